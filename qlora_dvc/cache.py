"""The shared DVC cache for CI (and for a team): set up the remote and check that it answers.

    qlora-dvc cache check [--url URL]   # configure (when given a URL) and check the default remote
    qlora-dvc cache push                # dvc push --run-cache, and the uncached outputs it leaves out

`check` never fails the build for a missing or unreachable remote: it says so in one clear line
(a GitHub `::warning::` in Actions) and answers "enabled=false", and the pipeline then runs every
stage itself, so a broken remote costs time, never a wrong result. With "enabled=true", CI runs
`dvc repro --pull`: a stage whose dependencies, params and command match a run in the remote's
run-cache is restored from there instead of running (README, "Shared DVC cache").

The URL is any DVC remote: s3://bucket/path, gs://bucket/path, ssh://user@host/path, a local or
mounted directory. Credentials come from the environment the way DVC reads them (AWS_*,
GOOGLE_APPLICATION_CREDENTIALS, an SSH key in the agent); none are written to a file that git tracks:
the remote goes into .dvc/config.local ($DVC_SSH_KEYFILE names an SSH remote's key file).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REMOTE_NAME = "shared"
URL_ENV = "DVC_REMOTE_URL"
KEYFILE_ENV = "DVC_SSH_KEYFILE"  # an SSH remote's private key file (CI writes it from a secret)


def _say(level: str, message: str) -> None:
    """One line on stderr; in GitHub Actions also an annotation the PR page shows."""
    prefix = f"::{level}::" if os.environ.get("GITHUB_ACTIONS") == "true" and level in ("warning", "notice") else ""
    print(f"{prefix}cache: {message}", file=sys.stderr)


def _output(key: str, value: str) -> None:
    """key=value on stdout and, in GitHub Actions, into the step's outputs."""
    print(f"{key}={value}")
    path = os.environ.get("GITHUB_OUTPUT")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{key}={value}\n")


def _dvc(args: list[str]) -> subprocess.CompletedProcess:
    from qlora_dvc.pr_report import dvc_executable

    return subprocess.run([dvc_executable(), *args], capture_output=True, text=True, check=False)


def _redact(url: str) -> str:
    # ssh://user:password@host/... or https://token@host/...: never print a secret.
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def configure(url: str) -> None:
    commands = [["remote", "add", "--local", "--force", "--default", REMOTE_NAME, url]]
    keyfile = os.environ.get(KEYFILE_ENV)
    if keyfile and url.startswith("ssh://"):
        commands.append(["remote", "modify", "--local", REMOTE_NAME, "keyfile", keyfile])
    for args in commands:
        done = _dvc(args)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"could not configure the DVC remote {_redact(url)}: {lines[-1] if lines else ''}")


def default_remote() -> str | None:
    done = _dvc(["remote", "default"])
    name = done.stdout.strip()
    return name if done.returncode == 0 and name else None


def reachable() -> tuple[bool, str]:
    """Whether the default remote's storage answers, and where it is.

    A local remote must be an existing directory (a typo would otherwise create an empty cache
    nobody shares); an object store or SSH host must answer for its bucket or path."""
    from dvc.repo import Repo

    try:
        with Repo() as repo:
            remote = repo.cloud.get_remote(None, "check")
            fs, path = remote.fs, remote.path
            local = fs.protocol in ("local", "file") or "local" in getattr(fs, "protocol", ())
            where = path if local else f"{fs.protocol}://{path}"
            if local:
                return (True, where) if fs.isdir(path) else (False, f"{where} is not an existing directory")
            bucket = path.split("/", 1)[0]
            if fs.exists(path) or fs.exists(bucket):
                return True, where
            return False, f"{where} does not exist"
    except Exception as exc:  # credentials, network, DNS, permissions, missing plugin: all "not usable now"
        return False, " ".join(str(exc).split()) or type(exc).__name__


