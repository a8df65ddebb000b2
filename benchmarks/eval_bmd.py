"""Evaluate BMD end to end from the CT on new phantom cohorts, per scanner, by the calibration that maps the HU.

Usage:  python benchmarks/eval_bmd.py [--seg M] [--bmd M] [--cases 20] [--seed 95000] [--size small|full]
                                      [--vendors ABC] [--scanner FILE.json ...] [--variant none] [--no-kvp]
                                      [--modes internal,phantom,nominal,uncalibrated[,uncorrected]] [--out DIR]

For every case: canal → sagittal candidates → R2U-Net → localisation → trabecular patches → DenseNet-121, with
the default models unless given. Each case is measured from the same segmentation with its HU mapped onto the
regression model's reference scale by:

* ``internal``: what the pipeline does by default, without any calibration scan: the internal calibration from
  the reference tissues (air, fat, muscle, blood) when its fit is good, else the nominal line of the DICOM kVp;
* ``phantom``: the scanner's K2HPO4 line fitted on its scan of the calibration phantom (asynchronous QCT);
* ``nominal``: the line of an ideal scanner at the DICOM kVp (no tissue fit);
* ``uncalibrated``: the HU as they are (the model's reference scale assumed);
* ``uncorrected``: as ``internal`` but without the contrast correction (what it changes on enhanced cohorts);
* ``spec``: as ``internal`` with the scanner's equivalent filtration stated by the site (``lumbarbmd run
  --scanner-spec``; here the scanner's own physics), which narrows the effective-energy prior.

The contrast correction of the detected phase applies in the first three modes. ``--no-kvp`` drops the tube
voltage a DICOM header would carry (a NIfTI has none). ``--scanner`` adds physically defined scanners the models
never saw (e.g. ``docs/scanner_example.json``, ``benchmarks/scanners/site4_140kvp.json``). Writes
``DIR/<scanner>_<mode>/<case>/results.json`` and the evaluation (``lumbarbmd evaluate``: JSON + plots) per scanner
and mode, and prints the paper's statistics plus the segmentation's DSC and valid rate.
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

from LumbarBMDLib.batch import apply_scanner_spec
from LumbarBMDLib.calibration import fit_calibration
from LumbarBMDLib.evaluation import collect_pairs, read_truth, write_evaluation
from LumbarBMDLib.internal_calibration.assess import assess_scanner
from LumbarBMDLib.metrics import segmentation_metrics, summarise
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.phantom.calibration_scan import calibration_scan
from LumbarBMDLib.phantom.physical_scanner import as_physics, case_prefix, profile_from_physics
from LumbarBMDLib.phantom.scanner import VENDOR_PHYSICS, scanner_profile
from LumbarBMDLib.pipeline import identified_body_centres, measure, measure_from_labels, results_json
from LumbarBMDLib.regression import RegressionModel
from LumbarBMDLib.segmentation import SegmentationModel

MODES = ("internal", "phantom", "nominal", "uncalibrated", "uncorrected", "spec")


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def _remeasure(result, bmd_model, calibration=None, scanner=None, assess=True):
    return replace(measure_from_labels(result.annotation, result.labels, result.label_geometry, bmd_model,
                                       calibration, scanner, assess),
                   segmentation=result.segmentation, numbering_anchor=result.numbering_anchor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seg", default=None)
    parser.add_argument("--bmd", default=None)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=95000)
    parser.add_argument("--size", default="small", choices=["small", "full"])
    parser.add_argument("--vendors", default="ABC", help="vendor letters ('' for none)")
    parser.add_argument("--scanner", action="append", default=[], help="a scanner physics JSON (repeatable)")
    parser.add_argument("--variant", default="none")
    parser.add_argument("--no-kvp", action="store_true", help="measure without the DICOM kVp")
    parser.add_argument("--modes", default=",".join(MODES[:4]))
    parser.add_argument("--out", default="eval-bmd")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}: choose from {', '.join(MODES)}")
    seg_model = SegmentationModel.load(args.seg, device="auto")
    bmd_model = RegressionModel.load(args.bmd, device="auto")
    out = Path(args.out)
    print(f"models: segmentation {seg_model.sha256[:12]}, regression {bmd_model.sha256[:12]} on {bmd_model.device}")
    scanners = [(v, v, None, scanner_profile(v)) for v in args.vendors]
    for f in args.scanner:
        physics = as_physics(f)
        scanners.append((case_prefix(physics), None, physics, profile_from_physics(physics)))
    for name, vendor, physics, profile in scanners:
        calibration = fit_calibration(calibration_scan(profile))
        print(f"scanner {name}: phantom-scan calibration HU = {calibration.slope:.4f} x BMD "
              f"{calibration.intercept:+.2f} (true {profile.bone_slope:.4f}, {profile.bone_intercept:+.2f})")
        truth_dir = out / f"{name}_truth"
        seg_cases, times, fits = [], [], []
        for seed in range(args.seed, args.seed + args.cases):
            case = generate_case(seed, vendor or "A", args.size, args.variant, scanner=physics)
            if args.no_kvp:
                case.ct.metadata.pop("kvp", None)
            (truth_dir / case.case_id).mkdir(parents=True, exist_ok=True)
            write_json(truth_dir / case.case_id / "truth.json", case.truth)
            try:
                result = measure(case.ct, seg_model, bmd_model)
            except Exception as err:  # a failed case is a result too
                for mode in modes:
                    write_json(out / f"{name}_{mode}" / case.case_id / "results.json",
                               {"input": case.case_id, "status": "failed", "error": str(err), "vertebrae": []})
                continue
            seg_cases.append(segmentation_metrics(result.labels, reference_labels(case, result.annotation)))
            times.append(result.timings_s)
            sc = result.scanner
            fits.append((sc.choice.source, sc.choice.slope / profile.bone_slope - 1.0,
                         sc.choice.intercept - profile.bone_intercept, sc.phase.phase))
            for mode in modes:
                if mode == "internal":
                    measured = result
                elif mode == "phantom":
                    measured = _remeasure(result, bmd_model, calibration, sc)
                elif mode == "nominal":  # as if no reference tissue had been found
                    measured = _remeasure(result, bmd_model, None, replace(sc, calibration=None))
                elif mode == "spec":
                    spec = physics if physics is not None else VENDOR_PHYSICS[vendor]
                    ct = replace(result.annotation.volume, metadata=dict(result.annotation.volume.metadata))
                    apply_scanner_spec(ct, spec)  # on a copy of the metadata: the other modes see the case as read
                    measured = _remeasure(result, bmd_model, None, assess_scanner(
                        ct, identified_body_centres(result.annotation.spine)))
                elif mode == "uncorrected":
                    measured = _remeasure(result, bmd_model, None, replace(
                        sc, correction=replace(sc.correction, applied=False, delta_hu=0.0)))
                else:
                    measured = _remeasure(result, bmd_model, assess=False)
                write_json(out / f"{name}_{mode}" / case.case_id / "results.json",
                           results_json(measured, case.case_id, seg_model, bmd_model))
            del case
        seg = summarise(seg_cases) if seg_cases else None
        truth = read_truth(truth_dir)
        if seg:
            dsc = " / ".join(f"{m['dsc']['mean']:.3f}" for m in seg["levels"].values())
            print(f"  segmentation: DSC L1-L4 {dsc}, valid {100 * seg['valid_rate']:.1f} %")
        if fits:
            src = {s_: sum(f[0] == s_ for f in fits) for s_ in sorted({f[0] for f in fits})}
            err = np.array([f[1] for f in fits]) * 100
            off = np.array([f[2] for f in fits])
            phases = {p: sum(f[3] == p for f in fits) for p in sorted({f[3] for f in fits})}
            print(f"  calibration used {src}; slope error {np.mean(err):+.1f} % (SD {np.std(err):.1f} %, "
                  f"{np.min(err):+.1f}..{np.max(err):+.1f}); intercept error {np.mean(off):+.1f} HU; phases {phases}")
        if times:
            t = {k: np.median([x[k] for x in times]) for k in ("canal", "segment", "scanner", "patches", "regress",
                                                                  "total")}
            print("  median seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
        for mode in modes:
            pairs, summary = collect_pairs(out / f"{name}_{mode}", truth)
            res = write_evaluation(pairs, out / f"{name}_{mode}_evaluation", {"cases": summary, "segmentation": seg},
                                   title=f"scanner {name}, {mode}")
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
