"""The LLM judge: verdict parsing, outcomes, rates and position bias (pure), and the HTTP client
against real socket servers that misbehave (rate limits, 5xx, hangs, trickles, garbage, bad key).
The real llama.cpp server is in test_judge_llama.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stages.lib.judge import (ChatClient, JudgeError, judge_messages, judge_pairs, parse_verdict, row_outcome,
                              summarize, tuned_outcome)

ROOT = Path(__file__).resolve().parents[1]


# --- parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, verdict", [
    ('{"reason": "B has valid JSON", "winner": "B"}', "B"),
    ('```json\n{"reason": "same", "winner": "tie"}\n```', "tie"),
    ('Both are fine. {"winner": "Answer A"} That is all.', "A"),
    ('{"verdict": "a"}', "A"),
    ("A is better.\nVerdict: B", "B"),
    ("**Winner:** [[A]]", "A"),
    ("After review: [[B]]", "B"),
    ("[[C]]", "tie"),
    ("B", "B"),
    ("Tie.", "tie"),
])
def test_parse_verdict_reads_clear_replies(reply, verdict):
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize("reply", [
    None, "", "   ", "I like both of them", "Answer A is good but answer B is also good",
    '{"winner": "C"}', '{"winner": 1}', '{"reason": "no verdict here"}',
    '{"winner": "A"} {"winner": "B"}',          # two different verdicts: not a guess
    "Verdict: A\nVerdict: B", "[[A]] or maybe [[B]]", '{"winner": "A"', "The answer is A or B.",
])
def test_parse_verdict_refuses_to_guess(reply):
    assert parse_verdict(reply) is None


def test_outcomes_are_from_the_tuned_side_and_unparsable_never_wins():
    assert tuned_outcome("B", "base_first") == "win"      # tuned was shown as B
    assert tuned_outcome("A", "base_first") == "loss"
    assert tuned_outcome("A", "tuned_first") == "win"
    assert tuned_outcome("tie", "tuned_first") == "tie"
    assert tuned_outcome(None, "base_first") == "unparsable"
    assert row_outcome("win", "win") == "win"
    assert row_outcome("win", "tie") == "win"
    assert row_outcome("win", "loss") == "tie"             # followed the position: cancels
    assert row_outcome("loss", "tie") == "loss"
    assert row_outcome("win", "unparsable") == "unparsable"


def _j(row, order, verdict):
    return {"id": row, "order": order, "verdict": verdict, "outcome": tuned_outcome(verdict, order)}


def test_summarize_rates_add_up_and_position_bias_is_measured():
    judgements = [
        _j("r1", "base_first", "B"), _j("r1", "tuned_first", "A"),        # tuned wins both: win
        _j("r2", "base_first", "A"), _j("r2", "tuned_first", "A"),        # always slot A: flip -> tie
        _j("r3", "base_first", "tie"), _j("r3", "tuned_first", "tie"),    # tie
        _j("r4", "base_first", None), _j("r4", "tuned_first", "A"),       # unparsable row
    ]
    report = summarize(judgements)
    assert report["rows"] == 4 and report["judgements"] == 8 and report["unparsable_judgements"] == 1
    assert [report[k]["count"] for k in ("win", "tie", "loss", "unparsable")] == [1, 2, 0, 1]
    assert sum(report[k]["rate"] for k in ("win", "tie", "loss", "unparsable")) == pytest.approx(1)
    assert report["win"]["lower"] < report["win"]["rate"] < report["win"]["upper"]
    bias = report["position_bias"]
    assert bias["flip_rate"]["count"] == 1 and bias["flip_rate"]["n"] == 3      # r2, of r1..r3
    # Decisive judgements: r1 B, r1 A, r2 A, r2 A, r4 A -> 4 of 5 picked the first-shown answer.
    assert (bias["first_shown_rate"]["count"], bias["first_shown_rate"]["n"]) == (4, 5)


def test_summarize_refuses_a_row_judged_in_one_order_only():
    with pytest.raises(ValueError, match="both orders"):
        summarize([_j("r1", "base_first", "B")])


def test_judge_messages_put_each_answer_in_its_slot():
    messages = judge_messages([{"role": "user", "content": "ticket text"}], "ANSWER-ONE", "ANSWER-TWO",
                              "rubric here", reference="REF")
    text = messages[-1]["content"]
    assert text.index("[Answer A]\nANSWER-ONE") < text.index("[Answer B]\nANSWER-TWO")
    assert "REF" in text and "rubric here" in text and "ticket text" in text
    assert "REF" not in judge_messages("p", "x", "y", "r")[-1]["content"]


def test_judge_pairs_asks_both_orders_with_swapped_slots():
    pairs = [{"id": "r1", "prompt": "p", "reference": None, "base": "BASE-ANSWER", "tuned": "TUNED-ANSWER"}]
    seen = []

    def ask(messages):
        text = messages[-1]["content"]
        seen.append(text.index("BASE-ANSWER") < text.index("TUNED-ANSWER"))
        return '{"reason": "x", "winner": "A"}'

    records = judge_pairs(pairs, ask, "rubric")
    assert seen == [True, False]
    assert [(r["order"], r["outcome"]) for r in records] == [("base_first", "loss"), ("tuned_first", "win")]


# --- a real socket server that misbehaves on purpose -------------------------------------------

def completion(content: str, usage: dict | None = None) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        **({"usage": usage} if usage else {})}).encode()


class FaultServer:
    """An HTTP server whose answers follow a script: one entry per request, the last repeats.

    An entry is (status, body, headers) or "hang" (accept, read, never answer) or "trickle"
    (send the headers, then one byte a second)."""

    def __init__(self, script, port=0):
        self.script = list(script)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append({"path": self.path, "headers": dict(self.headers),
                                       "json": json.loads(body)})
                step = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                if callable(step):
                    step = step(outer.requests[-1])
                if step == "hang":
                    time.sleep(30)
                    return
                if step == "trickle":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    for _ in range(30):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(1)
                    return
                status, payload, headers = step
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(*script, port=0):
        server = FaultServer(script, port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


OK = (200, completion('{"reason": "fine", "winner": "B"}'), {"Content-Type": "application/json"})
MSG = [{"role": "user", "content": "hi"}]


def client(server, **kw):
    kw = {"timeout_s": 5, "retries": 3, "backoff_s": 0.01, **kw}
    return ChatClient(server.url, "judge-model", **kw)


def test_rate_limit_is_retried_honouring_retry_after(serve):
    server = serve((429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0.3"}), OK)
    waits = []
    reply = client(server, sleep=lambda s: (waits.append(s), time.sleep(s))).complete(MSG)
    assert parse_verdict(reply) == "B"
    assert len(server.requests) == 2 and waits == [0.3]
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert server.requests[0]["json"]["model"] == "judge-model"


def test_backoff_doubles_and_then_fails_with_the_last_error(serve):
    server = serve((503, b"overloaded", {}))
    waits = []
    with pytest.raises(JudgeError) as err:
        client(server, retries=3, backoff_s=0.01, sleep=waits.append).complete(MSG)
    assert len(server.requests) == 4 and waits == [0.01, 0.02, 0.04]
    assert "after 4 attempt(s)" in str(err.value) and "HTTP 503" in str(err.value) and "overloaded" in str(err.value)


def test_persistent_rate_limit_is_a_clear_error(serve):
    server = serve((429, b'{"error": {"message": "quota exceeded"}}', {}))
    with pytest.raises(JudgeError, match=r"rate limited \(HTTP 429\): quota exceeded"):
        client(server, retries=1).complete(MSG)
    assert len(server.requests) == 2


def test_a_hanging_server_times_out(serve):
    server = serve("hang", OK)
    start = time.monotonic()
    reply = client(server, timeout_s=0.5).complete(MSG)
    assert parse_verdict(reply) == "B" and len(server.requests) == 2
    assert time.monotonic() - start < 5

    server = serve("hang")
    start = time.monotonic()
    with pytest.raises(JudgeError, match=r"within 0.5 s \(evaluate.judge.timeout_s\)"):
        client(server, timeout_s=0.5, retries=1).complete(MSG)
    assert time.monotonic() - start < 5


def test_a_trickling_server_cannot_outlast_the_deadline(serve):
    # Every byte arrives within the socket timeout; only the whole-request deadline stops it.
    server = serve("trickle")
    start = time.monotonic()
    with pytest.raises(JudgeError, match="within 2 s"):
        client(server, timeout_s=2, retries=0).complete(MSG)
    assert time.monotonic() - start < 6


def test_a_body_that_is_not_a_completion_is_retried_then_an_error(serve):
    server = serve((200, b"<html>proxy error</html>", {}), OK)
    assert parse_verdict(client(server).complete(MSG)) == "B"
    server = serve((200, b'{"choices": []}', {}))
    with pytest.raises(JudgeError, match="not a chat completion"):
        client(server, retries=1).complete(MSG)


def test_bad_key_fails_at_once_and_the_key_is_never_shown(serve):
    server = serve((401, b'{"error": {"message": "invalid api key"}}', {}))
    secret = "sk-canary-" + os.urandom(6).hex()
    judge = client(server, api_key=secret)
    with pytest.raises(JudgeError) as err:
        judge.complete(MSG)
    assert len(server.requests) == 1
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {secret}"
    assert "key_env" in str(err.value) and secret not in str(err.value) and secret not in repr(judge)


def test_no_key_no_authorization_header(serve):
    server = serve(OK)
    client(server).complete(MSG)
    assert "Authorization" not in server.requests[0]["headers"]


def test_unsupported_structured_output_says_what_to_set(serve):
    server = serve((400, b'{"error": {"message": "response_format not supported"}}', {}))
    with pytest.raises(JudgeError, match="response_format to one it supports"):
        client(server).complete(MSG, response_format={"type": "json_schema"})


def test_connection_refused_is_a_clear_error():
    with socket.socket() as sock:          # a port that was free a moment ago and is closed now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = ChatClient(f"http://127.0.0.1:{port}/v1", "m", retries=1, backoff_s=0.01)
    with pytest.raises(JudgeError, match="cannot connect"):
        judge.complete(MSG)


def test_garbage_verdicts_are_counted_unparsable_never_a_win(serve):
    server = serve((200, completion("Both answers have merit. I cannot decide."), {}))
    pairs = [{"id": f"r{i}", "prompt": "p", "reference": "ref", "base": "b", "tuned": "t"} for i in range(3)]
    judge = client(server)
    report = summarize(judge_pairs(pairs, judge.complete, "rubric", concurrency=2))
    assert report["unparsable"]["count"] == 3 and report["win"]["count"] == 0
    assert report["unparsable_judgements"] == 6 and len(server.requests) == 6


# --- the stage, in a scratch project -------------------------------------------------------------

def _stage_project(tmp_path: Path, judge: dict) -> Path:
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["evaluate"]["judge"].update(judge)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for which, answer in (("base", "not json"), ("tuned", '{"category": "bug"}')):
        folder = tmp_path / "data/eval" / which
        folder.mkdir(parents=True)
        rows = [{"id": f"row{i}", "prompt": [{"role": "user", "content": f"ticket {i}"}],
                 "reference": '{"category": "bug"}', "prediction": f"{answer} {i}"} for i in range(5)]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _run_stage(project: Path, **env):
    return subprocess.run([sys.executable, "-m", "stages.judge"], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)


def test_stage_off_writes_an_off_report_without_a_server(tmp_path):
    project = _stage_project(tmp_path, {"enabled": False, "url": "http://127.0.0.1:9/v1"})
    done = _run_stage(project)
    assert done.returncode == 0, done.stderr
    assert json.loads((project / "reports/judge.json").read_text()) == {"enabled": False}
    assert (project / "data/judge/replies.jsonl").read_text() == ""


def test_stage_with_a_slot_a_judge_reports_position_bias_not_wins(serve, tmp_path):
    # A judge that always says "A" prefers whatever is shown first: every row flips with the order,
    # so it must come out as all ties with flip rate 1, not as wins for either model.
    server = serve((200, completion('{"reason": "first is best", "winner": "A"}',
                                    {"prompt_tokens": 300, "completion_tokens": 12, "total_tokens": 312}), {}))
    secret = "sk-canary-" + os.urandom(6).hex()
    project = _stage_project(tmp_path, {"enabled": True, "url": server.url, "model": "m",
                                        "key_env": "MY_JUDGE_KEY", "retries": 0})
    done = _run_stage(project, MY_JUDGE_KEY=secret)
    assert done.returncode == 0, done.stderr
    report = json.loads((project / "reports/judge.json").read_text())
    assert report["rows"] == 5 and report["judgements"] == 10
    assert report["tie"]["count"] == 5 and report["win"]["count"] == 0 and report["loss"]["count"] == 0
    assert report["position_bias"]["flip_rate"]["rate"] == 1.0
    assert report["position_bias"]["first_shown_rate"]["rate"] == 1.0
    assert report["tokens"] == {"prompt": 3000, "completion": 120}     # what the run cost
    replies = [json.loads(line) for line in (project / "data/judge/replies.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["order"]) for r in replies) == sorted(
        (f"row{i}", o) for i in range(5) for o in ("base_first", "tuned_first"))
    assert all(r["reply"] == '{"reason": "first is best", "winner": "A"}' for r in replies)
    request = server.requests[0]
    assert request["headers"]["Authorization"] == f"Bearer {secret}"
    assert request["json"]["response_format"]["type"] == "json_schema"
    assert request["json"]["temperature"] == 0.0
    for path in project.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path
    assert secret not in done.stderr + done.stdout


def test_stage_fails_with_one_clear_line_when_the_judge_is_down(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    project = _stage_project(tmp_path, {"enabled": True, "url": f"http://127.0.0.1:{port}/v1",
                                        "retries": 1, "backoff_s": 0.01})
    done = _run_stage(project)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("judge: http://127.0.0.1:")
    assert "cannot connect" in done.stderr and "Traceback" not in done.stderr
    assert not (project / "reports/judge.json").exists()


# --- dvc.yaml: judging params never re-run generation, and every verdict-changing key re-judges ----

OPERATIONAL = {"timeout_s", "retries", "backoff_s", "max_backoff_s", "concurrency", "key_env"}
TUNED_ONLY = {"n_samples", "gates"}   # read by `evaluate` (samples, gates), not by `evaluate_base`


def test_dvc_yaml_params_keep_judge_and_prefs_apart_from_evaluate():
    import yaml

    from stages.lib.params import EvaluateParams, JudgeParams

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def listed(stage, prefix):
        return {p for p in stages[stage]["params"] if isinstance(p, str) and p.startswith(prefix)}

    own = {f"evaluate.{k}" for k in EvaluateParams.model_fields if k not in ("judge", "prefs")}
    # A new evaluate key must be listed here, or changing it would re-run nothing; `evaluate` as a
    # whole would re-run both evaluations (minutes) whenever a judge or prefs key changes.
    assert listed("evaluate", "evaluate") == own
    assert listed("evaluate_base", "evaluate") == own - {f"evaluate.{k}" for k in TUNED_ONLY}
    assert listed("judge", "evaluate") == {f"evaluate.judge.{k}" for k in JudgeParams.model_fields} - {
        f"evaluate.judge.{k}" for k in OPERATIONAL}
    assert listed("prefs", "evaluate") == {"evaluate.prefs"}


def test_a_failed_run_resumes_without_asking_again(serve, tmp_path):
    verdict = (200, completion('{"reason": "x", "winner": "B"}'), {})
    flaky = serve(verdict, verdict, verdict, (503, b"gone", {}))
    project = _stage_project(tmp_path, {"enabled": True, "url": flaky.url, "retries": 0})
    done = _run_stage(project)
    assert done.returncode == 1 and "HTTP 503" in done.stderr
    journal = project / "checkpoints/judge/replies.partial.jsonl"
    assert len(journal.read_text().splitlines()) == 3

    # The same server back up (same URL: the URL is part of what a reply is keyed by).
    flaky.close()
    healthy = serve(verdict, port=flaky.httpd.server_address[1])
    done = _run_stage(project)
    assert done.returncode == 0, done.stderr
    assert "resuming: 3 replies" in done.stderr
    assert len(healthy.requests) == 10 - 3
    assert json.loads((project / "reports/judge.json").read_text())["judgements"] == 10
    assert not journal.exists(), "a finished run leaves no journal: a forced re-run asks afresh"
