"""Throughput and memory of the data stages vs a plain datasketch MinHashLSH loop, in one run.

    python bench/data_throughput.py                       # 100k rows
    python bench/data_throughput.py --rows 100000 --scale-rows 1000000   # + memory at 1M rows

What it does:
1. writes N synthetic support-ticket rows (messages format) into a temporary DVC-less project,
   with injected exact duplicates and near-duplicates (re-cased, re-spaced, a few words changed);
2. runs `python -m stages.clean`, `stages.dedup`, `stages.split` there as subprocesses: wall time
   (imports included), CPU time and peak RSS per stage (os.wait4; both include the stage's worker
   processes, one per CPU: QLORA_DVC_WORKERS=1 in the environment measures a single process);
3. runs, on the same cleaned records and the same shingles, a plain datasketch loop: one MinHash
   per record, `update` per shingle, `MinHashLSH.query`, `insert` when nothing matched; and the
   same loop with `update_batch`, and with rensa (Rust MinHash), for reference;
4. runs the pipeline --repeats times (default 3: before the loops, between them, after them) and
   takes its median run, so that a machine whose speed drifts over the minutes the loops take
   moves both sides alike;
5. prints and writes reports/bench/data_throughput.json: records/s, the speedup of the whole
   clean+dedup+split over the loop's dedup alone, recall of the injected near-duplicates for
   each, and peak memory (at --scale-rows too, to show it stays bounded as the input grows).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "bench" / "data_throughput.json"

_PRODUCTS = ["router", "smart thermostat", "mobile app", "web dashboard", "subscription", "api", "camera", "doorbell"]
_ISSUES = ["keeps disconnecting", "shows error {code}", "charged me twice", "will not update", "froze on the {screen} screen",
           "lost all my settings", "is very slow since {date}", "sends duplicate notifications", "cannot find my invoice"]
_OPENERS = ["Hi support,", "Hello,", "Dear team,", "Good morning,", "Hey there,", "To whom it may concern,", ""]
_CLOSERS = ["Thanks.", "Please help asap.", "Regards, {name}", "This is the third time I write.", "Cheers", ""]
_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Femi", "Gita", "Hugo", "Ines", "Jon", "Kai", "Lena"]
_FILLER = ("i have tried restarting it twice and reinstalling the firmware but nothing changed my partner says the "
           "same thing happens on her phone we use it every day for work and the family depends on it so please "
           "look into this soon the previous agent told me it would be fixed in the next release but it was not "
           "also the manual does not mention this case at all and the community forum has no answer either").split()


def _ticket(rng: random.Random) -> tuple[str, str]:
    product = rng.choice(_PRODUCTS)
    issue = rng.choice(_ISSUES).format(code=f"0x{rng.randrange(16**4):04X}", screen=rng.choice(["home", "schedule", "login"]),
                                      date=f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")
    order = f"order {rng.choice('ABCDEFGH')}{rng.randrange(10**6):06d}"
    filler = rng.sample(_FILLER, rng.randint(15, 40))
    user = (f"{rng.choice(_OPENERS)} My {product} {issue} ({order}). " + " ".join(filler) + ". "
            + rng.choice(_CLOSERS).format(name=rng.choice(_NAMES))).strip()
    answer = json.dumps({"category": rng.choice(["bug", "billing", "shipping", "how_to"]),
                         "priority": rng.choice(["low", "medium", "high"]), "product": product,
                         "summary": f"{product} {issue.split('{')[0]} for {order}"})
    return user, answer


def _near_copy(text: str, rng: random.Random) -> str:
    """Re-case, re-space and change a few words: a near-duplicate (Jaccard of 3-shingles ~0.75-0.9)."""
    tokens = text.split(" ")
    for _ in range(rng.randint(1, 2)):
        tokens[rng.randrange(len(tokens))] = rng.choice(_FILLER)
    text = " ".join(tokens)
    if rng.random() < 0.5:
        text = text.lower()
    if rng.random() < 0.5:
        text = text.replace(" ", "  ", 3)
    return text


def generate(path: Path, rows: int, seed: int = 0, near_share: float = 0.1, exact_share: float = 0.02) -> set[int]:
    """Write `rows` JSONL rows; return the 1-based line numbers of the injected near-duplicates."""
    rng = random.Random(seed)
    system = "Triage the customer message. Reply with only a JSON object."
    # Copies are made of the last 5000 originals, kept in a ring so that this process stays small
    # (a child's peak RSS on Linux includes what it inherited from its parent before exec).
    recent: list[tuple[str, str]] = []
    made = 0
    near_lines: set[int] = set()
    with open(path, "w", encoding="utf-8") as out:
        for line in range(1, rows + 1):
            roll = rng.random()
            if recent and roll < near_share:
                user, answer = recent[rng.randrange(len(recent))]
                user = _near_copy(user, rng)
                near_lines.add(line)
            elif recent and roll < near_share + exact_share:
                user, answer = recent[rng.randrange(len(recent))]
            else:
                user, answer = _ticket(rng)
                if len(recent) < 5000:
                    recent.append((user, answer))
                else:
                    recent[made % 5000] = (user, answer)
                made += 1
            out.write(json.dumps({"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                                               {"role": "assistant", "content": answer}]}) + "\n")
    return near_lines


def _run(command: list[str], cwd: Path) -> dict:
    """Run a command; wall seconds and peak RSS (MB) of that child alone."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=errors)
        stdout = process.stdout.read()
        # Reap with wait4 (not communicate) to get this child's own rusage.
        _, status, usage = os.wait4(process.pid, 0)
        errors.seek(0)
        stderr = errors.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{stderr.decode()[-3000:]}")
    return {"seconds": round(seconds, 3), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "stdout": stdout.decode().strip()}


