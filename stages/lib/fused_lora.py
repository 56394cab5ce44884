"""A fused LoRA path for bitsandbytes 4-bit linear layers (the train stage's CUDA profiles).

peft computes each adapted 4-bit layer as `result = base(x).clone(); result = result + lora_B(
lora_A(dropout(x))) * scaling`: per layer a defensive copy of the output, a separate LoRA output,
a scale and an add, each a full pass over a (tokens x out_features) tensor, and in the backward
as many again. On an 8B model at 16k tokens these passes cost ~19 % of a step for 0.25 % of the
FLOPs (bench/NOTES.md). This module computes the same function with fewer passes:

- layers that read the same input (q/k/v of attention, gate/up of the MLP) form a group: the
  input is read once for all their LoRA A products (one GEMM against the concatenated A's), and
  with dropout one mask is drawn per group instead of one per layer;
- the LoRA scaling is folded into B, and the LoRA product is accumulated into the base GEMM's
  output by cuBLAS (`addmm_`, beta=1): no separate LoRA output, scale, add or clone;
- in the backward, the input gradient of the base and LoRA paths is accumulated the same way
  (one output buffer, no autograd-side adds), and each B gradient reads its output gradient once.

The adapter parameters stay peft's own (`lora_A`/`lora_B` of each layer), so checkpoints and the
saved adapter are exactly what peft writes; only the layers' `forward` is replaced. Anything the
fast path does not cover (DoRA and other variants, several active adapters, merged or disabled
adapters, LoRA bias, mixed-adapter batches) runs peft's own forward.

Numerics: the same products in the same dtype with fp32 accumulation; fewer bf16 roundings than
peft (the LoRA term is added before the output is rounded). With dropout > 0 the layers of a group
share one mask (each layer still sees its input dropped with probability p, as in peft; the masks
are only no longer independent between q, k and v). tests/test_fused_lora.py checks outputs,
gradients and a short training run against peft's path.

On CPU the same grouping and folding serve the frozen bf16 linears of stages/lib/precision.py
(the CPU profile's default): there the input is rounded to bf16 once per group instead of once per
layer, the frozen products run in bf16 and are widened to fp32, and the LoRA term (fp32 A, B and
products, as in peft) is accumulated into that fp32 output by one GEMM with beta=1. On the 2-core
reference machine every pass over a (tokens x features) fp32 tensor costs about as much as a
small GEMM, and peft's LoRA B product, scale and add were three of them per layer (bench/NOTES.md,
CPU section).
"""
from __future__ import annotations

import functools

# Layers of one parent module that are called on the same input, in call order. A group is formed
# only from layers that exist and qualify; the cache check below makes the grouping safe anyway
# (a layer called on another input simply computes its own group again).
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def _is_frozen_bf16(base) -> bool:
    return type(base).__name__ == "FrozenBF16Linear"  # stages/lib/precision.py, built lazily


def _is_4bit(base) -> bool:
    # By class name, so that a CPU run never imports bitsandbytes (its import probes for kernels
    # and prints a warning on machines without them).
    return type(base).__name__ == "Linear4bit" and hasattr(base.weight, "quant_state")


def _lora_parts(module):
    """(adapter, lora_A weight, lora_B weight, scaling, dropout p) when `module` is a peft LoRA layer
    on a bitsandbytes 4-bit linear or a frozen bf16 linear that the fused path covers; None
    otherwise."""
    if not hasattr(module, "lora_A") or not hasattr(module, "get_base_layer"):
        return None
    base = module.get_base_layer()
    if not (_is_4bit(base) or _is_frozen_bf16(base)):
        return None
    adapters = list(module.active_adapters)
    if len(adapters) != 1 or len(module.lora_A) != 1:
        return None
    name = adapters[0]
    if name not in module.lora_A or getattr(module, "lora_variant", {}).get(name) is not None:
        return None
    if getattr(module, "use_dora", {}).get(name) or getattr(module, "lora_bias", {}).get(name):
        return None
    dropout = module.lora_dropout[name]
    p = float(getattr(dropout, "p", 0.0))
    return name, module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]), p


def _dequantize(base):
    """The 4-bit layer's weight as a dense (out_features, in_features) tensor in its compute dtype."""
    import bitsandbytes.functional as F
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(base)
    weight = F.dequantize_4bit(base.weight.data, base.weight.quant_state)
    return weight


