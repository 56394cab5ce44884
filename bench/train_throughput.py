"""GPU training throughput: the plain TRL QLoRA recipe against this project's train-stage path.

On one GPU, in one run, on the same data (Alpaca-like lengths: lognormal, mean ~187 tokens, random
token ids) and the same Llama-3-8B-shaped model with random weights, nf4 + double quant:

  seed        the reference arm, the plain TRL QLoRA recipe a user would write: TRL SFTTrainer,
              LoRA r=16 alpha=32 dropout=0.05 on q/k/v/o, batch 4 x accum 4, max length 1024,
              gradient checkpointing as SFTConfig defaults it, no packing;
  throughput  the train stage's GPU default: plan_training(profile throughput) -> build_trainer,
              i.e. LoRA r=16 on all linear layers, packed padding-free micro-batches of a token
              budget with varlen (per-example) attention, no checkpointing, Liger kernels;
  low_memory  the same with gradient checkpointing and a smaller token budget (16-24 GB cards);
  trl:...     "best TRL": TRL's SFTTrainer tuned for speed as its documentation recommends (packing
              bfd, padding-free collation, Liger, all-linear LoRA r=16 with the project's alpha and
              dropout, no checkpointing), 16k tokens per optimizer step as a 16k-token row or as
              4k-token rows x gradient accumulation 4 (--trl-arms), SDPA attention, each arm in its
              own process. Our arms get `ratio_to_fastest_trl` (median and aggregate).

Variants for the notes (--arms, ';'-separated): `throughput:tokens=8192`, `throughput:attention=sdpa`,
`throughput:liger=0`, `throughput:dropout=0`, `throughput:fused=0` (peft's own LoRA forward instead of
stages/lib/fused_lora.py), `low_memory:tokens=8192`, or several keys at once:
`throughput:tokens=8192,liger=0`. Arms run in the order given on one loaded model; Liger patches the
model in place, so list the `liger=0` arms first.

Each step's time is taken between CUDA-synchronised step boundaries; tokens are counted in the
model's forward (non-padding tokens: the attention mask's sum, or the packed row's length). After
WARMUP steps, the per-step tokens/s are collected and their median reported (aggregate too).
MFU = tokens/s * (4 * N_matmul + 6 * N_lora) / 989e12 (frozen base: no weight gradients;
recomputation under checkpointing is not counted as useful work).

Usage on a GPU machine, from the repository root:
    python bench/train_throughput.py                       # seed, best-TRL arms, throughput, low_memory
    python bench/train_throughput.py --no-seed --arms 'throughput:liger=0;throughput;throughput:tokens=8192'
    python bench/train_throughput.py --profile-steps 2     # + per-phase breakdown of throughput
Writes reports/bench/train_throughput.json (--out) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL_DIR = os.environ.get("BENCH_MODEL_DIR", "/tmp/llama8b-random")
PEAK_FLOPS = 989e12        # H100/H200 SXM dense bf16, datasheet
WARMUP = 2                 # steps excluded from timing (compilation, allocator growth)
SEED_STEPS = 14            # as the reference recipe
SEED_SEQS_PER_STEP = 16    # batch 4 x accum 4
# "Best TRL" arms: 16k tokens per optimizer step either way (as the project's throughput profile).
DEFAULT_TRL_ARMS = "trl:tokens=16384,accum=1;trl:tokens=4096,accum=4"


def llama8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False)


def n_matmul(cfg) -> int:
    """Weights that multiply every token: the decoder's linear layers and the LM head."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + cfg.vocab_size * h


def make_model(path: str) -> float:
    """Random-weight Llama-3-8B-shaped checkpoint in bf16 safetensors, as the reference recipe makes it."""
    import torch
    from transformers import LlamaForCausalLM

    if os.path.exists(path + "/config.json"):
        return 0.0
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama8b_config()).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="20GB")
    del model
    torch.cuda.empty_cache()
    return time.perf_counter() - started


def make_rows(n: int):
    """The reference recipe's data: lognormal lengths (mean ~187) clipped to [16, 1024], random ids."""
    rng = random.Random(0)
    lens = [max(16, min(1024, int(rng.lognormvariate(5.0, 0.7)))) for _ in range(n)]
    return [[rng.randrange(1000, 128000) for _ in range(length)] for length in lens]


