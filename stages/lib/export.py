"""Export the fine-tuned model: merge the LoRA adapter into the base weights, write a plain
transformers model (models/merged/) and, optionally, a GGUF file for llama.cpp / Ollama.

The merge is into the *unquantised* base (fp32 on CPU, bf16 on CUDA), not into the nf4 weights
the adapter was trained against. That is the standard practice (a merged nf4 model would have to
be re-quantised, losing the update in rounding), but it is not bit-identical to the nf4 base +
adapter that `evaluate` measured: the adapter partly learned to correct nf4 rounding that the
full-precision base does not have. The checks here compare the merged model with the unquantised
base + adapter, which is what the merge must reproduce exactly.

GGUF types written from Python with the `gguf` package alone (no llama.cpp build): f32, f16,
bf16 and q8_0. gguf-py 0.19 can also quantise q4_0/q4_1/q5_0/q5_1, but llama.cpp's own quantiser
picks per-tensor types for those (and k-quants, which gguf-py cannot write at all); use
`llama-quantize` on the f16 file for anything smaller than q8_0.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from stages.lib.chat import end_of_turn_ids, prompt_ids, stop_ids
from stages.lib.io import atomic_dir, write_text

# GGUF type name -> (GGMLQuantizationType name, LlamaFileType name) in the gguf package.
GGUF_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}
# Used when the test split has no rows to check on.
FALLBACK_CHECK_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
# A merge done in fp32 reproduces base + adapter to float rounding (measured ~1e-5 on SmolLM2);
# anything above this is a merge bug, not noise.
FP32_MAX_LOGIT_DIFF = 1e-3


class ExportError(RuntimeError):
    """The model cannot be exported as asked; the message says why and what to do."""


class GGUFCheckError(ExportError):
    """The GGUF was written but llama.cpp does not reproduce the merged model; carries the report."""

    def __init__(self, report: dict, message: str):
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------------------------
# Merge


def merge_dtype(cuda: bool):
    """fp32 on CPU (exact merge, and bf16 on CPU diverged in training: docs/design.md#cpu-compute-in-fp32); bf16 on CUDA."""
    import torch

    if cuda and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_adapter_tokenizer(adapter_dir: Path, resolved):
    """The tokenizer saved with the adapter (what training used), else the base model's."""
    from stages.lib.modeling import load_tokenizer

    if (adapter_dir / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
        if tokenizer.chat_template is not None:
            return tokenizer
    return load_tokenizer(resolved)


def _model_card(label: str, dtype: str, eos: list[int], tokenizer) -> str:
    names = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)} ({i})" for i in eos)
    return f"""# Merged fine-tuned model

The LoRA adapter in `models/adapter/` merged into the base model `{label}`, saved as plain
transformers safetensors ({dtype}) with its tokenizer and chat template. It loads without PEFT:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("models/merged")
model = AutoModelForCausalLM.from_pretrained("models/merged")
```

`generation_config.json` stops generation at: {names}.

Written by the `export` stage (`dvc repro export`). The merge is into the full-precision base,
not the nf4-quantised base the adapter was trained against: the standard practice, close to but
not bit-identical with what `evaluate` measured (see reports/export.json).
"""


def _prompt_tensor(tokenizer, messages):
    """The prompt as training preceded a reply with it (stages/lib/chat.py), as a [1, T] tensor."""
    import torch

    return torch.tensor([prompt_ids(tokenizer, messages)])


