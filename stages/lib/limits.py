"""Bounded work: what a model's context and this machine's memory allow, checked before the work
starts, so that a params value out of range is one clear error instead of a hang, a swap storm
or generation past the model's last position.
"""
from __future__ import annotations

import os
import sys


class LimitError(ValueError):
    """A size in params (or a prompt) does not fit the model or the machine; the message says which."""


def context_length(model_or_config) -> int | None:
    """Positions the model can attend over (max_position_embeddings and its aliases)."""
    config = getattr(model_or_config, "config", model_or_config)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_new_tokens(max_new_tokens: int, context: int | None, key: str) -> None:
    """Refuse a generation length that leaves no room for any prompt."""
    if context is not None and max_new_tokens >= context:
        raise LimitError(f"{key}={max_new_tokens} does not fit the model's context of {context} positions "
                         f"(prompt + new tokens <= {context}); use at most {context // 2} or so")


def prompt_budget(max_new_tokens: int, context: int | None) -> int | None:
    """Prompt tokens that fit next to `max_new_tokens` new ones; None: no known limit."""
    return None if context is None else context - max_new_tokens


def truncate_prompt_ids(ids: list[int], budget: int | None) -> tuple[list[int], bool]:
    """Keep the last `budget` tokens of a prompt (its end holds the question and the assistant
    header the answer follows); say whether anything was cut."""
    if budget is None or len(ids) <= budget:
        return ids, False
    return ids[len(ids) - budget:], True


def warn_truncated(count: int, total: int, budget: int, where: str) -> None:
    if count:
        print(f"warning: {count} of {total} {where} prompts are longer than the {budget} tokens that fit "
              "next to the answer in the model's context; their beginning was cut", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Memory


def available_memory_bytes(cuda: bool) -> int | None:
    """Free GPU memory on CUDA; MemAvailable (and the cgroup limit, if lower) on CPU."""
    if cuda:
        import torch

        return int(torch.cuda.mem_get_info()[0])
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        return None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path, encoding="ascii").read().strip()
        except OSError:
            continue
        if text.isdigit():
            available = min(available, int(text)) if available else int(text)
    return available


def logits_bytes(rows: int, length: int, vocab_size: int, *, copies: int = 2) -> int:
    """Memory of the language-model head's output for one batch, in fp32: the logits and the
    log-softmax (or the logits' gradient) are at least two copies. For small models this term
    dominates everything else (SmolLM2-135M: 49,152 vocabulary entries x 4 bytes = 197 KB per
    token). A lower bound, so the check refuses only what cannot fit."""
    return rows * length * vocab_size * 4 * copies


def check_batch_memory(*, rows: int, length: int, vocab_size: int, available: int | None, key: str,
                       advice: str) -> None:
    """Refuse a batch whose logits alone would not fit in the memory available (a hang in swap on
    CPU, an out-of-memory error late in the run on CUDA)."""
    if available is None or not vocab_size:
        return
    need = logits_bytes(rows, length, vocab_size)
    if need > available:
        raise LimitError(f"{key}={rows} needs about {need / 2**30:.1f} GiB for the model's output alone "
                         f"({rows} rows x {length} tokens x {vocab_size} vocabulary x 4 bytes x 2), and "
                         f"{available / 2**30:.1f} GiB is available: {advice}")


# --------------------------------------------------------------------------------------------
# Processes

# Set by the train stage when it re-launches itself; accelerate/torchrun set the others in every
# process they start.
LAUNCHED_MARK = "QLORA_DVC_ACCELERATE_LAUNCHED"
_LAUNCHER_VARS = (LAUNCHED_MARK, "LOCAL_RANK", "RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def inside_launcher(environ=os.environ) -> bool:
    """True in a process started by `accelerate launch` / torchrun (or by our own re-launch)."""
    return any(name in environ for name in _LAUNCHER_VARS)


def check_processes(num_processes: int, cuda_devices: int) -> None:
    """train.num_processes > 1 needs that many GPUs: accelerate's CPU launcher starts plain
    copies of the script, which (before this check) re-launched themselves without end."""
    if num_processes <= 1:
        return
    if cuda_devices == 0:
        raise LimitError(f"train.num_processes={num_processes} needs CUDA GPUs (one per process) and this "
                         "machine has none: set train.num_processes: 1 (one process uses every CPU core)")
    if num_processes > cuda_devices:
        raise LimitError(f"train.num_processes={num_processes} but only {cuda_devices} CUDA GPU(s) are "
                         f"visible: set train.num_processes: {cuda_devices}")
