"""CPU training throughput: the train stage's CPU path against a plain TRL SFTTrainer, one run.

Both arms train the default model (SmolLM2-135M-Instruct, dequantised by the pipeline into
models/base/) on the same examples of data/split/train.jsonl, with LoRA r=16 alpha=32 on all
linear layers and the same max length (train.max_length of params.yaml):

  stage   what `python -m stages.train` runs on this machine: params.yaml's train section
          through plan_training -> load_model -> build_trainer (on CPU by default: no
          quantisation, packed padding-free rows with per-example attention, the frozen
          weights' products in bf16, fp32 LoRA weights, norms and loss);
  trl     a plain TRL SFTTrainer as a user would write it from the TRL and PEFT docs: nf4 +
          double quantisation, fp32 compute, prompt-completion data (completion-only loss),
          padded batches of train.batch_size examples.

Variants (--arms, comma-separated): `stage:nf4` (the stage with train.quantization nf4 and no
packing: the stage's CPU path before this benchmark existed), `stage:fp32` (no quantisation, fp32
products, packed).

Each arm runs in its own process (so each peak RSS is its own: ru_maxrss of the process, model
load included), one after the other, twice when --rounds 2 (ABAB, so a change in machine load
hits both). Per arm: WARMUP steps, then --steps timed steps; tokens are the non-padding tokens the
model's forward saw (the attention mask's sum, or the packed row's length), examples the
sequences in the batch. The 1-minute load average is recorded before and after each arm: on a
shared machine compare arms of the same run, not figures of different runs.

    python bench/cpu_train.py                       # stage and trl, ~3-5 min on 2 idle cores
    python bench/cpu_train.py --arms stage,stage:nf4,trl --rounds 2
Needs `dvc repro split` (or a full `dvc repro`) first. Writes reports/bench/cpu_train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TRAIN = ROOT / "data/split/train.jsonl"
WARMUP = 1


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _records(n: int) -> list[dict]:
    from stages.lib.io import read_jsonl

    if not TRAIN.exists():
        sys.exit(f"{TRAIN} not found: run `dvc repro split` first")
    return list(read_jsonl(TRAIN))[:n]


def _counting_hook(counter: dict):
    """A forward pre-hook that counts non-padding tokens and sequences of every training forward."""

    def hook(module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        positions = kwargs.get("position_ids")
        if mask is not None:
            counter["tokens"] += int(mask.sum())
            counter["examples"] += int(mask.shape[0])
        elif positions is not None and ids is not None and ids.shape[0] == 1:
            counter["tokens"] += int(ids.numel())
            counter["examples"] += int((positions == 0).sum())  # a packed row: position 0 starts an example
        elif ids is not None:
            counter["tokens"] += int(ids.numel())
            counter["examples"] += int(ids.shape[0])

    return hook


def _timing_callback(counter: dict, steps: list):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self.tokens, self.examples = counter["tokens"], counter["examples"]

        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"s": time.perf_counter() - self.started,
                          "tokens": counter["tokens"] - self.tokens,
                          "examples": counter["examples"] - self.examples})

    return StepTimer()


def _stage_trainer(variant: str, train, records, output_dir: str):
    from stages.lib.modeling import load_model, load_tokenizer, pick_compute_dtype, resolve_base_model
    from stages.lib.params import load_params
    from stages.lib.training import build_dataset, build_trainer, resolve_plan

    params = load_params(ROOT / "params.yaml")
    if variant == "nf4":
        train = train.model_copy(update={"quantization": "nf4", "compute_dtype": "auto", "packing": False})
    elif variant == "fp32":
        train = train.model_copy(update={"quantization": "none", "compute_dtype": "fp32"})
    elif variant:
        sys.exit(f"unknown stage variant {variant!r}")
    plan = resolve_plan(train)
    resolved = resolve_base_model(params.model, root=ROOT / "models/base")
    tokenizer = load_tokenizer(resolved)
    dataset, _ = build_dataset(records, tokenizer, train.max_length)
    model = load_model(resolved, quantize=plan.quantize,
                       compute_dtype=pick_compute_dtype(plan.compute_dtype, False, plan.quantize))
    loaded_rss = _rss_mib()
    trainer = build_trainer(plan, train, model=model, tokenizer=tokenizer, train_dataset=dataset,
                            output_dir=output_dir)
    from dataclasses import asdict

    return trainer, loaded_rss, {"plan": asdict(plan)}


def _trl_trainer(train, records, output_dir: str):
    """The plain recipe, written as the TRL/PEFT docs show it (no project code but the paths)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from stages.lib.modeling import resolve_base_model
    from stages.lib.params import load_params

    path = resolve_base_model(load_params(ROOT / "params.yaml").model, root=ROOT / "models/base").path
    tokenizer = AutoTokenizer.from_pretrained(path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
    loaded_rss = _rss_mib()
    rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records]
    args = SFTConfig(output_dir=output_dir, max_steps=train.max_steps, per_device_train_batch_size=train.batch_size,
                     learning_rate=train.learning_rate, max_length=train.max_length, use_cpu=True,
                     logging_steps=1, save_strategy="no", report_to="none", seed=train.seed)
    lora = LoraConfig(r=train.lora.r, lora_alpha=train.lora.alpha, lora_dropout=train.lora.dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=lora)
    return trainer, loaded_rss, {}


