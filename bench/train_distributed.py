"""Several GPUs: tokens/s of the train stage's path under DDP and FSDP-QLoRA, and the adapter each
saves, on random-weight Llama-shaped models (no hub access needed).

Each arm runs the stage's own code under the launch plan the stage itself would use
(stages/lib/distributed.py: `accelerate launch`, DDP or FSDP with the QLoRA settings): load_model
(nf4; the 4-bit weights stored in bf16 for FSDP), the `throughput` profile's plan, build_trainer,
trainer.train(), then save_adapter from the wrapped or sharded model, whose file is checked
against the model's LoRA parameters (names, shapes, dtype).

    python bench/train_distributed.py --arms 'ddp:1;fsdp:1'                 # one GPU: correctness
    python bench/train_distributed.py --arms 'ddp:1;ddp:2;ddp:4;ddp:8;fsdp:8'   # scaling (as lent)
    python bench/train_distributed.py --model 70b --arms 'fsdp:8' --tokens 4096  # does not fit one GPU

Arm `MODE:N`: MODE ddp or fsdp, N processes (GPUs). tokens/s counts the tokens of every process
between CUDA-synchronised step boundaries after WARMUP steps (median step). Writes
reports/bench/train_distributed.json (--out). The 8B checkpoint is bench/train_throughput.py's
(/tmp/llama8b-random); the 70B one (/tmp/llama70b-random, ~140 GB) is written tensor by tensor.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WARMUP = 2
SHAPES = {  # hidden, MLP, layers, heads, kv heads
    "8b": (4096, 14336, 32, 32, 8),
    "70b": (8192, 28672, 80, 64, 8),
    "tiny": (256, 512, 2, 4, 2),
}


def config_for(shape: str):
    from transformers import LlamaConfig

    hidden, mlp, layers, heads, kv = SHAPES[shape]
    return LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False)


def make_checkpoint(shape: str, path: str) -> None:
    """Random bf16 safetensors for `shape`, written one tensor at a time (a 70B model never has to
    fit in memory): names and shapes from a meta-device model, values N(0, 0.02) drawn on the GPU."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    if os.path.exists(os.path.join(path, "config.json")):
        return
    config = config_for(shape)
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    os.makedirs(path, exist_ok=True)
    generator = torch.Generator(device="cuda").manual_seed(0)
    shard, shard_bytes, index, number = {}, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes, number
        if shard:
            name = f"model-{number:05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            index.update({key: name for key in shard})
            shard, shard_bytes, number = {}, 0, number + 1

    for name, parameter in meta.state_dict().items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(parameter.shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(parameter.shape, generator=generator, device="cuda", dtype=torch.float32)
                      .mul_(0.02).to(torch.bfloat16).cpu())
        shard[name] = tensor
        shard_bytes += tensor.numel() * 2
        if shard_bytes > 5 * 2**30:
            flush()
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    config.torch_dtype = "bfloat16"
    config.save_pretrained(path)


