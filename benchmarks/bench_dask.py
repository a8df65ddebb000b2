"""A batch of full-size phantom CTs in one process versus on a local Dask cluster (``lumbarbmd run --scheduler``).

Usage:  python benchmarks/bench_dask.py [--cases 6] [--workers 2] [--threads-per-worker 1] [--rounds 1]
                                        [--work DIR] [--device cpu]

1. Writes ``--cases`` full phantom cases (``lumbarbmd phantom WORK/inputs --cases N --size full``) unless there.
2. Runs the whole batch as a command (``lumbarbmd run ... --force``) in-process and with
   ``--scheduler local:W --threads-per-worker T``, alternating the two ``--rounds`` times (in, dask, dask, in, …:
   the machine is shared, so both modes see the same load on average).
3. Prints per run: wall time of the command and cases per minute (start-up included); when the first case was
   done and the steady rate between the first and the last case; worker utilisation (the cases' own pipeline
   seconds / (workers × the seconds from the first case started to the last done)); per-stage medians from
   results.json ``timings_s`` (under concurrency a stage takes longer per case: the profile shows where).
   Then the ratio of the two modes' cases per minute (target ≥ 1.3× on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STAGES = ("load", "canal", "spine", "sagittal", "segment", "patches", "regress", "scanner", "total")


def lumbarbmd() -> list[str]:
    return [sys.executable, "-m", "LumbarBMDLib"]


def make_inputs(work: Path, cases: int) -> list[Path]:
    folder = work / "inputs"
    paths = sorted(folder.glob("*/ct.nii.gz"))
    if len(paths) < cases:
        subprocess.run([*lumbarbmd(), "phantom", str(folder), "--cases", str(cases), "--size", "full", "--quiet"],
                       check=True)
        paths = sorted(folder.glob("*/ct.nii.gz"))
    return paths[:cases]


def watch(out: Path, stop: threading.Event, seen: dict[str, float], t0: float) -> None:
    """When each case's results.json appeared (seconds after ``t0``)."""
    while not stop.is_set():
        if out.is_dir():
            for f in out.glob("*/results.json"):
                if not f.parent.name.startswith("."):  # a case folder, not a temporary one being filled
                    seen.setdefault(f.parent.name, time.perf_counter() - t0)
        time.sleep(0.1)


def run_once(mode: str, paths: list[Path], out: Path, args) -> dict:
    cmd = [*lumbarbmd(), "run", *map(str, paths), "--out", str(out), "--force", "--quiet", "--device", args.device]
    if mode == "dask":
        cmd += ["--scheduler", f"local:{args.workers}", "--threads-per-worker", str(args.threads_per_worker)]
    shutil.rmtree(out, ignore_errors=True)  # the watcher must not see an earlier run's results.json
    seen: dict[str, float] = {}
    stop = threading.Event()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    thread = threading.Thread(target=watch, args=(out, stop, seen, t0), daemon=True)
    thread.start()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its workers (reaped when it closed them)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stop.set()
    thread.join()
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    timings = {p.parent.name: json.loads((out / p.parent.name / "results.json").read_text(encoding="utf-8"))[
        "timings_s"] for p in paths}
    done = sorted(seen.values())
    workers = args.workers if mode == "dask" else 1
    first = min(seen, key=seen.get)
    start = max(0.0, seen[first] - timings[first]["total"])  # when the first case to finish began its read
    busy = sum(t["total"] for t in timings.values())
    return {"mode": mode, "wall": wall, "per_min": 60 * len(paths) / wall, "first_done": seen[first],
            "steady_per_min": 60 * (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 else None,
            "utilisation": busy / (workers * max(done[-1] - start, 1e-9)), "startup": start,
            "cpu": cpu, "cores_busy": cpu / wall,
            "stages": {k: statistics.median(t.get(k, 0.0) for t in timings.values()) for k in STAGES}}


def show(r: dict, n: int) -> None:
    steady = f"{r['steady_per_min']:.2f}" if r["steady_per_min"] else "-"
    print(f"{r['mode']:>10}: {r['wall']:6.1f} s for {n} cases = {r['per_min']:.2f} cases/min (start-up included); "
          f"first case done at {r['first_done']:.1f} s (start-up ≈ {r['startup']:.1f} s), then {steady} cases/min; "
          f"worker utilisation {100 * r['utilisation']:.0f} %; CPU {r['cpu']:.0f} s = {r['cores_busy']:.2f} of "
          f"{os.cpu_count()} cores busy on average")
    print(" " * 12 + "median s per case: " + ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="pairs of runs, alternating the order")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lumbarbmd-bench-dask"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="in-process,dask", help="which of the two to run (default both)")
    args = ap.parse_args()
    modes = args.modes.split(",")
    work = Path(args.work)
    paths = make_inputs(work, args.cases)
    print(f"{len(paths)} full phantom cases in {work / 'inputs'}; {os.cpu_count()} cores; load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    runs: dict[str, list[dict]] = {"in-process": [], "dask": []}
    for i in range(args.rounds):
        order = ("in-process", "dask") if i % 2 == 0 else ("dask", "in-process")
        for mode in (m for m in order if m in modes):
            r = run_once("dask" if mode == "dask" else "in", paths, work / f"out-{mode}", args)
            r["mode"] = mode
            runs[mode].append(r)
            show(r, len(paths))
    print(f"load average {os.getloadavg()[0]:.1f} at the end (other users of the machine make every figure noisy)")
    if not all(runs.values()):
        return
    inproc = statistics.median(r["per_min"] for r in runs["in-process"])
    dask = statistics.median(r["per_min"] for r in runs["dask"])
    print(f"cases per minute (median of {args.rounds}): in-process {inproc:.2f}, Dask local:{args.workers} "
          f"(threads per worker {args.threads_per_worker}) {dask:.2f}: ratio {dask / inproc:.2f}x (target >= 1.3x)")


if __name__ == "__main__":
    main()
