"""Batched greedy generation and reference-answer loss, for evaluation and the generate command."""
from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

from stages.lib.chat import render_prompt, stop_ids, tokenize_conversation


def load_for_inference(params, adapter_dir: Path | None = None):
    """The base model as it was trained on (same quantisation and compute dtype), plus the
    adapter when given: base and tuned differ by the adapter only, so the comparison is fair.
    The adapter is checked first (readable config, finite weights, trained on this very base)."""
    import torch

    from stages.lib.modeling import (base_identity, check_model_files, load_model, load_tokenizer,
                                     pick_compute_dtype, resolve_base_model, resolve_precision)

    cuda = torch.cuda.is_available()
    check_model_files(params.model)
    resolved = resolve_base_model(params.model)
    if adapter_dir is not None:
        from stages.lib.adapter import check_adapter

        check_adapter(adapter_dir, base_identity(resolved))
    tokenizer = load_tokenizer(resolved)
    from stages.lib.precision import cpu_multiplies_bf16

    quantize, dtype_name = resolve_precision(params.train.quantization, params.train.compute_dtype, cuda,
                                             cpu_bf16=not cuda and cpu_multiplies_bf16())
    dtype = pick_compute_dtype(dtype_name, cuda, quantize)
    model = load_model(resolved, quantize=quantize, compute_dtype=dtype,
                       device_map={"": 0} if cuda else None)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        from stages.lib.precision import uses_frozen_bf16

        if not cuda and uses_frozen_bf16(model):
            # The adapter through the path it was trained with on CPU (stages/lib/fused_lora.py):
            # on the frozen bf16 layers, one bf16 cast per input group and the LoRA term added by
            # the product, a third fewer operations per generated token than peft's own forward.
            from stages.lib.fused_lora import fuse_lora

            fuse_lora(model)
    model.eval()
    return model, tokenizer


def _device(model):
    return next(model.parameters()).device


def generate(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int,
             batch_size: int, desc: str = "generating", key: str = "evaluate.max_new_tokens") -> list[str]:
    """Greedy completions of each conversation (its chat-template prompt), in input order.

    Prompts are batched by length (left padding) so little compute goes to padding; generation
    stops at the template's end-of-turn token. Prompt + max_new_tokens never exceeds the model's
    positions: a longer prompt loses its beginning, with a warning (`key` names the parameter).
    """
    import torch
    from tqdm import tqdm

    from stages.lib.limits import check_new_tokens, context_length, prompt_budget, truncate_prompt_ids, warn_truncated
    from stages.lib.precision import bf16_output_head, uses_frozen_bf16

    context = context_length(model)
    check_new_tokens(max_new_tokens, context, key)
    budget = prompt_budget(max_new_tokens, context)
    tokenizer.padding_side = "left"
    prompts, truncated = [], 0
    for conversation in conversations:
        ids = tokenizer(render_prompt(tokenizer, conversation), add_special_tokens=False)["input_ids"]
        ids, cut = truncate_prompt_ids(list(ids), budget)
        prompts.append(ids)
        truncated += cut
    warn_truncated(truncated, len(prompts), budget, desc)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    stops = stop_ids(model, tokenizer)
    # On CPU a preallocated KV cache: the default one grows by concatenation, copying every layer's
    # keys and values at every new token (a third of a decoding step on the reference machine).
    # On CUDA transformers would compile the model for a static cache; there the default is kept.
    cpu = _device(model).type == "cpu"
    cache = {"cache_implementation": "static"} if cpu else {}
    # On CPU a model whose decoder multiplies in bf16 (stages/lib/precision.py) gets a bf16 head
    # whose top candidates are rescored in fp32: the fp32 head's tokens at a quarter of its cost.
    head = bf16_output_head(model) if cpu and uses_frozen_bf16(model) else contextlib.nullcontext()
    with torch.inference_mode(), head, tqdm(total=len(prompts), desc=desc, file=sys.stderr) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [prompts[i] for i in chunk]}, padding=True,
                                  return_tensors="pt").to(_device(model))
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       temperature=None, top_p=None, top_k=None,
                                       eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                                       **cache)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            for index, tokens in zip(chunk, new_tokens):
                outputs[index] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            bar.update(len(chunk))
    return outputs


