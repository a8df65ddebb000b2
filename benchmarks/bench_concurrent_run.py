"""Two concurrent ``lumbarbmd run`` processes on overlapping inputs into one output folder (issue 13).

Usage:  python benchmarks/bench_concurrent_run.py [--cases 300] [--good 4] [--out DIR]

Makes ``--cases`` inputs: ``--good`` small phantom CTs (measured end to end) and small water blocks (valid CTs that
fail fast: "no spinal canal found"), each distinct. Process 1 runs the first two thirds, process 2 the last two
thirds (in reverse order, so they meet in the middle third), both into one folder at the same time. Then checks
and prints: exit codes and tracebacks, one complete case folder per input (its results.json names that input and
its sha256), no temporary folder left, summary.csv listing every case once.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.volume import CTVolume, write_volume


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--good", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="lumbarbmd-concurrent-"))
    inputs = []
    for i in range(args.cases):
        path = root / "in" / f"case{i:03d}.nii.gz"
        if i < args.good:
            write_volume(generate_case(40_000 + i, "A", "small").ct, path)
        else:
            block = np.full((24, 64, 64), -1000, np.int16)
            block[:, 8:56, 8:56] = i % 200
            write_volume(CTVolume(hu=block, spacing=(2.0, 2.0, 2.5), origin=(0.0, 0.0, float(i))), path)
        inputs.append(path)
    third = args.cases // 3
    first, second = inputs[: 2 * third], list(reversed(inputs[third:]))
    out = root / "out"
    cmd = [sys.executable, "-m", "LumbarBMDLib", "run", "--out", str(out), "--device", "cpu", "--quiet"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*cmd, *map(str, part)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for part in (first, second)]
    outputs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    tracebacks = sum("Traceback" in err for _, err in outputs)
    folders = {p.name: p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")}
    lost, wrong, half = [], [], []
    for path in inputs:
        folder = folders.get(path.name.removesuffix(".nii.gz"))
        if folder is None:
            lost.append(path.name)
            continue
        try:
            res = json.loads((folder / "results.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            half.append(folder.name)
            continue
        if res.get("input") != str(path) or len(res.get("input_sha256") or "") != 64:
            wrong.append(folder.name)
        if res["status"] != "failed" and not (folder / "report.html").is_file():
            half.append(folder.name)
    temporaries = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lumbarbmd-locks"]
    rows = list(csv.DictReader((out / "summary.csv").open(encoding="utf-8")))
    statuses = [json.loads((f / "results.json").read_text())["status"] for f in folders.values()]
    print(f"{args.cases} inputs ({args.good} phantoms measured, {args.cases - args.good} fast failures), "
          f"{len(first)} + {len(second)} given to two concurrent processes ({third} overlapping); {wall:.1f} s")
    print(f"exit codes {[p.returncode for p in procs]} (1 = some case failed, as expected), tracebacks {tracebacks}")
    print(f"case folders {len(folders)}; lost {len(lost)}, half-written {len(half)}, another input's {len(wrong)}, "
          f"temporary folders left {len(temporaries)}; summary rows {len(rows)} "
          f"(unique {len({r['case'] for r in rows})})")
    counts = {s: statuses.count(s) for s in ("ok", "partial", "failed")}
    print(f"statuses: ok {counts['ok']}, partial {counts['partial']}, failed {counts['failed']}")
    ok = not (lost or half or wrong or temporaries or tracebacks) and len(rows) == args.cases == len(folders)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
