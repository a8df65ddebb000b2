"""Evaluate a segmentation model end to end on new phantom cohorts (and the real example), per vendor.

Usage:  python benchmarks/eval_segmentation.py [--model M.safetensors] [--cases 20] [--seed 90000]
                                               [--size small|full] [--vendors ABC]

For every case: canal detection and level identification on the CT → sagittal candidates → R2U-Net (10
candidates, one batch) → fusion → the network's foreground renumbered by the vertebral chain (what the pipeline
measures; ``--network`` also scores the network's own numbering). The reference is what an annotator draws on the
same plane (the phantom's 3-D truth resampled onto the same 16 mm slab and grid). Prints DSC / PPV / sensitivity
per vertebra, the valid-case rate (all four DSC > 0.5) and the segmentation time of the 10 candidates; then, on
the real example, which TotalSegmentator vertebra each level overlaps most (off-by-one check).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LumbarBMDLib.annotation import prepare
from LumbarBMDLib.metrics import is_valid_case, segmentation_metrics, summarise
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.phantom.transforms import contrast_distractors
from LumbarBMDLib.pipeline import lumbar_rows
from LumbarBMDLib.sagittal import ANNOTATION_SLICES, sagittal_label_image
from LumbarBMDLib.segmentation import SegmentationModel, segment
from LumbarBMDLib.spine.labelling import anatomical_labels, as_segmentation_result
from LumbarBMDLib.volume import CTVolume, read_ct, reorient_to_lps

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "totalseg-example"


def reference_labels(case, ann) -> np.ndarray:
    """The annotator's L1–L4 on the plane the pipeline used (same grid as the prediction)."""
    geom = ann.images.annotation_geometry.slab(ANNOTATION_SLICES)
    labels = CTVolume(hu=case.labels, spacing=case.ct.spacing, origin=case.ct.origin)
    return sagittal_label_image(labels, geom)


def run_case(model, ct):
    """Canal, chain and sagittal candidates, the network, and the anatomical labels (as the pipeline does)."""
    ann = prepare(ct)
    t = time.perf_counter()
    network = segment(model, ann.images, ann.canal.mean_centre_lps, lumbar_rows(ann))  # as the pipeline
    elapsed = time.perf_counter() - t
    anatomical = anatomical_labels(network.probabilities, network.geometry, ann.spine, ann.images.annotation_hu)
    return ann, network, as_segmentation_result(anatomical, network.probabilities), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=90000)
    parser.add_argument("--size", default="small", choices=["small", "full"])
    parser.add_argument("--vendors", default="ABC")
    parser.add_argument("--variant", default="mixed")
    parser.add_argument("--network", action="store_true", help="also score the network's own numbering")
    parser.add_argument("--perturb", choices=["none", "distractors"], default="none",
                        help="add contrast-filled heart and aorta and bowel gas in front of the spine "
                             "(phantom.transforms.contrast_distractors) to every case")
    args = parser.parse_args()
    model = SegmentationModel.load(args.model, device="auto")
    print(f"model {model.card['architecture']['features']} sha256 {model.sha256[:12]} on {model.device}")
    for vendor in args.vendors:
        per_case, per_case_net, times = [], [], []
        for seed in range(args.seed, args.seed + args.cases):
            case = generate_case(seed, vendor, args.size, args.variant)
            ct = case.ct if args.perturb == "none" else contrast_distractors(case, seed).ct
            ann, network, result, dt = run_case(model, ct)
            times.append(dt)
            reference = reference_labels(case, ann)
            per_case.append(segmentation_metrics(result.labels, reference))
            per_case_net.append(segmentation_metrics(network.labels, reference))
        for name, cases in (("anatomical numbering", per_case), ("network's own numbering", per_case_net)):
            if name.startswith("network") and not args.network:
                continue
            s = summarise(cases)
            print(f"vendor {vendor} ({args.size}, {args.variant}, perturb {args.perturb}, {args.cases} cases), {name}: "
                  f"valid {100 * s['valid_rate']:.1f} %, segmentation {np.median(times):.2f} s median")
            for level, m in s["levels"].items():
                print(f"  {level}: DSC {m['dsc']['mean']:.3f} ± {m['dsc']['sd']:.3f}  PPV {m['ppv']['mean']:.3f}  "
                      f"sensitivity {m['sensitivity']['mean']:.3f}")
            bad = [i for i, m in enumerate(cases) if not is_valid_case(m)]
            if bad:
                print(f"  invalid cases (seed): {[args.seed + i for i in bad]}")
    if REAL.is_dir():
        ct = read_ct(REAL / "ct.nii.gz")
        ts = sitk.GetArrayFromImage(reorient_to_lps(sitk.ReadImage(str(REAL / "vertebrae_totalseg.nii.gz"))))
        names = {31: "L1", 30: "L2", 29: "L3", 28: "L4", 27: "L5", 32: "T12", 33: "T11", 26: "S1"}
        _, _, result, dt = run_case(model, ct)
        print(f"real example: status {result.status}, missing {result.missing}, {dt:.2f} s")
        for lv in result.levels:
            if not lv.found:
                continue
            rows, cols = np.nonzero(result.labels == lv.label)
            lps = result.geometry.pixel_to_lps(np.c_[cols, rows, np.zeros(len(rows))])
            ijk = np.rint(ct.lps_to_index(lps)).astype(int)
            inside = np.all((ijk >= 0) & (ijk < np.array(ct.shape[::-1])), axis=1)
            hits = ts[ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]]
            values, counts = np.unique(hits[hits > 0], return_counts=True)
            best = names.get(int(values[np.argmax(counts)]), str(values[np.argmax(counts)])) if len(values) else "-"
            overlap = dict(zip(map(int, values), map(int, counts), strict=True))
            print(f"  predicted {lv.level}: overlaps most {best} {overlap}, confidence {lv.confidence:.2f}")


if __name__ == "__main__":
    main()