def run_arm(arm: str, steps: int, examples: int) -> dict:
    """One arm in this process: build, train WARMUP + steps steps, return the figures."""
    import tempfile

    import torch

    from stages.lib.params import load_params

    name, _, variant = arm.partition(":")
    train = load_params(ROOT / "params.yaml").train.model_copy(update={
        "max_steps": WARMUP + steps, "save_steps": 10**6, "eval_steps": 10**6, "logging_steps": 1})
    records = _records(examples)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        if name == "stage":
            from stages.lib.stage import bound_onednn_cache, fix_allocator_thresholds

            fix_allocator_thresholds()  # as run_stage does for `python -m stages.train`
            bound_onednn_cache()
            trainer, loaded_rss, extra = _stage_trainer(variant, train, records, output_dir)
        elif name == "trl":
            trainer, loaded_rss, extra = _trl_trainer(train, records, output_dir)
        else:
            sys.exit(f"unknown arm {arm!r}")
        setup_s = time.perf_counter() - started
        counter, per_step = {"tokens": 0, "examples": 0}, []
        # On the decoder itself: both arms' losses call it (the stage's loss skips the PEFT wrapper).
        causal_lm = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        causal_lm.base_model.register_forward_pre_hook(_counting_hook(counter), with_kwargs=True)
        trainer.add_callback(_timing_callback(counter, per_step))
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    timed = per_step[WARMUP:]
    seconds = sum(s["s"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    n_examples = sum(s["examples"] for s in timed)
    return {
        "arm": arm, "steps_timed": len(timed), "setup_s": round(setup_s, 1),
        "tokens_per_s": round(tokens / seconds, 1), "examples_per_s": round(n_examples / seconds, 3),
        "median_step_tokens_per_s": round(statistics.median(s["tokens"] / s["s"] for s in timed), 1),
        "tokens_per_step": round(tokens / len(timed), 1), "examples_per_step": round(n_examples / len(timed), 2),
        "step_s": [round(s["s"], 2) for s in per_step],
        "losses": [round(x, 4) for x in losses],
        "rss_after_load_mib": round(loaded_rss, 1), "peak_rss_mib": round(_rss_mib(), 1),
        "torch_threads": torch.get_num_threads(), **extra,
    }


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="stage,trl")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per arm, after %d warm-up" % WARMUP)
    parser.add_argument("--examples", type=int, default=400, help="first N train examples (enough for every step)")
    parser.add_argument("--rounds", type=int, default=1, help="run the arm list this many times (ABAB)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in every arm (0: torch's default, one per core); on a "
                             "loaded machine 1 thread per process avoids OpenMP threads waiting on each other")
    parser.add_argument("--out", default=str(ROOT / "reports/bench/cpu_train.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one arm, print its JSON
    args = parser.parse_args()
    if args.one:
        if args.one == "stage":  # as the stage's own process: no bitsandbytes when nothing is quantised
            from stages.lib.modeling import leave_out_unused_bitsandbytes

            leave_out_unused_bitsandbytes("train")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_arm(args.one, args.steps, args.examples)))
        return 0

    results = []
    for round_ in range(args.rounds):
        for arm in args.arms.split(","):
            before = _load()
            proc = subprocess.run([sys.executable, __file__, "--one", arm, "--steps", str(args.steps),
                                   "--examples", str(args.examples), "--threads", str(args.threads)],
                                  cwd=ROOT, text=True,
                                  capture_output=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            result = json.loads(line[len("RESULT "):])
            result.update(round=round_, load_before=before, load_after=_load())
            results.append(result)
            print(f"{arm:12s} {result['tokens_per_s']:8.1f} tokens/s {result['examples_per_s']:7.3f} examples/s "
                  f"peak RSS {result['peak_rss_mib']:7.0f} MiB (load {before} -> {result['load_after']})",
                  file=sys.stderr)

    def best(name):  # arms of this name, their median over rounds
        runs = [r for r in results if r["arm"] == name]
        return statistics.median(r["tokens_per_s"] for r in runs) if runs else None

    stage, trl = best("stage"), best("trl")
    summary = {
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "versions": _versions()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "stage_over_trl": round(stage / trl, 2) if stage and trl else None,
        "results": results,
    }
    from stages.lib.io import write_text

    write_text(args.out, json.dumps(summary, indent=2) + "\n")  # atomic, as the stages write
    print("\n| arm | tokens/s | examples/s | peak RSS MiB | load before -> after |\n|---|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['arm']} | {r['tokens_per_s']} | {r['examples_per_s']} | {r['peak_rss_mib']:.0f} | "
              f"{r['load_before']} -> {r['load_after']} |")
    if summary["stage_over_trl"]:
        print(f"\nstage / trl tokens/s: {summary['stage_over_trl']}x   ({args.out})")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


if __name__ == "__main__":
    sys.exit(main())
