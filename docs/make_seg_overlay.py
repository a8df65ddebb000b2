"""The README picture of the DICOM SEG: ``docs/images/dicom_seg_overlay.png``.

A full-size phantom case (512², 1 mm slices) is written as a classic DICOM CT series, read back with ``read_ct``,
measured by the whole pipeline with the shipped models, and its ``seg.dcm`` / ``sr.dcm`` are written. The SEG is then
**read back from the file** (``highdicom.seg.segread``) and drawn over the CT read from the DICOM series: a sagittal
slice through the canal's plane (L1–L4 bodies and trabecular ROIs), a coronal slice through the bodies (the 8 mm slab
the body segments span, the 16 mm ROIs) and an axial slice through L3's ROI. Prints the timings and sizes.

    .venv/bin/python docs/make_seg_overlay.py [--out docs/images/dicom_seg_overlay.png] [--size full|small]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

LEVEL_RGB = {1: (230, 25, 75), 2: (60, 180, 75), 3: (0, 130, 200), 4: (245, 130, 48)}
WINDOW = (-150.0, 850.0)


def _rgba(mask: np.ndarray, rgb, alpha: float) -> np.ndarray:
    out = np.zeros((*mask.shape, 4))
    out[mask] = (*(c / 255.0 for c in rgb), alpha)
    return out


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask)


def _panel(ax, image: np.ndarray, bodies: np.ndarray, rois: np.ndarray, extent, title: str) -> None:
    """image ``(rows, cols)`` HU; bodies / rois ``(rows, cols, 4)`` bool, levels L1..L4."""
    ax.imshow(image, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], extent=extent, interpolation="nearest")
    for n in range(4):
        if bodies[..., n].any():
            ax.imshow(_rgba(bodies[..., n], LEVEL_RGB[n + 1], 0.55), extent=extent, interpolation="nearest")
        if rois[..., n].any():
            ax.imshow(_rgba(_outline(rois[..., n]), (255, 255, 255), 1.0),
                      extent=extent, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "images" / "dicom_seg_overlay.png"))
    parser.add_argument("--size", default="full", choices=("full", "small"))
    args = parser.parse_args()

    import highdicom as hd
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from LumbarBMDLib.dicom.ct_series import write_ct_series
    from LumbarBMDLib.dicom.outputs import write_dicom_outputs
    from LumbarBMDLib.dicom.source import read_source_series
    from LumbarBMDLib.phantom import generate_case
    from LumbarBMDLib.pipeline import measure, results_json
    from LumbarBMDLib.regression import RegressionModel
    from LumbarBMDLib.segmentation import SegmentationModel
    from LumbarBMDLib.volume import read_ct

    case = generate_case(101, "A", args.size, category="normal")
    with tempfile.TemporaryDirectory() as tmp:
        series = Path(tmp) / "ct"
        t = time.perf_counter()
        paths = write_ct_series(case.ct, series, patient_id="LBMD-0101", patient_name="Phantom^Normal",
                                series_description="phantom A", kvp=120, convolution_kernel="B30f",
                                rescale_intercept=-1024.0)
        t_write = time.perf_counter() - t
        volume = read_ct(series)
        seg_model, bmd_model = SegmentationModel.load(device="cpu"), RegressionModel.load(device="cpu")
        result = measure(volume, seg_model, bmd_model)
        results = results_json(result, str(series), seg_model, bmd_model)
        t = time.perf_counter()
        seg_path, sr_path = write_dicom_outputs(Path(tmp) / "out", series, result, results)
        t_dicom = time.perf_counter() - t
        print(f"{len(paths)} CT files written in {t_write:.1f} s; seg.dcm {seg_path.stat().st_size / 1e3:.0f} kB, "
              f"sr.dcm {sr_path.stat().st_size / 1e3:.0f} kB written in {t_dicom:.1f} s; status {results['status']}")
        seg = hd.seg.segread(seg_path)  # from the file, not from memory
        uids = [str(ds.SOPInstanceUID) for ds in read_source_series(series, volume).datasets]
        masks = seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True).astype(bool)
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    bodies = np.zeros((*volume.shape, 4), dtype=bool)
    rois = np.zeros((*volume.shape, 4), dtype=bool)
    for n, label in enumerate(labels):
        level = int(label[1]) - 1
        (bodies if label.endswith("vertebral body") else rois)[..., level] = masks[..., n]

    hu = volume.hu
    nz, ny, nx = hu.shape
    sx, sy, sz = volume.spacing
    x_plane = results["canal"]["sagittal_x_lps"]
    i = int(np.rint(volume.lps_to_index([x_plane, 0.0, 0.0])[0]))
    centres = np.array([v["centre_lps"] for v in results["vertebrae"] if v["centre_lps"]])
    j = int(np.rint(volume.lps_to_index([0.0, float(centres[:, 1].mean()), 0.0])[1]))
    l3 = next(v for v in results["vertebrae"] if v["level"] == "L3")
    k = int(np.rint(volume.lps_to_index(l3["patch_centre_lps"])[2]))
    z0, z1 = volume.origin[2], volume.origin[2] + (nz - 1) * sz
    fig, axes = plt.subplots(1, 3, figsize=(15, 6.4), gridspec_kw={"width_ratios": [1.0, 1.0, 1.0]})
    # sagittal: rows superior → inferior (flip z), columns anterior → posterior
    _panel(axes[0], hu[::-1, :, i], bodies[::-1, :, i], rois[::-1, :, i],
           (volume.origin[1], volume.origin[1] + (ny - 1) * sy, z0, z1),
           f"sagittal x = {x_plane:.1f} mm (canal plane)")
    # coronal: rows superior → inferior, columns patient right → left
    _panel(axes[1], hu[::-1, j, :], bodies[::-1, j, :], rois[::-1, j, :],
           (volume.origin[0], volume.origin[0] + (nx - 1) * sx, z0, z1),
           "coronal through the bodies: the 8 mm slab")
    # axial: rows anterior → posterior, columns right → left
    _panel(axes[2], hu[k], bodies[k], rois[k],
           (volume.origin[0], volume.origin[0] + (nx - 1) * sx, volume.origin[1] + (ny - 1) * sy, volume.origin[1]),
           f"axial through L3's ROI (z = {l3['patch_centre_lps'][2]:.0f} mm)")
    for ax in axes[:2]:
        ax.set_ylim(centres[:, 2].min() - 60, centres[:, 2].max() + 60)
    axes[1].set_xlim(x_plane - 70, x_plane + 70)
    c = l3["patch_centre_lps"]
    axes[2].set_xlim(c[0] - 80, c[0] + 80)
    axes[2].set_ylim(c[1] + 80, c[1] - 80)
    axes[0].set_xlim(c[1] - 110, c[1] + 110)
    handles = [plt.Rectangle((0, 0), 1, 1, color=np.array(LEVEL_RGB[n + 1]) / 255) for n in range(4)]
    handles.append(plt.Rectangle((0, 0), 1, 1, fill=False, edgecolor="white"))
    names = [f"{v['level']} body ({v['bmd_mg_cm3']} mg/cm³)" for v in results["vertebrae"]] + ["trabecular ROI"]
    fig.legend(handles, names, loc="lower center", ncol=5, facecolor="0.2", labelcolor="white", fontsize=9)
    fig.suptitle("DICOM SEG read back from seg.dcm (highdicom) over the CT read from its DICOM series", fontsize=11)
    fig.patch.set_facecolor("0.12")
    for ax in axes:
        ax.title.set_color("white")
    fig._suptitle.set_color("white")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, facecolor=fig.get_facecolor())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
