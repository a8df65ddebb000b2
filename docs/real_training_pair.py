"""Make the annotator's training pair of the real development CT from its TotalSegmentator labels.

Usage:  python docs/real_training_pair.py OUT

Writes ``OUT/real_totalseg_example/annotation_image.nii.gz`` (the 20-slice mean sagittal image at the detected
canal, exactly as ``lumbarbmd annotate`` makes it) and ``annotation_labels.nii.gz``: L1–L4 where an annotator
draws them, i.e. the vertebral *bodies* (``vertebral_bodies_totalseg`` = 1) of the levels 31 (L1) … 28 (L4) of
``vertebrae_totalseg``, resampled onto the same 16 mm slab (:func:`LumbarBMDLib.sagittal.sagittal_label_image`).
The shipped segmentation model was fine-tuned with this pair (see the README), so the real example is a
training case for it, not a held-out test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LumbarBMDLib.annotation import prepare
from LumbarBMDLib.sagittal import ANNOTATION_SLICES, sagittal_label_image
from LumbarBMDLib.volume import CTVolume, read_ct, reorient_to_lps, write_image

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "totalseg-example"
TOTALSEG_LEVELS = {31: 1, 30: 2, 29: 3, 28: 4}  # TotalSegmentator vertebra value → L1..L4


def main() -> None:
    out = Path(sys.argv[1]) / "real_totalseg_example"
    ct = read_ct(REAL / "ct.nii.gz")
    ann = prepare(ct)
    vert = CTVolume.from_sitk(reorient_to_lps(sitk.ReadImage(str(REAL / "vertebrae_totalseg.nii.gz"))))
    bodies = sitk.GetArrayFromImage(reorient_to_lps(sitk.ReadImage(str(REAL / "vertebral_bodies_totalseg.nii.gz"))))
    labels = np.zeros(vert.hu.shape, np.uint8)
    for value, level in TOTALSEG_LEVELS.items():
        labels[(vert.hu == value) & (bodies == 1)] = level
    assert np.allclose(vert.origin, ct.origin) and vert.hu.shape == ct.hu.shape
    slab = ann.images.annotation_geometry.slab(ANNOTATION_SLICES)
    drawn = sagittal_label_image(CTVolume(hu=labels, spacing=ct.spacing, origin=ct.origin, direction=ct.direction),
                                 slab)
    out.mkdir(parents=True, exist_ok=True)
    geom = ann.images.annotation_geometry
    write_image(geom.to_sitk(ann.images.annotation_hu.astype(np.float32)), out / "annotation_image.nii.gz")
    write_image(geom.to_sitk(drawn.astype(np.uint8)), out / "annotation_labels.nii.gz")
    print(f"wrote {out}: levels {sorted(set(np.unique(drawn)) - {0})}, "
          + ", ".join(f"L{v} {int((drawn == v).sum() * 0.64)} mm²" for v in range(1, 5)))


if __name__ == "__main__":
    main()
