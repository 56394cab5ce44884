"""QLoRA training: the device plan, the token budget, the DVCLive curves and the TRL run.

The same code path runs on CPU and CUDA; `plan_training` decides what differs (compute dtype,
packing, gradient checkpointing, fused kernels) from the device and `train.profile`.
"""
from __future__ import annotations

import contextlib
import functools
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from stages.lib.chat import tokenize_conversation
from stages.lib.io import read_jsonl
from stages.lib.packing import PACKED_ATTENTION, register_packed_attention, varlen_available
from stages.lib.replay import mix_replay


def supervision_stats(rows: list[dict], dropped: int) -> dict:
    """How much of the data the loss sees: the supervised (assistant-mask) share of each kept
    example's tokens, its mean and minimum, and the examples dropped because truncation to
    train.max_length left them no assistant token. A mask that covered nothing, or everything,
    would show here before it showed in the model."""
    shares = [sum(r["assistant_masks"]) / len(r["assistant_masks"]) for r in rows]
    return {
        "examples": len(rows),
        "dropped_no_assistant_token": dropped,
        "supervised_tokens": sum(sum(r["assistant_masks"]) for r in rows),
        "tokens": sum(len(r["assistant_masks"]) for r in rows),
        "supervised_share_mean": round(sum(shares) / len(shares), 4) if shares else 0.0,
        "supervised_share_min": round(min(shares), 4) if shares else 0.0,
    }


def tokenize_records(records: list[dict], tokenizer, max_length: int) -> tuple[list[dict], dict]:
    """Each record's ids and assistant mask (stages/lib/chat.py), and `supervision_stats`."""
    rows, dropped = [], 0
    for record in records:
        row = tokenize_conversation(tokenizer, record["messages"], max_length)
        if row is None:
            dropped += 1
        else:
            rows.append(row)
    return rows, supervision_stats(rows, dropped)


def build_dataset(records: list[dict], tokenizer, max_length: int):
    """Tokenise records into a datasets.Dataset; return it and its `supervision_stats`."""
    from datasets import Dataset

    rows, stats = tokenize_records(records, tokenizer, max_length)
    columns = {"input_ids": [r["input_ids"] for r in rows],
               "assistant_masks": [r["assistant_masks"] for r in rows]}
    return Dataset.from_dict(columns), stats


def no_supervision_message(stats: dict, max_length: int) -> str:
    return (f"no token to train on: all {stats['dropped_no_assistant_token']} training examples lost "
            f"every assistant token to truncation at train.max_length={max_length} (their prompts are "
            f"longer); raise train.max_length or shorten the prompts")


# Packed tokens per micro-batch for the CUDA profiles when train.tokens_per_batch is null, chosen by
# measurement on an H200 with a Llama-3-8B-shaped nf4 model (bench/NOTES.md), and lowered by
# `fit_token_budget` to what the card's free memory holds.
THROUGHPUT_TOKENS = 16384
LOW_MEMORY_TOKENS = 6144
# Packed tokens per micro-batch on CPU: enough rows for efficient bf16 products (2 of the sample's
# ~140-token examples), few enough that the saved activations and the allocator's reuse of their
# memory keep the stage under 2 GB resident (the default run: 1,738 MiB peak at 320 tokens, about
# 1,940 at 384, 2,402 at 512; 320-token steps also ran more tokens/s: bench/NOTES.md, CPU section).
# A packed row is never shorter than train.max_length (a whole example always fits).
CPU_TOKENS = 320


@dataclass(frozen=True)
class TrainingPlan:
    device: str                 # "cuda" or "cpu"
    compute_dtype: str          # "bf16" | "fp16" | "fp32"
    quantize: bool
    packing: bool
    gradient_checkpointing: bool
    liger: bool
    per_device_batch_size: int
    grad_accum: int
    profile: str = "cpu"        # the resolved train.profile
    # Packed tokens per micro-batch: every micro-batch is one padding-free row of whole examples,
    # at most this long. None: batches of `per_device_batch_size` examples (bins of max_length).
    tokens_per_batch: int | None = None
    # Attention implementation set on the model; None keeps the model's default (sdpa).
    attention: str | None = None
    # LoRA on the 4-bit linears through stages/lib/fused_lora.py instead of peft's per-layer path.
    fused_lora: bool = False


