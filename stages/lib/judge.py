"""Pairwise LLM-as-a-judge: base vs tuned answers, judged by a model behind any OpenAI-compatible
chat endpoint (vLLM, llama.cpp's server, Ollama, a hosted API).

Position bias is controlled by design, not hoped away: every row is judged twice, once with the
base answer shown first and once with the tuned answer first. A row counts as a win for the tuned
model when the two verdicts add up in its favour (win+win, win+tie), a loss the other way round,
and a tie when they cancel (win+loss: the verdict followed the position, not the answer) or both
say tie. How often the verdict flips with the order is reported, so a judge that mostly follows
position is visible as such.

A reply the parser cannot read is counted as "unparsable", never guessed: a row with an
unparsable judgement in either order is an unparsable row, and the four rates (win, tie, loss,
unparsable) always add up to 1 over all rows. Transport problems (timeouts, refused connections,
rate limits, 5xx, a body that is not a chat completion) are retried with exponential backoff and
then fail the stage with one clear line; other HTTP errors (bad key, unknown model) fail at once.

Pure parts (`judge_messages`, `parse_verdict`, `tuned_outcome`, `summarize`) are separate from the
one impure part (`ChatClient`), so they are tested without a server.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

from stages.lib.pairing import share

ORDERS = ("base_first", "tuned_first")
OUTCOMES = ("win", "tie", "loss", "unparsable")   # from the tuned model's side

JUDGE_SYSTEM = ("You are an impartial judge comparing two answers to the same request. "
                "Judge the content only: ignore which answer is shown first, and ignore length "
                "unless the rubric asks for it.")
REPLY_INSTRUCTION = ('Reply with only a JSON object: {"reason": "<one short sentence>", '
                     '"winner": "A" or "B" or "tie"}.')
# What a well-behaved judge returns; sent as a JSON schema when the server supports it
# (evaluate.judge.response_format), which makes every reply parsable by construction.
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"reason": {"type": "string"}, "winner": {"type": "string", "enum": ["A", "B", "tie"]}},
    "required": ["reason", "winner"],
    "additionalProperties": False,
}


class JudgeError(RuntimeError):
    """The judge could not be asked (server down, rate limited for too long, bad key, unknown
    model): the message says what happened and what to check. Never raised for a bad verdict."""


# --- the request ------------------------------------------------------------------------------

def _conversation(prompt: Sequence[Mapping[str, str]] | str) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m.get('role', 'user').upper()}:\n{m.get('content', '')}" for m in prompt)


def judge_messages(prompt: Sequence[Mapping[str, str]] | str, answer_a: str, answer_b: str,
                   rubric: str, reference: str | None = None) -> list[dict]:
    """The chat messages that ask the judge to compare answer A with answer B."""
    parts = [rubric.strip(), "[Conversation]\n" + _conversation(prompt)]
    if reference is not None:
        parts.append("[Reference answer]\n" + reference)
    parts.append(f"[Answer A]\n{answer_a}\n[End of answer A]")
    parts.append(f"[Answer B]\n{answer_b}\n[End of answer B]")
    parts.append(REPLY_INSTRUCTION)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


# --- reading the verdict ----------------------------------------------------------------------

_WORDS = {"a": "A", "answer a": "A", "b": "B", "answer b": "B",
          "tie": "tie", "draw": "tie", "equal": "tie", "both": "tie", "neither": "tie"}
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
# "Verdict: A", "winner = tie", MT-bench's "[[A]]" / "[[C]]" (C = tie).
_LINE = re.compile(r"(?im)^\s*\**\s*(?:final\s+)?(?:verdict|winner)\s*\**\s*[:=]\s*\**\s*\[*\s*"
                   r"(answer\s+a|answer\s+b|a|b|tie|draw|equal)\s*\]*\**\s*\.?\s*$")
_BRACKETS = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.I)


def _word(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return _WORDS.get(" ".join(value.strip().strip(".!\"'[]*").lower().split()))


def _json_objects(text: str) -> list[dict]:
    """Every top-level JSON object in `text` (a judge may wrap its JSON in prose or fences)."""
    decoder = json.JSONDecoder()
    found, i = [], 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return found
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = end


def parse_verdict(reply: str | None) -> str | None:
    """'A', 'B' or 'tie' from a judge's reply; None when the reply does not say one clearly.

    Accepted: a JSON object with "winner" (or "verdict"), a line "Verdict: A", "[[A]]", or a
    reply that is nothing but the verdict ("B", "Tie."). A
    reply that names two different verdicts, or none, is unparsable: guessing would turn noise
    into wins."""
    if not reply or not reply.strip():
        return None
    text = _FENCE.sub("", reply.strip())
    if _word(text) is not None and len(text) <= 12:   # the whole reply is one verdict: "B", "Tie."
        return _word(text)
    verdicts = set()
    for obj in _json_objects(text):
        for key in ("winner", "verdict"):
            if key in obj:
                verdicts.add(_word(obj[key]))
    if not verdicts:
        verdicts.update(_word(m) for m in _LINE.findall(text))
        verdicts.update("tie" if m.upper() == "C" else _word(m) for m in _BRACKETS.findall(text))
    if len(verdicts) != 1:
        return None
    return verdicts.pop()


def tuned_outcome(verdict: str | None, order: str) -> str:
    """A verdict about slots A/B as an outcome for the tuned model: win, tie, loss, unparsable."""
    if verdict is None:
        return "unparsable"
    if verdict == "tie":
        return "tie"
    tuned_slot = "B" if order == "base_first" else "A"
    return "win" if verdict == tuned_slot else "loss"


def row_outcome(first: str, second: str) -> str:
    """The two orders' outcomes combined: they add up (win=+1, tie=0, loss=-1), so a verdict that
    flips with the order cancels to a tie; any unparsable judgement makes the row unparsable."""
    if "unparsable" in (first, second):
        return "unparsable"
    score = sum({"win": 1, "tie": 0, "loss": -1}[o] for o in (first, second))
    return "win" if score > 0 else "loss" if score < 0 else "tie"


# --- numbers ----------------------------------------------------------------------------------

def summarize(judgements: Sequence[Mapping[str, Any]]) -> dict:
    """The judge report from per-judgement records ({"id", "order", "verdict", "outcome"}).

    Rates are per row (both orders combined) over all rows; position-bias figures use the rows,
    or judgements, where the judge gave a readable verdict."""
    by_row: dict[str, dict[str, Mapping]] = {}
    for j in judgements:
        by_row.setdefault(j["id"], {})[j["order"]] = j
    incomplete = [rid for rid, orders in by_row.items() if set(orders) != set(ORDERS)]
    if incomplete:
        raise ValueError(f"{len(incomplete)} row(s) not judged in both orders, e.g. {incomplete[0]}")
    n = len(by_row)
    rows = [row_outcome(o["base_first"]["outcome"], o["tuned_first"]["outcome"]) for o in by_row.values()]
    both_read = [o for o in by_row.values()
                 if "unparsable" not in (o["base_first"]["outcome"], o["tuned_first"]["outcome"])]
    flips = sum(o["base_first"]["outcome"] != o["tuned_first"]["outcome"] for o in both_read)
    decisive = [j for j in judgements if j["verdict"] in ("A", "B")]
    first_slot = sum(j["verdict"] == "A" for j in decisive)
    report = {"rows": n, "judgements": len(judgements),
              "unparsable_judgements": sum(j["outcome"] == "unparsable" for j in judgements)}
    for outcome in OUTCOMES:
        report[outcome] = share(rows.count(outcome), n)
    # What the run cost, in the units APIs bill: summed over the judgements the server reported.
    for kind in ("prompt_tokens", "completion_tokens"):
        counted = [j["usage"][kind] for j in judgements if kind in (j.get("usage") or {})]
        if counted:
            report.setdefault("tokens", {})[kind.removesuffix("_tokens")] = sum(counted)
    report["position_bias"] = {
        # Rows whose outcome changed when the answers swapped places (0: position never mattered).
        "flip_rate": share(flips, len(both_read)),
        # Of the judgements that picked a winner, the share that picked whatever was shown first
        # (0.5: no preference for a slot).
        "first_shown_rate": share(first_slot, len(decisive)),
    }
    return report


def off_report() -> dict:
    return {"enabled": False}


# --- the client -------------------------------------------------------------------------------

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_FORMAT_HINT = ("if the server rejects the structured-output request, set evaluate.judge.response_format "
                "to one it supports: json_schema, json_object_schema, json_object or none")


class _Retryable(Exception):
    def __init__(self, message: str, wait_s: float | None = None):
        super().__init__(message)
        self.wait_s = wait_s


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _error_detail(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        text = err.get("message", text) if isinstance(err, dict) else str(err)
    except ValueError:
        pass
    text = " ".join(str(text).split())
    return text[:200] + ("…" if len(text) > 200 else "")


class ChatClient:
    """POST /chat/completions to an OpenAI-compatible server, with a deadline per request and
    retries with exponential backoff (backoff_s, 2*backoff_s, ... capped at max_backoff_s, or the
    server's Retry-After when it sends one).

    The API key is sent as a Bearer header and appears in no message, log or report."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, timeout_s: float = 60,
                 retries: int = 4, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep):
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = model
        self._api_key = api_key or None
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep

    def __repr__(self) -> str:  # never the key
        return f"ChatClient({self.endpoint!r}, model={self.model!r})"

    def complete(self, messages: list[dict], **options: Any) -> str:
        """The assistant message's content ("" when the server sent none)."""
        return self.chat(messages, **options)[0]

    def chat(self, messages: list[dict], **options: Any) -> tuple[str, dict]:
        """(content, token usage {"prompt_tokens", "completion_tokens"} as far as the server says)."""
        payload = json.dumps({"model": self.model, "messages": messages, **options}).encode("utf-8")
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            try:
                return self._post(payload)
            except _Retryable as exc:
                last = str(exc)
                if attempt + 1 == attempts:
                    break
                wait = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
                if exc.wait_s is not None:
                    wait = min(self.max_backoff_s, max(wait, exc.wait_s))
                self._sleep(wait)
        raise JudgeError(f"{self.endpoint}: no usable answer after {attempts} attempt(s); last: {last}")

    def _post(self, payload: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.endpoint, data=payload, headers=headers, method="POST")
        deadline = time.monotonic() + self.timeout_s
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = self._read_before(response, deadline)
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc.read() if exc.fp else b"")
            if exc.code in RETRY_STATUS:
                what = "rate limited (HTTP 429)" if exc.code == 429 else f"HTTP {exc.code}"
                raise _Retryable(f"{what}: {detail}", _retry_after(exc.headers)) from None
            hint = {401: "check the API key's environment variable (evaluate.judge.key_env)",
                    403: "check the API key's environment variable (evaluate.judge.key_env)",
                    404: "check evaluate.judge.url (the OpenAI-compatible base, e.g. http://host:8000/v1) "
                         "and evaluate.judge.model",
                    400: _FORMAT_HINT, 422: _FORMAT_HINT}.get(exc.code, "")
            raise JudgeError(f"{self.endpoint}: HTTP {exc.code}: {detail}" + (f" ({hint})" if hint else "")) from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"no complete answer within {self.timeout_s:g} s (evaluate.judge.timeout_s)") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no complete answer within {self.timeout_s:g} s (evaluate.judge.timeout_s)") from None
            raise _Retryable(f"cannot connect: {reason}") from None
        except (ConnectionError, OSError) as exc:
            raise _Retryable(f"connection failed: {exc}") from None
        return self._content(body)

    def _read_before(self, response, deadline: float) -> bytes:
        # The socket timeout bounds each read; this bounds the whole body, so a server that
        # trickles a byte a second cannot hold the stage forever.
        chunks = []
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError
            chunk = response.read1(65536)   # what has arrived, not "wait for 64 KiB"
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    @staticmethod
    def _content(body: bytes) -> tuple[str, dict]:
        try:
            obj = json.loads(body)
            message = obj["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = " ".join(body[:120].decode("utf-8", "replace").split())
            raise _Retryable(f"the server's answer is not a chat completion: {snippet!r}") from None
        content = message.get("content") if isinstance(message, dict) else None
        usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
        usage = {k: usage[k] for k in ("prompt_tokens", "completion_tokens")
                 if isinstance(usage.get(k), int) and not isinstance(usage.get(k), bool)}
        return (content if isinstance(content, str) else ""), usage


def response_format_option(kind: str) -> dict:
    """The request option that asks for a JSON verdict, in the form the server understands."""
    if kind == "json_schema":   # OpenAI, vLLM, llama.cpp's server, Ollama
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA, "strict": True}}}
    if kind == "json_object_schema":   # llama-cpp-python's server (and Anyscale-style APIs)
        return {"response_format": {"type": "json_object", "schema": VERDICT_SCHEMA}}
    if kind == "json_object":   # any JSON object (the instruction asks for the keys)
        return {"response_format": {"type": "json_object"}}
    return {}