def answer_loss_rows(model, tokenizer, conversations: list[list[dict]], *, max_length: int,
                     batch_size: int) -> list[tuple[float, int]]:
    """Per conversation: summed cross-entropy (nats) of its assistant tokens given the prompt, and
    how many tokens that is -- the tokens the training loss is computed on. (0.0, 0) for a row
    with no assistant tokens. Kept per row so the evaluation can put an interval on the loss."""
    import torch

    from stages.lib.limits import context_length

    max_length = min(max_length, context_length(model) or max_length)
    encoded = [tokenize_conversation(tokenizer, c, max_length) for c in conversations]
    results: list[tuple[float, int]] = [(0.0, 0)] * len(conversations)
    present = [i for i, r in enumerate(encoded) if r]
    device = _device(model)
    from stages.lib.modeling import unwrap_peft

    causal_lm = unwrap_peft(model)   # its backbone includes the adapters
    with torch.inference_mode():
        for start in range(0, len(present), batch_size):
            chunk_index = present[start:start + batch_size]
            chunk = [encoded[i] for i in chunk_index]
            width = max(len(r["input_ids"]) for r in chunk)
            pad = tokenizer.pad_token_id
            ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in chunk])
            attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                      for r in chunk])
            labels = torch.tensor([[t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]
                                   + [-100] * (width - len(r["input_ids"])) for r in chunk])
            # The LM head only where there is a label: full logits of a batch (rows x tokens x a
            # 49k vocabulary, in fp32) were the evaluate stage's memory peak.
            hidden = causal_lm.base_model(input_ids=ids.to(device),
                                          attention_mask=attention.to(device)).last_hidden_state
            targets = labels[:, 1:].to(device)
            labelled = targets != -100
            logits = causal_lm.get_output_embeddings()(hidden[:, :-1][labelled]).float()
            per_token = torch.nn.functional.cross_entropy(logits, targets[labelled], reduction="none")
            sums = torch.zeros(len(chunk), dtype=per_token.dtype, device=per_token.device)
            sums.index_add_(0, labelled.nonzero()[:, 0], per_token)
            counts = labelled.sum(dim=1).tolist()
            for index, total, count in zip(chunk_index, sums.tolist(), counts):
                results[index] = (float(total), int(count))
    return results


def answer_loss(model, tokenizer, conversations: list[list[dict]], *, max_length: int,
                batch_size: int) -> tuple[float | None, float | None]:
    """Mean cross-entropy (nats/token) of the assistant turns given their prompts, and its
    perplexity: the same tokens the training loss is computed on."""
    rows = answer_loss_rows(model, tokenizer, conversations, max_length=max_length, batch_size=batch_size)
    count = sum(n for _, n in rows)
    if not count:
        return None, None
    mean = sum(total for total, _ in rows) / count
    return mean, math.exp(min(mean, 50.0))


TEXT_BLOCK_TOKENS = 32  # the probe text is scored in one pass; its token losses are summed per block


def text_nll_blocks(model, tokenizer, text: str, *, max_length: int = 1024,
                    block_tokens: int = TEXT_BLOCK_TOKENS) -> list[dict]:
    """Plain text (no chat template) scored in one forward pass; the per-token losses summed in
    consecutive blocks: [{"id", "nll_sum", "tokens"}]. exp(sum of nll_sum / sum of tokens) is the
    text's perplexity; the blocks are what its interval resamples. [] for text under 2 tokens."""
    import torch

    from stages.lib.limits import context_length

    max_length = min(max_length, context_length(model) or max_length)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_length]
    if ids.shape[1] < 2:
        return []
    device = _device(model)
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device)).logits.float()
        per_token = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:].to(device),
                                                      reduction="none").tolist()
    return [{"id": f"block-{start // block_tokens:04d}", "nll_sum": float(sum(per_token[start:start + block_tokens])),
             "tokens": len(per_token[start:start + block_tokens])}
            for start in range(0, len(per_token), block_tokens)]


def text_perplexity(model, tokenizer, text: str, *, max_length: int = 1024) -> float | None:
    """Perplexity of plain text (no chat template): a cheap check of general language modelling."""
    blocks = text_nll_blocks(model, tokenizer, text, max_length=max_length)
    if not blocks:
        return None
    mean = sum(b["nll_sum"] for b in blocks) / sum(b["tokens"] for b in blocks)
    return math.exp(min(mean, 50.0))
