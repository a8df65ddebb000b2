"""Benchmark of the canal-centre detection: speed on a 512 × 512 × 400 volume and accuracy on phantom cohorts.

Usage:
    python benchmarks/bench_canal.py speed [--repeats 5]
    python benchmarks/bench_canal.py accuracy [--seeds 11] [--size full]

``speed`` times ``find_canal`` on a full phantom extended to 400 slices (target ≤ 1.5 s on the 2-core
machine). ``accuracy`` runs every variant on every vendor (seed i gets variant i) and prints, per case and
overall, the share of found slices whose centre lies within 2 mm of the phantom's truth (target ≥ 99 %).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from LumbarBMDLib.canal import find_canal
from LumbarBMDLib.phantom import VARIANTS, generate_case
from LumbarBMDLib.volume import CTVolume


def speed(repeats: int) -> None:
    case = generate_case(1000, "A", "full")
    hu = case.ct.hu
    reps = int(np.ceil(400 / hu.shape[0]))
    hu = np.concatenate([hu] * reps, axis=0)[:400]  # a 400-slice volume (the spine repeated)
    vol = CTVolume(hu=np.ascontiguousarray(hu), spacing=case.ct.spacing, origin=case.ct.origin)
    find_canal(vol)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        find_canal(vol)
        times.append(time.perf_counter() - t)
    nz, ny, nx = vol.shape
    print(
        f"find_canal on {nx} x {ny} x {nz} int16: median {statistics.median(times):.2f} s, "
        f"min {min(times):.2f} s, max {max(times):.2f} s over {repeats} runs"
    )


def accuracy(n_seeds: int, size: str) -> None:
    errors, rows = [], []
    print(f"{'case':<22}{'found/truth':>12}{'median mm':>11}{'max mm':>8}{'<=2 mm':>8}{'drift mm':>10}{'s':>6}")
    for seed in range(n_seeds):
        variant = VARIANTS[seed % len(VARIANTS)]
        for vendor in "ABC":
            case = generate_case(seed, vendor, size, variant)
            t = time.perf_counter()
            result = find_canal(case.ct)
            dt = time.perf_counter() - t
            truth = dict(zip(case.truth["canal"]["slice_indices"], case.truth["canal"]["centres_lps"], strict=True))
            err = np.array(
                [
                    np.hypot(*(p[:2] - np.asarray(truth[k][:2])))
                    for k, p in zip(result.slice_indices, result.centres_lps, strict=True)
                    if k in truth
                ]
            )
            errors.append(err)
            rows.append((vendor, variant))
            print(
                f"{vendor} {variant:<20}{len(err):>5}/{len(truth):<6}{np.median(err):>11.2f}{err.max():>8.2f}"
                f"{np.mean(err <= 2.0):>8.3f}{result.drift_mm:>10.1f}{dt:>6.2f}"
            )
    allerr = np.concatenate(errors)
    print(
        f"\n{size} phantoms, {len(rows)} cases, {len(allerr)} found slices: {100 * np.mean(allerr <= 2.0):.2f} % "
        f"within 2 mm, median {np.median(allerr):.2f} mm, 99th percentile {np.percentile(allerr, 99):.2f} mm"
    )
    for vendor in "ABC":
        e = np.concatenate([x for x, (v, _) in zip(errors, rows, strict=True) if v == vendor])
        print(f"  vendor {vendor}: {100 * np.mean(e <= 2.0):.2f} % within 2 mm ({len(e)} slices)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("accuracy")
    p.add_argument("--seeds", type=int, default=len(VARIANTS))
    p.add_argument("--size", choices=["full", "small"], default="full")
    args = parser.parse_args()
    if args.mode == "speed":
        speed(args.repeats)
    else:
        accuracy(args.seeds, args.size)


if __name__ == "__main__":
    main()
