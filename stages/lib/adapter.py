"""Checks on models/adapter before evaluate, export or generate use it: a readable PEFT config,
finite weights, and the base model it was trained on.

An adapter of the right shapes loads onto any base of that architecture without complaint from
PEFT, so a base swapped under the same name (or a local directory whose weights were replaced)
would be evaluated and merged silently. The train stage records the base's identity (name,
revision, and a hash of its files or its resolved hub commit) in training_config.json; these
checks compare it with the base about to be used.
"""
from __future__ import annotations

import json
from pathlib import Path

CONFIG = "adapter_config.json"
TRAINING_CONFIG = "training_config.json"
WEIGHTS = "adapter_model.safetensors"


class AdapterError(RuntimeError):
    """models/adapter is missing, unreadable, non-finite or for another base; the message says what to do."""


def read_adapter_config(adapter_dir: Path) -> dict:
    """The adapter's PEFT config, checked enough that PEFT will not fail on it with a traceback."""
    path = Path(adapter_dir) / CONFIG
    if not path.exists():
        raise AdapterError(f"{path} not found: run the train stage first")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterError(f"{path} is not readable JSON ({exc}): re-run `dvc repro train` "
                           "(or `dvc checkout models/adapter`)") from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str) \
            or not isinstance(config.get("r"), int):
        raise AdapterError(f"{path} is not a PEFT LoRA config (no peft_type or r): re-run `dvc repro train` "
                           "(or `dvc checkout models/adapter`)")
    if not (Path(adapter_dir) / WEIGHTS).exists():
        raise AdapterError(f"{Path(adapter_dir) / WEIGHTS} not found: re-run `dvc repro train`")
    return config


def nonfinite_tensors(adapter_dir: Path) -> list[str]:
    """Names of the adapter's tensors that hold NaN or infinity."""
    import torch
    from safetensors import safe_open

    bad = []
    with safe_open(str(Path(adapter_dir) / WEIGHTS), framework="pt") as handle:
        for key in handle.keys():
            if not bool(torch.isfinite(handle.get_tensor(key)).all()):
                bad.append(key)
    return bad


def check_finite(adapter_dir: Path) -> None:
    bad = nonfinite_tensors(adapter_dir)
    if bad:
        raise AdapterError(f"{adapter_dir} holds non-finite weights (NaN or infinity) in {len(bad)} tensor(s), "
                           f"e.g. {bad[0]}: training diverged; lower train.learning_rate and re-run train")


def recorded_base(adapter_dir: Path) -> dict | None:
    path = Path(adapter_dir) / TRAINING_CONFIG
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("base_model")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, dict) else None


def base_mismatch(recorded: dict | None, current: dict) -> str | None:
    """Why `current` is not the base `recorded` says the adapter was trained on; None when it is."""
    if recorded is None:
        return None  # an adapter from before identities were recorded: nothing to compare
    if recorded.get("base") != current.get("base"):
        return f"it was trained on {recorded.get('base')!r}, not {current.get('base')!r}"
    for key, what in (("sha256", "files (sha256)"), ("commit", "hub commit")):
        old, new = recorded.get(key), current.get(key)
        if old and new and old != new:
            return (f"it was trained on {current.get('base')} with {what} {old[:12]}…, and the base now has "
                    f"{new[:12]}… (its weights or revision changed)")
    return None


def check_base(adapter_dir: Path, current: dict) -> None:
    why = base_mismatch(recorded_base(adapter_dir), current)
    if why:
        raise AdapterError(f"{adapter_dir} does not belong to this base model: {why}; re-run `dvc repro train` "
                           "(or set model.base / model.revision back)")


def check_adapter(adapter_dir: Path, current_base: dict) -> dict:
    """All the checks, in the order a user would want to hear about them; returns the PEFT config."""
    config = read_adapter_config(adapter_dir)
    check_base(adapter_dir, current_base)
    check_finite(adapter_dir)
    return config