def check(url: str | None) -> bool:
    url = url or os.environ.get(URL_ENV) or None
    if url:
        configure(url)
    name = default_remote()
    if name is None:
        _say("notice", f"no DVC remote configured (set {URL_ENV}, see the README's 'Shared DVC cache'); "
                       "every stage will run here, nothing is reused")
        return False
    ok, where = reachable()
    if not ok:
        _say("warning", f"the DVC remote {name!r} cannot be used ({where}); falling back to running every "
                        "stage here, nothing is reused")
        return False
    _say("notice", f"using the DVC remote {name!r} at {_redact(where)}: stages that ran before are restored")
    return True


def uncached_output_objects(repo) -> set:
    """The cache objects of every output recorded in dvc.lock and in the local run-cache entries
    (a stage that ran several times has several), with the files of directory outputs, that the
    local cache holds. The run-cache commits a stage's `cache: false` outputs there when it runs,
    and a run-cache restore may pick any entry of the stage."""
    import yaml
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    odb = repo.cache.local
    infos = [out.hash_info for stage in repo.index.stages for out in stage.outs if not out.use_cache]
    runs = Path(repo.cache.legacy.path) / "runs" if repo.cache.legacy else None
    if runs is not None and runs.is_dir():
        for entry in runs.glob("*/*/*"):
            try:
                recorded = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError):
                continue
            infos += [HashInfo("md5", out["md5"]) for out in recorded.get("outs", []) if out.get("md5")]
    objects = set()
    for info in infos:
        if not info or not info.value or not odb.exists(info.value):
            continue
        objects.add(info)
        if info.isdir:
            objects |= {oid for _, _, oid in Tree.load(odb, info)}
    return objects


def push_uncached_outputs() -> tuple[int, int]:
    """Push the uncached outputs' objects to the default remote; return (transferred, failed).

    `dvc push --run-cache` pushes the run-cache entries and the cached outputs, not the outputs
    with `cache: false` that the entries also record; a fresh clone's `dvc repro --pull` then finds
    those missing and re-runs the stage (every stage here writes its metrics uncached, so all of
    them would re-run: treeverse/dvc#5749). Pushed too, each stage is restored instead."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        objects = uncached_output_objects(repo)
        if not objects:
            return 0, 0
        result = repo.cloud.push(objects)
        return len(result.transferred), len(result.failed)


def push() -> int:
    if default_remote() is None:
        _say("notice", "no DVC remote configured: nothing pushed")
        return 0
    done = _dvc(["push", "--run-cache"])
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        errors = [line for line in lines if line.startswith("ERROR")] or lines[:1]
        _say("warning", f"dvc push --run-cache failed: {errors[0] if errors else done.returncode}")
        return 1
    lines = (done.stdout or "").strip().splitlines()
    try:
        transferred, failed = push_uncached_outputs()
    except Exception as exc:  # noqa: BLE001 - DVC's errors are many; the message says what failed
        _say("warning", f"pushing the uncached outputs (metrics, plots) failed: {exc}; a fresh clone's "
                        "dvc repro --pull will re-run the stages that wrote them")
        return 1
    if failed:
        _say("warning", f"{failed} uncached output object(s) could not be pushed; the stages that wrote "
                        "them will re-run in a fresh clone")
        return 1
    print((lines[-1] if lines else "pushed") + f"; {transferred} uncached output object(s) pushed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-dvc cache", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    check_parser = sub.add_parser("check", help="configure (with --url or $DVC_REMOTE_URL) and check the remote")
    check_parser.add_argument("--url", help=f"DVC remote URL (default: ${URL_ENV}, else the configured default)")
    sub.add_parser("push", help="dvc push --run-cache to the default remote")
    args = parser.parse_args(argv)
    if not Path(".dvc").is_dir():
        print("cache: not a DVC project (no .dvc directory here); run it from the project root", file=sys.stderr)
        return 1
    if args.action == "push":
        return push()
    _output("enabled", "true" if check(args.url) else "false")
    return 0