def _lora_backward(ctx, src, xa, a_cat, b_scaled, grads, grad_x):
    """The LoRA part of a fused group's backward, shared by both paths: each B's gradient, the
    concatenated A's gradient, and the input gradient of the LoRA term, accumulated into the
    frozen path's `grad_x` (or the dropout input's own gradient). Returns (grad_x, grad_x_lora,
    grad_a, grad_b)."""
    import torch

    grad_x_lora = grad_a = None
    grad_b = [None] * len(b_scaled)
    pieces, offset = [], 0
    for index, (b, g) in enumerate(zip(b_scaled, grads)):
        rank = b.shape[1]
        if g is None:
            pieces.append(torch.zeros(src.shape[0], rank, dtype=src.dtype, device=src.device))
        else:
            g = g if g.stride(-1) == 1 else g.contiguous()
            pieces.append(g @ b)                                      # (M, r_i)
            if ctx.needs_input_grad[4 + index]:
                grad_b[index] = g.t() @ xa[:, offset:offset + rank]
        offset += rank
    gb = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
    if ctx.needs_input_grad[2]:
        grad_a = gb.t() @ src
    if ctx.lora_separate:
        if ctx.needs_input_grad[1]:
            grad_x_lora = gb @ a_cat
    elif ctx.needs_input_grad[0]:
        grad_x = gb @ a_cat if grad_x is None else grad_x.addmm_(gb, a_cat)
    return grad_x, grad_x_lora, grad_a, grad_b


@functools.cache
def _make_function():
    import torch

    class FusedLoRA4bit(torch.autograd.Function):
        """outputs_i = x @ W_i^T (+ bias_i) + (src @ A_i^T) @ (s_i B_i)^T for the layers of one group,
        src = dropout(x) or x. W_i is dequantized in the forward and again in the backward (as
        bitsandbytes does: nothing weight-sized is kept between them)."""

        @staticmethod
        def forward(ctx, x, x_lora, a_cat, group, *b_scaled):
            dtype = x.dtype
            src = x if x_lora is None else x_lora
            xa = src @ a_cat.t()                       # (M, R): one read of the input for all A's
            outputs, offset = [], 0
            for base, b in zip(group.bases, b_scaled):
                weight = _dequantize(base).to(dtype)
                bias = base.bias
                out = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias.to(dtype), x, weight.t())
                del weight
                rank = b.shape[1]
                out.addmm_(xa[:, offset:offset + rank], b.t())   # LoRA accumulated by cuBLAS, beta=1
                offset += rank
                outputs.append(out)
            ctx.group = group
            ctx.lora_separate = x_lora is not None
            ctx.save_for_backward(src, xa, a_cat, *b_scaled)
            return tuple(outputs)

        @staticmethod
        def backward(ctx, *grads):
            src, xa, a_cat, *b_scaled = ctx.saved_tensors
            grad_x = None
            if ctx.needs_input_grad[0]:
                for base, g in zip(ctx.group.bases, grads):
                    if g is None:
                        continue
                    g = g if g.stride(-1) == 1 else g.contiguous()
                    weight = _dequantize(base).to(g.dtype)
                    if grad_x is None:
                        grad_x = g @ weight
                    else:
                        grad_x.addmm_(g, weight)                      # accumulated, no separate add
                    del weight
            grad_x, grad_x_lora, grad_a, grad_b = _lora_backward(ctx, src, xa, a_cat, b_scaled, grads, grad_x)
            return (grad_x, grad_x_lora, grad_a, None, *grad_b)

    return FusedLoRA4bit


@functools.cache
def _make_bf16_function():
    import torch

    class FusedLoRAFrozenBF16(torch.autograd.Function):
        """outputs_i = float(bf16(x) @ W_i^T) (+ bias_i) + (src @ A_i^T) @ (s_i B_i)^T, with W_i frozen
        in bf16 and x, A, B, the LoRA products and the outputs in fp32 (stages/lib/precision.py)."""

        @staticmethod
        def forward(ctx, x, x_lora, a_cat, group, *b_scaled):
            src = x if x_lora is None else x_lora
            xa = src @ a_cat.t()                       # (M, R) fp32: one read of the input for all A's
            x_bf16 = x.to(torch.bfloat16)              # once per group, not once per layer
            outputs, offset = [], 0
            for base, b in zip(group.bases, b_scaled):
                out = torch.nn.functional.linear(x_bf16, base.weight).to(x.dtype)
                if base.bias is not None:
                    out.add_(base.bias)
                rank = b.shape[1]
                out.addmm_(xa[:, offset:offset + rank], b.t())   # the LoRA term, accumulated in place
                offset += rank
                outputs.append(out)
            ctx.group = group
            ctx.lora_separate = x_lora is not None
            # Without dropout the A gradient reads the input itself: keep the bf16 copy the frozen
            # products already made, not the fp32 one (as torch.autocast keeps a bf16 linear's
            # input for its weight gradient). It is widened back in the backward, and the product
            # accumulates in fp32. This is a fifth of a step's saved activations on CPU.
            ctx.save_for_backward(x_bf16 if x_lora is None else src, xa, a_cat, *b_scaled)
            return tuple(outputs)

        @staticmethod
        def backward(ctx, *grads):
            src, xa, a_cat, *b_scaled = ctx.saved_tensors
            src = src.to(xa.dtype)
            grad_x = None
            frozen = [(g, base.weight) for base, g in zip(ctx.group.bases, grads) if g is not None]
            if ctx.needs_input_grad[0] and frozen:
                # The frozen path's input gradient: one bf16 GEMM over the group's concatenated
                # output gradients and weights (the weights are small next to the activations).
                g_cat = frozen[0][0] if len(frozen) == 1 else torch.cat([g for g, _ in frozen], dim=1)
                w_cat = frozen[0][1] if len(frozen) == 1 else torch.cat([w for _, w in frozen], dim=0)
                grad_x = (g_cat.to(torch.bfloat16) @ w_cat).to(src.dtype)
            grad_x, grad_x_lora, grad_a, grad_b = _lora_backward(ctx, src, xa, a_cat, b_scaled, grads, grad_x)
            return (grad_x, grad_x_lora, grad_a, None, *grad_b)

    return FusedLoRAFrozenBF16


