"""Try the model from the command line, with the chat template applied and the answer streamed.

    qlora-dvc generate "My order arrived broken"          # the fine-tuned model
    qlora-dvc generate --model both "My order ..."        # base, then tuned, labelled
    qlora-dvc generate -i                                 # multi-turn chat (/reset, /exit)
    echo "My order arrived broken" | qlora-dvc generate -  # the prompt from stdin

Run it from the project root (it reads params.yaml for model.base). `tuned` is models/merged when
the export stage has written it and it is newer than the adapter (one plain model: fastest),
otherwise the base model + models/adapter exactly as evaluate loads them.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADAPTER = Path("models/adapter")
MERGED = Path("models/merged")
MODELS = ("tuned", "base", "merged", "both")


class GenerateError(RuntimeError):
    pass


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-dvc generate",
        description="Answer a prompt with the fine-tuned model (chat template applied, streamed).")
    parser.add_argument("prompt", nargs="?", help="the user message; '-' reads it from stdin")
    parser.add_argument("--model", choices=MODELS, default="tuned",
                        help="tuned (default): models/merged if exported, else base + adapter; "
                             "base: the base model alone; merged: models/merged only; "
                             "both: base then tuned, one after the other")
    parser.add_argument("--system", help="a system message (default: the one the training data "
                        "used, if its first row has one; else the chat template's own; '' for none)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=256, metavar="N")
    parser.add_argument("--temperature", type=_temperature, default=0.0,
                        help="0 (default): greedy, as evaluate generates")
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="multi-turn chat; /reset clears the history, /exit or Ctrl-D quits")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt is None and not args.interactive:
        parser.error("give a prompt (or '-' to read it from stdin), or -i for a chat")
    if args.prompt is not None and not args.prompt.strip():
        parser.error("the prompt is empty")
    return args


@dataclass
class Loaded:
    label: str          # what the output is headed with
    model: Any
    tokenizer: Any
    stops: list[int]


def merged_is_current(merged_dir: Path = MERGED, adapter_dir: Path = ADAPTER) -> bool:
    """models/merged holds a model (not the export-disabled note) at least as new as the adapter."""
    config = merged_dir / "config.json"
    if not config.exists():
        return False
    adapter = adapter_dir / "adapter_model.safetensors"
    return not adapter.exists() or config.stat().st_mtime >= adapter.stat().st_mtime


def load_models(params, which: str) -> list[Loaded]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.chat import stop_ids
    from stages.lib.export import merge_dtype
    from stages.lib.modeling import load_model, load_tokenizer, resolve_base_model

    cuda = torch.cuda.is_available()
    device_map = {"": 0} if cuda else None
    use_merged = which == "merged" or (which in ("tuned", "both") and merged_is_current())
    if which == "merged" and not (MERGED / "config.json").exists():
        raise GenerateError(f"{MERGED}/config.json not found: run `dvc repro export` "
                            "(with export.enabled: true), or use --model tuned")
    if which in ("tuned", "both") and not use_merged and not (ADAPTER / "adapter_config.json").exists():
        raise GenerateError(f"no fine-tuned model: neither {MERGED}/ nor {ADAPTER}/ exists; run `dvc repro`")

    if which in ("tuned", "both") and not use_merged and (MERGED / "config.json").exists():
        print(f"{MERGED}/ is older than {ADAPTER}/: using base + adapter (`dvc repro export` "
              "refreshes it)", file=sys.stderr)
    loaded: list[Loaded] = []
    if use_merged:
        # Base and merged are then both unquantised, so "both" differs by the adapter alone.
        dtype = merge_dtype(cuda)
        tuned_tokenizer = AutoTokenizer.from_pretrained(str(MERGED))
        tuned = AutoModelForCausalLM.from_pretrained(str(MERGED), dtype=dtype, device_map=device_map).eval()
        if which == "both":
            resolved = resolve_base_model(params.model)
            base = load_model(resolved, quantize=False, compute_dtype=dtype, device_map=device_map).eval()
            tokenizer = load_tokenizer(resolved)
            loaded.append(Loaded(f"base ({resolved.label})", base, tokenizer, stop_ids(base, tokenizer)))
        loaded.append(Loaded(f"tuned ({MERGED})", tuned, tuned_tokenizer, stop_ids(tuned, tuned_tokenizer)))
        return loaded
    if which == "base":
        resolved = resolve_base_model(params.model)
        dtype = merge_dtype(cuda)
        base = load_model(resolved, quantize=False, compute_dtype=dtype, device_map=device_map).eval()
        tokenizer = load_tokenizer(resolved)
        return [Loaded(f"base ({resolved.label})", base, tokenizer, stop_ids(base, tokenizer))]

    # Base + adapter, loaded as evaluate loads it (train.quantization, train.compute_dtype).
    from stages.lib.generation import load_for_inference

    model, tokenizer = load_for_inference(params, ADAPTER)
    stops = stop_ids(model, tokenizer)
    if which == "both":
        # The same weights with the adapter switched off: no second copy of the base in memory.
        loaded.append(Loaded("base (adapter disabled)", _AdapterOff(model), tokenizer, stops))
    loaded.append(Loaded(f"tuned (base + {ADAPTER})", model, tokenizer, stops))
    return loaded


class _AdapterOff:
    """A PEFT model whose generate runs with the adapter disabled."""

    def __init__(self, peft_model):
        self.peft_model = peft_model
        self.device = peft_model.device
        self.config = peft_model.config

    def generate(self, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model.generate(**kwargs)


def fit_new_tokens(prompt_tokens: int, max_new_tokens: int, context: int | None) -> int:
    """Prompt + answer within the model's positions: a prompt that leaves no room is refused; a
    --max-new-tokens that does not fit next to the prompt is lowered, with a note."""
    if context is None:
        return max_new_tokens
    if prompt_tokens >= context:
        raise GenerateError(f"the prompt is {prompt_tokens:,} tokens and the model reads {context} positions in "
                            "all (prompt + answer): shorten it (in a chat, /reset drops the history)")
    if prompt_tokens + max_new_tokens > context:
        print(f"[--max-new-tokens lowered to {context - prompt_tokens}: the model reads {context} positions and "
              f"the prompt takes {prompt_tokens}]", file=sys.stderr)
        return context - prompt_tokens
    return max_new_tokens


def reply(loaded: Loaded, messages: list[dict], *, max_new_tokens: int, temperature: float) -> str:
    """Stream the assistant's answer to stdout; return it (special tokens dropped)."""
    import torch
    from transformers import TextStreamer

    from stages.lib.chat import prompt_ids
    from stages.lib.limits import context_length

    tokenizer = loaded.tokenizer
    # The prompt exactly as training preceded a reply with it (stages/lib/chat.py).
    ids = torch.tensor([prompt_ids(tokenizer, messages)], device=loaded.model.device)
    max_new_tokens = fit_new_tokens(ids.shape[1], max_new_tokens, context_length(loaded.model))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = ({"do_sample": True, "temperature": temperature} if temperature > 0
                else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=loaded.stops,
                                       pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _answer_all(models: list[Loaded], histories: dict[str, list[dict]], system: str | None, text: str,
                args) -> None:
    for loaded in models:
        if len(models) > 1:
            print(f"\n=== {loaded.label} ===", flush=True)
        history = histories[loaded.label]
        history.append({"role": "user", "content": text})
        prefix = [{"role": "system", "content": system}] if system else []
        answer = reply(loaded, prefix + history, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature)
        history.append({"role": "assistant", "content": answer})


def chat(models: list[Loaded], args, first: str | None) -> int:
    histories: dict[str, list[dict]] = {m.label: [] for m in models}
    print(f"chatting with {', '.join(m.label for m in models)}; /reset clears the history, "
          "/exit or Ctrl-D quits", file=sys.stderr)
    if first:
        _answer_all(models, histories, args.system, first, args)
    while True:
        try:
            text = input("\nyou> ").strip()
        except EOFError:
            print()
            return 0
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            histories = {m.label: [] for m in models}
            print("(history cleared)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text}; /reset or /exit", file=sys.stderr)
            continue
        _answer_all(models, histories, args.system, text, args)


def _quiet() -> None:
    """No progress bars or load-time warnings between the user and the answer."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


TRAIN_SPLIT = Path("data/split/train.jsonl")


def training_system_prompt(train_split: Path) -> str | None:
    """The system message the model was fine-tuned with (the first training row's), so that a
    plain `generate "..."` asks the tuned model the way it learned; None when there is none."""
    try:
        with open(train_split, encoding="utf-8") as handle:
            first = json.loads(handle.readline() or "{}")
    except (OSError, ValueError):
        return None
    messages = first.get("messages") or []
    if messages and messages[0].get("role") == "system":
        return messages[0].get("content")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from stages.lib.params import ParamsError, load_params

    try:
        params = load_params()
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.system is None:
        args.system = training_system_prompt(TRAIN_SPLIT)
        if args.system:
            print(f"[system prompt of the training data: {args.system!r}; --system overrides]", file=sys.stderr)
    prompt = sys.stdin.read().strip() if args.prompt == "-" else args.prompt
    if args.prompt == "-" and not prompt and not args.interactive:
        print("generate: nothing on stdin to answer", file=sys.stderr)
        return 1

    from stages.lib.modeling import ModelError

    _quiet()
    try:
        models = load_models(params, args.model)
    except (GenerateError, ModelError) as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 1
    try:
        if args.interactive:
            return chat(models, args, prompt)
        if len(models) == 1:
            print(f"[{models[0].label}]", file=sys.stderr)
        _answer_all(models, {m.label: [] for m in models}, args.system, prompt, args)
    except GenerateError as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0

