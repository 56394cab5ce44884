"""Tiny random-weight models of the major architectures, built from configs (no download), each
with the SmolLM2 tokenizer carrying that family's real chat template and control tokens. Small
enough (2 layers, width 64) that train -> evaluate -> export runs in seconds on CPU."""
from __future__ import annotations

import json
from pathlib import Path

# architecture -> (transformers config class, chat-template family in tests/data/chat_templates)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "llama3_1"),
    "mistral": ("MistralConfig", "mistral_v3_nemo"),
    "qwen2": ("Qwen2Config", "qwen2_5"),
    "qwen3": ("Qwen3Config", "qwen3"),
    "gemma2": ("Gemma2Config", "gemma"),
    "gemma3_text": ("Gemma3TextConfig", "gemma3"),
    # Phi-4 is a Phi3ForCausalLM with a GPT-2 (byte-level BPE) tokenizer, as this one is.
    "phi3": ("Phi3Config", "phi4"),
}

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048)
EXTRA = {
    "qwen3": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=256),
    "gemma3_text": dict(head_dim=16, sliding_window=256),
    "phi3": dict(original_max_position_embeddings=2048),
    "mistral": dict(sliding_window=None),
}


def build_tiny_model(architecture: str, tokenizer, out_dir: Path, seed: int = 0) -> Path:
    """Save a random-weight `architecture` model and `tokenizer` (already the family's) to out_dir."""
    import torch
    import transformers

    config_class, _family = ARCHITECTURES[architecture]
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **SHAPE, **EXTRA.get(architecture, {}))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random weights at init scale give near-uniform logits, whose near-ties would make greedy
    # decoding fragile to float rounding; a larger output scale gives a clear top token.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if architecture == "phi3":
        # llama.cpp's converter reads a Phi-3 model's vocabulary as GPT-2 BPE when the tokenizer
        # class says so (the Phi-4 case), else it wants a SentencePiece tokenizer.model.
        path = out_dir / "tokenizer_config.json"
        settings = json.loads(path.read_text())
        settings["tokenizer_class"] = "GPT2Tokenizer"
        path.write_text(json.dumps(settings, indent=2))
    return out_dir
