"""A SwiGLU MLP whose backward recomputes the activation instead of keeping it (the train stage, CPU).

The gated MLP of Llama-style models is `down(silu(gate(x)) * up(x))`. Autograd keeps three
(tokens x intermediate) fp32 tensors per layer for it: `gate(x)` for the SiLU's backward, and
`silu(gate(x))` and `up(x)` for the product's. The SiLU output is one cheap elementwise pass away
from `gate(x)`, so here the backward recomputes it: two tensors kept instead of three, the
largest single share of a CPU step's saved activations (a quarter of the MLP's). The function and
its gradients are autograd's own kernels (`silu`, `silu_backward`), so the numbers are the same;
the cost is one extra elementwise pass per layer in the backward. Keeping gate and up in bf16 as
well was measured and left: 50 MiB less at the peak for 5 % more step time (bench/NOTES.md).

Only MLP classes known to compute exactly that formula are changed (MLP_CLASSES); any other
module keeps its own forward.
"""
from __future__ import annotations

import functools

# transformers' MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)).
MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


@functools.cache  # built on first use: torch is a heavy import
def _swiglu_function():
    import torch

    class RecomputedSwiGLU(torch.autograd.Function):
        """silu(gate) * up, keeping gate and up only."""

        @staticmethod
        def forward(ctx, gate, up):
            ctx.save_for_backward(gate, up)
            return torch.nn.functional.silu(gate) * up

        @staticmethod
        def backward(ctx, grad):
            gate, up = ctx.saved_tensors
            grad_gate = grad_up = None
            if ctx.needs_input_grad[1]:
                grad_up = grad * torch.nn.functional.silu(gate)
            if ctx.needs_input_grad[0]:
                grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
            return grad_gate, grad_up

    return RecomputedSwiGLU


def _is_silu(act_fn) -> bool:
    import torch

    return isinstance(act_fn, torch.nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


def _forward(module, x):
    return module.down_proj(_swiglu_function().apply(module.gate_proj(x), module.up_proj(x)))


def recompute_swiglu(model) -> int:
    """Give every SwiGLU MLP of `model` (MLP_CLASSES, SiLU activation) the recomputing forward.
    Returns the number of MLPs changed (0 for other architectures, which keep their own)."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ in MLP_CLASSES and _is_silu(getattr(module, "act_fn", None)):
            module.forward = functools.partial(_forward, module)
            changed += 1
    return changed
