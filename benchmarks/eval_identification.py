"""Level identification on the CT (chain, anchors, numbering), on new phantom cases of every vendor and variant,
and on faults: a head/foot flip, scans cropped to L1–L2 / T12–L4 / L2–sacrum / T11–T12, an oblique grid, a tilted
patient, a damaged slice.

Usage:  python benchmarks/eval_identification.py [--cases 3] [--seed 96000] [--size small|full] [--vendors ABC]
                                                  [--only NAME ...]

A case is **right** when it is numbered and every identified level's chain body lies in that level's vertebral body
of the phantom's 3-D truth (the centre, or within 3 mm of it), no level outside the field of view is reported as
measurable, and the six-lumbar variant is flagged as transitional; or when it is expected to be refused (flipped,
L1–L2 only, T11–T12 only) and is refused for the expected reason. Prints one row per variant and fault, then the
time of chain + anchors + numbering per case.
"""

from __future__ import annotations

import argparse

import numpy as np

from LumbarBMDLib.annotation import prepare
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.phantom.transforms import (
    Transformed,
    crop_to_levels,
    damage_slice,
    flip_head_foot,
    oblique_grid,
    tilted_patient,
)

VARIANTS = ("none", "fracture", "implant", "partial-L1", "partial-L4", "six-lumbar", "contrast", "low-dose",
            "scoliosis", "calcification")
#: fault name → (how to make it from a case of variant "none", the expected outcome: "numbered" or a refusal phrase)
FAULTS = {
    "flipped head/foot": (flip_head_foot, "contradicts itself"),
    "L1-L2 only": (lambda c: crop_to_levels(c, "L1", "L2"), "cannot be numbered"),
    "T11-T12 only": (lambda c: crop_to_levels(c, "T11", "T12", 12.0), "no lumbar vertebra in the field of view"),
    "T12-L4 (no sacrum)": (lambda c: crop_to_levels(c, "T12", "L4", 20.0), "numbered"),
    "L2-sacrum (no ribs)": (lambda c: crop_to_levels(c, "L2", "S", 0.0), "numbered"),
    "oblique grid 30°": (lambda c: oblique_grid(c, 30.0, "x"), "numbered"),
    "patient tilted 20°": (lambda c: tilted_patient(c, 20.0, "x"), "numbered"),
    "patient rotated 15°": (lambda c: tilted_patient(c, 15.0, "z"), "numbered"),
    "damaged slice (air)": (lambda c: damage_slice(c, "L3", 0.45, "air"), "numbered"),
    "damaged slice (noise)": (lambda c: damage_slice(c, "L2", 0.0, "noise"), "numbered"),
}


def body_at(labels: np.ndarray, ct, lps: np.ndarray, tolerance_mm: float = 3.0) -> set[int]:
    """Truth body labels (1–6 lumbar, 11/12 thoracic, 20 sacrum) at an LPS point or within ``tolerance_mm``."""
    i, j, k = np.rint(ct.lps_to_index(lps)).astype(int)
    r = [max(1, int(np.ceil(tolerance_mm / s))) for s in ct.spacing]
    box = labels[max(k - r[2], 0) : k + r[2] + 1, max(j - r[1], 0) : j + r[1] + 1, max(i - r[0], 0) : i + r[0] + 1]
    return {int(v) for v in np.unique(box) if 0 < v < 100}


def judge(ident, t: Transformed, expect: str, truth_in_view: set[str], six_lumbar: bool) -> tuple[bool, str]:
    """Whether the identification is right (see the module docstring), and what was wrong."""
    if expect != "numbered":
        ok = not ident.numbered and expect in (ident.refusal or "")
        return ok, "" if ok else f"expected a refusal ({expect}), got: {ident.refusal or ident.names}"
    if not ident.numbered:
        return False, f"refused: {ident.refusal}"
    problems = []
    for lv in ident.levels:
        if not lv.identified:
            if lv.level in truth_in_view:
                problems.append(f"{lv.level} in view but not identified ({lv.reason})")
            continue
        body = ident.chain.bodies[lv.body]
        got = body_at(t.labels, t.ct, body.centre_lps)
        if int(lv.level[1]) not in got:
            problems.append(f"{lv.level} on truth {sorted(got) or 'nothing'}")
        if lv.measurable and lv.level not in truth_in_view:
            problems.append(f"{lv.level} measurable but not in view")
    if six_lumbar and not any(f.code == "transitional_anatomy" for f in ident.flags):
        problems.append("six lumbar vertebrae not flagged")
    return not problems, "; ".join(problems)


def in_view(t: Transformed, case) -> set[str]:
    """Levels with at least half of their body's truth voxels in the (transformed) volume."""
    ratio = np.prod(case.ct.spacing) / np.prod(t.ct.spacing)
    return {f"L{k}" for k in range(1, 5) if (t.labels == k).sum() >= 0.5 * ratio * (case.labels == k).sum()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3, help="cases per vendor and variant")
    parser.add_argument("--seed", type=int, default=96000)
    parser.add_argument("--size", default="small", choices=["small", "full"])
    parser.add_argument("--vendors", default="ABC")
    parser.add_argument("--only", nargs="*", default=None, help="variant or fault names to run")
    args = parser.parse_args()
    rows = []
    times = []
    names = [*VARIANTS, *FAULTS]
    if args.only:
        names = [n for n in names if n in args.only]
    for name in names:
        for vendor in args.vendors:
            for c in range(args.cases):
                seed = args.seed + 100 * names.index(name) + c
                variant = name if name in VARIANTS else "none"
                case = generate_case(seed, vendor, args.size, variant)
                if name in FAULTS:
                    make, expect = FAULTS[name]
                    t = make(case)
                else:
                    expect = "numbered"
                    t = Transformed(case.ct, case.labels, name)
                try:
                    ann = prepare(t.ct)  # as the pipeline: an oblique grid resampled, canal, chain, anchors
                    ident = ann.spine
                    times.append(ann.timings_s["spine"])
                    visible = set(case.truth["levels_in_view"]) if name in VARIANTS else in_view(t, case)
                    ok, why = judge(ident, t, expect, visible, variant == "six-lumbar")
                except LumbarBMDError as err:
                    ok, why = expect in str(err), f"error: {err}"
                rows.append((name, vendor, seed, ok, why))
                print(f"{name:24s} {vendor} {seed}: {'right' if ok else 'WRONG'} {why}", flush=True)
    print()
    print(f"{'variant / fault':24s} {'cases':>5s} {'right':>5s}")
    for name in names:
        sel = [r for r in rows if r[0] == name]
        print(f"{name:24s} {len(sel):5d} {sum(r[3] for r in sel):5d}")
    total = len(rows)
    print(f"{'all':24s} {total:5d} {sum(r[3] for r in rows):5d}")
    if times:
        print(f"chain + anchors + numbering: median {np.median(times):.2f} s, max {np.max(times):.2f} s per case "
              f"({args.size})")


if __name__ == "__main__":
    main()
