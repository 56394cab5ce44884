"""Batched greedy generation and reference-answer loss, for evaluation and the generate command."""
from __future__ import annotations

import math
import sys
from pathlib import Path

from stages.lib.chat import render_prompt, stop_ids, tokenize_conversation


def load_for_inference(params, adapter_dir: Path | None = None):
    """The base model as it was trained on (same quantisation and compute dtype), plus the
    adapter when given: base and tuned differ by the adapter only, so the comparison is fair."""
    import torch

    from stages.lib.modeling import load_model, load_tokenizer, pick_compute_dtype, resolve_base_model

    cuda = torch.cuda.is_available()
    resolved = resolve_base_model(params.model)
    tokenizer = load_tokenizer(resolved)
    dtype = pick_compute_dtype(params.train.compute_dtype, cuda)
    model = load_model(resolved, quantize=params.train.quantization == "nf4", compute_dtype=dtype,
                       device_map={"": 0} if cuda else None)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer


def _device(model):
    return next(model.parameters()).device


def generate(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int,
             batch_size: int, desc: str = "generating") -> list[str]:
    """Greedy completions of each conversation (its chat-template prompt), in input order.

    Prompts are batched by length (left padding) so little compute goes to padding; generation
    stops at the template's end-of-turn token.
    """
    import torch
    from tqdm import tqdm

    tokenizer.padding_side = "left"
    prompts = [render_prompt(tokenizer, c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    stops = stop_ids(model, tokenizer)
    with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, file=sys.stderr) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(_device(model))
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       temperature=None, top_p=None, top_k=None,
                                       eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            for index, tokens in zip(chunk, new_tokens):
                outputs[index] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            bar.update(len(chunk))
    return outputs


def answer_loss(model, tokenizer, conversations: list[list[dict]], *, max_length: int,
                batch_size: int) -> tuple[float | None, float | None]:
    """Mean cross-entropy (nats/token) of the assistant turns given their prompts, and its
    perplexity: the same tokens the training loss is computed on."""
    import torch

    rows = [r for r in (tokenize_conversation(tokenizer, c, max_length) for c in conversations) if r]
    if not rows:
        return None, None
    total, count = 0.0, 0
    device = _device(model)
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(r["input_ids"]) for r in chunk)
            pad = tokenizer.pad_token_id
            ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in chunk])
            attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                      for r in chunk])
            labels = torch.tensor([[t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]
                                   + [-100] * (width - len(r["input_ids"])) for r in chunk])
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
            shifted = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1).to(device),
                ignore_index=-100, reduction="sum")
            total += shifted.item()
            count += int((labels[:, 1:] != -100).sum())
    mean = total / count
    return mean, math.exp(min(mean, 50.0))


def text_perplexity(model, tokenizer, text: str, *, max_length: int = 1024) -> float | None:
    """Perplexity of plain text (no chat template): a cheap check of general language modelling."""
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_length]
    if ids.shape[1] < 2:
        return None
    with torch.inference_mode():
        loss = model(input_ids=ids.to(_device(model)), labels=ids.to(_device(model))).loss.item()
    return math.exp(min(loss, 50.0))
