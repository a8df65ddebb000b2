"""Evaluate BMD end to end from the CT on new phantom cohorts, per vendor, with and without scanner calibration.

Usage:  python benchmarks/eval_bmd.py [--seg M] [--bmd M] [--cases 20] [--seed 95000] [--size small|full]
                                      [--vendors ABC] [--variant none] [--out DIR]

For every case: canal → sagittal candidates → R2U-Net → localisation → trabecular patches → DenseNet-121, with
the default models unless given. Each case is measured twice from the same segmentation: with the HU as they
are ("uncalibrated") and mapped onto the training scanner through the vendor's calibration, fitted on that
vendor's scan of the K2HPO4 calibration phantom ("calibrated"). Writes ``DIR/<vendor>_<mode>/<case>/results.json``
and the evaluation (``lumbarbmd evaluate``: JSON + plots) per vendor and mode, and prints the paper's statistics
plus the segmentation's DSC and valid rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_segmentation import reference_labels

from LumbarBMDLib.calibration import fit_calibration
from LumbarBMDLib.evaluation import collect_pairs, read_truth, write_evaluation
from LumbarBMDLib.metrics import segmentation_metrics, summarise
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.phantom.calibration_scan import calibration_scan
from LumbarBMDLib.pipeline import hu_transform_for, measure, measure_from_labels, results_json
from LumbarBMDLib.regression import RegressionModel
from LumbarBMDLib.segmentation import SegmentationModel


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seg", default=None)
    parser.add_argument("--bmd", default=None)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=95000)
    parser.add_argument("--size", default="small", choices=["small", "full"])
    parser.add_argument("--vendors", default="ABC")
    parser.add_argument("--variant", default="none")
    parser.add_argument("--out", default="eval-bmd")
    args = parser.parse_args()
    seg_model = SegmentationModel.load(args.seg, device="auto")
    bmd_model = RegressionModel.load(args.bmd, device="auto")
    out = Path(args.out)
    print(f"models: segmentation {seg_model.sha256[:12]}, regression {bmd_model.sha256[:12]} on {bmd_model.device}")
    for vendor in args.vendors:
        calibration = fit_calibration(calibration_scan(vendor))
        transform = hu_transform_for(bmd_model, calibration)
        print(f"vendor {vendor}: calibration HU = {calibration.slope:.4f} x BMD {calibration.intercept:+.2f}; "
              f"onto the reference scanner: HU' = {transform[0]:.4f} HU {transform[1]:+.2f}")
        truth_dir = out / f"{vendor}_truth"
        seg_cases, times = [], []
        for seed in range(args.seed, args.seed + args.cases):
            case = generate_case(seed, vendor, args.size, args.variant)
            (truth_dir / case.case_id).mkdir(parents=True, exist_ok=True)
            write_json(truth_dir / case.case_id / "truth.json", case.truth)
            try:
                result = measure(case.ct, seg_model, bmd_model)
            except Exception as err:  # a failed case is a result too
                for mode in ("uncalibrated", "calibrated"):
                    write_json(out / f"{vendor}_{mode}" / case.case_id / "results.json",
                               {"input": case.case_id, "status": "failed", "error": str(err), "vertebrae": []})
                continue
            seg_cases.append(segmentation_metrics(result.labels, reference_labels(case, result.annotation)))
            times.append(result.timings_s)
            write_json(out / f"{vendor}_uncalibrated" / case.case_id / "results.json",
                       results_json(result, case.case_id, seg_model, bmd_model))
            # the same segmentation, HU mapped onto the training scanner through this vendor's calibration
            calibrated = replace(measure_from_labels(result.annotation, result.labels, result.label_geometry,
                                                     bmd_model, calibration),
                                 segmentation=result.segmentation, numbering_anchor=result.numbering_anchor)
            write_json(out / f"{vendor}_calibrated" / case.case_id / "results.json",
                       results_json(calibrated, case.case_id, seg_model, bmd_model))
            del case
        seg = summarise(seg_cases) if seg_cases else None
        truth = read_truth(truth_dir)
        if seg:
            dsc = " / ".join(f"{m['dsc']['mean']:.3f}" for m in seg["levels"].values())
            print(f"  segmentation: DSC L1-L4 {dsc}, valid {100 * seg['valid_rate']:.1f} %")
        t = {k: np.median([x[k] for x in times]) for k in ("canal", "segment", "patches", "regress", "total")}
        print("  median seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
        for mode in ("uncalibrated", "calibrated"):
            pairs, summary = collect_pairs(out / f"{vendor}_{mode}", truth)
            res = write_evaluation(pairs, out / f"{vendor}_{mode}_evaluation", {"cases": summary, "segmentation": seg},
                                   title=f"vendor {vendor}, {mode}")
            al, pt = res["all_levels"], res["patients"]
            ba = al["bland_altman"]
            print(f"  {mode:>12}: levels {al['pearson']['n']}, r {al['pearson']['r']:.4f}, bias {ba['bias']:+.2f}, "
                  f"LoA {ba['loa'][0]:+.2f}..{ba['loa'][1]:+.2f}, Wilcoxon p {al['wilcoxon']['p']:.3g}; "
                  f"patients {pt['n']}, kappa {pt['categories']['kappa']:.3f}; "
                  f"status ok/partial/failed {summary['ok']}/{summary['partial']}/{summary['failed']}; "
                  f"missing {summary['missing_levels']}")
            r2 = ", ".join(f"{lv} {m['r2']['r2']:.3f} [{m['r2']['ci'][0]:.3f}-{m['r2']['ci'][1]:.3f}]"
                           for lv, m in res["levels"].items())
            print(f"  {'':>12}  r2 per level: {r2}")
    print(f"wrote {out.resolve()}  ({time.strftime('%H:%M:%S')})")


if __name__ == "__main__":
    main()