def plan_training(train, cuda: bool, bf16_supported: bool = True, liger_available: bool = False,
                  varlen_available: bool = False, cpu_bf16: bool = False) -> TrainingPlan:
    """Resolve `train.profile` and the auto settings for this device (pure: no torch calls).

    throughput (the CUDA default): packed padding-free micro-batches of `tokens_per_batch` tokens
    with per-example attention (varlen flash attention, no cross-example attention), no gradient
    checkpointing, Liger kernels. low_memory: the same with gradient checkpointing and a smaller
    token budget, for 16-24 GB cards. cpu (the CPU default): packed padding-free rows of
    CPU_TOKENS tokens with per-example attention, no quantisation, the frozen base's products in
    bf16 with fp32 LoRA weights, norms and loss (stages/lib/precision.py) where the CPU multiplies
    bf16 natively (`cpu_bf16`), fp32 elsewhere. The GPU-only switches
    turn themselves off without CUDA; the GPU profiles on CPU, and the cpu profile on CUDA, keep
    plain padded batches.
    """
    from stages.lib.modeling import resolve_precision

    profile = train.profile
    if profile == "auto":
        profile = "throughput" if cuda else "cpu"
    quantize, dtype = resolve_precision(train.quantization, train.compute_dtype, cuda, cpu_bf16)
    if cuda and train.compute_dtype == "auto" and not bf16_supported:
        dtype = "fp16"
    on_gpu_profile = cuda and profile in ("throughput", "low_memory")
    cpu_packed = not cuda and profile == "cpu"
    packing = bool(train.packing if train.packing is not None else (on_gpu_profile or cpu_packed))
    checkpointing = (train.gradient_checkpointing if train.gradient_checkpointing is not None
                     else profile == "low_memory")
    batch_size, tokens = train.batch_size, train.tokens_per_batch
    if packing and tokens is None:
        if on_gpu_profile:
            tokens = LOW_MEMORY_TOKENS if profile == "low_memory" else THROUGHPUT_TOKENS
        elif cpu_packed:
            tokens = CPU_TOKENS
    if packing and tokens is not None:
        tokens = max(tokens, train.max_length)  # a whole example always fits in a micro-batch
        batch_size = 1                          # one packed row per micro-batch
    else:
        tokens = None
    # The fused LoRA path: same function, fewer passes over activations (bench/NOTES.md); on by
    # default where throughput is the point: the CUDA profiles (nf4 layers) and the cpu profile
    # (the frozen bf16 layers of stages/lib/precision.py).
    fused = train.fused_lora if train.fused_lora is not None else (on_gpu_profile or cpu_packed)
    if train.distributed == "fsdp":
        fused = False  # FSDP flattens the 4-bit weights; bitsandbytes' own forward knows how to read them
    cpu_mixed = not cuda and not quantize and dtype == "bf16"
    # Packed rows need per-example attention: varlen flash attention on CUDA, one SDPA call per
    # example on CPU (stages/lib/packing.py); on CUDA without the varlen kernel, transformers' SDPA
    # with the block-diagonal mask it builds from the restarting position ids.
    packed_attention = tokens is not None and (varlen_available if cuda else True)
    return TrainingPlan(
        device="cuda" if cuda else "cpu", compute_dtype=dtype, quantize=quantize,
        packing=packing, gradient_checkpointing=bool(checkpointing),
        liger=bool(cuda and liger_available and profile != "cpu"),
        per_device_batch_size=batch_size, grad_accum=train.grad_accum, profile=profile,
        tokens_per_batch=tokens,
        attention=PACKED_ATTENTION if packed_attention else None,
        fused_lora=bool(fused and (quantize or cpu_mixed)))


