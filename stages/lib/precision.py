"""Mixed precision for CPU: the frozen base's matrix products in bf16, everything else in fp32.

Why not plain `torch.autocast` or a bf16 model: on this stack, nf4 with bf16 *compute* on CPU
(bf16 activations, norms, residual stream and LoRA weights) took the loss up instead of down.
What must stay fp32 stays fp32 here:

  - the LoRA weights (the trained "master" weights) and their optimizer state, so small Adam
    updates are not rounded away, and their products (x @ A @ B, in fp32);
  - the residual stream, RMSNorms, attention softmax, the LM head, the log-softmax and the loss;
  - the accumulation inside every bf16 product: oneDNN multiplies bf16 and accumulates in fp32.

Only the frozen base weights of the decoder's linear layers are stored in bf16 (half the memory
of fp32, no per-step cast), and their inputs are rounded to bf16 on the way in and the products
widened back to fp32 on the way out. CPUs with AVX-512 BF16 (or AMX) multiply bf16 matrices
several times faster than fp32 ones (bench/NOTES.md has the figures of the reference machine);
on the others bf16 is emulated and slower than fp32, so `auto` picks the scheme only where
`cpu_multiplies_bf16` says the instructions are there, and fp32 elsewhere.
The weights are frozen, so the backward pass needs only grad_input = grad_output @ W, again a
bf16 product, and nothing of the input is kept for it.
"""
from __future__ import annotations

import contextlib
import functools


@functools.cache
def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 or AMX), where the scheme above
    is faster than fp32. Without them oneDNN emulates bf16, and the same product is several times
    slower than in fp32: on an AVX2-only AMD EPYC (2 cores) a 320x576 @ 576x1536 product took
    37.7 ms in bf16 and 7.7 ms in fp32, and a default training step 45 s instead of about 2.5 s
    (bench/NOTES.md, CPU section). Other architectures answer False: fp32, never a slow path."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@functools.cache  # built on first use: torch is a heavy import
def _frozen_bf16_matmul():
    import torch

    class FrozenBF16Matmul(torch.autograd.Function):
        """y = x @ W.T with W frozen in bf16; x and y in x's dtype (fp32)."""

        @staticmethod
        def forward(ctx, x, weight):
            ctx.weight = weight  # frozen: nothing of x needs saving, W is the module's own
            return torch.nn.functional.linear(x.to(weight.dtype), weight).to(x.dtype)

        @staticmethod
        def backward(ctx, grad_output):
            grad_input = grad_output.to(ctx.weight.dtype).matmul(ctx.weight).to(grad_output.dtype)
            return grad_input, None

    return FrozenBF16Matmul


@functools.cache
def _linear_class():
    import torch

    class FrozenBF16Linear(torch.nn.Linear):
        """An nn.Linear (so PEFT still finds and wraps it) whose frozen weight is stored in bf16 and
        whose product runs in bf16 with fp32 input and output."""

        def forward(self, x):
            out = _frozen_bf16_matmul().apply(x, self.weight)
            return out if self.bias is None else out + self.bias.to(out.dtype)

    return FrozenBF16Linear


def store_frozen_linears_in_bf16(model) -> int:
    """Convert the decoder's linear layers of `model` (fp32, frozen) to bf16 storage and bf16
    products; the LM head (often tied to the input embeddings) and everything else keep fp32.
    Returns how many layers were converted. Call it before PEFT wraps the model."""
    import torch

    head = model.get_output_embeddings()
    converted = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module is head:
            continue
        module.weight = torch.nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)
        if module.bias is not None:
            module.bias.requires_grad_(False)
        module.__class__ = _linear_class()
        converted += 1
    return converted


RESCORED_CANDIDATES = 32  # tokens per position whose logits are recomputed in fp32 (greedy decoding)


@functools.cache
def _rescored_head_class():
    import torch

    class RescoredBF16Head(torch.nn.Module):
        """An LM head for greedy decoding only: the logits of the whole vocabulary from a bf16
        product, the RESCORED_CANDIDATES largest of them recomputed in fp32 from the fp32 weight,
        and every other token set to -inf. The argmax is then fp32's own choice unless fp32's
        winner is not among bf16's top 32, which takes 32 tokens within a bf16 rounding error
        (about 2^-8 of a logit) of it."""

        def __init__(self, head):
            super().__init__()
            self.weight = head.weight  # the fp32 weight itself (often tied to the embeddings)
            self.bias = head.bias
            self.weight_bf16 = head.weight.detach().to(torch.bfloat16)

        def forward(self, hidden):
            approx = torch.nn.functional.linear(hidden.to(torch.bfloat16), self.weight_bf16)
            top = approx.topk(min(RESCORED_CANDIDATES, approx.shape[-1]), dim=-1).indices
            exact = (hidden.unsqueeze(-2) * self.weight[top]).sum(-1)
            if self.bias is not None:
                exact = exact + self.bias[top]
            logits = torch.full(approx.shape, float("-inf"), dtype=hidden.dtype, device=hidden.device)
            return logits.scatter_(-1, top, exact)

    return RescoredBF16Head


@contextlib.contextmanager
def bf16_output_head(model):
    """Within the block, `model`'s LM head is the RescoredBF16Head above: the same greedy tokens
    as the fp32 head (tests/test_precision.py), at a quarter of its cost on CPU, where the fp32 head
    over a 49k vocabulary was the largest single product of every generated token
    (bench/NOTES.md). Only for greedy decoding: every token outside the candidates gets -inf, so
    losses and perplexities never go through this block."""
    import torch

    from stages.lib.modeling import unwrap_peft

    causal_lm = unwrap_peft(model)
    head = causal_lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.dtype != torch.float32:
        yield
        return
    causal_lm.set_output_embeddings(_rescored_head_class()(head))
    try:
        yield
    finally:
        causal_lm.set_output_embeddings(head)


def uses_frozen_bf16(model) -> bool:
    return any(type(m).__name__ == "FrozenBF16Linear" for m in model.modules())