def _project(workdir: Path, rows: int, params: dict) -> set[int]:
    (workdir / "data" / "raw").mkdir(parents=True)
    near_lines = generate(workdir / "data" / "raw" / "bench.jsonl", rows)
    import yaml

    text = yaml.safe_load((ROOT / "params.yaml").read_text())
    text["data"]["raw"] = "data/raw/bench.jsonl"
    text["data"]["format"] = "messages"
    text["clean"]["max_rejected_fraction"] = 1.0
    text["split"]["max_leakage"] = 10**9   # measure throughput, not fail on the synthetic data
    text["dedup"].update(params)
    (workdir / "params.yaml").write_text(yaml.safe_dump(text))
    return near_lines


def _workers() -> int:
    sys.path.insert(0, str(ROOT))
    from stages.lib.parallel import default_workers

    return default_workers()


def run_pipeline(workdir: Path) -> dict:
    stages = {name: _run([sys.executable, "-m", f"stages.{name}"], workdir) for name in ("clean", "dedup", "split")}
    return stages


def pipeline_recall(workdir: Path, near_lines: set[int]) -> float:
    removed = set()
    with open(workdir / "data" / "dedup" / "removed.jsonl", encoding="utf-8") as handle:
        for line in handle:
            removed.add(json.loads(line)["source"]["line"])
    clean_lines = set()
    with open(workdir / "data" / "clean" / "records.jsonl", encoding="utf-8") as handle:
        for line in handle:
            clean_lines.add(json.loads(line)["source"]["line"])
    targets = near_lines & clean_lines
    return len(targets & removed) / max(1, len(targets))


# ---------------------------------------------------------------------------------------------
# The reference loops (run in a subprocess of this script: `--loop NAME DIR`).


