"""The CPU mixed-precision scheme (stages/lib/precision.py): bf16 products of the frozen weights,
fp32 everything else. It must keep what must stay fp32 in fp32, give the same forward and input
gradients as fp32 within bf16 rounding, and train like fp32: the same loss curve and held-out
result within noise, on a task the tiny model can actually learn."""
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stages.lib.precision import cpu_multiplies_bf16, store_frozen_linears_in_bf16, uses_frozen_bf16  # noqa: E402


def _tiny(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def _pair():
    fp32 = _tiny()
    mixed = _tiny()
    mixed.load_state_dict(fp32.state_dict())
    converted = store_frozen_linears_in_bf16(mixed)
    return fp32, mixed, converted


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU flags from Linux's /proc/cpuinfo")
def test_bf16_is_chosen_only_on_a_cpu_with_bf16_matrix_instructions():
    """What `auto` decides on CPU follows the CPU's own flags: AVX-512 BF16 or AMX (x86); any
    other CPU (AVX2 only, ARM) gets fp32, never emulated bf16."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    assert cpu_multiplies_bf16() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)


def test_only_the_decoder_linears_go_bf16():
    fp32, mixed, converted = _pair()
    assert converted == 2 * 7 and uses_frozen_bf16(mixed) and not uses_frozen_bf16(fp32)
    dtypes = {name: p.dtype for name, p in mixed.named_parameters()}
    assert all(dtypes[n] == torch.bfloat16 for n in dtypes if n.endswith("proj.weight"))
    # Embeddings (tied to the LM head) and norms stay fp32.
    assert all(dtypes[n] == torch.float32 for n in dtypes if not n.endswith("proj.weight"))
    assert mixed.get_output_embeddings().weight.dtype == torch.float32
    assert isinstance(mixed.model.layers[0].mlp.down_proj, torch.nn.Linear)  # PEFT still finds it


def test_forward_and_input_gradient_match_fp32_within_bf16_rounding():
    fp32, mixed, _ = _pair()
    ids = torch.randint(0, 96, (2, 12))
    outputs = []
    for model in (fp32, mixed):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits
        assert logits.dtype == torch.float32  # the residual stream and the head stay fp32
        logits.square().mean().backward()
        outputs.append((logits.detach(), embeds.grad))
    (ref_logits, ref_grad), (logits, grad) = outputs
    assert (logits - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()
    cosine = torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0)
    assert cosine > 0.999


def test_peft_adapters_on_bf16_layers_are_fp32_master_weights():
    peft = pytest.importorskip("peft")
    _, mixed, _ = _pair()
    model = peft.get_peft_model(mixed, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen_bf16 = [p for p in model.parameters() if p.dtype == torch.bfloat16]
    assert frozen_bf16 and not any(p.requires_grad for p in frozen_bf16)


def _train_lora(mixed: bool, steps: int = 80):
    """LoRA on a frozen random tiny Llama, learning a deterministic sequence task (each token is
    the previous one plus 3, mod 96): returns the loss curve and held-out next-token accuracy.
    `mixed`: the CPU path of the train stage (bf16 frozen products, fused LoRA, recomputed SwiGLU)."""
    peft = pytest.importorskip("peft")
    model = _tiny(seed=1)
    if mixed:
        store_frozen_linears_in_bf16(model)
    torch.manual_seed(2)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                       target_modules="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if mixed:  # the rest of the train stage's CPU path: fused LoRA, recomputed SwiGLU
        from stages.lib.fused_lora import fuse_lora
        from stages.lib.swiglu import recompute_swiglu

        assert fuse_lora(model) > 0 and recompute_swiglu(model) == 2
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(3)

    def batch(n):
        start = torch.randint(0, 96, (n, 1), generator=generator)
        return (start + 3 * torch.arange(16)) % 96

    curve = []
    for _ in range(steps):
        ids = batch(8)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        curve.append(loss.item())
    with torch.no_grad():
        ids = batch(64)
        predicted = model(input_ids=ids).logits[:, 1:-1].argmax(-1)
        accuracy = (predicted == ids[:, 2:]).float().mean().item()
    return curve, accuracy


def test_training_curve_and_result_match_fp32():
    fp32_curve, fp32_accuracy = _train_lora(mixed=False)
    mixed_curve, mixed_accuracy = _train_lora(mixed=True)
    # Both learn: the loss falls well below its start (ln 96 = 4.56) ...
    assert fp32_curve[-1] < 0.8 * fp32_curve[0] and mixed_curve[-1] < 0.8 * mixed_curve[0]
    # ... along the same curve (means over windows of 10 steps, within 5 % of each other) ...
    for start in range(0, len(fp32_curve), 10):
        a = sum(fp32_curve[start:start + 10]) / 10
        b = sum(mixed_curve[start:start + 10]) / 10
        assert abs(a - b) <= 0.05 * a, (start, a, b)
    # ... to the same held-out result (fp32 reaches 1.0 next-token accuracy on unseen sequences).
    assert fp32_accuracy >= 0.9 and abs(fp32_accuracy - mixed_accuracy) <= 0.05, (fp32_accuracy, mixed_accuracy)


def test_rescored_head_picks_fp32_argmax_where_a_bf16_head_does_not():
    from stages.lib.precision import _rescored_head_class

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 4096, bias=False)
    hidden = torch.randn(2000, 64)
    exact = head(hidden).argmax(-1)
    bf16_only = torch.nn.functional.linear(hidden.bfloat16(), head.weight.bfloat16()).argmax(-1)
    assert (bf16_only != exact).sum() > 10  # near ties that bf16 rounding decides wrongly exist here
    rescored = _rescored_head_class()(head)
    assert rescored.weight is head.weight  # the fp32 weight is shared, not copied
    with torch.inference_mode():
        assert torch.equal(rescored(hidden).argmax(-1), exact)
        assert torch.equal(rescored(hidden.view(40, 50, 64)).argmax(-1), exact.view(40, 50))


def test_greedy_generation_with_the_rescored_head_is_fp32_greedy():
    from stages.lib.precision import bf16_output_head

    _, mixed, _ = _pair()
    mixed.eval()
    head = mixed.get_output_embeddings()
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(5))
    settings = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        reference = mixed.generate(input_ids=ids, **settings)
        with bf16_output_head(mixed):
            assert type(mixed.get_output_embeddings()).__name__ == "RescoredBF16Head"
            rescored = mixed.generate(input_ids=ids, **settings)
    assert torch.equal(rescored, reference)
    assert mixed.get_output_embeddings() is head  # put back after the block
