"""All record I/O: the JSON/JSONL readers and writers every stage uses, and atomic outputs.

Every output is written to a temporary file next to its target and moved into place with
`os.replace`, so a killed stage leaves either the old file or no file, never a half-written one
that DVC or the next stage could mistake for a result.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson


class OutputError(OSError):
    """An output could not be written (read-only directory, disk full, ...)."""


def _temp_prefix(path: Path) -> str:
    # The writer's pid is in the name, so a later run can tell a temp file whose writer died
    # (SIGKILL, power loss) from one being written right now.
    return f".{path.name}.{os.getpid()}."


def sweep_stale_temps(path: Path) -> None:
    """Remove temporary files/folders beside `path` that a process now dead left behind
    (`.<name>.<pid>.*.tmp`): a killed stage cannot clean up, its next run does."""
    prefix = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        pid = entry.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


@contextlib.contextmanager
def scratch_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder `.<name>.<pid>.*.tmp` beside `path`, removed on the way out (also on
    an exception or a SIGTERM turned into one); one left by a killed run is swept by the next.
    Beside the outputs, not in /tmp: a re-run of the stage is what cleans it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path)
    folder = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: str | os.PathLike, mode: int) -> None:
    # mkstemp/mkdtemp create 0600/0700 entries; outputs get the usual umask-based permissions.
    os.chmod(path, mode & ~_umask())


def dumps_record(obj: Any) -> str:
    """One JSON line: sorted keys, no spaces, UTF-8 text unescaped; the same record always
    serialises to the same bytes.

    Through orjson (5x faster than json), whose output is byte for byte json.dumps(obj,
    ensure_ascii=False, sort_keys=True, separators=(",", ":")) for strings, integers, booleans,
    null, lists and objects; floats are written in orjson's shortest form ("1e16", where json
    writes "1e+16"), NaN and infinities as null. What orjson refuses (integers beyond 64 bits,
    lone surrogates, non-string keys) goes to json.
    """
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode("utf-8")
    except TypeError:
        text = json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (in a rejected row's excerpt, or a file name that is not UTF-8)
            # cannot go into a UTF-8 file: written as its JSON escape, "\ud800", instead.
            return json.dumps(obj, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
        return text


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temp file beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8",
                       newline=None if "b" in mode else "\n") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _publish_mode(tmp, 0o666)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def nonfinite_json_values(obj: Any, prefix: str = "") -> tuple[Any, dict[str, str]]:
    """`obj` with every NaN/infinite float replaced by None, and {dotted key: "nan"/"inf"/"-inf"}
    for each one replaced (JSON has no such numbers; Python's json writes them anyway)."""
    found: dict[str, str] = {}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            found[key or "(value)"] = repr(value)
            return None
        if isinstance(value, dict):
            return {k: walk(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    return walk(obj, prefix), found


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON. NaN and infinities are not JSON (Python writes them anyway,
    and strict parsers, `dvc metrics` among them, then fail): each becomes null, and a dict gets a
    "non_finite" entry naming the keys and what they held, so the null has its reason beside it."""
    obj, found = nonfinite_json_values(obj)
    if found and isinstance(obj, dict):
        obj["non_finite"] = {**(obj.get("non_finite") or {}),
                             **{key: f"{value}: not a finite number, written as null" for key, value in found.items()}}
    with atomic_file(path) as handle:
        json.dump(obj, handle, ensure_ascii=False, indent=2, sort_keys=True, allow_nan=False)
        handle.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text)


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> int:
    """Stream rows to `path` atomically; return how many were written."""
    count = 0
    with atomic_file(path) as handle:
        for row in rows:
            handle.write(dumps_record(row))
            handle.write("\n")
            count += 1
    return count


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Read a JSONL file this pipeline wrote (trusted format: errors are bugs, not bad rows)."""
    with open(path, encoding="utf-8") as handle:
        yield from parse_jsonl_lines(handle)


def parse_jsonl_lines(lines: Iterable[str | bytes], malformed_as_none: bool = False) -> Iterator[Any]:
    """The JSON value of each non-blank line, from any source of lines (an open file, a file's
    bytes at a git revision). With `malformed_as_none`, a line that is not JSON gives None instead
    of raising: for files people edit by hand or a crash may cut short, where one bad line must not
    hide the rest."""
    for line in lines:
        if not line.strip():
            continue
        try:
            yield fast_json_loads(line)
        except ValueError:
            if not malformed_as_none:
                raise
            yield None


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# orjson turns integers beyond 64 bits into floats (losing digits); json keeps them exact. A line
# with a run of 19+ digits goes to json. Found by mapping digits to "0" and everything else to a
# space, then a substring search: 15x faster than the regex \d{19} (which restarts at every digit).
_DIGITS_ONLY = bytes.maketrans(bytes(range(256)), bytes(0x30 if 0x30 <= c <= 0x39 else 0x20 for c in range(256)))
_LONG_RUN = b"0" * 19


def has_long_number(data: bytes) -> bool:
    return _LONG_RUN in data.translate(_DIGITS_ONLY)


def fast_json_loads(text, may_have_long_numbers: bool = True):
    """json.loads, through orjson when it can: same value for every input json accepts.
    may_have_long_numbers=False: the caller has checked `has_long_number` (on a whole batch)."""
    # orjson parses 3x faster; anything it refuses goes to json, whose behaviour (NaN, big
    # integers, raw control characters) and error messages are the reference.
    if not (may_have_long_numbers and has_long_number(text if isinstance(text, bytes) else text.encode())):
        try:
            return orjson.loads(text)
        except ValueError:
            pass
    return json.loads(text, strict=False)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success replace `path` with it (on failure the
    temp directory goes, as any scratch_dir does)."""
    path = Path(path)
    with scratch_dir(path) as tmp:
        yield tmp
        _publish_mode(tmp, 0o777)
        for entry in tmp.rglob("*"):  # libraries write some files 0600 (safetensors' mkstemp)
            _publish_mode(entry, 0o777 if entry.is_dir() else 0o666)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)


def resolve_data_path(value: str, root: str | os.PathLike = ".", allowed_roots=()) -> Path:
    """Resolve a data path from params: it must lie inside the project or under one of
    `allowed_roots` (params data.allowed_roots), after symlinks are resolved.

    A params edit in a pull request (`../../etc/passwd`, `/proc/self/environ`, a symlink in the
    repository pointing at either) cannot make the pipeline read files from anywhere else; a
    user who keeps data outside the project names the directory in data.allowed_roots.
    """
    path = Path(value)
    root = Path(root).resolve()
    resolved = (path if path.is_absolute() else root / path).resolve()
    if not is_allowed_path(resolved, root, allowed_roots):
        raise ValueError(f"{value!r} points outside the project: it resolves to {resolved}, outside the project "
                         f"and data.allowed_roots ({list(allowed_roots)}); add its directory to "
                         "data.allowed_roots if you mean it")
    return resolved


def is_allowed_path(resolved: Path, root: Path, allowed_roots=()) -> bool:
    """`resolved` (symlinks already resolved) is the project root, or inside it or one of
    `allowed_roots` (absolute directories, resolved here)."""
    for base in (root, *(Path(r).resolve() for r in allowed_roots)):
        if resolved == base or base in resolved.parents:
            return True
    return False


class ProbeError(ValueError):
    """The probe set is missing or malformed."""


def read_probes(setting: str, *, missing_ok: bool = False) -> tuple[list[dict], str]:
    """The probe set of `evaluate.probes` (general.jsonl, and general_text.txt when present),
    checked: the folder is inside the project (as data.raw), every row has an id, a prompt and a
    non-empty list of accepted answers. Read by evaluation and by replay (which must not train on
    a probe's prompt; for it a missing probe set, `missing_ok`, is no probes: ([], ""))."""
    try:
        folder = resolve_data_path(setting)
    except ValueError as exc:
        raise ProbeError(f"evaluate.probes: {exc}") from None
    questions = Path(setting) / "general.jsonl"
    text = folder / "general_text.txt"
    if not (folder / "general.jsonl").is_file():
        if missing_ok:
            return [], ""
        raise ProbeError(f"{questions} not found (evaluate.probes names the probe folder)")
    probes, problems = [], []
    with open(folder / "general.jsonl", encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                problems.append(f"line {number}: not JSON ({exc})")
                continue
            accept = row.get("accept") if isinstance(row, dict) else None
            if not isinstance(row, dict) or not isinstance(row.get("id"), str) \
                    or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                problems.append(f"line {number}: needs a string id and a non-empty prompt")
            elif not (isinstance(accept, list) and accept and all(isinstance(a, str) and a.strip() for a in accept)):
                problems.append(f"line {number} ({row['id']}): needs \"accept\", a non-empty list of accepted answers")
            else:
                probes.append(row)
    if problems:
        raise ProbeError(f"{questions}: {len(problems)} bad probe row(s): " + "; ".join(problems[:5])
                        + (" ..." if len(problems) > 5 else "") + ' (each row: {"id", "prompt", "accept": [...]})')
    if not probes:
        raise ProbeError(f"{questions} has no probes")
    return probes, text.read_text(encoding="utf-8") if text.exists() else ""
