"""Make the README's figures: a phantom next to the real example CT, `annotate` on the real CT, and the vertebral
chain with its anchors on the real CT and on the real chest CT.

Usage:  python docs/make_figures.py   (writes docs/images/*.png)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import SimpleITK as sitk

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from LumbarBMDLib.annotation import prepare, preview_png
from LumbarBMDLib.figures import LEVEL_COLOURS, WINDOW_HU, draw_chain
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.sagittal import ANNOTATION_SLICES, mean_sagittal_image, sagittal_geometry
from LumbarBMDLib.volume import read_ct, reorient_to_lps

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real" / "totalseg-example"


def _crop(img: np.ndarray, centre_rc: tuple[float, float], half: int = 190) -> np.ndarray:
    r, c = (round(float(v)) for v in centre_rc)
    pad = np.pad(img, half, constant_values=img.min())
    return pad[r : r + 2 * half, c : c + 2 * half]


def main() -> None:
    real = read_ct(REAL / "ct.nii.gz")
    labels = sitk.GetArrayFromImage(reorient_to_lps(sitk.ReadImage(str(REAL / "vertebrae_totalseg.nii.gz"))))
    # sagittal plane of the real case: mean x of the L1–L4 vertebrae (TotalSegmentator labels 28–31)
    kk, jj, ii = np.nonzero((labels >= 28) & (labels <= 31))
    centre = real.index_to_lps(np.c_[ii, jj, kk].mean(axis=0))
    geom_r = sagittal_geometry(real, float(centre[0]), ANNOTATION_SLICES, centre_yz_lps=(centre[1], centre[2]))
    sag_r = mean_sagittal_image(real, geom_r)
    l3_real = int(np.median(kk[labels[kk, jj, ii] == 29]))

    case = generate_case(101, "A", "full", category="normal")
    sag_p = case.annotation_image
    l3 = case.truth["levels"]["L3"]["centre_lps"]
    k = round(float(case.ct.lps_to_index(l3)[2]))
    l3_px = case.annotation_geometry.lps_to_pixel(l3)

    fig, axes = plt.subplots(2, 2, figsize=(10, 10))
    axes[0, 0].imshow(_crop(sag_r, (255.5, 255.5)), cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1])
    axes[0, 0].set_title("real CT (TotalSegmentator example, 3 mm)\n16 mm mean sagittal slab")
    axes[0, 1].imshow(_crop(sag_p, (l3_px[1], l3_px[0])), cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1])
    axes[0, 1].set_title(
        f"phantom {case.case_id} (vendor A, 0.{int(case.ct.spacing[0] * 100):02d} mm × 1 mm)\n"
        "16 mm mean sagittal slab (annotation image)"
    )
    axes[1, 0].imshow(real.hu[l3_real], cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1])
    axes[1, 0].set_title("real CT, axial slice through L3")
    axes[1, 1].imshow(case.ct.hu[k], cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1])
    axes[1, 1].set_title("phantom, axial slice through L3")
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle("Window WL 350 / WW 1000 (the paper's); sagittal: anterior left, superior up")
    fig.tight_layout()
    out = ROOT / "docs" / "images" / "phantom_vs_real.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)

    # annotation image with the annotator's truth
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(sag_p, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1])
    rgba = np.zeros((*sag_p.shape, 4))
    for value, rgb in LEVEL_COLOURS.items():
        rgba[case.annotation_labels == value] = (*(c / 255 for c in rgb), 0.5)
    ax.imshow(rgba)
    ax.set_axis_off()
    ax.set_title("annotation image + annotator's L1–L4 truth")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "images" / "phantom_annotation.png", dpi=80)
    plt.close(fig)
    # the annotate step on the real CT: annotation image with the detected canal, and the axial slice
    prepared = prepare(real)
    preview_png(prepared, ROOT / "docs" / "images" / "annotation_real.png")
    # the chain and its anchors found on the real CT (T12 … S1) and on the real chest CT (no lumbar vertebra)
    chest = prepare(read_ct(REAL.parent / "chest-ct-negative"))
    fig, axes = plt.subplots(1, 4, figsize=(15, 6.2), gridspec_kw={"width_ratios": [1.0, 1.4, 1.0, 1.4]})
    draw_chain(axes[:2], prepared.spine)
    draw_chain(axes[2:], chest.spine)
    axes[0].set_title("real abdominal CT (3 mm): chain", fontsize=9)
    axes[2].set_title("real chest CT (5 mm): chain", fontsize=9)
    fig.suptitle("Levels identified on the CT: discs (yellow) between endplates, ribs (red) leaving the spine, "
                 "sacrum (cyan) joined to the ilia", fontsize=10)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "images" / "chain_real.png", dpi=80)
    plt.close(fig)
    print(out)


if __name__ == "__main__":
    main()
