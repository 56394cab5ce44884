"""`qlora-dvc prefs`: blind human preference between the base and the tuned model's answers.

    qlora-dvc prefs [--port 8765] [--rater NAME] [--limit N] [--open]

Serves a small page on this machine (http://127.0.0.1:8765/ by default) that shows one test
prompt and the two models' answers as "A" and "B", sides drawn at random for every comparison;
which model is which never reaches the browser (the page only gets an opaque token). Keys: A, B,
T (tie), S (skip). Every judgement is appended at once to `evaluate.prefs.file`
(data/prefs/judgements.jsonl); commit that file, and `dvc repro prefs` turns it into win rates
with intervals in reports/prefs.json. Rows this rater has already judged (for the current
answers) are not shown again; skipped rows come back next session.

Run it from the project root after `dvc repro` (it reads data/eval/{base,tuned}/predictions.jsonl).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import sys
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BASE = Path("data/eval/base/predictions.jsonl")
TUNED = Path("data/eval/tuned/predictions.jsonl")
KEYS = {"a": "A", "b": "B", "t": "tie", "s": "skip"}


class PrefsSession:
    """The comparisons still to show, who is behind each token, and the append-only file."""

    def __init__(self, pairs: list[dict], judgements_file: Path, rater: str, *, limit: int | None = None,
                 rng: random.Random | None = None):
        from stages.lib.prefs import answers_fingerprint, read_judgements

        self.file = Path(judgements_file)
        self.rater = rater
        self._rng = rng or random.SystemRandom()
        self._lock = threading.Lock()
        done = set()
        if self.file.exists():
            with open(self.file, encoding="utf-8") as handle:
                for j in read_judgements(handle):
                    if isinstance(j, dict) and j.get("rater") == rater and j.get("choice") in ("A", "B", "tie"):
                        done.add((j.get("id"), j.get("answers")))
        self._fingerprints = {p["id"]: answers_fingerprint(p["base"], p["tuned"]) for p in pairs}
        todo = [p for p in pairs if (p["id"], self._fingerprints[p["id"]]) not in done]
        self._rng.shuffle(todo)
        self.queue = todo[:limit] if limit else todo
        self.total = len(self.queue)
        self.saved = 0
        self._shown: dict[str, tuple[dict, str]] = {}   # token -> (pair, model shown as A)

    def next(self) -> dict:
        """The next comparison for the page: prompt and answers A/B, no model names."""
        with self._lock:
            if not self.queue:
                return {"done": True, "saved": self.saved, "file": str(self.file)}
            pair = self.queue[0]
            shown_first = self._rng.choice(("base", "tuned"))
            token = secrets.token_urlsafe(12)
            self._shown = {token: (pair, shown_first)}   # only the comparison on screen is answerable
            other = "tuned" if shown_first == "base" else "base"
            return {"done": False, "token": token, "prompt": _prompt_turns(pair["prompt"]),
                    "a": pair[shown_first], "b": pair[other],
                    "position": self.total - len(self.queue) + 1, "total": self.total}

    def judge(self, token: str, choice: str) -> dict:
        from stages.lib.prefs import judgement_record

        with self._lock:
            if token not in self._shown:
                raise LookupError("this comparison is no longer on screen (reload the page)")
            pair, shown_first = self._shown.pop(token)
            record = judgement_record(pair["id"], self._fingerprints[pair["id"]], shown_first, choice,
                                      self.rater, datetime.now(timezone.utc).isoformat(timespec="seconds"))
            _append_line(self.file, json.dumps(record, ensure_ascii=False, sort_keys=True))
            self.queue.remove(pair)
            self.saved += 1
        return record


def _append_line(path: Path, line: str) -> None:
    # One write() of one line on an O_APPEND file, then fsync: a crash loses at most the judgement
    # being written, never an earlier one (this is a log the user commits, not a stage output).
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        if os.fstat(fd).st_size:
            with open(path, "rb") as handle:      # a file edited by hand may lack its last newline
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    line = "\n" + line
        os.write(fd, (line + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _prompt_turns(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m.get("role", "user"), "content": m.get("content", "")} for m in prompt]


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Which answer is better?</title>
<style>
 body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:16px;color:#222}
 .turn{background:#f4f4f4;border-radius:6px;padding:8px 12px;margin:6px 0;white-space:pre-wrap}
 .turn.system{color:#666;font-size:13px}
 .answers{display:grid;grid-template-columns:1fr 1fr;gap:16px;margin-top:12px}
 .answer{border:2px solid #ccc;border-radius:6px;padding:10px;white-space:pre-wrap;overflow-wrap:anywhere;
   font-family:ui-monospace,monospace;font-size:13px;min-height:4em}
 h2{margin:0 0 6px 0;font-size:16px} .bar{margin:14px 0;display:flex;gap:8px;align-items:center}
 button{font-size:15px;padding:6px 14px} kbd{border:1px solid #999;border-radius:3px;padding:0 4px}
 #status{color:#555;margin-left:auto}
</style></head><body>
<h1 style="font-size:20px">Which answer is better? <small style="font-weight:normal;color:#666">(the sides are random; the models are not named)</small></h1>
<div id="prompt"></div>
<div class="answers">
 <div><h2>A</h2><div class="answer" id="answer-a"></div></div>
 <div><h2>B</h2><div class="answer" id="answer-b"></div></div>
</div>
<div class="bar">
 <button id="choose-a" data-choice="A"><kbd>A</kbd> A is better</button>
 <button id="choose-b" data-choice="B"><kbd>B</kbd> B is better</button>
 <button id="choose-tie" data-choice="tie"><kbd>T</kbd> Tie</button>
 <button id="choose-skip" data-choice="skip"><kbd>S</kbd> Skip</button>
 <span id="status"></span>
</div>
<script>
"use strict";
let current = null, busy = false;
const KEYS = {a: "A", b: "B", t: "tie", s: "skip"};
function show(item) {
  current = item.done ? null : item;
  const status = document.getElementById("status");
  const prompt = document.getElementById("prompt");
  prompt.replaceChildren();
  if (item.done) {
    document.getElementById("answer-a").textContent = "";
    document.getElementById("answer-b").textContent = "";
    status.textContent = "All done: " + item.saved + " judgement(s) saved to " + item.file +
      ". Commit it and run `dvc repro prefs`.";
    document.body.dataset.state = "done";
    return;
  }
  for (const turn of item.prompt) {
    const div = document.createElement("div");
    div.className = "turn " + turn.role;
    div.textContent = turn.content;             // text, never HTML: answers are untrusted
    prompt.appendChild(div);
  }
  document.getElementById("answer-a").textContent = item.a;
  document.getElementById("answer-b").textContent = item.b;
  status.textContent = "Comparison " + item.position + " of " + item.total;
  document.body.dataset.state = "ready";
  document.body.dataset.position = item.position;
}
async function load() {
  const r = await fetch("api/next");
  show(await r.json());
}
async function choose(choice) {
  if (!current || busy) return;
  busy = true;
  document.body.dataset.state = "saving";
  try {
    const r = await fetch("api/judge", {method: "POST", headers: {"Content-Type": "application/json"},
                                        body: JSON.stringify({token: current.token, choice: choice})});
    const body = await r.json();
    if (!r.ok) { document.getElementById("status").textContent = "Not saved: " + body.error; return; }
    show(body.next);
  } finally { busy = false; }
}
document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const choice = KEYS[e.key.toLowerCase()];
  if (choice) { e.preventDefault(); choose(choice); }
});
for (const button of document.querySelectorAll("button[data-choice]")) {
  button.addEventListener("click", () => choose(button.dataset.choice));
}
load();
</script></body></html>
"""


