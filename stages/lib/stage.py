"""The one wrapper every stage script runs under, so that failures look the same everywhere.

    if __name__ == "__main__":
        sys.exit(run_stage("clean", main))

- `main` returns an exit status (0, or 1 after printing its own message) or raises.
- An exception becomes one line on stderr, "<stage>: <message>", and exit status 1: a user
  running `dvc repro` sees what went wrong, not a page of traceback. The full traceback is
  printed with `--debug` on the command line or QLORA_DVC_DEBUG=1 in the environment.
- Ctrl-C becomes "<stage>: interrupted" and exit status 130 (the shell's convention for SIGINT);
  SIGTERM becomes "<stage>: terminated" and exit status 143. Both are raised as exceptions in the
  stage, so that temporary files are removed and worker processes stopped on the way out
  (stages/lib/io.py, stages/lib/parallel.py).
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from typing import Callable

DEBUG_FLAG = "--debug"
DEBUG_ENV = "QLORA_DVC_DEBUG"


class StageError(RuntimeError):
    """A failure the stage explains itself: its message is all the user needs."""


class Terminated(BaseException):
    """SIGTERM, raised where the stage is, so that every `finally` and context manager runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


def debug_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        # From any library (dvclive, safetensors, the Trainer's checkpoints): say what to do.
        where = f" writing {exc.filename}" if exc.filename else ""
        return (f"no space left on device{where}: free some space and run it again (train resumes from "
                "its last complete checkpoint)")
    message = str(exc).strip()
    if not message:
        return type(exc).__name__
    if isinstance(exc, (StageError, OSError, ValueError)) or type(exc).__module__.startswith("stages."):
        return message
    # An unexpected exception type: its name says more than a bare message ("KeyError: 'x'").
    return f"{type(exc).__name__}: {message}"


def peak_rss_mib() -> float:
    """The peak resident memory of this process so far, in MiB (what the heavy stages report)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)  # bytes on macOS, KiB on Linux


def fix_allocator_thresholds() -> bool:
    """Fix glibc's mmap threshold at 4 MiB and its trim threshold at 32 MiB.

    By default glibc raises its mmap threshold up to 32 MiB as large blocks are freed, after which
    tensors of many MiB come from the heap, where freed ones fragment and stay resident. Fixed at
    4 MiB, the activations of a CPU step (up to a few MiB each) are still reused from the heap
    (fast), and the larger blocks (logits, weights) are mapped and returned when freed. Measured
    over 240 default training steps: 2,221 MiB peak RSS and 185 s instead of 2,386 MiB and 208 s
    with glibc's defaults; a 128 KiB threshold, which made every activation a fresh zero-filled
    mapping, halved the speed (bench/NOTES.md, CPU section). A no-op where glibc is not the
    allocator."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 4 << 20)) and bool(mallopt(m_trim_threshold, 32 << 20))


# oneDNN keeps every matrix-product primitive it builds (1,024 by default), each with its own
# buffers, keyed by shape. Packed training rows have a different length almost every step, so the
# cache only grows: measured over 240 default training steps it added about 1.5 MiB of resident
# memory a step. 32 covers the dozen shapes one row uses across the layers (so products within a
# step still hit the cache): peak 2,037 MiB instead of 2,244 MiB, tokens/s unchanged within noise
# (bench/NOTES.md, CPU section).
ONEDNN_PRIMITIVE_CACHE = "32"


def bound_onednn_cache() -> None:
    """Bound oneDNN's primitive cache (ONEDNN_PRIMITIVE_CACHE) unless the user set it. oneDNN reads
    the variable when it first builds a primitive, so this runs before any tensor work."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_PRIMITIVE_CACHE)


def _close_progress_bars() -> None:
    """Close the progress bars an exception left open (the Trainer's, generation's), so the
    one-line message starts on a line of its own instead of after a half-drawn bar."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return
    for bar in list(getattr(std.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the real error
            pass


def run_stage(name: str, main: Callable[..., int | None], argv: list[str] | None = None) -> int:
    """Run `main(argv)` (or `main()` when argv is None) and turn its outcome into an exit status.

    `--debug` is taken out of argv before `main` sees it."""
    fix_allocator_thresholds()
    bound_onednn_cache()
    debug = debug_requested(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if argv is None:
            if DEBUG_FLAG in sys.argv[1:]:
                sys.argv = [a for a in sys.argv if a != DEBUG_FLAG]
            status = main()
        else:
            status = main([a for a in argv if a != DEBUG_FLAG])
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{name}: terminated", file=sys.stderr)
        return 143
    except SystemExit:
        raise  # argparse's --help and usage errors keep their own status
    except Exception as exc:  # noqa: BLE001 - the point of the wrapper
        _close_progress_bars()
        if debug:
            traceback.print_exc()
        print(f"{name}: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if status is None else int(status)
