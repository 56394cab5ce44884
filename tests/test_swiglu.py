"""The recomputing SwiGLU MLP (stages/lib/swiglu.py): same outputs and gradients as the model's own
MLP, fewer saved activations, and other MLPs left alone."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from stages.lib.swiglu import recompute_swiglu  # noqa: E402
from tests.tiny_models import SHAPE  # noqa: E402


def tiny_model(config_class: str, **extra):
    import transformers

    config = getattr(transformers, config_class)(vocab_size=256, **SHAPE, **extra)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, ids):
    total = 0
    seen = set()

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss
    return total


def test_llama_mlp_same_numbers_fewer_saved_bytes():
    torch.manual_seed(0)
    model = tiny_model("LlamaConfig")
    ids = torch.randint(0, model.config.vocab_size, (2, 48))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    saved_ref = _saved_bytes(model, ids)

    assert recompute_swiglu(model) == model.config.num_hidden_layers
    loss, grads = _loss_and_grads(model, ids)
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ref[name], rtol=1e-5, atol=1e-7), name
    # One (tokens x intermediate) tensor less per layer.
    per_layer = 2 * 48 * model.config.intermediate_size * 4
    assert saved_ref - _saved_bytes(model, ids) >= model.config.num_hidden_layers * per_layer


def test_other_activations_keep_their_own_mlp():
    model = tiny_model("Gemma2Config", head_dim=16)  # gelu_pytorch_tanh: not a SwiGLU
    assert recompute_swiglu(model) == 0
