"""plan_training's profile resolution (pure, no GPU) and the token-budget fit."""
from types import SimpleNamespace

import pytest

from stages.lib.params import TrainParams
from stages.lib.packing import PACKED_ATTENTION
from stages.lib.training import (CPU_TOKENS, LOW_MEMORY_TOKENS, THROUGHPUT_TOKENS, TrainingPlan,
                                 activation_bytes_per_token, fit_token_budget, plan_training)


def _train(**overrides):
    return TrainParams().model_copy(update=overrides)


def _plan(cuda, **overrides):
    """The plan on a machine with every fast path: on CPU, one with bf16 matrix instructions."""
    return plan_training(_train(**overrides), cuda, liger_available=True, varlen_available=True,
                         cpu_bf16=not cuda)


def test_auto_on_cpu_is_the_cpu_profile_packed_mixed_bf16_and_unquantised():
    plan = _plan(False)
    assert plan.profile == "cpu" and plan.device == "cpu"
    # No nf4 on CPU by default (no fast 4-bit kernel there), bf16 products of the frozen weights.
    assert not plan.quantize and plan.compute_dtype == "bf16"
    assert plan.packing and plan.tokens_per_batch == CPU_TOKENS and plan.per_device_batch_size == 1
    assert plan.attention == PACKED_ATTENTION  # one causal SDPA call per example of the row
    assert not plan.liger and not plan.gradient_checkpointing


def test_auto_on_a_cpu_without_bf16_instructions_computes_in_fp32():
    # Emulated bf16 products are several times slower than fp32 ones there (AVX2-only CPUs).
    plan = plan_training(_train(), False, cpu_bf16=False)
    assert plan.profile == "cpu" and not plan.quantize and plan.compute_dtype == "fp32"
    assert plan.packing and plan.tokens_per_batch == CPU_TOKENS  # the rest of the cpu profile stays
    assert not plan.fused_lora                                   # plain fp32 layers: peft's own forward
    explicit = plan_training(_train(compute_dtype="bf16"), False, cpu_bf16=False)
    assert explicit.compute_dtype == "bf16" and explicit.fused_lora  # what the params ask for wins


def test_nf4_on_cpu_stays_available_and_computes_in_fp32():
    plan = _plan(False, quantization="nf4")
    assert plan.quantize and plan.compute_dtype == "fp32"
    assert _plan(False, quantization="nf4", compute_dtype="bf16").compute_dtype == "bf16"  # explicit wins
    assert _plan(False, quantization="none", compute_dtype="fp32").compute_dtype == "fp32"


def test_cpu_packing_off_is_plain_padded_batches():
    plan = _plan(False, packing=False)
    assert not plan.packing and plan.tokens_per_batch is None and plan.attention is None
    assert plan.per_device_batch_size == TrainParams().batch_size


@pytest.mark.parametrize("profile", ["throughput", "low_memory"])
def test_gpu_profiles_turn_themselves_off_without_cuda(profile):
    plan = _plan(False, profile=profile)
    assert not plan.packing and not plan.liger and plan.attention is None and plan.tokens_per_batch is None
    assert plan.compute_dtype == "bf16" and not plan.quantize


def test_auto_on_cuda_is_the_throughput_profile():
    plan = _plan(True)
    assert plan.profile == "throughput" and plan.compute_dtype == "bf16" and plan.quantize
    assert plan.packing and plan.liger and not plan.gradient_checkpointing
    assert plan.tokens_per_batch == THROUGHPUT_TOKENS and plan.per_device_batch_size == 1
    assert plan.attention == PACKED_ATTENTION


def test_low_memory_checkpoints_with_a_smaller_budget():
    plan = _plan(True, profile="low_memory")
    assert plan.gradient_checkpointing and plan.packing and plan.liger
    assert plan.tokens_per_batch == LOW_MEMORY_TOKENS < THROUGHPUT_TOKENS


def test_cpu_profile_on_cuda_is_plain_batches():
    plan = _plan(True, profile="cpu")
    assert not plan.packing and not plan.liger and plan.attention is None
    assert plan.compute_dtype == "bf16"  # the dtype still follows the device


def test_explicit_settings_win_over_the_profile():
    plan = _plan(True, packing=False, gradient_checkpointing=True, compute_dtype="fp16")
    assert not plan.packing and plan.gradient_checkpointing and plan.compute_dtype == "fp16"
    assert plan.tokens_per_batch is None and plan.attention is None
    assert _plan(True, tokens_per_batch=8192).tokens_per_batch == 8192


def test_budget_never_below_one_whole_example():
    plan = _plan(True, tokens_per_batch=100, max_length=512)
    assert plan.tokens_per_batch == 512


def test_no_varlen_kernel_keeps_sdpa_and_no_liger_package_no_liger():
    plan = plan_training(_train(), True, liger_available=False, varlen_available=False)
    assert plan.packing and plan.attention is None and not plan.liger


def test_fp16_when_bf16_unsupported():
    assert plan_training(_train(), True, bf16_supported=False).compute_dtype == "fp16"


LLAMA_8B = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128)


def test_checkpointing_needs_far_less_memory_per_token():
    full = activation_bytes_per_token(LLAMA_8B, checkpointing=False, lora_dropout=0.05)
    ckpt = activation_bytes_per_token(LLAMA_8B, checkpointing=True, lora_dropout=0.05)
    assert ckpt * 8 < full
    assert activation_bytes_per_token(LLAMA_8B, False, 0.0) < full


def test_fit_token_budget_only_lowers():
    plan = _plan(True)
    roomy = fit_token_budget(plan, LLAMA_8B, free_bytes=10**15, lora_dropout=0.05)
    assert roomy.tokens_per_batch == plan.tokens_per_batch
    tight = fit_token_budget(plan, LLAMA_8B, free_bytes=16 * 2**30, lora_dropout=0.05)
    assert 1024 <= tight.tokens_per_batch < plan.tokens_per_batch and tight.tokens_per_batch % 1024 == 0
    cpu = TrainingPlan("cpu", "fp32", True, False, False, False, 8, 1)
    assert fit_token_budget(cpu, LLAMA_8B, 1, 0.05) is cpu



def test_fused_lora_is_on_for_nf4_on_cuda_and_the_frozen_bf16_layers_on_cpu():
    assert _plan(True).fused_lora and _plan(True, profile="low_memory").fused_lora
    assert _plan(False).fused_lora                           # CPU default: the frozen bf16 layers
    assert not _plan(False, compute_dtype="fp32").fused_lora  # plain fp32 layers: peft's own forward
    assert not _plan(False, profile="throughput").fused_lora  # a GPU profile on CPU: plain peft
    assert not _plan(False, fused_lora=False).fused_lora
    assert not _plan(True, profile="cpu").fused_lora
    assert not _plan(True, quantization="none").fused_lora   # on CUDA the fused path is for 4-bit layers
    assert not _plan(True, fused_lora=False).fused_lora
    assert _plan(True, profile="cpu", fused_lora=True).fused_lora