def make_handler(session: PrefsSession, allowed_hosts: set[str]):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):   # quiet: the terminal shows progress lines instead
            pass

        def _host_ok(self) -> bool:
            # Refuse requests that reach us under another host name (DNS rebinding).
            if self.headers.get("Host", "") in allowed_hosts:
                return True
            self._send(403, {"error": "unexpected Host header"})
            return False

        def _send(self, status: int, obj=None, html: str | None = None):
            body = (html if html is not None else json.dumps(obj, ensure_ascii=False)).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8" if html is not None
                             else "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if not self._host_ok():
                return
            if self.path in ("/", "/index.html"):
                self._send(200, html=PAGE)
            elif self.path == "/api/next":
                self._send(200, session.next())
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self):
            if not self._host_ok():
                return
            if self.path != "/api/judge":
                self._send(404, {"error": "not found"})
                return
            try:
                body = json.loads(self.rfile.read(min(int(self.headers.get("Content-Length", 0)), 10_000)))
                record = session.judge(str(body["token"]), str(body["choice"]))
            except LookupError as exc:
                self._send(409, {"error": str(exc)})
                return
            except (ValueError, KeyError, TypeError) as exc:
                self._send(400, {"error": f"bad request: {exc}"})
                return
            print(f"prefs: {session.saved}/{session.total} saved ({record['choice']})", file=sys.stderr)
            self._send(200, {"saved": True, "next": session.next()})

    return Handler


def serve(session: PrefsSession, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A started server (in a daemon thread); `.shutdown()` stops it. Port 0 picks a free one."""
    httpd = ThreadingHTTPServer((host, port), None)
    bound = httpd.server_address[1]
    names = {host, "127.0.0.1", "localhost"} if host in ("127.0.0.1", "localhost") else {host}
    httpd.RequestHandlerClass = make_handler(session, {f"{name}:{bound}" for name in names})
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def load_session(rater: str, limit: int | None, seed: int | None = None) -> PrefsSession:
    from stages.lib.io import read_jsonl
    from stages.lib.pairing import pair_rows
    from stages.lib.params import load_params

    for path in (BASE, TUNED):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `dvc repro` first (prefs compares the "
                                    "answers the evaluate stages wrote)")
    pairs = pair_rows(read_jsonl(BASE), read_jsonl(TUNED))
    rng = random.Random(seed) if seed is not None else None
    return PrefsSession(pairs, Path(load_params().evaluate.prefs.file), rater, limit=limit, rng=rng)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-dvc prefs", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--rater", default=os.environ.get("USER", "rater"),
                        help="your name in the judgements file (default: $USER)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many comparisons")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for the order and the sides (default: unpredictable, which keeps it blind)")
    parser.add_argument("--open", action="store_true", help="open the page in the default browser")
    args = parser.parse_args(argv)

    session = load_session(args.rater, args.limit, args.seed)
    httpd = serve(session, args.host, args.port)
    url = f"http://{args.host}:{httpd.server_address[1]}/"
    print(f"prefs: {session.total} comparison(s) for {args.rater} at {url} (Ctrl-C to stop); "
          f"judgements go to {session.file}", file=sys.stderr)
    if args.open:
        import webbrowser

        webbrowser.open(url)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.shutdown()
        httpd.server_close()
    print(f"prefs: {session.saved} judgement(s) saved to {session.file}; commit it and run "
          "`dvc repro prefs`", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