def _greedy(model, tokenizer, messages, *, max_new_tokens: int, stops: list[int]) -> list[int]:
    import torch

    ids = _prompt_tensor(tokenizer, messages).to(model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                             top_p=None, top_k=None, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def _prompt_logits(model, tokenizer, messages):
    import torch

    ids = _prompt_tensor(tokenizer, messages)
    with torch.inference_mode():
        return model(input_ids=ids.to(model.device)).logits[0].float().cpu()


def _prefix_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def merge_adapter(resolved, adapter_dir: Path, merged_dir: Path, *, checks: list[list[dict]],
                  max_new_tokens: int) -> dict:
    """Merge `adapter_dir` into the unquantised base; write `merged_dir`; return the check report.

    The check: for each conversation in `checks`, the prompt logits and the greedy tokens of the
    merged model reloaded from disk (plain transformers, as a user loads it) against the
    unquantised base + adapter (PEFT).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stages.lib.modeling import load_model

    if not (adapter_dir / "adapter_config.json").exists():
        raise ExportError(f"{adapter_dir}/adapter_config.json not found: run the train stage first")
    cuda = torch.cuda.is_available()
    dtype = merge_dtype(cuda)
    device_map = {"": 0} if cuda else None
    tokenizer = load_adapter_tokenizer(adapter_dir, resolved)
    base = load_model(resolved, quantize=False, compute_dtype=dtype, device_map=device_map)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    stops = stop_ids(base, tokenizer)

    reference = [(_prompt_logits(peft_model, tokenizer, c),
                  _greedy(peft_model, tokenizer, c, max_new_tokens=max_new_tokens, stops=stops))
                 for c in checks]

    merged = peft_model.merge_and_unload()
    from stages.lib.numeric import NonFiniteError, check_model_finite

    try:
        check_model_finite(merged, "the merged model")
    except NonFiniteError as exc:
        raise ExportError(f"{exc}: nothing was written; the adapter or the base holds NaN/infinity "
                          "(re-run train with a lower train.learning_rate)") from None
    # The generation config is what transformers, vLLM and TGI read to know when to stop.
    merged.generation_config.eos_token_id = stops
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.config.eos_token_id = stops[0] if len(stops) == 1 else stops
    dtype_name = str(dtype).removeprefix("torch.")
    with atomic_dir(merged_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # save_pretrained leaves some files 0600: atomic_dir gives every file the umask's mode.
        write_text(tmp / "README.md", _model_card(resolved.label, dtype_name, stops, tokenizer))
    del merged, peft_model, base

    reloaded = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=dtype,
                                                    device_map=device_map).eval()
    rows, max_diff = [], 0.0
    for conversation, (ref_logits, ref_tokens) in zip(checks, reference):
        logits = _prompt_logits(reloaded, tokenizer, conversation)
        diff = float((logits - ref_logits).abs().max())
        if not (math.isfinite(diff) and bool(torch.isfinite(logits).all())):
            raise ExportError("the merged model's logits are not finite (NaN or infinity): the export is "
                              f"unusable; {merged_dir} was left for inspection")
        tokens = _greedy(reloaded, tokenizer, conversation, max_new_tokens=max_new_tokens, stops=stops)
        max_diff = max(max_diff, diff)
        rows.append({"max_abs_logit_diff": diff, "tokens_equal": tokens == ref_tokens,
                     "agreeing_prefix": _prefix_agreement(tokens, ref_tokens),
                     "n_tokens": len(ref_tokens), "stopped_at_end_of_turn": bool(tokens) and tokens[-1] in stops,
                     "answer": tokenizer.decode(tokens, skip_special_tokens=True).strip()})
    if dtype == torch.float32 and max_diff > FP32_MAX_LOGIT_DIFF:
        raise ExportError(f"the merged model's logits differ from base + adapter by {max_diff:.2e} "
                          f"(> {FP32_MAX_LOGIT_DIFF:g} in fp32): the merge is wrong")
    return {
        "dtype": dtype_name,
        "eos_token_id": stops,
        "eos_tokens": tokenizer.convert_ids_to_tokens(stops),
        "check": {"compared_with": "unquantised base + adapter (PEFT)",
                  "prompts": len(rows), "max_new_tokens": max_new_tokens,
                  "max_abs_logit_diff": max_diff,
                  "greedy_tokens_equal": all(r["tokens_equal"] for r in rows), "rows": rows},
    }


# --------------------------------------------------------------------------------------------
# GGUF


def permute_qk(weights, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py), exactly: HF stores each head's
    rotary dimensions as two halves, llama.cpp's rope kernel wants them interleaved in pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def builtin_tokenizer_pre(label: str) -> str | None:
    """The `tokenizer.ggml.pre` of the GGUF the offline default was materialised from."""
    from stages.lib.modeling import BUILTIN_MODELS, find_builtin_gguf

    if label not in BUILTIN_MODELS:
        return None
    path = str(find_builtin_gguf(BUILTIN_MODELS[label]))
    try:  # transformers' metadata reader skips the big token arrays: 0.05 s instead of 6 s
        from transformers.integrations.gguf.reader import read_gguf_metadata

        return read_gguf_metadata(path, ())[0].get("tokenizer.ggml.pre")
    except ImportError:
        import gguf

        field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
        return field.contents() if field is not None else None


def _check_llama(config) -> None:
    problems = []
    if config.model_type != "llama":
        problems.append(f"architecture {config.model_type!r} (only Llama-architecture models are supported)")
    # transformers 5 keeps rope settings in rope_parameters (rope_scaling is an alias of it).
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope scaling {rope_type!r} (only plain RoPE is supported)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention/MLP biases")
    if problems:
        raise ExportError("GGUF export: the built-in writer does not support " + "; ".join(problems) +
                          ". `make setup` installs llama.cpp's own converter, which export then uses "
                          "for every architecture llama.cpp knows; or set export.gguf: null")


def _vocab(tokenizer, vocab_size: int):
    """Tokens and token types as llama.cpp's convert_hf_to_gguf.py get_vocab_base writes them."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif reverse[i] in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_gguf(model_dir: Path, out_path: Path, gguf_type: str, *, tokenizer_pre: str | None,
               name: str) -> dict:
    """Write the transformers model in `model_dir` (a Llama) as one GGUF file of `gguf_type`."""
    import gguf
    import numpy as np
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"export.gguf: {gguf_type!r} is not supported; use one of {sorted(GGUF_TYPES)}")
    config = AutoConfig.from_pretrained(str(model_dir))
    _check_llama(config)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    qtype = gguf.GGMLQuantizationType[GGUF_TYPES[gguf_type][0]]
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or {}
    eos = end_of_turn_ids(tokenizer)

    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[GGUF_TYPES[gguf_type][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_head != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)

    tokens, types = _vocab(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")  # byte-level BPE; SentencePiece vocabularies are refused below
    # llama.cpp chooses its pre-tokeniser regex from this name; "default" is its GPT-2 regex.
    writer.add_tokenizer_pre(tokenizer_pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = gguf.SpecialVocab(model_dir, load_merges=True, special_token_types=()).merges
    if not merges:
        raise ExportError("GGUF export: the tokenizer has no BPE merges (a SentencePiece vocabulary?); "
                          "convert models/merged with llama.cpp's convert_hf_to_gguf.py instead")
    writer.add_token_merges(merges)
    for setter, value in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if value is not None:
            setter(value)
    turn_end = [i for i in eos if i != tokenizer.eos_token_id]
    if turn_end:
        writer.add_eot_token_id(turn_end[0])
    # Whether the tokenizer itself adds bos/eos, measured rather than read from a config key.
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    writer.add_add_bos_token(tokenizer_adds_bos(tokenizer))
    writer.add_add_eos_token(len(full) > len(plain) and full[-1] == tokenizer.eos_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    counts: dict[str, int] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # llama.cpp reuses token_embd when there is no output tensor
                new_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new_name is None:
                    raise ExportError(f"GGUF export: no llama.cpp name for tensor {key!r}")
                data = handle.get_tensor(key).float().numpy()
                if key.endswith("q_proj.weight"):
                    data = permute_qk(data, n_head, n_head)
                elif key.endswith("k_proj.weight"):
                    data = permute_qk(data, n_head, n_kv)
                # As llama.cpp: norms and other 1-D tensors stay f32; a row that is not a whole
                # number of q8_0 blocks (32 values) falls back to f16.
                tensor_type = qtype
                if data.ndim <= 1 or new_name.endswith("_norm.weight"):
                    tensor_type = gguf.GGMLQuantizationType.F32
                try:
                    data = gguf.quants.quantize(data, tensor_type)
                except gguf.quants.QuantError:
                    tensor_type = gguf.GGMLQuantizationType.F16
                    data = gguf.quants.quantize(data, tensor_type)
                writer.add_tensor(new_name, np.ascontiguousarray(data), raw_dtype=tensor_type)
                counts[tensor_type.name] = counts.get(tensor_type.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"type": gguf_type, "tensor_types": counts, "tokenizer_pre": tokenizer_pre or "default",
            "eos_token_id": tokenizer.eos_token_id, "eot_token_id": turn_end[0] if turn_end else None}


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt a ChatML template inserts when none is given (SmolLM2 has one)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    start = "<|im_start|>system\n"
    if text.startswith(start) and "<|im_end|>" in text:
        return text[len(start):text.index("<|im_end|>")]
    return None


# ---- The Ollama Modelfile ----------------------------------------------------------------------
#
# Ollama does not run the Jinja chat template: its TEMPLATE is a Go text/template over the chat's
# messages, and without one Ollama guesses a template from the GGUF's. The TEMPLATE written here
# is built from the model's own chat template: the chat format is recognised by its control
# tokens, and the text around each turn is read off `render_prompt` (the prompt exactly as
# training, evaluation and generation see it) on probe chats, so what the template adds on its
# own is copied as it writes it: a default system prompt, Llama 3.1's date header, Command R7B's
# preamble, GPT-OSS's system message, Qwen3's and GLM's empty think block, R7B's
# <|START_RESPONSE|>, GPT-OSS's final channel. The pieces are then checked to rebuild
# `render_prompt` exactly on chats of one, two and three user turns, with and without a system
# prompt; a chat template of no format known here, or one the pieces do not rebuild, gets no
# TEMPLATE and a warning. A template that writes today's date (GPT-OSS, Mistral Small 3.x) gets
# the export date. tests/test_export.py renders every emitted TEMPLATE with a Go-template
# evaluator and compares it with `render_prompt` for every chat-template family.
#
# BOS: llama.cpp and Ollama put the BOS token in front of every prompt when the GGUF's
# tokenizer.ggml.add_bos_token says so, even a prompt whose text starts with it (they log a
# warning and the prompt has two). So the TEMPLATE leaves out the BOS text that `render_prompt`
# starts with when the GGUF adds BOS, and writes it when the GGUF does not (Ollama parses it as the
# special token). A GGUF that adds BOS to a model whose prompts have none gets a warning.

# Probe contents: letters only, so no template trims, escapes or splits them.
_SYS, _ONE, _REPLY1, _TWO, _REPLY2, _THREE = (f"QZX{name}QZX" for name in
                                              ("SYSTEM", "USERONE", "REPLYONE", "USERTWO", "REPLYTWO", "USERTHREE"))
_CHATML_TURN = "<|im_start|>{role}\n{content}<|im_end|>\n"

# The chat formats, most specific first: name, the markers that must all be in the chat template,
# the text that opens a user turn ("roles": ChatML, one loop over every role), the text that opens
# an assistant turn (None: none, the reply follows the user turn's close), and the stop string for
# a made-up next turn.
OLLAMA_FORMATS = (
    ("phi4", ("<|im_sep|>",), "<|im_start|>user", "<|im_start|>assistant", "<|im_start|>"),
    ("gpt-oss", ("<|channel|>",), "<|start|>user", "<|start|>assistant", "<|start|>"),
    ("command-r", ("<|CHATBOT_TOKEN|>",), "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>",
     "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", "<|START_OF_TURN_TOKEN|>"),
    ("glm4", ("[gMASK]",), "<|user|>", "<|assistant|>", "<|user|>"),
    ("deepseek", ("<\uff5cAssistant\uff5c>",), "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>", "<\uff5cUser\uff5c>"),
    ("llama3", ("<|start_header_id|>",), "<|start_header_id|>user", "<|start_header_id|>assistant",
     "<|start_header_id|>"),
    ("mistral-system-prompt", ("[SYSTEM_PROMPT]", "[INST]"), "[INST]", None, "[INST]"),
    ("mistral", ("[INST]",), "[INST]", None, "[INST]"),
    ("gemma", ("<start_of_turn>",), "<start_of_turn>user", "<start_of_turn>model", "<start_of_turn>"),
    ("phi3", ("<|assistant|>", "<|end|>"), "<|user|>", "<|assistant|>", "<|user|>"),
    ("lfm2", ("<|im_start|>", "<|tool_list_start|>"), "roles", None, "<|im_start|>"),
    ("chatml", ("<|im_start|>",), "roles", None, "<|im_start|>"),
)


def ollama_chat_format(tokenizer) -> tuple | None:
    """The entry of OLLAMA_FORMATS the tokenizer's chat template belongs to, or None."""
    template = tokenizer.chat_template or ""
    return next((f for f in OLLAMA_FORMATS if all(marker in template for marker in f[1])), None)


def _probe_chats() -> list[list[dict]]:
    turns = [{"role": "user", "content": _ONE}, {"role": "assistant", "content": _REPLY1},
             {"role": "user", "content": _TWO}, {"role": "assistant", "content": _REPLY2},
             {"role": "user", "content": _THREE}]
    system = [{"role": "system", "content": _SYS}]
    return [chat for n in (1, 3, 5) for chat in (turns[:n], system + turns[:n])]


def _template_pieces(tokenizer, user_mark: str, assistant_mark: str | None) -> dict:
    """The text around each turn, read off two renderings (a ValueError when a piece is not
    where the format puts it). mode: where a system prompt goes: "head" (a block before the first
    turn), "first_user" or "last_user" (folded into that turn, as Gemma and Mistral v0.3 do)."""
    from stages.lib.chat import render_prompt

    def user(text):
        return {"role": "user", "content": text}

    if user_mark == "roles":  # ChatML: every message as <|im_start|>role ... <|im_end|>
        text = render_prompt(tokenizer, [user(_ONE)])
        end = text.index(_ONE) + len(_ONE) + len("<|im_end|>\n")
        prefix = text[:text.index("<|im_start|>")]
        if prefix not in ("", tokenizer.bos_token):
            raise ValueError("the prompt starts with something other than BOS")
        return {"mode": "roles", "prefix": prefix, "opener": text[end:]}
    chat = [user(_ONE), {"role": "assistant", "content": _REPLY1}, user(_TWO)]
    plain = render_prompt(tokenizer, chat)
    one, reply, two = plain.index(_ONE), plain.index(_REPLY1), plain.index(_TWO)
    start = plain.rindex(user_mark, 0, one)
    user_open, between, after = plain[start:one], plain[one + len(_ONE):reply], plain[reply + len(_REPLY1):two]
    cut = between.index(assistant_mark) if assistant_mark else len(between)
    pieces = {"head": plain[:start], "user_open": user_open, "user_close": between[:cut],
              "assistant_open": between[cut:], "assistant_close": after[:len(after) - len(user_open)],
              "opener": plain[two + len(_TWO) + cut:], "sys_pre": "", "sys_post": "", "fold_pre": "",
              "fold_post": ""}
    text = render_prompt(tokenizer, [{"role": "system", "content": _SYS}, *chat])
    at, one, two = text.index(_SYS), text.index(_ONE), text.index(_TWO)
    first, last = text.rindex(user_mark, 0, one), text.rindex(user_mark, 0, two)
    if at < first:
        pieces["mode"] = "head"
        pieces["sys_pre"], _, pieces["sys_post"] = text[:first].partition(_SYS)
    elif at < one:
        pieces["mode"] = "first_user"
        pieces["fold_pre"], _, pieces["fold_post"] = text[first + len(user_open):one].partition(_SYS)
    elif last < at < two:
        pieces["mode"] = "last_user"
        pieces["fold_pre"], _, pieces["fold_post"] = text[last + len(user_open):two].partition(_SYS)
    else:
        raise ValueError("the system prompt is not before a user turn")
    bos = tokenizer.bos_token or ""
    heads = [pieces["head"], *([pieces["sys_pre"]] if pieces["mode"] == "head" else [])]
    pieces["prefix"] = bos if bos and all(h.startswith(bos) for h in heads) else ""
    pieces["head"] = pieces["head"][len(pieces["prefix"]):]
    if pieces["mode"] == "head":
        pieces["sys_pre"] = pieces["sys_pre"][len(pieces["prefix"]):]
    return pieces


def _rebuild(pieces: dict, messages: list[dict], default_system: str | None) -> str:
    """What the TEMPLATE of `_go_template` renders for `messages` as Ollama hands them over (the
    SYSTEM line's prompt in front of a chat without one; every system prompt, joined, in
    $.System), with the BOS text: its Python mirror, to check the pieces before writing them."""
    if default_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    mode, out = pieces["mode"], pieces["prefix"]
    if mode == "roles":
        return out + "".join(_CHATML_TURN.format(**m) for m in messages) + pieces["opener"]
    out += pieces["sys_pre"] + system + pieces["sys_post"] if system and mode == "head" else pieces["head"]
    first = True
    for i, m in enumerate(messages):
        if m["role"] == "user":
            fold = system and ((mode == "first_user" and first) or (mode == "last_user" and i == len(messages) - 1))
            out += (pieces["user_open"] + (pieces["fold_pre"] + system + pieces["fold_post"] if fold else "")
                    + m["content"] + pieces["user_close"])
            first = False
        elif m["role"] == "assistant":
            out += pieces["assistant_open"] + m["content"] + pieces["assistant_close"]
    return out + pieces["opener"]


def _go_template(pieces: dict, prefix: str) -> str:
    """The Go text/template (Ollama's TEMPLATE) that renders the pieces; `prefix` is the BOS text
    or nothing. Literal text is never followed by a trimming "{{-", which would eat its newlines."""
    mode, p = pieces["mode"], pieces
    if mode == "roles":
        return (prefix + "{{ range .Messages }}" + _CHATML_TURN.format(role="{{ .Role }}", content="{{ .Content }}")
                + "{{ end }}" + p["opener"])
    if mode == "head":
        head = (f'{prefix}{{{{ if $.System }}}}{p["sys_pre"]}{{{{ $.System }}}}{p["sys_post"]}'
                f'{{{{ else }}}}{p["head"]}{{{{ end }}}}\n{{{{- range $i, $_ := .Messages }}}}\n')
        fold = ""
    elif mode == "first_user":
        head = f"{prefix}{p['head']}{{{{ $first := true }}}}\n{{{{- range $i, $_ := .Messages }}}}\n"
        fold = (f'{{{{ if $first }}}}{{{{ if $.System }}}}{p["fold_pre"]}{{{{ $.System }}}}{p["fold_post"]}'
                f'{{{{ end }}}}{{{{ $first = false }}}}{{{{ end }}}}')
    else:  # last_user: the last message, the user turn the reply answers
        head = f"{prefix}{p['head']}{{{{ range $i, $_ := .Messages }}}}\n"
        fold = (f'{{{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}}}{p["fold_pre"]}{{{{ $.System }}}}'
                f'{p["fold_post"]}{{{{ end }}}}')
    return (head + f'{{{{- if eq .Role "user" }}}}{p["user_open"]}{fold}{{{{ .Content }}}}{p["user_close"]}'
            f'{{{{ else if eq .Role "assistant" }}}}{p["assistant_open"]}{{{{ .Content }}}}{p["assistant_close"]}'
            f'{{{{ end }}}}\n{{{{- end }}}}{p["opener"]}')


def ollama_template(tokenizer, *, add_bos: bool) -> dict:
    """The Modelfile's chat part for this tokenizer: format (name or None), template (the Go
    template, or None where none is written), system (the SYSTEM line's default prompt or None),
    stops (stop strings) and warnings. add_bos: whether the GGUF makes llama.cpp/Ollama put
    BOS in front of every prompt."""
    from stages.lib.chat import render_prompt

    stops = tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer))
    result = {"format": None, "template": None, "system": None, "stops": stops, "warnings": []}
    fmt = ollama_chat_format(tokenizer)
    if fmt is None:
        result["warnings"].append("no Ollama TEMPLATE written: the chat template is of no format known to "
                                  "stages/lib/export.py (OLLAMA_FORMATS); Ollama guesses one from the GGUF's")
        return result
    name, _, user_mark, assistant_mark, next_turn = fmt
    system = default_system_prompt(tokenizer) if user_mark == "roles" else None
    try:
        pieces = _template_pieces(tokenizer, user_mark, assistant_mark)
        wrong = [chat for chat in _probe_chats() if _rebuild(pieces, chat, system) != render_prompt(tokenizer, chat)]
    except ValueError as exc:
        wrong, pieces = [str(exc)], {}
    literal = [v for v in pieces.values() if "{{" in v or '"""' in v]
    if wrong or literal:
        result["warnings"].append(f"no Ollama TEMPLATE written: the {name} chat format's pieces do not rebuild this "
                                  "chat template's prompts exactly (or hold {{ or \"\"\"); Ollama guesses one from "
                                  "the GGUF's")
        return result
    bos = tokenizer.bos_token
    if add_bos and not pieces["prefix"] and bos:
        result["warnings"].append(f"the GGUF makes llama.cpp and Ollama put {bos} in front of every prompt "
                                  "(tokenizer.ggml.add_bos_token), which the training prompts do not start with")
    result.update(format=name, template=_go_template(pieces, "" if add_bos else pieces["prefix"]), system=system,
                  stops=[*stops, next_turn])
    return result


def build_modelfile(gguf_name: str, tokenizer, *, add_bos: bool = False) -> tuple[str, dict]:
    """An Ollama Modelfile (the GGUF, the chat template, the stop tokens) and what to report of it."""
    chat = ollama_template(tokenizer, add_bos=add_bos)
    lines = ["# Ollama: ollama create my-model -f Modelfile && ollama run my-model",
             f"FROM ./{gguf_name}"]
    if chat["template"]:
        bos = ("BOS: Ollama adds it, as the GGUF's add_bos_token says" if add_bos
               else "BOS, where the prompt has one, in the template: the GGUF does not add it")
        lines.append(f"# {chat['format']} chat format: the prompt exactly as in training ({bos}).")
        lines.append(f'TEMPLATE """{chat["template"]}"""')
        if chat["system"]:
            # The template adds this system prompt when none is given; so does the fine-tuning data.
            lines.append(f'SYSTEM """{chat["system"]}"""')
    else:
        lines.append("# No TEMPLATE: Ollama takes the chat template from the GGUF metadata.")
    for stop in dict.fromkeys(chat["stops"]):
        lines.append(f'PARAMETER stop "{stop}"')
    lines.append("PARAMETER temperature 0")
    report = {"chat_format": chat["format"], "template": bool(chat["template"]), "add_bos": add_bos}
    if chat["warnings"]:
        report["warnings"] = chat["warnings"]
    return "\n".join(lines) + "\n", report


def modelfile_text(gguf_name: str, tokenizer, *, add_bos: bool = False) -> str:
    """An Ollama Modelfile: the GGUF, the chat template and the stop tokens."""
    return build_modelfile(gguf_name, tokenizer, add_bos=add_bos)[0]


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself puts bos in front of a text, measured rather than read from a
    config key."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    return len(full) > len(plain) and full[0] == tokenizer.bos_token_id


def gguf_adds_bos(path: Path) -> bool | None:
    """The GGUF's tokenizer.ggml.add_bos_token, or None where the file does not say."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.parts[field.data[0]][0])


def _tensor_types(path: Path) -> dict:
    """How many tensors of each GGML type the file holds."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def export_gguf(merged_dir: Path, gguf_dir: Path, gguf_type: str, *, label: str) -> dict:
    """Write gguf_dir/model-<type>.gguf and gguf_dir/Modelfile (atomically, as one folder).

    With llama.cpp's converter installed (`make setup` does: stages/lib/gguf_convert.py) it writes
    the file, for any architecture it knows; without it, the built-in writer here handles
    Llama-architecture models only."""
    from transformers import AutoTokenizer

    from stages.lib import gguf_convert

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    file_name = f"model-{gguf_type}.gguf"
    converter = gguf_convert.find_converter()
    with atomic_dir(gguf_dir) as tmp:
        if converter is not None:
            try:
                gguf_convert.convert(merged_dir, tmp / file_name, gguf_type, converter)
            except RuntimeError as exc:
                raise ExportError(f"GGUF export: {exc}") from None
            info = {"type": gguf_type, "writer": f"llama.cpp convert_hf_to_gguf.py ({converter})",
                    "tensor_types": _tensor_types(tmp / file_name)}
        else:
            info = write_gguf(merged_dir, tmp / file_name, gguf_type, tokenizer_pre=builtin_tokenizer_pre(label),
                              name=f"{label}-merged")
            info["writer"] = "built-in (Llama architecture only; llama.cpp's converter is not installed)"
        # Whether llama.cpp and Ollama put BOS in front of each prompt: as the file says (or,
        # where it does not say, as the tokenizer does).
        add_bos = gguf_adds_bos(tmp / file_name)
        if add_bos is None:
            add_bos = tokenizer_adds_bos(tokenizer)
        text, info["modelfile"] = build_modelfile(file_name, tokenizer, add_bos=add_bos)
        write_text(tmp / "Modelfile", text)
    for warning in info["modelfile"].get("warnings", []):
        print(f"export: warning: {gguf_dir}/Modelfile: {warning}", file=sys.stderr)
    info["file"] = str(gguf_dir / file_name)
    return info


def compare_greedy(reference, other, tokenizer, conversation, *, max_new_tokens: int,
                   stops: list[int]) -> dict:
    """How closely `other` follows `reference` on one prompt.

    Free-running greedy tokens diverge for good at the first near-tie a quantisation flips, so
    the rows also give teacher-forced agreement: `other`'s top-1 at each position of the
    reference's own continuation. That, and the logits over prompt + continuation, measure the
    quantisation error without the cascade.
    """
    import torch

    want = _greedy(reference, tokenizer, conversation, max_new_tokens=max_new_tokens, stops=stops)
    got = _greedy(other, tokenizer, conversation, max_new_tokens=max_new_tokens, stops=stops)
    prompt = _prompt_tensor(tokenizer, conversation)
    ids = torch.cat([prompt, torch.tensor([want], dtype=prompt.dtype)], dim=1)
    with torch.inference_mode():
        a = reference(input_ids=ids.to(reference.device)).logits[0].float().cpu()
        b = other(input_ids=ids.to(other.device)).logits[0].float().cpu()
    n = prompt.shape[1]
    # Position n-1 predicts the first new token; the last position predicts past the answer.
    forced = b[n - 1:-1].argmax(-1).tolist() if want else []
    agree = sum(x == y for x, y in zip(forced, want))
    return {"tokens_equal": got == want, "agreeing_prefix": _prefix_agreement(got, want),
            "n_tokens": len(want), "teacher_forced_agreement": agree / len(want) if want else 1.0,
            "max_abs_logit_diff": float((a - b).abs().max())}


def check_gguf(merged_dir: Path, gguf_path: Path, checks: list[list[dict]], *, max_new_tokens: int) -> dict:
    """Reload the GGUF with transformers' GGUF loader (which un-permutes Q/K) and compare it
    with the merged model: tokenizer ids, greedy tokens, teacher-forced top-1, logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    stops = stop_ids(merged, tokenizer)
    rows = []
    for conversation in checks:
        row = compare_greedy(merged, from_gguf, tokenizer, conversation, max_new_tokens=max_new_tokens,
                             stops=stops)
        ids = [prompt_ids(t, conversation) for t in (tokenizer, gguf_tokenizer)]
        row["tokenizer_equal"] = list(ids[0]) == list(ids[1])
        rows.append(row)
    return {"compared_with": "merged model (fp32); GGUF reloaded with transformers' GGUF loader",
            "greedy_tokens_equal": all(r["tokens_equal"] for r in rows),
            "tokenizer_equal": all(r["tokenizer_equal"] for r in rows),
            "teacher_forced_agreement": min((r["teacher_forced_agreement"] for r in rows), default=1.0),
            "max_abs_logit_diff": max((r["max_abs_logit_diff"] for r in rows), default=0.0), "rows": rows}


# The llama.cpp check: what each GGUF type must reproduce of the merged model (fp32, transformers).
# f32 and f16 GGUFs: the same greedy tokens. bf16 and q8_0 round weights to 8 significant bits or
# so, which flips near-ties, after which free-running text diverges for good: they must agree on
# at least this share of next tokens along the merged model's own answer (teacher forced).
EXACT_GGUF_TYPES = ("f32", "f16")
MIN_TEACHER_FORCED_AGREEMENT = 0.9


def llama_cpp_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def check_gguf_llama_cpp(merged_dir: Path, gguf_path: Path, checks: list[list[dict]], *,
                         max_new_tokens: int, gguf_type: str) -> dict:
    """Load the GGUF in llama.cpp's own runtime (llama-cpp-python) and compare it with the merged
    model in transformers on each check prompt: llama.cpp's tokens for the prompt text (the
    GGUF's tokenizer) against transformers', greedy tokens, teacher-forced top-1 along the merged
    model's answer, and the logits over prompt + answer."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.chat import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    stops = stop_ids(merged, tokenizer)
    prompts = [prompt_ids(tokenizer, c) for c in checks]
    context = max(len(p) for p in prompts) + max_new_tokens + 8
    llm = Llama(model_path=str(gguf_path), n_ctx=context, n_batch=context, n_threads=2, seed=0,
                logits_all=True, verbose=False)
    rows = []
    for conversation, ids in zip(checks, prompts):
        text = render_prompt(tokenizer, conversation)
        cpp_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        want = _greedy(merged, tokenizer, conversation, max_new_tokens=max_new_tokens, stops=stops)
        # Greedy in llama.cpp, one token at a time from the same prompt ids.
        llm.reset()
        llm.eval(ids)
        got = []
        while len(got) < max_new_tokens:
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            got.append(token)
            if token in stops:
                break
            llm.eval([token])
        # Teacher forced: llama.cpp's logits over prompt + the merged model's answer.
        llm.reset()
        llm.eval(ids + want)
        cpp_logits = np.asarray(llm.scores[: llm.n_tokens], dtype=np.float32)
        with torch.inference_mode():
            hf_logits = merged(input_ids=torch.tensor([ids + want])).logits[0].float().numpy()
        n = len(ids)
        forced = cpp_logits[n - 1:-1].argmax(-1).tolist() if want else []
        agree = sum(x == y for x, y in zip(forced, want))
        rows.append({"tokenizer_equal": list(cpp_ids) == list(ids), "tokens_equal": got == want,
                     "tokens": got,
                     "agreeing_prefix": _prefix_agreement(got, want), "n_tokens": len(want),
                     "teacher_forced_agreement": agree / len(want) if want else 1.0,
                     "max_abs_logit_diff": float(np.abs(cpp_logits - hf_logits).max()),
                     "answer": tokenizer.decode(got, skip_special_tokens=True).strip()})
    embedded_template = llm.metadata.get("tokenizer.chat_template")
    del llm
    report = {"runtime": f"llama.cpp (llama-cpp-python {llama_cpp_version()})",
              "chat_template_equal": embedded_template == tokenizer.chat_template,
              "compared_with": "merged model in transformers (fp32), greedy, same prompt ids",
              "greedy_tokens_equal": all(r["tokens_equal"] for r in rows),
              "tokenizer_equal": all(r["tokenizer_equal"] for r in rows),
              "teacher_forced_agreement": min((r["teacher_forced_agreement"] for r in rows), default=1.0),
              "max_abs_logit_diff": max((r["max_abs_logit_diff"] for r in rows), default=0.0), "rows": rows}
    if gguf_type in EXACT_GGUF_TYPES:
        report["requirement"] = f"{gguf_type}: tokenizer, chat template and greedy tokens equal"
        report["ok"] = report["tokenizer_equal"] and report["greedy_tokens_equal"] and report["chat_template_equal"]
    else:
        report["requirement"] = (f"{gguf_type}: tokenizer and chat template equal, teacher-forced agreement >= "
                                 f"{MIN_TEACHER_FORCED_AGREEMENT}")
        report["ok"] = (report["tokenizer_equal"] and report["chat_template_equal"]
                        and report["teacher_forced_agreement"] >= MIN_TEACHER_FORCED_AGREEMENT)
    return report


# --------------------------------------------------------------------------------------------
# The stage


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


DISABLED_TEXT = """# {what}: export disabled

`export.enabled` is false in params.yaml, so the `export` stage wrote this note instead of {what}
(DVC needs its outputs to exist). Set `export.enabled: true` and run `dvc repro export`.
"""
NO_GGUF_TEXT = """# No GGUF file

`export.gguf` is null in params.yaml. Set it to one of f32, f16, bf16, q8_0 and run
`dvc repro export` to get models/gguf/model-<type>.gguf and an Ollama Modelfile here.
"""


def write_disabled(merged_dir: Path, gguf_dir: Path) -> dict:
    for folder, what in ((merged_dir, "models/merged"), (gguf_dir, "models/gguf")):
        with atomic_dir(folder) as tmp:
            write_text(tmp / "README.md", DISABLED_TEXT.format(what=what))
    return {"enabled": False}


def run_export(params, *, adapter_dir: Path, merged_dir: Path, gguf_dir: Path,
               checks: list[list[dict]]) -> dict:
    """The whole stage: merge, write models/merged, optionally the GGUF; return the report."""
    from stages.lib.modeling import resolve_base_model

    settings = params.export
    if not settings.enabled:
        return write_disabled(merged_dir, gguf_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ExportError(f"{adapter_dir}/adapter_config.json not found: run the train stage first")
    checks = checks[: settings.check_prompts] or [FALLBACK_CHECK_PROMPT]
    from stages.lib.adapter import check_adapter
    from stages.lib.modeling import base_identity, check_model_files

    check_model_files(params.model)
    resolved = resolve_base_model(params.model)
    # A readable adapter of finite weights, trained on this very base: PEFT would merge an adapter
    # of another base of the same shapes without a word.
    check_adapter(adapter_dir, base_identity(resolved))
    print(f"export: merging {adapter_dir} into {resolved.label}", file=sys.stderr)
    report = {"enabled": True, "base": resolved.label,
              "merged": {"path": str(merged_dir)},
              "note": "merged into the unquantised base; the adapter was trained on the nf4 base, "
                      "so the merged model is close to, not bit-identical with, what evaluate measured"}
    report["merged"].update(merge_adapter(resolved, adapter_dir, merged_dir, checks=checks,
                                          max_new_tokens=settings.check_max_new_tokens))
    report["merged"]["bytes"] = _size(merged_dir)
    if settings.gguf is None:
        with atomic_dir(gguf_dir) as tmp:
            write_text(tmp / "README.md", NO_GGUF_TEXT)
        report["gguf"] = None
        return report
    print(f"export: writing {gguf_dir}/model-{settings.gguf}.gguf", file=sys.stderr)
    info = export_gguf(merged_dir, gguf_dir, settings.gguf, label=resolved.label)
    info["bytes"] = _size(Path(info["file"]))
    if llama_cpp_version() is not None:
        info["check"] = check_gguf_llama_cpp(merged_dir, Path(info["file"]), checks, gguf_type=settings.gguf,
                                             max_new_tokens=settings.check_max_new_tokens)
    else:  # without llama.cpp's runtime: transformers' GGUF loader (Llama architecture only)
        info["check"] = check_gguf(merged_dir, Path(info["file"]), checks,
                                   max_new_tokens=settings.check_max_new_tokens)
    report["gguf"] = info
    check = info["check"]
    if check.get("ok") is False:
        # The report is still written (the stage script writes it on this error too) so the
        # figures can be read.
        raise GGUFCheckError(report, f"the GGUF does not reproduce the merged model in llama.cpp "
                             f"({check['requirement']}): tokenizer equal {check['tokenizer_equal']}, greedy "
                             f"tokens equal {check['greedy_tokens_equal']}, teacher-forced agreement "
                             f"{check['teacher_forced_agreement']:.2f}")
    return report