def loop_main(kind: str, workdir: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from stages.lib.minhash import similarity_text
    from stages.lib.params import load_params
    from stages.lib.text import shingles, words

    os.chdir(workdir)
    params = load_params().dedup
    records = []
    with open("data/clean/records.jsonl", encoding="utf-8") as handle:
        for line in handle:
            records.append(json.loads(line))
    start = time.perf_counter()
    flagged: list[int] = []
    if kind.startswith("datasketch"):
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=params.threshold, num_perm=params.num_perm)
        for number, record in enumerate(records):
            grams = shingles(words(similarity_text(record)), params.shingle_size)
            signature = MinHash(num_perm=params.num_perm, seed=params.seed)
            if kind == "datasketch_plain":
                for gram in grams:
                    signature.update(gram.encode("utf-8"))
            else:
                signature.update_batch([gram.encode("utf-8") for gram in grams])
            if lsh.query(signature):
                flagged.append(record["source"]["line"])
            else:
                lsh.insert(number, signature)
    elif kind == "ours_dedup_engine":
        # The dedup stage's work on the same in-memory records: exact keys, batched signatures,
        # LSH keys, candidate verification, keep-first decision (no file I/O, like the loops).
        import numpy as np

        from stages.lib import minhash
        from stages.lib.records import conversation_text

        hasher = minhash.MinHasher(params.num_perm, params.shingle_size, params.seed)
        layout = minhash.optimal_bands(params.threshold, params.num_perm, *minhash.RECALL_WEIGHTS)
        exact, prints, keys = [], [], []
        for lo in range(0, len(records), 4096):
            batch = records[lo:lo + 4096]
            exact.append(minhash.text_keys([conversation_text(r) for r in batch]))
            signatures = hasher.signatures([similarity_text(r) for r in batch])
            prints.append(minhash.fingerprint(signatures))
            keys.append(minhash.band_keys(signatures, layout))
        dups = minhash.find_duplicates(np.concatenate(exact), np.concatenate(prints), np.concatenate(keys),
                                       params.threshold)
        flagged = [records[i]["source"]["line"] for i in np.nonzero(dups.kind != 0)[0].tolist()]
    elif kind == "rensa":
        from rensa import RMinHash, RMinHashLSH

        from stages.lib.minhash import optimal_bands

        # rensa needs bands that divide num_perm: the divisor nearest the equal-weight optimum.
        best = optimal_bands(params.threshold, params.num_perm).bands
        bands = min((b for b in range(1, params.num_perm + 1) if params.num_perm % b == 0), key=lambda b: abs(b - best))
        lsh = RMinHashLSH(threshold=params.threshold, num_perm=params.num_perm, num_bands=bands)
        for number, record in enumerate(records):
            signature = RMinHash(num_perm=params.num_perm, seed=params.seed)
            signature.update(shingles(words(similarity_text(record)), params.shingle_size))
            if lsh.query(signature):
                flagged.append(record["source"]["line"])
            else:
                lsh.insert(number, signature)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "records": len(records), "flagged_lines": flagged}))


