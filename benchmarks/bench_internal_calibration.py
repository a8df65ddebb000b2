"""Benchmark: time (and accuracy) of the reference-tissue finder and the contrast-phase detector (issue 15).

Usage:  python benchmarks/bench_internal_calibration.py [--repeats 5] [--no-phantom] [--json OUT]

Times the whole scanner assessment as the pipeline runs it
(:func:`~LumbarBMDLib.internal_calibration.assess.assess_scanner`: reference tissues, contrast phase, scanner-response
fit and the calibration choice) on

* a full-size phantom case (512 × 512 × ~300, 0.74 mm pixels, 1 mm slices; non-contrast and contrast), with the
  L1–L4 centres from its labels as the pipeline's chain would give them; the tissue medians are printed against the
  scanner profile's values and the fraction of ROI voxels inside the right tissue code;
* the real abdominal CT (totalseg-example, 3 mm) with its L1–L4 centres from the TotalSegmentator masks, and the real
  chest CT (chest-ct-negative, 512 × 512 × 64, spine found from the bone).

The CT is loaded (and the phantom generated) before timing. Target: ≤ 0.5 s per case on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LumbarBMDLib.internal_calibration.assess import assess_scanner
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.phantom.render import Tissue
from LumbarBMDLib.phantom.scanner import scanner_profile
from LumbarBMDLib.volume import read_ct, reorient_to_lps

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
EXPECTED_CODE = {"air": Tissue.AIR, "subcutaneous_fat": Tissue.FAT, "visceral_fat": Tissue.FAT,
                 "paraspinal_muscle": Tissue.SOFT, "aorta": Tissue.BLOOD, "ivc": Tissue.BLOOD}


def _centres(ct, labels, ids) -> np.ndarray:
    return np.array([ct.index_to_lps(np.argwhere(labels == i).mean(axis=0)[::-1]) for i in ids])


def _time(ct, centres, repeats: int) -> tuple[list[float], object, object]:
    """The whole assessment as the pipeline runs it (tissues, phase, fit, choice), timed ``repeats`` times."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a = assess_scanner(ct, centres)
        times.append(time.perf_counter() - t0)
    print(f"\n  {a.choice.sentence}" + ("" if a.calibration is None else f"\n  {a.calibration.message}")
          + f"\n  water-equivalent diameter: {a.tissues.water_equivalent_diameter_cm}")
    return times, a.tissues, a.phase


def _report(name: str, shape, times: list[float], tissues, phase, expected: dict | None = None,
            tissue_map: np.ndarray | None = None) -> dict:
    print(f"\n{name}  {shape}  median {statistics.median(times):.3f} s  (min {min(times):.3f}, max {max(times):.3f}; "
          f"{len(times)} runs)  spine: {tissues.spine_source}")
    rows = {}
    for n, t in tissues.tissues.items():
        if not t.found:
            print(f"  {n:18s} not found: {t.reason}")
            rows[n] = {"found": False, "reason": t.reason}
            continue
        line = f"  {n:18s} median {t.median_hu:8.1f} HU  sd {t.sd_hu:5.1f}  n {t.n_voxels:6d}"
        row = {"found": True, "median_hu": t.median_hu, "sd_hu": t.sd_hu, "n": t.n_voxels}
        if expected and n in expected:
            line += f"  expected {expected[n]:7.1f}  error {t.median_hu - expected[n]:+5.1f}"
            row["error_hu"] = t.median_hu - expected[n]
        if tissue_map is not None and n in EXPECTED_CODE:
            frac = float(np.mean(tissue_map[tuple(t.voxels_kji.T)] == EXPECTED_CODE[n]))
            line += f"  in tissue {100 * frac:5.1f} %"
            row["in_tissue"] = frac
        print(line)
        rows[n] = row
    print(f"  phase: {phase.phase} ({phase.confidence}, qc {phase.qc}): {phase.evidence}")
    return {"shape": list(shape), "seconds": times, "tissues": rows, "phase": phase.as_json()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-phantom", action="store_true", help="skip the full-size phantom (≈ 15 s to generate each)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out: dict = {}
    if not args.no_phantom:
        for variant in ("none", "contrast"):
            case = generate_case(3, "A", "full", variant)
            sc = scanner_profile("A")
            painted = case.truth["contrast"]["hu"] if variant == "contrast" else {}
            blood, ivc = painted.get("aorta", sc.blood_hu), painted.get("ivc", sc.blood_hu)
            expected = {"air": -1000.0, "subcutaneous_fat": sc.fat_hu, "visceral_fat": sc.fat_hu + 11.0,
                        "paraspinal_muscle": sc.muscle_hu + 3.0, "aorta": blood, "ivc": ivc}
            centres = _centres(case.ct, case.labels, (1, 2, 3, 4))
            times, tissues, phase = _time(case.ct, centres, args.repeats)
            out[f"phantom_full_{variant}"] = _report(f"phantom A full, {variant}", case.ct.shape, times, tissues,
                                                     phase, expected, case.tissue)
    ct = read_ct(REAL / "totalseg-example" / "ct.nii.gz")
    labels = sitk.GetArrayFromImage(reorient_to_lps(sitk.ReadImage(str(REAL / "totalseg-example" /
                                                                    "vertebrae_totalseg.nii.gz"))))
    times, tissues, phase = _time(ct, _centres(ct, labels, (31, 30, 29, 28)), args.repeats)
    out["real_abdomen"] = _report("real abdomen (totalseg-example, 3 mm)", ct.shape, times, tissues, phase)
    ct = read_ct(REAL / "chest-ct-negative")
    times, tissues, phase = _time(ct, None, args.repeats)
    out["real_chest"] = _report("real chest (chest-ct-negative, 5 mm)", ct.shape, times, tissues, phase)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