def worker(args) -> None:
    """One process of an arm (run by accelerate launch, or directly for ddp:1)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import make_rows, n_matmul, wordlevel_tokenizer

    from stages.lib.distributed import save_adapter
    from stages.lib.modeling import ResolvedModel, load_model
    from stages.lib.params import TrainParams
    from stages.lib.training import build_trainer, resolve_plan

    mode, processes = args.arm.split(":")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.cuda.set_device(local_rank)
    train = TrainParams(profile="throughput", max_steps=args.steps, max_length=1024, logging_steps=1,
                        save_steps=10**6, tokens_per_batch=args.tokens, num_processes=int(processes),
                        distributed=mode)
    torch.cuda.synchronize()
    started = time.perf_counter()
    model = load_model(ResolvedModel(args.model_dir, None, False, f"llama-{args.model} (random)"), quantize=True,
                       compute_dtype=torch.bfloat16, device_map={"": local_rank},
                       quant_storage=torch.bfloat16 if mode == "fsdp" else None)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    plan = resolve_plan(train)
    rows = make_rows(max(2000, int(1.5 * args.tokens * args.steps * world / 187)))
    dataset = Dataset.from_dict({"input_ids": rows, "assistant_masks": [[1] * len(r) for r in rows]})

    class Meter(TrainerCallback):
        times, tokens = [], []

        def on_step_begin(self, a, state, control, **kwargs):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            self.tokens.append(state.num_input_tokens_seen)  # already summed over processes by Trainer

        def on_train_end(self, a, state, control, **kwargs):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            self.tokens.append(state.num_input_tokens_seen)

    meter = Meter()
    out_dir = tempfile.mkdtemp(prefix="bench-dist-")
    trainer = build_trainer(plan, train, model=model, tokenizer=wordlevel_tokenizer(), train_dataset=dataset,
                            output_dir=out_dir, callbacks=[meter])
    adapter_dtype = next(p.dtype for p in trainer.model.parameters() if p.requires_grad)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    adapter_dir = os.path.join(args.result_dir, f"adapter-{mode}-{processes}")
    save_adapter(trainer.model_wrapped, adapter_dir, is_main=trainer.is_world_process_zero(), dtype=adapter_dtype)
    peak = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()], device="cuda")
    if world > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    if rank != 0:
        return
    from safetensors.torch import load_file

    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    # Tokens: Trainer's count is of the first micro-batch of each step only where it logs; use the
    # per-step difference of num_input_tokens_seen (gathered over processes).
    steps = range(WARMUP, len(meter.times) - 1)
    per_step = [(meter.tokens[k + 1] - meter.tokens[k]) / (meter.times[k + 1] - meter.times[k]) for k in steps]
    per_step = [v for v in per_step if v > 0]
    n_lora = sum(t.numel() for t in saved.values())
    flops_per_token = 4 * n_matmul(model.config) + 6 * n_lora
    median = statistics.median(per_step) if per_step else None
    result = {
        "arm": args.arm, "model": args.model, "processes": world, "plan": {"tokens_per_batch": plan.tokens_per_batch,
                                                                            "fused_lora": plan.fused_lora},
        "tokens_per_s": round(median, 1) if median else None,
        "tokens_per_s_per_gpu": round(median / world, 1) if median else None,
        "mfu_per_gpu": round(median / world * flops_per_token / 989e12, 4) if median else None,
        "steps_timed": len(per_step), "load_quantize_s": round(load_s, 1),
        "peak_allocated_gib_per_gpu": round(peak[0].item() / 2**30, 2),
        "peak_reserved_gib_per_gpu": round(peak[1].item() / 2**30, 2),
        "losses": [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e],
        "adapter": {"tensors": len(saved), "lora_params": n_lora,
                    "dtypes": sorted({str(t.dtype) for t in saved.values()}),
                    "all_finite": all(bool(torch.isfinite(t).all()) for t in saved.values()),
                    "b_nonzero": all(bool(t.abs().sum() > 0) for k, t in saved.items() if "lora_B" in k),
                    "keys_sample": sorted(saved)[:2]},
    }
    Path(args.result).write_text(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="ddp:1;fsdp:1")
    parser.add_argument("--model", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--model-dir")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16384, help="packed tokens per micro-batch per GPU")
    parser.add_argument("--out", default=str(ROOT / "reports/bench/train_distributed.json"))
    parser.add_argument("--work-dir")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model_dir = args.model_dir or {"8b": "/tmp/llama8b-random", "70b": "/tmp/llama70b-random",
                                        "tiny": "/tmp/llama-tiny-random"}[args.model]
    if args.arm:
        worker(args)
        return 0

    import torch

    from stages.lib.distributed import launch_command, needs_launch
    from stages.lib.params import TrainParams

    make_checkpoint(args.model, args.model_dir)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "gpu": torch.cuda.get_device_name(0), "gpus_visible": torch.cuda.device_count(),
              "model": args.model, "tokens_per_batch_per_gpu": args.tokens, "steps": args.steps, "arms": {}}
    for arm in [a for a in args.arms.split(";") if a]:
        mode, processes = arm.split(":")
        train = TrainParams(num_processes=int(processes), distributed=mode)
        result = work / f"{mode}-{processes}.json"
        tail = [__file__, "--arm", arm, "--model", args.model, "--model-dir", args.model_dir, "--steps", str(args.steps),
                "--tokens", str(args.tokens), "--result", str(result), "--result-dir", str(work)]
        if needs_launch(train, env={}):
            accelerate = str(Path(sys.executable).with_name("accelerate"))
            command = launch_command(train, accelerate if os.path.exists(accelerate) else "accelerate", env={})
            command = command[:-2] + tail  # the bench's worker instead of `-m stages.train`
        else:
            command = [sys.executable] + tail
        print("[bench] running", " ".join(command), file=sys.stderr, flush=True)
        code = subprocess.call(command)
        try:
            report["arms"][arm] = json.loads(result.read_text())
        except (OSError, ValueError):
            report["arms"][arm] = {"error": f"exit code {code}"}
    one = report["arms"].get("ddp:1", {}).get("tokens_per_s")
    for arm in report["arms"].values():
        if one and arm.get("tokens_per_s"):
            arm["speedup_vs_ddp1"] = round(arm["tokens_per_s"] / one, 3)
            arm["scaling_efficiency"] = round(arm["tokens_per_s"] / one / arm["processes"], 3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, arm in report["arms"].items():
        print(name, json.dumps({k: arm.get(k) for k in ("tokens_per_s", "speedup_vs_ddp1", "mfu_per_gpu",
                                                        "peak_reserved_gib_per_gpu", "adapter", "error")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
