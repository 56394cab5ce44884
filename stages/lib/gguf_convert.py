"""GGUF conversion with llama.cpp's own converter (convert_hf_to_gguf.py), the one users trust.

`make setup` extracts it, with its `conversion/` package and its own `gguf-py`, from the sdist of
llama-cpp-python (PyPI), which vendors llama.cpp whole, into <venv>/share/llama.cpp/. It runs in
a subprocess (`python -m stages.lib.gguf_convert ...`) so that its gguf-py, newer than the PyPI
`gguf` release this project imports, never meets it in one interpreter.

Three adjustments, made in that subprocess only (the third: Phi-3's class reads a GPT-2 BPE
vocabulary when tokenizer.json is there and tokenizer.model is not, see _patch_gemma2_vocab):
- llama.cpp's Gemma 2 class reads the vocabulary from a SentencePiece tokenizer.model and nothing
  else; without one it falls back to the tokenizer.json (byte-level BPE) vocabulary, as llama.cpp's
  own Gemma 3 class does.
- llama.cpp names a BPE pre-tokenizer by the hash of a test string's tokens, and refuses a hash it
  does not know. transformers 5 builds some tokenizers' pre-tokenizer from their class, whatever
  tokenizer.json says (a `qwen2` model always gets Qwen2's split pattern): for those classes the
  pre-tokenizer is known by construction and is named so. The llama.cpp check in export then
  compares llama.cpp's tokens with transformers' on the real prompts.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONVERTER_DIR_NAME = "share/llama.cpp"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def find_converter() -> Path | None:
    """The folder holding convert_hf_to_gguf.py, or None. $QLORA_DVC_LLAMA_CPP overrides."""
    candidates = [os.environ.get("QLORA_DVC_LLAMA_CPP"), str(Path(sys.prefix) / CONVERTER_DIR_NAME)]
    for candidate in candidates:
        if candidate and (Path(candidate) / "convert_hf_to_gguf.py").is_file():
            return Path(candidate)
    return None


def convert(model_dir: Path, out_path: Path, outtype: str, converter: Path) -> str:
    """Run llama.cpp's converter on a transformers model folder; return its log's tail."""
    if outtype not in OUTTYPES:
        raise ValueError(f"GGUF type {outtype!r}: use one of {OUTTYPES}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(converter / "gguf-py"), str(converter), str(Path(__file__).resolve().parents[2])]))
    command = [sys.executable, "-m", "stages.lib.gguf_convert", str(converter), str(model_dir),
               "--outfile", str(out_path), "--outtype", outtype]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    log = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        lines = [line for line in log.splitlines() if line.strip()]
        raise RuntimeError("llama.cpp's convert_hf_to_gguf.py failed: " + " | ".join(lines[-6:]))
    return "\n".join(log.splitlines()[-5:])


def _patch_gemma2_vocab() -> None:
    from conversion import gemma  # llama.cpp's, from the converter folder

    original = gemma.Gemma2Model.set_vocab

    def set_vocab(self):
        if (self.dir_model / "tokenizer.model").is_file():
            return original(self)
        self._set_vocab_gpt2()

    gemma.Gemma2Model.set_vocab = set_vocab

    # Phi-3's class reads GPT-2 BPE only when tokenizer_config.json names GPT2Tokenizer (Phi-4),
    # which transformers 5 does not write back when it re-saves the tokenizer (models/merged).
    from conversion import phi

    original_phi3 = phi.Phi3MiniModel.set_vocab

    def set_vocab_phi3(self):
        if (self.dir_model / "tokenizer.model").is_file() or not (self.dir_model / "tokenizer.json").is_file():
            return original_phi3(self)
        self._set_vocab_gpt2()

    phi.Phi3MiniModel.set_vocab = set_vocab_phi3


# transformers tokenizer classes whose pre-tokenizer is fixed by the class -> llama.cpp's name for it.
PRE_TOKENIZER_BY_CLASS = {"Qwen2Tokenizer": "qwen2"}


def _patch_pre_tokenizer() -> None:
    from conversion import base  # llama.cpp's

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            name = PRE_TOKENIZER_BY_CLASS.get(type(tokenizer).__name__)
            if name is None:
                raise
            print(f"pre-tokenizer: {type(tokenizer).__name__} -> {name!r}", file=sys.stderr)
            return name

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def _main(argv: list[str]) -> None:
    converter, rest = Path(argv[0]), argv[1:]
    sys.path[:0] = [str(converter / "gguf-py"), str(converter)]
    import convert_hf_to_gguf  # noqa: E402 (llama.cpp's, found through the path above)

    _patch_gemma2_vocab()
    _patch_pre_tokenizer()
    sys.argv = ["convert_hf_to_gguf.py", *rest]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    _main(sys.argv[1:])
