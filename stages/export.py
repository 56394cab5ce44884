"""Stage `export`: merge models/adapter into the base -> models/merged/ (plain transformers
safetensors, tokenizer, chat template, stop tokens), optionally models/gguf/model-<type>.gguf with
an Ollama Modelfile, and reports/export.json (sizes, and the checks that the artifacts reproduce
base + adapter).

The merge is always into the unquantised base (train.quantization is not read): see
stages/lib/export.py for why, and for what that means for the numbers evaluate measured.
"""
from __future__ import annotations

import sys
from pathlib import Path

from stages.lib.io import read_jsonl, write_json
from stages.lib.params import load_params
from stages.lib.stage import StageError

ADAPTER = Path("models/adapter")
MERGED = Path("models/merged")
GGUF_DIR = Path("models/gguf")
TEST = Path("data/split/test.jsonl")
REPORT = Path("reports/export.json")


def main() -> int:
    params = load_params(stage="export")

    from stages.lib.export import GGUFCheckError, run_export
    from stages.lib.records import prompt_messages

    # The first test prompts: the check then also shows answers in the fine-tuned format.
    checks = [prompt_messages(r) for r in read_jsonl(TEST)] if TEST.exists() else []
    try:
        report = run_export(params, adapter_dir=ADAPTER, merged_dir=MERGED, gguf_dir=GGUF_DIR,
                            checks=checks)
    except GGUFCheckError as exc:
        write_json(REPORT, exc.report)  # the figures that failed, for the reader
        raise StageError(f"{exc} (figures in {REPORT})") from None
    if report["enabled"]:  # a disabled export loads no model: its report stays {"enabled": false}
        from stages.lib.stage import peak_rss_mib

        report["peak_rss_mib"] = peak_rss_mib()
    write_json(REPORT, report)
    if not report["enabled"]:
        print("export: disabled (export.enabled: false); wrote placeholder READMEs", file=sys.stderr)
        return 0
    merged = report["merged"]
    summary = (f"export: {MERGED}/ ({merged['bytes'] / 1e6:.0f} MB, {merged['dtype']}), max |logit diff| vs "
               f"base + adapter {merged['check']['max_abs_logit_diff']:.1e}, greedy tokens equal: "
               f"{merged['check']['greedy_tokens_equal']}")
    if report["gguf"]:
        gguf = report["gguf"]
        runtime = gguf["check"].get("runtime", "transformers' GGUF loader")
        summary += (f"; {gguf['file']} ({gguf['bytes'] / 1e6:.0f} MB), in {runtime} greedy tokens equal to "
                    f"merged: {gguf['check']['greedy_tokens_equal']}")
    print(summary, file=sys.stderr)
    return 0


if __name__ == "__main__":
    from stages.lib.modeling import run_model_stage

    sys.exit(run_model_stage("export", main))