def run_loop(kind: str, workdir: Path, near_lines: set[int]) -> dict:
    result = _run([sys.executable, str(Path(__file__).resolve()), "--loop", kind, str(workdir)], workdir)
    body = json.loads(result["stdout"].splitlines()[-1])
    clean_lines = set()
    with open(workdir / "data" / "clean" / "records.jsonl", encoding="utf-8") as handle:
        for line in handle:
            clean_lines.add(json.loads(line)["source"]["line"])
    targets = near_lines & clean_lines
    return {
        "seconds_dedup_loop": round(body["seconds"], 3),   # the loop alone: no file reading, no imports
        "seconds_with_startup": result["seconds"],
        "records_per_s": round(body["records"] / body["seconds"], 1),
        "recall_injected_near_duplicates": round(len(targets & set(body["flagged_lines"])) / max(1, len(targets)), 4),
        "peak_rss_mb": result["peak_rss_mb"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--scale-rows", type=int, default=0, help="also run the pipeline alone at this size (memory)")
    parser.add_argument("--loops", default="ours_dedup_engine,datasketch_plain,datasketch_batch,rensa")
    parser.add_argument("--repeats", type=int, default=3, help="pipeline runs, spread between the loops")
    parser.add_argument("--out", type=Path, default=REPORT)
    parser.add_argument("--loop", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        loop_main(args.loop[0], Path(args.loop[1]))
        return 0

    result = {
        "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "pipeline_workers": _workers(),
        "rows": args.rows,
    }
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        workdir = Path(tmp) / "main"
        near_lines = _project(workdir, args.rows, {})
        kinds = [k for k in args.loops.split(",") if k]
        # The pipeline runs `repeats` times, spread between the loops (before the first, after the
        # last), and its median run is compared with each loop: a machine whose speed drifts
        # during the minutes the loops take then moves both sides alike.
        runs = []

        def pipeline_run():
            stages = run_pipeline(workdir)
            runs.append(stages)
            print(f"pipeline run {len(runs)} (clean+dedup+split, {args.rows} rows, {result['pipeline_workers']} "
                  f"worker processes): {sum(s['seconds'] for s in stages.values()):.2f} s wall, "
                  f"{sum(s['cpu_seconds'] for s in stages.values()):.2f} s CPU "
                  + str({k: v['seconds'] for k, v in stages.items()}), flush=True)

        pipeline_run()
        result["loops"] = {}
        between = {kinds[round(i * len(kinds) / max(1, args.repeats - 1)) - 1]
                   for i in range(1, args.repeats - 1)} if kinds else set()
        for kind in kinds:
            result["loops"][kind] = run_loop(kind, workdir, near_lines)
            if kind in between:
                pipeline_run()
        while len(runs) < args.repeats:
            pipeline_run()
        totals = [sum(s["seconds"] for s in stages.values()) for stages in runs]
        median = sorted(range(len(runs)), key=totals.__getitem__)[len(runs) // 2]
        stages = runs[median]
        total = totals[median]
        clean = json.loads((workdir / "reports" / "clean.json").read_text())
        pipeline = {
            "runs_seconds": [round(t, 3) for t in totals],
            "stages": {k: {"seconds": v["seconds"], "cpu_seconds": v["cpu_seconds"], "peak_rss_mb": v["peak_rss_mb"]}
                       for k, v in stages.items()},
            "seconds_total": round(total, 3),
            "records_per_s": round(clean["rows_in"] / total, 1),
            "recall_injected_near_duplicates": round(pipeline_recall(workdir, near_lines), 4),
            "cpu_seconds_total": round(sum(s["cpu_seconds"] for s in stages.values()), 3),
            "peak_rss_mb": max(s["peak_rss_mb"] for s in stages.values()),
            "dedup_report": {k: v for k, v in json.loads((workdir / "reports" / "dedup.json").read_text()).items()
                             if k in ("rows_in", "kept", "removed_exact", "removed_near")},
        }
        result["pipeline_clean_dedup_split"] = pipeline
        print(f"pipeline, median of {len(runs)} runs: {pipeline['records_per_s']:.0f} records/s "
              f"({pipeline['seconds_total']} s wall, {pipeline['cpu_seconds_total']} s CPU), recall "
              f"{pipeline['recall_injected_near_duplicates']:.3f}, peak RSS {pipeline['peak_rss_mb']} MB", flush=True)
        for kind, loop in result["loops"].items():
            loop["pipeline_speedup"] = round(pipeline["records_per_s"] / loop["records_per_s"], 2)
            print(f"{kind} (dedup only, in memory): {loop['records_per_s']:.0f} records/s, recall "
                  f"{loop['recall_injected_near_duplicates']:.3f}, peak RSS {loop['peak_rss_mb']} MB; whole "
                  f"pipeline is {loop['pipeline_speedup']}x its records/s", flush=True)
        loops = result["loops"]
        if "ours_dedup_engine" in loops and "datasketch_plain" in loops:
            result["dedup_engine_speedup_vs_datasketch_plain"] = round(
                loops["ours_dedup_engine"]["records_per_s"] / loops["datasketch_plain"]["records_per_s"], 2)
            print(f"dedup engine vs plain datasketch loop, same records in memory: "
                  f"{result['dedup_engine_speedup_vs_datasketch_plain']}x", flush=True)
        shutil.rmtree(workdir)
        if args.scale_rows:
            workdir = Path(tmp) / "scale"
            _project(workdir, args.scale_rows, {})
            scaled = run_pipeline(workdir)
            seconds = sum(s["seconds"] for s in scaled.values())
            result["scale"] = {
                "rows": args.scale_rows,
                "stages": {k: {"seconds": v["seconds"], "cpu_seconds": v["cpu_seconds"], "peak_rss_mb": v["peak_rss_mb"]}
                           for k, v in scaled.items()},
                "records_per_s": round(args.scale_rows / seconds, 1),
                "peak_rss_mb": max(s["peak_rss_mb"] for s in scaled.values()),
                "input_mb": round((workdir / "data" / "raw" / "bench.jsonl").stat().st_size / 2**20, 1),
            }
            print(f"scale ({args.scale_rows} rows, {result['scale']['input_mb']} MB input): "
                  f"{result['scale']['records_per_s']:.0f} records/s, peak RSS {result['scale']['peak_rss_mb']} MB "
                  + str({k: (v['seconds'], v['peak_rss_mb']) for k, v in scaled.items()}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