# --- the run ----------------------------------------------------------------------------------

class ReplyJournal:
    """Replies received so far, appended to a file as they arrive, so that a run that fails half way
    (rate limit exhausted, server gone, Ctrl-C) resumes without asking -- or paying for -- the same
    requests again. Keyed by a hash of everything that determines the reply (endpoint, model,
    messages, options); the stage deletes the file after a successful run, so a later forced
    re-run asks the judge afresh."""

    def __init__(self, path):
        from pathlib import Path

        self.path = Path(path)
        self.replies: dict[str, tuple[str, dict]] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            from stages.lib.io import parse_jsonl_lines

            with open(self.path, encoding="utf-8") as handle:
                for entry in parse_jsonl_lines(handle, malformed_as_none=True):
                    try:
                        self.replies[entry["key"]] = (entry["content"], entry.get("usage") or {})
                    except (KeyError, TypeError):
                        continue   # a line cut short by a crash (None): that request is asked again
        self.reused = 0

    @staticmethod
    def key(*parts: Any) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    def wrap(self, ask: Callable[[list[dict]], tuple[str, dict]], *identity: Any) -> Callable:
        def cached(messages: list[dict]) -> tuple[str, dict]:
            key = self.key(*identity, messages)
            with self._lock:
                if key in self.replies:
                    self.reused += 1
                    return self.replies[key]
            content, usage = ask(messages)
            with self._lock:
                self.replies[key] = (content, usage)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"key": key, "content": content, "usage": usage},
                                            ensure_ascii=False) + "\n")
            return content, usage
        return cached

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def judge_pairs(pairs: Sequence[Mapping], ask: Callable[[list[dict]], str], rubric: str, *,
                show_reference: bool = True, concurrency: int = 1,
                progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Judge every pair in both orders; one record per judgement, in a fixed order (row, order).

    `ask(messages)` does the request and returns the reply text, or (text, token usage); a
    JudgeError from it stops the run."""
    jobs = []
    for pair in pairs:
        for order in ORDERS:
            first, second = ("base", "tuned") if order == "base_first" else ("tuned", "base")
            messages = judge_messages(pair["prompt"], pair[first], pair[second], rubric,
                                      pair.get("reference") if show_reference else None)
            jobs.append((pair["id"], order, messages))
    done = itertools.count(1)

    def run(job):
        row_id, order, messages = job
        answer = ask(messages)
        reply, usage = answer if isinstance(answer, tuple) else (answer, {})
        verdict = parse_verdict(reply)
        finished = next(done)   # itertools.count is atomic under the GIL
        if progress:
            progress(finished, len(jobs))
        return {"id": row_id, "order": order, "reply": reply, "verdict": verdict,
                "outcome": tuned_outcome(verdict, order), **({"usage": usage} if usage else {})}

    if concurrency <= 1:
        return [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(run, jobs))
