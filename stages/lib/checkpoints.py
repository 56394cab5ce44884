"""Training checkpoints that survive an interrupted `dvc repro` and are never half-read.

DVC deletes a stage's outs before it runs, so checkpoints live outside them, under
checkpoints/train/<fingerprint>/ (git-ignored). The fingerprint hashes the training data and the
params that change the optimisation, so a checkpoint of other data or params is never resumed
from. The Trainer writes a checkpoint folder file by file; only after it has finished does
`SealCheckpoint` write a seal listing each file's size and sha256. On resume, the newest folder
whose seal matches its files wins; unsealed (half-written) or corrupted folders are skipped
with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from stages.lib.io import write_json

log = logging.getLogger(__name__)

CHECKPOINT_ROOT = Path("checkpoints/train")
SEAL = "checkpoint_seal.json"
# Keys that do not change what is learned: editing them must not throw away a resumable run.
_NON_SEMANTIC_TRAIN_KEYS = {"logging_steps", "save_steps", "save_total_limit", "eval_steps", "num_processes",
                            "num_machines", "main_process_ip", "main_process_port"}


def run_fingerprint(data_files: list[Path], model_params: dict, train_params: dict) -> str:
    digest = hashlib.sha256()
    for path in data_files:
        digest.update(path.name.encode())
        digest.update(_sha256(path).encode())
    semantic = {k: v for k, v in train_params.items() if k not in _NON_SEMANTIC_TRAIN_KEYS}
    digest.update(json.dumps({"model": model_params, "train": semantic}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _step(folder: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    return int(match[1]) if match else -1


def seal_checkpoint(folder: Path) -> None:
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != SEAL}
    write_json(folder / SEAL, {"files": files})


def verify_checkpoint(folder: Path) -> str | None:
    """Return None if the checkpoint is complete and intact, else the reason it is not."""
    seal = folder / SEAL
    if not seal.exists():
        return "no seal (the run stopped while writing it)"
    try:
        expected = json.loads(seal.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable seal: {exc}"
    for name, meta in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            return f"{name} does not match its seal (corrupted)"
    return None


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    if not run_dir.is_dir():
        return None
    for folder in sorted((p for p in run_dir.iterdir() if _step(p) >= 0), key=_step, reverse=True):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        log.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def prune_other_runs(root: Path, keep: str) -> None:
    """Drop checkpoints of other data/params: they can never be resumed from by this config."""
    if root.is_dir():
        for run in root.iterdir():
            if run.is_dir() and run.name != keep:
                shutil.rmtree(run, ignore_errors=True)


def make_seal_callback():
    from transformers import TrainerCallback

    class SealCheckpoint(TrainerCallback):
        """Seal each checkpoint after the Trainer has written all of it (on_save runs after)."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    seal_checkpoint(folder)
            return control

    return SealCheckpoint()


def remove_run(run_dir: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = run_dir.parent
        if parent.is_dir() and not os.listdir(parent):
            parent.rmdir()