def wordlevel_tokenizer():
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")))
    tok.pad_token = tok.eos_token = "<pad>"
    return tok


# --------------------------------------------------------------------------------------------
# Measurement


class TokenCounter:
    """Counts non-padding tokens entering the decoder (once per micro-batch, also under
    gradient checkpointing, which recomputes layers, not the model's forward)."""

    def __init__(self, decoder):
        self.host, self.device = 0, None
        self.handle = decoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None and mask.dim() == 2:
            total = mask.sum()
            self.device = total if self.device is None else self.device + total
        else:
            self.host += ids.numel()

    def value(self) -> int:
        return self.host + (int(self.device.item()) if self.device is not None else 0)


def make_meter(counter, profile_at: int | None = None, profile_steps: int = 0):
    import torch
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.profiler = [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            self.tokens.append(counter.value())
            if profile_at is not None and state.global_step == profile_at:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                self.profiler.__enter__()
                self.profile_started = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            self.tokens.append(counter.value())
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                self.profile_wall = time.perf_counter() - self.profile_started

    return Meter()


CATEGORIES = [  # first match wins; names lower-cased (flash kernels name cutlass types: test them first)
    ("attention (flash varlen / SDPA)", ("flash", "fmha", "attention", "attn")),
    ("nf4 dequantize (bitsandbytes)", ("dequant",)),
    ("matmul (cuBLAS/CUTLASS)", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "wgmma", "s16816", "cublas", "splitk")),
    ("Liger (RMSNorm/SwiGLU/RoPE)", ("liger", "rms_norm", "swiglu", "rope")),
    ("LM head log-probs (TRL)", ("logprob", "log_prob", "chunked", "cross_entropy", "log_softmax", "lse")),
    ("dropout (LoRA)", ("dropout", "bernoulli", "masked_scale")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copies/fill", ("memcpy", "memset", "copy", "fill")),
    ("elementwise add/mul (residual, LoRA sum/scale)", ("functor_add", "mulfunctor", "aunaryfunctor", "binaryfunctor")),
]


def breakdown(profiler, steps: int, tokens: int, flops_per_token: float, step_s: float) -> dict:
    """GPU time per kernel category over the profiled steps, against the unprofiled median step
    time (the profiler itself slows the host side, so its wall time would overstate idleness)."""
    from torch.autograd import DeviceType

    per_category, kernels = {}, []
    for event in profiler.key_averages():
        if getattr(event, "device_type", None) != DeviceType.CUDA:
            continue
        micros = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if micros <= 0:
            continue
        name = event.key.lower()
        category = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        per_category[category] = per_category.get(category, 0.0) + micros / 1e6 / steps
        kernels.append((micros / 1e6 / steps, event.count // steps, event.key[:120]))
    busy = sum(per_category.values())
    kernels.sort(reverse=True)
    matmul = per_category.get("matmul (cuBLAS/CUTLASS)", 0.0)
    return {
        "steps_profiled": steps, "tokens_per_step": tokens / steps,
        "gpu_busy_s_per_step": round(busy, 4), "unprofiled_step_s_median": round(step_s, 4),
        "gpu_idle_fraction_of_step": round(max(0.0, 1 - busy / step_s), 4),
        "seconds_per_step": {c: round(t, 4) for c, t in sorted(per_category.items(), key=lambda x: -x[1])},
        "share_of_step": {c: round(t / step_s, 4) for c, t in sorted(per_category.items(), key=lambda x: -x[1])},
        "matmul_tflops_while_in_gemm": round(tokens / steps * flops_per_token / matmul / 1e12, 1) if matmul else None,
        "top_kernels_per_step": [{"s": round(s, 4), "calls": n, "name": k} for s, n, k in kernels[:25]],
    }


def time_trainer(trainer, decoder, flops_const: float, profile_steps: int = 0) -> dict:
    import torch

    counter = TokenCounter(decoder)
    timed_end = trainer.args.max_steps - profile_steps
    meter = make_meter(counter, profile_at=timed_end if profile_steps else None, profile_steps=profile_steps)
    trainer.add_callback(meter)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    counter.handle.remove()
    times, tokens = meter.times, meter.tokens
    steps = list(range(WARMUP, timed_end))
    per_step = [(tokens[k + 1] - tokens[k]) / (times[k + 1] - times[k]) for k in steps]
    step_s = [times[k + 1] - times[k] for k in steps]
    total_tokens = tokens[timed_end] - tokens[WARMUP]
    n_lora = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    flops_per_token = flops_const + 6 * n_lora
    median = statistics.median(per_step)
    result = {
        "tokens_per_s": round(median, 1),
        "tokens_per_s_aggregate": round(total_tokens / (times[timed_end] - times[WARMUP]), 1),
        "tokens_per_s_min_max": [round(min(per_step), 1), round(max(per_step), 1)],
        "mfu": round(median * flops_per_token / PEAK_FLOPS, 4),
        "model_tflops": round(median * flops_per_token / 1e12, 1),
        "step_s_median": round(statistics.median(step_s), 4),
        "tokens_per_step_mean": round(total_tokens / len(steps), 1),
        "steps_timed": len(steps), "warmup_steps": WARMUP,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "n_lora": n_lora, "flops_per_token": flops_per_token,
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "final_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
        # Per-step losses (logging_steps=1): arms on the same data and seed must trace the same curve.
        "losses": [round(e["loss"], 5) for e in trainer.state.log_history if "loss" in e],
    }
    if profile_steps and meter.profiler is not None:
        result["breakdown"] = breakdown(meter.profiler, profile_steps, tokens[-1] - tokens[timed_end],
                                        flops_per_token, result["step_s_median"])
    return result


# --------------------------------------------------------------------------------------------
# Workers (one process each, so that arms never share patched modules or allocator state)


def worker_seed(rows, steps: int) -> dict:
    """The reference recipe's arm (plain TRL QLoRA), with its exact model, LoRA, SFTConfig and tokenizer."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_compute_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, quantization_config=bnb, device_map="auto")
    torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj", "k_proj", "o_proj"], bias="none"))
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="seed-recipe-"), max_steps=steps, learning_rate=2e-4,
                     bf16=True, logging_steps=1, save_strategy="no", report_to="none",
                     per_device_train_batch_size=4, gradient_accumulation_steps=4, packing=False, max_length=1024)
    trainer = SFTTrainer(model=model, train_dataset=Dataset.from_dict({"input_ids": rows}), args=args,
                         processing_class=wordlevel_tokenizer())
    result = time_trainer(trainer, model.get_base_model().model, 4 * n_matmul(model.config))
    result.update(load_quantize_s=round(load_s, 1), attention=model.config._attn_implementation,
                  plan="reference recipe: q/k/v/o r=16, batch 4 x accum 4, max_length 1024, no packing")
    return result


def worker_trl(rows, spec: str, steps: int) -> dict:
    """"Best TRL": TRL's own SFTTrainer tuned as its documentation recommends for speed, with the
    project's model, data, LoRA (r=16 alpha=32 dropout 0.05 on all linear layers) and timing:
    best-fit-decreasing packing, padding-free collation, Liger kernels, no gradient checkpointing.
    Spec `trl:tokens=16384,accum=1,attention=sdpa,dropout=0.05`: packed row length, gradient
    accumulation, attention implementation and LoRA dropout; tokens x accum is the tokens per
    optimizer step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    _, options = parse_arm(spec)
    tokens, accum = int(options.get("tokens", 16384)), int(options.get("accum", 1))
    attention = options.get("attention", "sdpa")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_compute_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, quantization_config=bnb, device_map={"": 0},
                                                 dtype=torch.bfloat16, attn_implementation=attention)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    model.config.use_cache = False
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=float(options.get("dropout", 0.05)),
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=steps, learning_rate=2e-4,
                     bf16=True, logging_steps=1, save_strategy="no", report_to="none",
                     per_device_train_batch_size=1, gradient_accumulation_steps=accum, max_length=tokens,
                     packing=True, packing_strategy="bfd", padding_free=True, gradient_checkpointing=False,
                     use_liger_kernel=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, train_dataset=Dataset.from_dict({"input_ids": rows}), args=args,
                         processing_class=wordlevel_tokenizer(), peft_config=lora)
    result = time_trainer(trainer, trainer.model.get_base_model().model, 4 * n_matmul(model.config))
    result.update(load_quantize_s=round(load_s, 1), attention=model.config._attn_implementation,
                  lora={"r": 16, "alpha": 32, "dropout": lora.lora_dropout, "target_modules": "all-linear"},
                  plan=f"TRL SFTTrainer: all-linear r=16, packing bfd, padding-free, Liger, no checkpointing, "
                       f"{tokens}-token rows x grad accum {accum} ({attention})")
    return result


def parse_arm(spec: str):
    profile, _, rest = spec.partition(":")
    options = dict(item.split("=", 1) for item in rest.split(",") if item)
    return profile, options


def worker_project(rows, arms: list[str], steps: int, profile_steps: int, result_path: str | None = None,
                   profile_arm: str = "throughput") -> dict:
    """The train stage's path: load_model -> plan -> build_trainer, for each arm on one loaded model."""
    import gc
    from dataclasses import asdict, replace

    import torch
    from datasets import Dataset

    from stages.lib.modeling import ResolvedModel, load_model
    from stages.lib.params import TrainParams
    from stages.lib.training import build_trainer, resolve_plan

    torch.cuda.synchronize()
    started = time.perf_counter()
    model = load_model(ResolvedModel(MODEL_DIR, None, False, "llama-3-8b-shaped (random)"), quantize=True,
                       compute_dtype=torch.bfloat16, device_map={"": 0} if torch.cuda.is_available() else None)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    dataset = Dataset.from_dict({"input_ids": rows, "assistant_masks": [[1] * len(r) for r in rows]})
    tokenizer = wordlevel_tokenizer()
    results = {}
    for spec in arms:
        profile, options = parse_arm(spec)
        train = TrainParams(profile=profile, max_steps=steps + (profile_steps if spec == profile_arm else 0),
                            max_length=1024, logging_steps=1, save_steps=10**6)
        if "tokens" in options:
            train = train.model_copy(update={"tokens_per_batch": int(options["tokens"])})
        if "dropout" in options:
            train = train.model_copy(update={"lora": train.lora.model_copy(update={"dropout": float(options["dropout"])})})
        # The defaults go through the stage's own fitting to free memory; explicit budgets are kept.
        plan = resolve_plan(train, model) if "tokens" not in options else resolve_plan(train)
        if options.get("liger") == "0":
            plan = replace(plan, liger=False)
        if "fused" in options:
            plan = replace(plan, fused_lora=options["fused"] == "1")
        if options.get("attention") == "sdpa":
            plan = replace(plan, attention=None)
        if plan.attention is None:
            model.set_attn_implementation("sdpa")
        print(f"[bench] {spec}: {plan}", file=sys.stderr, flush=True)
        trainer = None
        try:
            trainer = build_trainer(plan, train, model=model, tokenizer=tokenizer, train_dataset=dataset,
                                    output_dir=tempfile.mkdtemp(prefix="bench-"))
            result = time_trainer(trainer, model.model, 4 * n_matmul(model.config),
                                  profile_steps=profile_steps if spec == profile_arm else 0)
            result.update(load_quantize_s=round(load_s, 1), plan=asdict(plan), attention=model.config._attn_implementation,
                          lora={"r": train.lora.r, "alpha": train.lora.alpha, "dropout": train.lora.dropout,
                                "target_modules": train.lora.target_modules})
        except Exception as exc:  # keep the other arms' figures
            import traceback

            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"[:500], "plan": asdict(plan)}
        results[spec] = result
        print(f"[bench] {spec}: {json.dumps(result)[:600]}", file=sys.stderr, flush=True)
        if result_path:  # figures so far survive a crash or a timeout of a later arm
            Path(result_path).write_text(json.dumps(results))
        # Back to the bare base model for the next arm.
        if trainer is not None:
            peft_model = trainer.model
            del trainer
            model = peft_model.unload()
            del peft_model
        if plan.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        try:
            model.disable_input_require_grads()
        except Exception:
            pass
        model.__dict__.pop("forward", None)  # TRL's fused LM head patches the instance
        gc.collect()
        torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------------------------


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "liger_kernel",
                 "triton"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="throughput;low_memory",
                        help="project arms, ';'-separated, e.g. 'throughput;throughput:tokens=8192,liger=0'")
    parser.add_argument("--trl-arms", default=DEFAULT_TRL_ARMS,
                        help="'best TRL' arms, ';'-separated, each in its own process ('' for none)")
    parser.add_argument("--no-seed", action="store_true", help="skip the reference arm")
    parser.add_argument("--steps", type=int, default=12, help="steps per project arm, warm-up included")
    parser.add_argument("--seed-steps", type=int, default=SEED_STEPS)
    parser.add_argument("--profile-steps", type=int, default=0, help="extra profiled steps of --profile-arm")
    parser.add_argument("--profile-arm", default="throughput")
    parser.add_argument("--out", default=str(ROOT / "reports/bench/train_throughput.json"))
    parser.add_argument("--work-dir", help="where the workers' own result files go (default: a temp dir)")
    parser.add_argument("--worker", choices=["seed", "project", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    arms = [a for a in args.arms.split(";") if a]
    trl_arms = [a for a in args.trl_arms.split(";") if a]

    max_tokens = 16384
    for spec in arms + trl_arms:
        options = parse_arm(spec)[1]
        max_tokens = max(max_tokens, int(options.get("tokens", 0)) * int(options.get("accum", 1)))
    n_rows = max(args.seed_steps * SEED_SEQS_PER_STEP + 64,
                 math.ceil(1.5 * max_tokens * (args.steps + args.profile_steps) / 187))

    if args.worker:
        rows = make_rows(n_rows)
        if args.worker == "seed":
            result = worker_seed(rows, args.seed_steps)
        elif args.worker == "trl":
            result = worker_trl(rows, arms[0], args.steps)
        else:
            result = worker_project(rows, arms, args.steps, args.profile_steps, args.result, args.profile_arm)
        Path(args.result).write_text(json.dumps(result))
        return 0

    import torch

    create_s = make_model(MODEL_DIR)
    rows = make_rows(n_rows)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(0), "versions": versions(),
        "model": {"shape": "Llama-3-8B (32 layers, hidden 4096, MLP 14336, 32/8 heads, vocab 128256)",
                  "weights": "random (no hub)", "quantization": "nf4 + double quant, bf16 compute",
                  "n_matmul": n_matmul(llama8b_config()), "checkpoint_written_s": round(create_s, 1)},
        "data": {"rows": n_rows, "mean_tokens": round(sum(map(len, rows)) / n_rows, 1),
                 "lengths": "lognormal(5.0, 0.7) clipped to [16, 1024], as the reference recipe"},
        "peak_flops": PEAK_FLOPS, "arms": {},
    }
    del rows
    jobs = (([] if args.no_seed else [("seed", [])]) + [("trl", [spec]) for spec in trl_arms]
            + ([("project", arms)] if arms else []))
    for number, (worker, worker_arms) in enumerate(jobs):
        work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-results-"))
        work_dir.mkdir(parents=True, exist_ok=True)
        result_path = str(work_dir / f"{worker}{number}_result.json")
        command = [sys.executable, __file__, "--worker", worker, "--result", result_path,
                   "--steps", str(args.steps), "--seed-steps", str(args.seed_steps),
                   "--profile-steps", str(args.profile_steps), "--profile-arm", args.profile_arm,
                   "--arms", ";".join(worker_arms)]
        print("[bench] running", " ".join(command[1:]), file=sys.stderr, flush=True)
        code = subprocess.call(command)
        try:
            result = json.loads(Path(result_path).read_text())
        except (OSError, ValueError):
            result = {"error": f"worker exited with {code}"}
        if worker in ("seed", "trl"):
            report["arms"]["seed" if worker == "seed" else worker_arms[0]] = result
        else:
            report["arms"].update(result if "error" not in result else {a: result for a in worker_arms})

    seed = report["arms"].get("seed", {}).get("tokens_per_s")
    main_arm = report["arms"].get("throughput", {})
    low = report["arms"].get("low_memory", {})
    if seed:
        for arm in report["arms"].values():
            if arm.get("tokens_per_s"):
                arm["ratio_to_seed"] = round(arm["tokens_per_s"] / seed, 2)
    report["ratio"] = main_arm.get("ratio_to_seed")
    report["mfu"] = main_arm.get("mfu")
    report["low_memory_ratio"] = low.get("ratio_to_seed")
    trl_done = {name: arm for name, arm in report["arms"].items() if "trl" in name and arm.get("tokens_per_s")}
    if trl_done:
        fastest = max(trl_done, key=lambda name: trl_done[name]["tokens_per_s"])
        best = trl_done[fastest]
        report["fastest_trl_arm"] = fastest
        for name, arm in report["arms"].items():
            if "trl" not in name and arm.get("tokens_per_s"):
                arm["ratio_to_fastest_trl"] = round(arm["tokens_per_s"] / best["tokens_per_s"], 2)
                arm["ratio_to_fastest_trl_aggregate"] = round(
                    arm["tokens_per_s_aggregate"] / max(a["tokens_per_s_aggregate"] for a in trl_done.values()), 2)
    report["ratio_to_fastest_trl"] = main_arm.get("ratio_to_fastest_trl")
    report["targets"] = {
        "throughput >= 2x fastest TRL arm (median)": bool(
            report["ratio_to_fastest_trl"] and report["ratio_to_fastest_trl"] >= 2),
        "throughput MFU >= 55%": bool(report["mfu"] and report["mfu"] >= 0.55),
        "low_memory >= 8x seed at <= 10 GiB reserved": bool(
            report["low_memory_ratio"] and report["low_memory_ratio"] >= 8
            and low.get("peak_reserved_gib", 99) <= 10),
        "throughput >= 10x seed": bool(report["ratio"] and report["ratio"] >= 10),
        "throughput MFU >= 35%": bool(report["mfu"] and report["mfu"] >= 0.35),
        "low_memory >= 3x seed at <= 10 GiB peak": bool(
            report["low_memory_ratio"] and report["low_memory_ratio"] >= 3
            and low.get("peak_reserved_gib", 99) <= 10),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{report['gpu']}, {report['date']}, " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print(f"{'arm':34} {'tok/s':>9} {'aggr':>7} {'x seed':>7} {'x TRL':>6} {'MFU':>6} {'alloc':>7} {'reserv':>7} "
          f"{'step s':>7} {'tok/step':>9}")
    for name, arm in report["arms"].items():
        if "error" in arm:
            print(f"{name:34} ERROR {arm['error'][:100]}")
            continue
        print(f"{name:34} {arm['tokens_per_s']:9.0f} {arm['tokens_per_s_aggregate']:7.0f} "
              f"{arm.get('ratio_to_seed', 0) or 0:7.2f} {arm.get('ratio_to_fastest_trl', 0) or 0:6.2f} {arm['mfu']:6.1%} "
              f"{arm['peak_allocated_gib']:7.1f} {arm['peak_reserved_gib']:7.1f} {arm['step_s_median']:7.3f} "
              f"{arm['tokens_per_step_mean']:9.0f}")
    profiled = report["arms"].get(args.profile_arm, {})
    if "breakdown" in profiled:
        b = profiled["breakdown"]
        print(f"\n{args.profile_arm}: GPU time per step by kernel category ({b['tokens_per_step']:.0f} tokens, "
              f"unprofiled step {b['unprofiled_step_s_median']} s, GPU idle {b['gpu_idle_fraction_of_step']:.1%}, "
              f"GEMMs at {b['matmul_tflops_while_in_gemm']} TFLOP/s while running)")
        for category, seconds in b["seconds_per_step"].items():
            print(f"  {category:48} {seconds:7.3f} s {b['share_of_step'][category]:6.1%}")
    print("targets:", json.dumps(report["targets"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
