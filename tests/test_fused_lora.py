"""The fused LoRA path (stages/lib/fused_lora.py) computes what peft computes: outputs, every LoRA
gradient and a short training run's loss curve, on a real nf4 model (bitsandbytes' CPU kernels
here; the same checks on CUDA in bf16 are marked gpu) and on the CPU profile's frozen bf16 linears
(stages/lib/precision.py)."""
import copy

import pytest

torch = pytest.importorskip("torch")
for _name in ("bitsandbytes", "peft"):
    pytest.importorskip(_name)


def _nf4_lora_model(tmp_path, dropout=0.0, dtype=None, device="cpu"):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.lib.modeling import ResolvedModel, load_model

    dtype = dtype or torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    path = tmp_path / "model"
    if not (path / "config.json").exists():
        LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    model = load_model(ResolvedModel(str(path), None, False, "tiny"), quantize=True, compute_dtype=dtype,
                       device_map={"": 0} if device == "cuda" else None)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    # B starts at zero in peft; give it values so the LoRA term (and the A gradient) is not trivially 0.
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    model.train()  # as in training (on CPU, bitsandbytes repacks eval-mode weights for inference)
    return model


def _bf16_lora_model(tmp_path, dropout=0.0):
    """The CPU profile's model: frozen decoder linears in bf16, fp32 LoRA weights (as build_trainer
    leaves them), everything else fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.lib.modeling import ResolvedModel, load_model
    from stages.lib.precision import uses_frozen_bf16

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    path = tmp_path / "model"
    if not (path / "config.json").exists():
        LlamaForCausalLM(config).save_pretrained(path)
    model = load_model(ResolvedModel(str(path), None, False, "tiny"), quantize=False, compute_dtype=torch.bfloat16)
    assert uses_frozen_bf16(model)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    model.train()
    return model


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def _relative(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def test_fused_layers_match_peft_outputs_and_gradients(tmp_path):
    from stages.lib.fused_lora import fuse_lora, unfuse_lora

    model = _nf4_lora_model(tmp_path)
    ids = torch.randint(0, 256, (2, 24))
    logits_ref, loss_ref, grads_ref = _grads(model, ids)
    fused = fuse_lora(model)
    assert fused == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    logits, loss, grads = _grads(model, ids)
    assert _relative(logits, logits_ref) < 1e-5
    assert abs(float(loss - loss_ref)) < 1e-5
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name  # every adapter gets a gradient
        assert _relative(grad, grads_ref[name]) < 1e-4, name
    unfuse_lora(model)
    logits_again, _, _ = _grads(model, ids)
    assert torch.equal(logits_again, logits_ref)  # peft's own forward is back


def test_fused_path_leaves_the_saved_adapter_unchanged(tmp_path):
    from safetensors.torch import load_file

    from stages.lib.fused_lora import fuse_lora

    model = _nf4_lora_model(tmp_path)
    model.save_pretrained(tmp_path / "plain")
    fuse_lora(model)
    model.save_pretrained(tmp_path / "fused")
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    fused = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert plain.keys() == fused.keys() and all(torch.equal(plain[k], fused[k]) for k in plain)


def test_dropout_acts_in_training_only(tmp_path):
    from stages.lib.fused_lora import fuse_lora

    model = _nf4_lora_model(tmp_path, dropout=0.5)
    ids = torch.randint(0, 256, (1, 16))
    # Inputs that need a gradient keep bitsandbytes from repacking CPU weights in eval mode.
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    model.eval()
    ref = model(inputs_embeds=embeds).logits
    fuse_lora(model)
    assert _relative(model(inputs_embeds=embeds).logits, ref) < 1e-5  # no dropout in eval
    model.train()
    torch.manual_seed(3)
    a = model(inputs_embeds=embeds).logits
    torch.manual_seed(3)
    again = model(inputs_embeds=embeds).logits
    torch.manual_seed(4)
    b = model(inputs_embeds=embeds).logits
    assert torch.equal(a, again) and _relative(a, b) > 1e-4  # dropout acts, drawn from torch's RNG
    a.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def _train_losses(model, batches, steps=8):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for ids in batches[:steps]:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def _curves(tmp_path, dtype=None, device="cpu"):
    from stages.lib.fused_lora import fuse_lora

    torch.manual_seed(5)
    batches = [torch.randint(0, 64, (2, 32), device=device) for _ in range(8)]
    plain = _nf4_lora_model(tmp_path, dtype=dtype, device=device)
    fused = copy.deepcopy(plain)
    fuse_lora(fused)
    return _train_losses(plain, batches), _train_losses(fused, batches)


def test_training_loss_curve_matches_peft(tmp_path):
    plain, fused = _curves(tmp_path)
    assert plain[-1] < plain[0]  # it learns
    for a, b in zip(plain, fused):
        assert abs(a - b) <= 1e-3 * abs(a), (plain, fused)


def test_cpu_bf16_fused_layers_match_peft(tmp_path):
    """Each layer's output is peft's to fp32 rounding (the LoRA term is accumulated by a GEMM instead
    of a separate scale and add). Through the model those last-bit differences can flip the bf16
    rounding of a later layer's input, and the frozen path's input gradient of a group is one bf16
    GEMM (fp32 accumulation, one rounding) instead of one per layer: hence bf16-level bounds there."""
    from stages.lib.fused_lora import fuse_lora, unfuse_lora

    model = _bf16_lora_model(tmp_path)
    ids = torch.randint(0, 256, (2, 24))
    attention = model.base_model.model.model.layers[0].self_attn
    hidden = torch.randn(2, 24, 128)
    layer_refs = [attention.q_proj(hidden), attention.k_proj(hidden), attention.v_proj(hidden), attention.o_proj(hidden)]
    logits_ref, loss_ref, grads_ref = _grads(model, ids)
    assert fuse_lora(model) == 2 * 7
    layer_outs = [attention.q_proj(hidden), attention.k_proj(hidden), attention.v_proj(hidden), attention.o_proj(hidden)]
    for out, ref in zip(layer_outs, layer_refs):
        assert out.dtype == torch.float32 and _relative(out, ref) < 1e-6
    logits, loss, grads = _grads(model, ids)
    assert logits.dtype == torch.float32
    assert _relative(logits, logits_ref) < 2e-3
    assert abs(float(loss - loss_ref)) < 1e-3
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        assert grad.abs().sum() > 0, name
        assert _relative(grad, grads_ref[name]) < 1e-2, name
    unfuse_lora(model)
    assert torch.equal(_grads(model, ids)[0], logits_ref)


def test_cpu_bf16_fused_dropout_and_inference(tmp_path):
    from stages.lib.fused_lora import fuse_lora

    model = _bf16_lora_model(tmp_path, dropout=0.5)
    ids = torch.randint(0, 256, (1, 16))
    model.eval()
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
    fuse_lora(model)
    with torch.inference_mode():
        # no dropout in eval, no autograd needed; bf16-level bound as in the test above
        assert _relative(model(input_ids=ids).logits, ref) < 2e-3
    model.train()
    torch.manual_seed(3)
    a = model(input_ids=ids).logits
    torch.manual_seed(4)
    b = model(input_ids=ids).logits
    assert _relative(a, b) > 1e-4
    a.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_cpu_bf16_training_loss_curve_matches_peft(tmp_path):
    from stages.lib.fused_lora import fuse_lora

    torch.manual_seed(5)
    batches = [torch.randint(0, 64, (2, 32)) for _ in range(8)]
    plain = _bf16_lora_model(tmp_path)
    fused = copy.deepcopy(plain)
    fuse_lora(fused)
    plain_losses, fused_losses = _train_losses(plain, batches), _train_losses(fused, batches)
    assert plain_losses[-1] < plain_losses[0]
    # bf16 products: the two paths round the input gradients differently; within 1 % per step.
    for a, b in zip(plain_losses, fused_losses):
        assert abs(a - b) <= 1e-2 * abs(a), (plain_losses, fused_losses)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
def test_fused_matches_peft_on_cuda_bf16(tmp_path):
    from stages.lib.fused_lora import fuse_lora

    model = _nf4_lora_model(tmp_path, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, 256, (1, 512), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits_ref, loss_ref, grads_ref = _grads(model, ids)
        fuse_lora(model)
        logits, loss, grads = _grads(model, ids)
    assert _relative(logits, logits_ref) < 1e-2
    for name, grad in grads.items():
        assert _relative(grad, grads_ref[name]) < 3e-2, name


@pytest.mark.gpu
@gpu
def test_training_loss_curve_matches_peft_on_cuda_bf16(tmp_path):
    plain, fused = _curves(tmp_path, dtype=torch.bfloat16, device="cuda")
    assert plain[-1] < plain[0]
    # bf16: two runs of the same path differ by rounding too; within 2 % per step is noise here.
    for a, b in zip(plain, fused):
        assert abs(a - b) <= 2e-2 * abs(a), (plain, fused)
