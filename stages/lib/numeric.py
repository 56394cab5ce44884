"""Numeric sanity: a training step whose loss or gradients are not finite stops the run, naming the
step; a model with non-finite weights is refused. (JSON reports never hold NaN or Infinity:
stages/lib/io.py's write_json writes null and the reason.)

Why stop rather than carry on: the Trainer replaces a NaN loss in its logs by the running mean
(`logging_nan_inf_filter`), so a diverged run otherwise finishes with exit 0, a plausible loss
curve and an adapter of NaNs, which evaluate and export then use without a word.
"""
from __future__ import annotations

import math


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight is NaN or infinite; the message names the step or tensor."""


def nonfinite_parameters(named_parameters, *, grads: bool = False) -> list[str]:
    """Names of the parameters (or of their gradients) that hold NaN or infinity."""
    import torch

    bad = []
    for name, parameter in named_parameters:
        tensor = parameter.grad if grads else parameter
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


def check_model_finite(model, what: str) -> None:
    bad = nonfinite_parameters(model.named_parameters())
    if bad:
        raise NonFiniteError(f"{what} has non-finite weights (NaN or infinity) in {len(bad)} tensor(s), "
                             f"e.g. {bad[0]}")


HINT = "lower train.learning_rate (or check the data for empty or garbled rows) and re-run train"


def make_finite_guard_callback():
    """A TrainerCallback that checks, at every optimizer step, the trainable gradients (after
    clipping, before the update) and the trainable weights after it, and the logged loss; the first
    non-finite value stops training with NonFiniteError naming the step. Only the trainable (LoRA)
    tensors are scanned: a few MB, negligible next to a step."""
    from transformers import TrainerCallback

    class FiniteGuard(TrainerCallback):
        def _trainable(self, model):
            return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            # fp16 loss scaling makes an occasional infinite gradient normal (the scaler skips
            # that step); the weights check after the step still catches a real divergence.
            if model is None or args.fp16:
                return
            bad = nonfinite_parameters(self._trainable(model), grads=True)
            if bad:
                raise NonFiniteError(f"step {state.global_step + 1}: the gradient is not finite (NaN or "
                                     f"infinity) in {len(bad)} tensor(s), e.g. {bad[0]}: {HINT}")

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is None:
                return
            bad = nonfinite_parameters(self._trainable(model))
            if bad:
                raise NonFiniteError(f"step {state.global_step}: the optimizer step made {len(bad)} adapter "
                                     f"tensor(s) non-finite, e.g. {bad[0]} (learning rate "
                                     f"{args.learning_rate:g} too high?): {HINT}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm", "eval_loss"):
                value = (logs or {}).get(key)
                if isinstance(value, float) and not math.isfinite(value):
                    raise NonFiniteError(f"step {state.global_step}: {key} is {value}: {HINT}")

    return FiniteGuard()
