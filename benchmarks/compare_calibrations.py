"""Internal versus phantom-scan calibration on the same cases: how far apart the BMD they give is (issue 15).

Usage:  python benchmarks/compare_calibrations.py DIR [--a internal] [--b phantom]

DIR is the output of ``benchmarks/eval_bmd.py`` (``DIR/<scanner>_<mode>/<case>/results.json``). For every scanner
with both modes, each measured level's BMD under mode A is compared with the same level's under mode B (the same
segmentation, only the HU map differs): the mean and SD of (A − B) / B in %, its 95 % range, and the share of levels
within ± 2 %. Target (issue 15): internal and phantom calibration within 2 % of BMD.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def level_bmd(folder: Path) -> dict[tuple[str, str], float]:
    """``(case, level) → BMD`` of every measured level under ``folder``."""
    out = {}
    for f in sorted(folder.glob("*/results.json")):
        res = json.loads(f.read_text(encoding="utf-8"))
        for v in res.get("vertebrae", []):
            if v.get("found") and v.get("bmd_mg_cm3") is not None:
                out[(f.parent.name, v["level"])] = float(v["bmd_mg_cm3"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--a", default="internal")
    ap.add_argument("--b", default="phantom")
    args = ap.parse_args()
    scanners = sorted({p.name[: -len(args.b) - 1] for p in args.dir.glob(f"*_{args.b}") if p.is_dir()})
    for name in scanners:
        a, b = level_bmd(args.dir / f"{name}_{args.a}"), level_bmd(args.dir / f"{name}_{args.b}")
        keys = sorted(set(a) & set(b))
        if not keys:
            continue
        d = np.array([100.0 * (a[k] - b[k]) / b[k] for k in keys])
        lo, hi = np.percentile(d, [2.5, 97.5])
        print(f"{name:>20}: {len(keys)} levels, {args.a} vs {args.b}: {np.mean(d):+.2f} % (SD {np.std(d):.2f} %, "
              f"95 % range {lo:+.2f}..{hi:+.2f} %), within ±2 %: {100 * np.mean(np.abs(d) <= 2.0):.0f} %")


if __name__ == "__main__":
    main()