class FusedGroup:
    """Layers (peft LoRA on 4-bit linears) that read the same input; the first one called computes
    all outputs, the others take theirs from the cache if they are called on the same tensor."""

    def __init__(self, modules: list, parts: list):
        self.modules = modules
        self.bases = [m.get_base_layer() for m in modules]
        self.adapter = parts[0][0]
        self.p = parts[0][4]
        self._cache = None  # (input, its version, grad mode, outputs, members not yet served)

    def _eligible(self, module) -> bool:
        # bitsandbytes repacks CPU weights for its inference kernel (eval mode, no grad); that
        # layout is not what dequantize_4bit reads, so such layers keep their own forward.
        quant_state = getattr(module.get_base_layer().weight, "quant_state", None)
        return (not module.disable_adapters and not module.merged
                and list(module.active_adapters) == [self.adapter]
                and not getattr(quant_state, "packing_format_for_cpu", False))

    def compute(self, x):
        if _is_frozen_bf16(self.bases[0]):
            return self._compute_frozen_bf16(x)
        import torch

        base = self.bases[0]
        dtype = base.compute_dtype or x.dtype
        lead = x.shape[:-1]
        flat = x.to(dtype).reshape(-1, x.shape[-1])
        a_cat = torch.cat([m.lora_A[self.adapter].weight for m in self.modules]).to(dtype)
        b_scaled = [(m.lora_B[self.adapter].weight * m.scaling[self.adapter]).to(dtype) for m in self.modules]
        x_lora = None
        if self.p > 0 and self.modules[0].training:
            x_lora = torch.nn.functional.dropout(flat, p=self.p, training=True)
        outputs = _make_function().apply(flat, x_lora, a_cat, self, *b_scaled)
        return [out.view(*lead, out.shape[-1]).to(x.dtype) for out in outputs]

    def _compute_frozen_bf16(self, x):
        import torch

        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        a_cat = torch.cat([m.lora_A[self.adapter].weight for m in self.modules]).to(x.dtype)
        b_scaled = [(m.lora_B[self.adapter].weight * m.scaling[self.adapter]).to(x.dtype) for m in self.modules]
        x_lora = None
        if self.p > 0 and self.modules[0].training:
            x_lora = torch.nn.functional.dropout(flat, p=self.p, training=True)
        outputs = _make_bf16_function().apply(flat, x_lora, a_cat, self, *b_scaled)
        return [out.view(*lead, out.shape[-1]) for out in outputs]

    def forward(self, index: int, x, *args, **kwargs):
        module = self.modules[index]
        if args or kwargs or not all(self._eligible(m) for m in self.modules):
            return type(module).forward(module, x, *args, **kwargs)
        import torch

        cache = self._cache
        # Inference tensors (torch.inference_mode, e.g. evaluation) carry no version counter; the
        # members of a group are called one after the other on the same input there too.
        version = None if x.is_inference() else x._version
        if (cache is not None and cache[0] is x and cache[1] == version
                and cache[2] == torch.is_grad_enabled() and index in cache[4]):
            cache[4].discard(index)
            out = cache[3][index]
            if not cache[4]:
                self._cache = None
            return out
        outputs = self.compute(x)
        rest = set(range(len(self.modules))) - {index}
        self._cache = (x, version, torch.is_grad_enabled(), outputs, rest) if rest else None
        return outputs[index]


def fuse_lora(model) -> int:
    """Replace the forward of every peft LoRA layer on a 4-bit or frozen bf16 linear in `model` by the fused path;
    layers that share their input (SHARED_INPUT_GROUPS) are grouped. Returns the number of layers
    fused (0 when nothing qualifies, e.g. an unquantised model)."""
    fused = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        taken = set()
        candidates = [names for names in SHARED_INPUT_GROUPS if all(n in children for n in names)]
        candidates += [(name,) for name in children]
        for names in candidates:
            if taken & set(names):
                continue
            parts = [_lora_parts(children[n]) for n in names]
            if any(p is None for p in parts):
                continue
            if len({p[4] for p in parts}) != 1 or len({p[0] for p in parts}) != 1:
                continue  # one dropout mask per group needs one p
            group = FusedGroup([children[n] for n in names], parts)
            for index, name in enumerate(names):
                children[name].forward = functools.partial(group.forward, index)
            taken |= set(names)
            fused += len(names)
    return fused


def unfuse_lora(model) -> None:
    """Put peft's own forward back on every layer `fuse_lora` changed."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, __import__("functools").partial) and isinstance(
                getattr(forward.func, "__self__", None), FusedGroup):
            del module.__dict__["forward"]
