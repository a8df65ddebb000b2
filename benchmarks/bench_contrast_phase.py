"""Benchmark: does the contrast-phase detector read the phantom's contrast phases (issue 15)?

Usage:  python benchmarks/bench_contrast_phase.py [--cases 20] [--seed 97000] [--vendor A] [--json OUT]

Generates ``--cases`` small phantoms (192², 2 mm, 2.5 mm slices) per phase (unenhanced, arterial, portal venous,
delayed) with seeds ``SEED … SEED+N−1`` (97000 upward: disjoint from the training seeds), the same seeds for every
phase (paired: the same patients), finds the reference tissues from the L1–L4 centres of the labels (as the
pipeline's chain would give them) and reads the phase with
:func:`~LumbarBMDLib.internal_calibration.phase.contrast_phase`. Prints the accuracy per phase (target ≥ 95 %), the
confusion matrix, how often the portal vein was found, and the painted versus measured aorta / IVC HU.

The BMD bias of contrast (and its correction) is not measured here: the pipeline is not run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import numpy as np

from LumbarBMDLib.internal_calibration.assess import iodine_scale_to_120kvp
from LumbarBMDLib.internal_calibration.phase import PHASES, contrast_phase
from LumbarBMDLib.internal_calibration.tissues import find_reference_tissues
from LumbarBMDLib.phantom import generate_case

VARIANT_OF = {"non_contrast": "none", "arterial": "contrast-arterial", "portal_venous": "contrast-portal-venous",
              "delayed": "contrast-delayed"}
TARGET = 0.95


def _centres(case, ids=(1, 2, 3, 4)) -> np.ndarray:
    return np.array([case.ct.index_to_lps(np.argwhere(case.labels == i).mean(axis=0)[::-1]) for i in ids
                     if (case.labels == i).any()])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=20, help="cases per phase (default 20)")
    ap.add_argument("--seed", type=int, default=97000, help="first seed (default 97000)")
    ap.add_argument("--vendor", default="A", help="scanner profile (default A)")
    ap.add_argument("--json", help="write the per-case results here")
    args = ap.parse_args(argv)

    rows = []
    t0 = time.perf_counter()
    for truth_phase, variant in VARIANT_OF.items():
        for seed in range(args.seed, args.seed + args.cases):
            case = generate_case(seed, args.vendor, "small", variant)
            tissues = find_reference_tissues(case.ct, _centres(case))
            p = contrast_phase(tissues, iodine_scale_to_120kvp(case.ct.metadata.get("kvp")))
            painted = case.truth.get("contrast", {}).get("hu", {})
            rows.append({"seed": seed, "truth": truth_phase, "read": p.phase, "confidence": p.confidence,
                         "aorta": tissues.median("aorta"), "ivc": tissues.median("ivc"),
                         "portal_vein": tissues.median("portal_vein"),
                         "painted_aorta": painted.get("aorta", case.truth["scanner"]["blood_hu"]),
                         "painted_ivc": painted.get("ivc", case.truth["scanner"]["blood_hu"]),
                         "evidence": p.evidence})
    seconds = time.perf_counter() - t0

    print(f"contrast-phase detection on small phantoms, vendor {args.vendor}, seeds {args.seed}–"
          f"{args.seed + args.cases - 1} ({args.cases} per phase, {seconds:.0f} s)")
    print(f"{'phase':<15}{'accuracy':>10}{'high conf':>11}{'PV found':>10}{'aorta err':>11}{'IVC err':>9}")
    ok_all = True
    for ph in VARIANT_OF:
        r = [x for x in rows if x["truth"] == ph]
        acc = np.mean([x["read"] == ph for x in r])
        ok_all &= acc >= TARGET
        high = np.mean([x["confidence"] == "high" for x in r])
        pv = np.mean([x["portal_vein"] is not None for x in r])
        ea = [abs(x["aorta"] - x["painted_aorta"]) for x in r if x["aorta"] is not None]
        ei = [abs(x["ivc"] - x["painted_ivc"]) for x in r if x["ivc"] is not None]
        print(f"{ph:<15}{acc:>9.0%} {high:>10.0%} {pv:>9.0%} {np.max(ea) if ea else float('nan'):>9.1f}  "
              f"{np.max(ei) if ei else float('nan'):>7.1f}")
    print("(aorta / IVC err: the largest |measured median − painted HU|)")
    print("\nconfusion (rows: painted phase, columns: phase read)")
    cols = [c for c in PHASES if any(x["read"] == c for x in rows) or c in VARIANT_OF]
    print(f"{'':<15}" + "".join(f"{c:>15}" for c in cols))
    for ph in VARIANT_OF:
        cnt = Counter(x["read"] for x in rows if x["truth"] == ph)
        print(f"{ph:<15}" + "".join(f"{cnt.get(c, 0):>15}" for c in cols))
    wrong = [x for x in rows if x["read"] != x["truth"]]
    for x in wrong[:10]:
        print(f"  wrong: seed {x['seed']} {x['truth']} → {x['read']}: {x['evidence']}")
    print(f"\ntarget ≥ {TARGET:.0%} per phase: {'met' if ok_all else 'NOT met'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
