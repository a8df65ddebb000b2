"""Speed of the level identification (vertebral chain + anchors + numbering) per case.

Usage:  python benchmarks/bench_spine.py [--cases 3] [--repeats 3] [--seed 98000]

On full-size phantom cases (512², 0.6–0.9 mm, 1 mm slices, ~300 slices) and on the real CTs (the 3 mm abdominal
example, the 5 mm chest CT), times :func:`~LumbarBMDLib.spine.identify_spine` after the canal was found (target:
≤ 1 s per full case on the 2-core CPU) and prints its parts (chain, anchors, numbering), the median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from LumbarBMDLib.canal import find_canal
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.spine import identify_spine
from LumbarBMDLib.volume import read_ct

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def time_case(name: str, volume, repeats: int) -> float:
    canal = find_canal(volume)
    totals, parts = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        ident = identify_spine(volume, canal)
        totals.append(time.perf_counter() - t)
        parts.append(ident.timings_s)
    median = statistics.median(totals)
    part = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    nz, ny, nx = volume.shape
    print(f"{name:34s} {nx}x{ny}x{nz}: {median:.2f} s (chain {part['chain']:.2f}, anchors {part['anchors']:.2f}, "
          f"numbering {part['numbering']:.3f}); {ident.anchor or ident.refusal[:40]}", flush=True)
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=98000)
    args = parser.parse_args()
    full = []
    for c in range(args.cases):
        case = generate_case(args.seed + c, "ABC"[c % 3], "full")
        full.append(time_case(f"full phantom {case.case_id}", case.ct, args.repeats))
    if REAL.is_dir():
        time_case("real abdominal CT (3 mm)", read_ct(REAL / "totalseg-example" / "ct.nii.gz"), args.repeats)
        time_case("real chest CT (5 mm)", read_ct(REAL / "chest-ct-negative"), args.repeats)
    print(f"full phantoms: median {statistics.median(full):.2f} s, max {max(full):.2f} s per case (target ≤ 1 s)")


if __name__ == "__main__":
    main()
