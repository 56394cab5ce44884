"""stages/lib/modeling.py: the GGUF materialisation's parse-once block, and bitsandbytes left out
of a CPU stage process that quantises nothing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tiny_gguf(path: Path) -> Path:
    gguf = pytest.importorskip("gguf")
    numpy = pytest.importorskip("numpy")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_token_list(["<s>", "a", "b"])
    writer.add_tensor("token_embd.weight", numpy.arange(12, dtype=numpy.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_parsed_once_inside_the_block_and_put_back_after(tmp_path):
    import gguf

    from stages.lib.modeling import _gguf_parsed_once

    path = str(_tiny_gguf(tmp_path / "tiny.gguf"))
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(path) is first  # the config, tokenizer and weights share one parse
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is name_map
    fresh = gguf.GGUFReader(path)
    assert fresh is not first and list(fresh.fields) == list(first.fields)
    assert [t.name for t in fresh.tensors] == [t.name for t in first.tensors] == ["token_embd.weight"]


def _run_on_cpu(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (leaving bitsandbytes out lasts as long as the process); the
    test is skipped on CUDA, where the default quantises (nf4) and bitsandbytes is needed."""
    pytest.importorskip("peft")
    if pytest.importorskip("torch").cuda.is_available():
        pytest.skip("on CUDA the default quantises (nf4): bitsandbytes is needed there")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_cpu_stage_that_quantises_nothing_never_imports_bitsandbytes():
    code = ("import sys, torch\n"
            "assert not torch.cuda.is_available()\n"
            "from stages.lib.modeling import leave_out_unused_bitsandbytes\n"
            "assert leave_out_unused_bitsandbytes('train')\n"
            "import peft, transformers.utils as u\n"
            "assert sys.modules['bitsandbytes'] is None\n"
            "assert not peft.import_utils.is_bnb_available() and not u.is_bitsandbytes_available()\n"
            "assert not leave_out_unused_bitsandbytes('train')  # already decided: nothing to do\n")
    done = _run_on_cpu(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gemm_4bit_forward" not in done.stderr  # bitsandbytes' import-time warning is gone too


def test_a_model_stage_runs_under_run_stage_with_bitsandbytes_left_out():
    """run_model_stage, what the model stages' `__main__` calls: bitsandbytes is left out before
    the stage runs, and a failure is run_stage's one line and exit status 1."""
    code = ("import sys\n"
            "from stages.lib.modeling import run_model_stage\n"
            "def main():\n"
            "    assert sys.modules['bitsandbytes'] is None\n"
            "    raise ValueError('the stage failed here')\n"
            "sys.exit(run_model_stage('train', main))\n")
    done = _run_on_cpu(code)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == "train: the stage failed here"
    assert "Traceback" not in done.stderr
