"""Packed attention: padding-free rows of several whole examples, each attending only to itself.

Registered with transformers' AttentionInterface under PACKED_ATTENTION by the training plan:
on CUDA varlen flash attention, on CPU one causal SDPA call per example of the row. See
docs/design.md ("Packed rows") for why a per-example mask is not left to chance.
"""
from __future__ import annotations

import functools

PACKED_ATTENTION = "packed_varlen"  # registered by `register_packed_attention`


@functools.cache  # probed once: (varlen_attn, keyword arguments), or (None, None)
def _varlen_kernel():
    """torch's varlen flash attention (torch >= 2.9), with the keywords this torch version spells
    causality and grouped-query attention with; (None, None) where it is missing."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        kwargs = {"is_causal": True}
    elif "window_size" in params:
        kwargs = {"window_size": (-1, 0)}
    else:
        return None, None
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True  # older versions take grouped k/v heads as they are (FA2 does)
    return varlen_attn, kwargs


def varlen_available() -> bool:
    import torch

    return torch.cuda.is_available() and _varlen_kernel()[0] is not None


def _cu_seqlens_from_positions(position_ids):
    import torch

    starts = (position_ids[0] == 0).nonzero().flatten()
    total = torch.tensor([position_ids.shape[1]], device=starts.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    return cu, int(cu.diff().max())


def packed_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention for transformers' AttentionInterface. A padding-free packed row (batch 1, no
    attention mask, examples delimited by the `cu_seq_lens_q` that TRL's collator computes or by
    restarting `position_ids`) goes to varlen flash attention: each example attends only to its
    own earlier tokens, and no T x T mask is built. Without the CUDA kernel (on CPU) each example
    of the row goes through causal SDPA on its own; any other batch goes to SDPA unchanged."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    position_ids = kwargs.get("position_ids")
    packed = query.shape[0] == 1 and attention_mask is None and (cu is not None or position_ids is not None)
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if cu is None:
        cu, max_len = _cu_seqlens_from_positions(position_ids)
    cu = cu.to(device=query.device, dtype=torch.int32)
    kernel, kernel_kwargs = _varlen_kernel()
    if kernel is None or not query.is_cuda:
        # One causal SDPA call per example: the attention each example needs and no more (a
        # block-diagonal T x T mask would compute, then discard, every cross-example score).
        # torch.split, not one slice per example: the backward of a split is one concatenation,
        # that of n slices is n zero-filled full-size gradients (a pass over q, k and v each).
        kwargs = {k: v for k, v in kwargs.items() if k != "is_causal"}
        sizes = cu.diff().tolist()
        pieces = [sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling,
                                         is_causal=True, **kwargs)[0]
                  for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2),
                                     value.split(sizes, dim=2))]
        return torch.cat(pieces, dim=1), None  # [1, T, heads, head_dim]
    # [1, heads, T, head_dim] -> [T, heads, head_dim]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v))
    if max_len is None:
        max_len = int(cu.diff().max())
    out = kernel(q, k, v, cu, cu, int(max_len), int(max_len), scale=scaling, **kernel_kwargs)
    return out.unsqueeze(0), None  # [1, T, heads, head_dim], as sdpa_attention_forward returns


def _packed_attention_mask(*args, attention_mask=None, **kwargs):
    # No mask for a padding-free row (the attention reads cu_seq_lens); a padded batch keeps SDPA's.
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_packed_attention() -> str | None:
    """Register `packed_varlen_attention` with transformers under PACKED_ATTENTION; return the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_varlen_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_attention_mask)
    return PACKED_ATTENTION
