"""End-to-end speed and memory of `lumbarbmd run` on full-size phantom CTs (this machine, CPU or GPU).

Usage:  python benchmarks/bench_run.py [--cases 4] [--seed 97000] [--device cpu|auto] [--work DIR]

1. Writes ``--cases`` full phantom cases (512² × ~300 slices, vendor A) as NIfTI.
2. Per case, in a fresh process (`python -m LumbarBMDLib run CASE`), measures the wall time of the process, the
   pipeline's own total (results.json ``timings_s``) and the peak RSS; and, in this process, the time to only
   read the same file (`read_ct`) for the ratio.
3. One batch of all cases in one process (models loaded once): throughput in cases per minute.
4. Where the time goes: the median of each stage's seconds from the results.json files.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.volume import read_ct, write_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=97000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default="bench-run")
    args = parser.parse_args()
    work = Path(args.work)
    paths = []
    for seed in range(args.seed, args.seed + args.cases):
        path = work / "inputs" / f"A_{seed:06d}.nii.gz"
        if not path.is_file():
            case = generate_case(seed, "A", "full")
            write_volume(case.ct, path)
        paths.append(path)
    rows = []
    for path in paths:
        t0 = time.perf_counter()
        read_ct(path)
        read_s = time.perf_counter() - t0
        out = work / "single" / path.name.removesuffix(".nii.gz")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "LumbarBMDLib", "run", str(path), "--out", str(out.parent), "--force",
                        "--quiet", "--device", args.device], check=True, capture_output=True)
        wall = time.perf_counter() - t0
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # max over the children so far
        res = json.loads((out / "results.json").read_text(encoding="utf-8"))
        rows.append({"case": path.name, "read_s": read_s, "process_s": wall, "pipeline_s": res["timings_s"]["total"],
                     "peak_rss_gb": peak_gb, "status": res["status"], **res["timings_s"]})
        print(f"{path.name}: pipeline {res['timings_s']['total']:.2f} s (process {wall:.2f} s incl. start-up and "
              f"model loading), read only {read_s:.2f} s -> ratio {res['timings_s']['total'] / read_s:.1f}, "
              f"peak RSS so far {peak_gb:.2f} GB, status {res['status']}")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "LumbarBMDLib", "run", *map(str, paths), "--out", str(work / "batch"),
                    "--force", "--quiet", "--device", args.device], check=True, capture_output=True)
    batch = time.perf_counter() - t0
    print(f"median per case: pipeline {np.median([r['pipeline_s'] for r in rows]):.2f} s, "
          f"read {np.median([r['read_s'] for r in rows]):.2f} s; peak RSS {max(r['peak_rss_gb'] for r in rows):.2f} GB")
    print(f"batch of {len(paths)} in one process: {batch:.1f} s = {60 * len(paths) / batch:.1f} cases per minute")
    stages = ("load", "canal", "segment", "patches", "regress", "total")
    print("where the time goes (median s): " + ", ".join(f"{k} {np.median([r[k] for r in rows]):.2f}"
                                                         for k in stages))


if __name__ == "__main__":
    main()
