"""Benchmark: time and peak memory to generate and write one `full` phantom case.

Usage:  python benchmarks/bench_phantom.py [--cases 5] [--size full] [--vendor A] [--out DIR]

Prints per case the seconds of each step (anatomy, render, acquire, annotation, write) and the total,
then the median and maximum total and the peak resident memory of the process. The issue's target is
≤ 10 s per `full` case on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time

from LumbarBMDLib.phantom import generate_case, write_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--size", default="full", choices=["full", "small"])
    parser.add_argument("--vendor", default="A", choices=["A", "B", "C"])
    parser.add_argument("--variant", default="none")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", default=None, help="output folder (default: a temporary folder)")
    args = parser.parse_args()

    generate_case(0, args.vendor, "small")  # warm-up: imports, thread pools
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        print(f"{'case':<10}{'shape (z,y,x)':<18}{'render':>8}{'acquire':>9}{'annot.':>8}{'write':>8}{'total s':>9}")
        for seed in range(args.seed, args.seed + args.cases):
            t0 = time.perf_counter()
            case = generate_case(seed, args.vendor, args.size, args.variant)
            t1 = time.perf_counter()
            write_case(case, out)
            t2 = time.perf_counter()
            tm = case.timings_s
            totals.append(t2 - t0)
            print(
                f"{case.case_id:<10}{case.ct.shape!s:<18}{tm['render']:>8.2f}{tm['acquire']:>9.2f}"
                f"{tm['annotation']:>8.2f}{t2 - t1:>8.2f}{t2 - t0:>9.2f}"
            )
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        f"\n{args.size} case ({args.vendor}, {args.variant}): median {statistics.median(totals):.2f} s, "
        f"max {max(totals):.2f} s over {len(totals)} cases; peak RSS {peak_gb:.2f} GB"
    )


if __name__ == "__main__":
    main()