def activation_bytes_per_token(config, checkpointing: bool, lora_dropout: float) -> int:
    """Bytes of saved activations per packed token in training a decoder with LoRA on all linear
    layers (bf16, Liger kernels): counted from the tensors autograd keeps per layer and calibrated
    against measured peaks (bench/NOTES.md). With checkpointing only each layer's input is kept,
    plus one layer's worth while it is recomputed."""
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = head_dim * (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    # Bytes per layer and token, calibrated on Llama-3-8B shapes (H200, 2026-11-28): 6.4 MiB per
    # token measured at 8-16k tokens, 4.2 MiB without LoRA dropout (which keeps each adapter's
    # dropped-out input and its mask), 0.47 MiB with checkpointing.
    per_layer = (26 * hidden + 4 * kv + 7 * inter) if lora_dropout > 0 else (16 * hidden + 4 * kv + 5 * inter)
    if checkpointing:
        return layers * 2 * hidden + per_layer
    return layers * per_layer


def fit_token_budget(plan: TrainingPlan, config, free_bytes: int, lora_dropout: float,
                     headroom: float = 0.85) -> TrainingPlan:
    """Lower `plan.tokens_per_batch` (never raise it) to what `free_bytes` of GPU memory holds."""
    from dataclasses import replace

    if plan.tokens_per_batch is None:
        return plan
    per_token = activation_bytes_per_token(config, plan.gradient_checkpointing, lora_dropout)
    fits = int(free_bytes * headroom) // max(per_token, 1) // 1024 * 1024
    if fits >= plan.tokens_per_batch:
        return plan
    print(f"train: {plan.tokens_per_batch} tokens per micro-batch would not fit in "
          f"{free_bytes / 2**30:.1f} GiB free; using {max(fits, 1024)}", file=sys.stderr)
    return replace(plan, tokens_per_batch=max(fits, 1024))


def peak_memory_bytes(cuda: bool) -> int:
    if cuda:
        import torch

        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_dvclive_callback(live_dir: Path):
    """Per-step curves through DVCLive. On resume, the steps before the interruption are replayed
    from the checkpoint's log history, so the curve is whole although DVC wiped the old plots.

    Why not the callback DVCLive ships for transformers (dvclive.huggingface.DVCLiveCallback,
    deprecated in favour of the same code in transformers.integrations.DVCLiveCallback): compared
    on one Trainer run (tiny Llama, 6 steps, a log every step, an evaluation every 3), it
    - numbers points by log call (next_step() after every on_log), not by training step: the
      per-step loss went to steps 0,1,2,4,5,6 and the evaluations to steps 3 and 7, where the
      training steps were 1-6 and 3, 6; curves of runs with different eval_steps do not line up;
    - writes the per-step loss to plots/metrics/loss.tsv and only the run's mean (one point) to
      train/loss.tsv, which dvc.yaml plots; plus epoch, total_flos and train_runtime series;
    - on resume from checkpoint-3 started again at step 0 with steps 4-6 only, where this one
      replayed steps 1-3 from the checkpoint: the curve of an interrupted run was half a curve.
    """
    from transformers import TrainerCallback

    class DVCLiveCurves(TrainerCallback):
        live = None

        def _log(self, entry: dict, step: int):
            self.live.step = step
            for key, value in entry.items():
                # train_loss/train_runtime etc. are end-of-run summaries, not per-step points.
                if not isinstance(value, (int, float)) or key in ("epoch", "step", "total_flos") \
                        or key.startswith("train_"):
                    continue
                name = "eval/" + key[len("eval_"):] if key.startswith("eval_") else "train/" + key
                self.live.log_metric(name, value)

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                from dvclive import Live

                self.live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
                for entry in state.log_history:
                    self._log(entry, entry.get("step", 0))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.live is not None and logs:
                self._log(logs, state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.live is not None:
                self.live.end()

    return DVCLiveCurves()


class TrainError(RuntimeError):
    """Training cannot start or finish; the message says why."""


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "liger_kernel"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def build_trainer(plan: TrainingPlan, train, *, model, tokenizer, train_dataset, eval_dataset=None,
                  output_dir: str, callbacks=(), seed: int | None = None):
    """The SFTTrainer for `plan`: LoRA config, SFTConfig and trainer, shared by the train stage and
    bench/train_throughput.py (so the benchmark times exactly what the stage runs)."""
    import os

    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    cuda = plan.device == "cuda"
    # Gemma 2 caps its attention logits and only the eager kernel applies the cap (the packed and
    # SDPA kernels refuse it): it keeps eager, for which transformers builds the per-example mask
    # from the restarting position ids of packed rows.
    keeps_eager = bool(getattr(model.config, "attn_logit_softcapping", None))
    if plan.attention is not None and not keeps_eager:
        if plan.attention == PACKED_ATTENTION:
            register_packed_attention()
        model.set_attn_implementation(plan.attention)
    model.config.use_cache = False  # a KV cache during training is waste, and breaks packed attention
    lora = LoraConfig(r=train.lora.r, lora_alpha=train.lora.alpha, lora_dropout=train.lora.dropout,
                      target_modules=train.lora.target_modules, bias="none", task_type="CAUSAL_LM")
    has_eval = eval_dataset is not None
    seed = train.seed if seed is None else seed
    # Packed: each micro-batch is one bin of at most tokens_per_batch tokens, filled best-fit-
    # decreasing with whole examples (already truncated to train.max_length by build_dataset).
    packed_length = plan.tokens_per_batch if plan.tokens_per_batch is not None else train.max_length
    args = SFTConfig(
        output_dir=output_dir, seed=seed, data_seed=seed,
        num_train_epochs=train.epochs, max_steps=train.max_steps,
        per_device_train_batch_size=plan.per_device_batch_size,
        per_device_eval_batch_size=plan.per_device_batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        learning_rate=train.learning_rate, lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio, weight_decay=train.weight_decay,
        max_length=packed_length if plan.packing else train.max_length, packing=plan.packing,
        packing_strategy="bfd", padding_free=plan.packing,
        gradient_checkpointing=plan.gradient_checkpointing,
        use_liger_kernel=plan.liger,
        # On CPU no autocast: bf16 is confined to the frozen weights' products (precision.py).
        bf16=cuda and plan.compute_dtype == "bf16", fp16=cuda and plan.compute_dtype == "fp16",
        use_cpu=not cuda,
        logging_steps=train.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=train.save_steps, save_total_limit=train.save_total_limit,
        eval_strategy="steps" if has_eval else "no", eval_steps=train.eval_steps,
        load_best_model_at_end=bool(has_eval and train.early_stopping_patience),
        metric_for_best_model="eval_loss" if has_eval else None, greater_is_better=False,
        include_num_input_tokens_seen="non_padding",
        report_to="none", dataloader_num_workers=0,
        ddp_find_unused_parameters=False if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    trainer_class = SFTTrainer if cuda else _labelled_positions_trainer_class()
    trainer = trainer_class(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                            processing_class=tokenizer, peft_config=lora, callbacks=list(callbacks))
    if plan.fused_lora:
        from stages.lib.fused_lora import fuse_lora

        fuse_lora(trainer.model)
    if not cuda:
        # The SwiGLU activation recomputed in the backward instead of kept: on CPU the step's
        # saved activations are most of the train stage's peak memory (stages/lib/swiglu.py).
        from stages.lib.swiglu import recompute_swiglu

        recompute_swiglu(trainer.model)
    if plan.compute_dtype == "fp32" or not cuda:
        # TRL stores LoRA weights of a quantised model in bf16 (the QLoRA paper's GPU recipe), and
        # PEFT gives new adapters the dtype of the layer they wrap (bf16 for the frozen bf16 layers
        # on CPU); with fp32 compute, and always on CPU, keep them fp32: they are the master
        # weights, and small Adam updates would round away in bf16.
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    return trainer


ENTROPY_CHUNK_ROWS = 32  # positions per chunk of the logged entropy (three vocabulary-wide temporaries each)


def _entropy_sum(logits):
    """Summed entropy of the softmax of each row of `logits`, a chunk of rows at a time: computed
    at the end of the forward, when every saved activation is alive, its temporaries over all
    labelled positions at once (3 x positions x vocabulary floats) were a step's memory peak."""
    import torch

    total = logits.new_zeros(())
    for chunk in logits.split(ENTROPY_CHUNK_ROWS):
        log_probs = torch.log_softmax(chunk, dim=-1)
        total -= (log_probs.exp() * log_probs).sum()
    return total


@functools.cache
def _labelled_positions_trainer_class():
    """SFTTrainer whose loss runs the LM head on the labelled positions only, in fp32 (for CPU).

    TRL's fused LM head scores only the labelled positions on CUDA, but every position on CPU (its
    tile shapes must not change between batches there), through per-tile elementwise torch ops that
    it recomputes in the backward. With the loss on assistant tokens only, about two thirds of the
    positions carry no label, and the head (49k x 576 for the default model) was half of a CPU step
    (bench/NOTES.md, CPU section). Here the head is one fp32 product over the labelled positions and
    the loss a plain fp32 cross-entropy; the logged entropy and token accuracy are computed from
    the same logits, so the curves keep TRL's names and meaning.
    """
    import torch
    from trl import SFTTrainer

    from stages.lib.modeling import unwrap_peft

    class LabelledPositionsSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            causal_lm = unwrap_peft(model)
            forward = {k: v for k, v in inputs.items() if k != "labels"}
            forward["use_cache"] = False
            hidden = causal_lm.base_model(**forward).last_hidden_state
            targets = inputs["labels"][:, 1:]
            labelled = targets != -100
            head = causal_lm.get_output_embeddings()
            logits = torch.nn.functional.linear(hidden[:, :-1][labelled].float(), head.weight.float(),
                                                None if head.bias is None else head.bias.float())
            total = torch.nn.functional.cross_entropy(logits, targets[labelled], reduction="sum")
            count = labelled.sum()
            loss = total / (num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1))
            with torch.no_grad():
                valid = max(int(count), 1)
                entropy = _entropy_sum(logits) / valid
                accuracy = (logits.argmax(-1) == targets[labelled]).sum() / valid
            self._metrics[mode]["entropy"].append(float(entropy))
            self._metrics[mode]["mean_token_accuracy"].append(float(accuracy))
            if mode == "train":
                mask = inputs.get("attention_mask")
                self._total_train_tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, {"loss": loss}) if return_outputs else loss

    return LabelledPositionsSFTTrainer


def check_target_modules(model, targets) -> None:
    """Every name in train.lora.target_modules must match a module of the model, as PEFT matches
    them (the full name, or its last dotted parts): PEFT raises only when none matches, with a
    traceback, and silently skips a misspelt name among good ones."""
    if isinstance(targets, str):
        return  # "all-linear"
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        import torch

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")})
        raise TrainError(f"train.lora.target_modules: {', '.join(map(repr, unmatched))} "
                         f"match{'es' if len(unmatched) == 1 else ''} no module of the model; its linear layers are "
                         f"{', '.join(linear)} (or use all-linear)")


def check_train_sizes(train, plan: TrainingPlan, model, dataset) -> None:
    """train.max_length within the model's positions, and a batch whose output fits in memory."""
    from stages.lib.limits import LimitError, available_memory_bytes, check_batch_memory, context_length

    context = context_length(model)
    if context is not None and train.max_length > context:
        raise LimitError(f"train.max_length={train.max_length} is longer than the model's context of "
                         f"{context} positions: set train.max_length <= {context}")
    if plan.packing:
        return  # packed rows: the token budget was fitted to free memory (fit_token_budget)
    longest = max((len(ids) for ids in dataset["input_ids"]), default=0)
    rows = min(plan.per_device_batch_size, len(dataset))
    check_batch_memory(rows=rows, length=longest, vocab_size=getattr(model.config, "vocab_size", 0),
                       available=available_memory_bytes(plan.device == "cuda"), key="train.batch_size",
                       advice="lower train.batch_size (raise train.grad_accum to keep the effective "
                              "batch) or train.max_length")


def resolve_plan(train, model=None) -> TrainingPlan:
    """plan_training for this machine; with a loaded model on CUDA, the token budget fitted to the
    free GPU memory."""
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    from stages.lib.precision import cpu_multiplies_bf16

    plan = plan_training(train, cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported(),
                         liger_available=importlib.util.find_spec("liger_kernel") is not None,
                         varlen_available=cuda and varlen_available(),
                         cpu_bf16=not cuda and cpu_multiplies_bf16())
    if cuda and model is not None:
        free, _total = torch.cuda.mem_get_info()
        plan = fit_token_budget(plan, model.config, free, train.lora.dropout)
    return plan


def run_training(params, *, train_path: Path, validation_path: Path, adapter_dir: Path,
                 live_dir: Path, checkpoint_root: Path, replay_path: Path | None = None) -> dict:
    """Train a LoRA adapter on the train split (plus the base model's replay answers, at
    train.replay.share of the rows: stages/lib/replay.py); write the adapter; return the report dict."""
    import os

    if (params.train.num_processes == 1 and "LOCAL_RANK" not in os.environ
            and "CUDA_VISIBLE_DEVICES" not in os.environ):
        # One process on a machine with several GPUs: Trainer would wrap the model in
        # nn.DataParallel, which SFTTrainer refuses (seen on 2 x H200). Train on the first GPU;
        # train.num_processes > 1 uses them all through `accelerate launch`. Set before CUDA starts.
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"

    import torch
    from transformers import EarlyStoppingCallback, set_seed

    from stages.lib import checkpoints
    from stages.lib.io import atomic_dir, write_json
    from stages.lib.modeling import (base_identity, check_model_files, load_model, load_tokenizer,
                                     pick_compute_dtype, resolve_base_model)
    from stages.lib.numeric import make_finite_guard_callback

    train = params.train
    cuda = torch.cuda.is_available()
    plan = resolve_plan(train)
    dtype = pick_compute_dtype(plan.compute_dtype, cuda, plan.quantize)
    set_seed(train.seed)

    check_model_files(params.model)
    resolved = resolve_base_model(params.model)
    identity = base_identity(resolved)
    tokenizer = load_tokenizer(resolved)
    train_records = list(read_jsonl(train_path))
    validation_records = list(read_jsonl(validation_path)) if validation_path.exists() else []
    if not train_records:
        raise TrainError(f"{train_path} is empty: nothing to train on")
    replay = list(read_jsonl(replay_path)) if replay_path is not None and replay_path.exists() else []
    task_examples = len(train_records)
    train_records, replay_copies = mix_replay(train_records, replay, train.replay.share)
    train_dataset, supervision = build_dataset(train_records, tokenizer, train.max_length)
    if supervision["supervised_tokens"] == 0:
        raise TrainError(no_supervision_message(supervision, train.max_length))
    if supervision["dropped_no_assistant_token"]:
        print(f"train: {supervision['dropped_no_assistant_token']} of {len(train_records)} examples dropped: "
              f"truncation at train.max_length={train.max_length} left them no assistant token", file=sys.stderr)
    eval_dataset = build_dataset(validation_records, tokenizer, train.max_length)[0] if validation_records else None
    if eval_dataset is not None and len(eval_dataset) == 0:
        eval_dataset = None

    fingerprint = checkpoints.run_fingerprint(
        [p for p in (train_path, validation_path, replay_path) if p is not None and p.exists()],
        params.model.model_dump(), train.model_dump())
    run_dir = checkpoint_root / fingerprint
    checkpoints.prune_other_runs(checkpoint_root, keep=fingerprint)
    resume_from = checkpoints.latest_valid_checkpoint(run_dir)
    if resume_from is not None:
        print(f"resuming from {resume_from} (an earlier run of the same data and params was interrupted)",
              file=sys.stderr)

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # FSDP-QLoRA: nf4 weights stored in the compute dtype so that FSDP can flatten and shard them
    # together with the LoRA weights (stages/lib/distributed.py).
    model = load_model(resolved, quantize=plan.quantize, compute_dtype=dtype,
                       device_map={"": local_rank} if cuda else None,
                       quant_storage=dtype if train.distributed == "fsdp" else None)
    if cuda:
        plan = resolve_plan(train, model)  # the token budget, fitted to the memory left after loading
    check_target_modules(model, train.lora.target_modules)
    check_train_sizes(train, plan, model, train_dataset)
    # The guard first: a non-finite step stops the run before anything logs or saves it.
    callbacks = [make_finite_guard_callback(), checkpoints.make_seal_callback(), make_dvclive_callback(live_dir)]
    if eval_dataset is not None and train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    trainer = build_trainer(plan, train, model=model, tokenizer=tokenizer, train_dataset=train_dataset,
                            eval_dataset=eval_dataset, output_dir=str(run_dir), callbacks=callbacks)

    # The adapter's dtype as this run creates it (bf16 for QLoRA on CUDA): what is saved at the end,
    # whatever a sharding engine did to the trainable weights meanwhile.
    adapter_dtype = next(p.dtype for p in trainer.model.parameters() if p.requires_grad)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.perf_counter() - started

    state = trainer.state
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    eval_losses = [e["eval_loss"] for e in state.log_history if "eval_loss" in e]
    tokens = int(state.num_input_tokens_seen)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    report = {
        "model": resolved.label, "device": plan.device, "plan": asdict(plan),
        # What the adapter was trained on: the resolved hub commit or the hash of the base's files.
        "base": {k: v for k, v in identity.items() if k in ("revision", "commit", "sha256")},
        "steps": state.global_step, "epochs": round(state.epoch or 0, 4),
        "train_examples": len(train_dataset),
        "task_examples": task_examples,
        "replay": {"examples": len(replay), "copies": replay_copies, "rows": len(replay) * replay_copies},
        "dropped_by_truncation": supervision["dropped_no_assistant_token"],
        "supervised_share_mean": supervision["supervised_share_mean"],
        "supervised_share_min": supervision["supervised_share_min"],
        "supervised_tokens": supervision["supervised_tokens"],
        "first_loss": round(losses[0], 4) if losses else None,
        "final_loss": round(losses[-1], 4) if losses else None,
        "mean_loss": round(result.training_loss, 4),
        "eval_loss": round(eval_losses[-1], 4) if eval_losses else None,
        "tokens_seen": tokens, "wall_s": round(wall, 1),
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "peak_memory_mib": round(peak_memory_bytes(cuda) / 2**20, 1),
        "trainable_params": trainable,
        "resumed_from_step": int(resume_from.name.split("-")[-1]) if resume_from else None,
    }
    # Every process takes part in gathering the adapter (FSDP shards it); the first one writes it,
    # in the same format as a one-GPU run.
    from stages.lib.distributed import save_adapter

    main = trainer.is_world_process_zero()
    with (atomic_dir(adapter_dir) if main else contextlib.nullcontext()) as tmp:
        save_adapter(trainer.model_wrapped, tmp, is_main=main, dtype=adapter_dtype)
        if main:
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "training_config.json", {
                "base_model": {**identity, "resolved": resolved.path},
                "train": train.model_dump(), "plan": asdict(plan), "versions": _versions()})
    if main:
        # The adapter is now in DVC's hands; the checkpoints have served their purpose.
        checkpoints.remove_run(run_dir)
    return report
