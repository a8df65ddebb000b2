"""The annotator's images from a CT: canal → sagittal plane → 10 candidates and the 20-slice mean image.

``lumbarbmd annotate INPUT --out DIR`` writes, atomically (a temporary folder whose files are moved into
DIR at the end, so a failure leaves nothing half-written):

* ``annotation_image.nii.gz``: float32 HU, the mean of 20 consecutive sagittal slices through the canal
  (one slice; its geometry overlays the CT in Slicer or ITK-SNAP). Annotators draw L1–L4 on it.
* ``candidates.nii.gz``: float32 HU, the 10 consecutive sagittal slices containing the mean canal centre
  (the segmentation network's candidates), as a 10-slice volume with its geometry.
* ``canal.json``: the canal centre per axial slice where it was found (LPS mm), the mean centre, the
  sagittal position, the number of slices found, the lateral drift, and the sagittal grid.
* ``annotation_preview.png``: the annotation image and an axial slice with the detected centres.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from LumbarBMDLib.canal import CanalResult, find_canal
from LumbarBMDLib.sagittal import (
    ANNOTATION_SLICES,
    CANDIDATE_SLICES,
    SAGITTAL_PIXEL_MM,
    SAGITTAL_SIZE,
    SAGITTAL_STEP_MM,
    SagittalImages,
    sagittal_centre_yz,
    sagittal_images,
)
from LumbarBMDLib.spine import SpineIdentification, identify_spine
from LumbarBMDLib.volume import CTVolume, axial_grid, read_ct, repair_damaged_slices, write_image

ANNOTATION_FILES = ("annotation_image.nii.gz", "candidates.nii.gz", "canal.json", "annotation_preview.png")


@dataclass
class Annotation:
    """A CT prepared for annotation (and for the segmentation network).

    Attributes:
        volume: the CT.
        canal: the canal centres.
        images: the sagittal images through the canal (the plane: :func:`sagittal_plane`).
        spine: the vertebral-body chain, its anchors and numbering (None when not computed).
        timings_s: seconds per step.
    """

    volume: CTVolume
    canal: CanalResult
    images: SagittalImages
    spine: SpineIdentification | None = None
    timings_s: dict = field(default_factory=dict)

    def canal_json(self) -> dict:
        """canal.json: DESIGN.md's contract plus the sagittal grid and timings."""
        out = {"input": self.volume.source, **self.canal.as_json()}
        ann, cand = self.images.annotation_geometry, self.images.candidate_geometry
        out["sagittal_x_lps"] = round(ann.sagittal_x_lps, 3)  # the plane used (median over L1–L4 when identified)
        out["sagittal"] = {
            "pixel_mm": SAGITTAL_PIXEL_MM,
            "step_mm": SAGITTAL_STEP_MM,
            "size": ann.size,
            "annotation_slices": ANNOTATION_SLICES,
            "candidate_slices": CANDIDATE_SLICES,
            "annotation_affine_lps": np.round(ann.affine, 6).tolist(),
            "candidates_affine_lps": np.round(cand.affine, 6).tolist(),
        }
        if self.spine is not None:
            out["spine"] = self.spine.as_json()
        out["timings_s"] = {k: round(v, 3) for k, v in self.timings_s.items()}
        return out


def sagittal_plane(volume: CTVolume, canal: CanalResult, spine: SpineIdentification | None
                   ) -> tuple[float, tuple[float, float]]:
    """Where the sagittal images lie: ``(x, (y, z))`` in LPS mm.

    * x: the median canal x over the identified L1–L4 (so a scoliotic thoracic spine or a few wrong centres do not
      move the plane off the lumbar bodies), else over all the canal's centres.
    * y, z: the centring policy of :func:`~LumbarBMDLib.sagittal.sagittal_centre_yz`; when L1–L4 are identified, z
      is the middle of L1–L4 instead (the paper's centre crop on the levels that are measured), kept inside the scan
      so that no more of the image lies outside it than the policy's.
    """
    y, z = sagittal_centre_yz(volume, canal.centres_lps)
    lumbar = spine.lumbar_z_range() if spine is not None and spine.numbered else None
    if lumbar is None:
        return canal.sagittal_x_lps, (y, z)
    x = canal.sagittal_x_between(*lumbar)
    z_mid = 0.5 * (lumbar[0] + lumbar[1])
    nz, ny, nx = volume.shape
    corners = volume.index_to_lps(np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)],
                                           dtype=float))
    lo, hi = float(corners[:, 2].min()), float(corners[:, 2].max())
    half = SAGITTAL_SIZE * SAGITTAL_PIXEL_MM / 2.0
    if hi - lo > 2 * half:  # a long scan: the image stays inside it
        z_mid = float(np.clip(z_mid, lo + half, hi - half))
    else:  # a short scan: at most as much outside as when centred on it
        z_mid = float(np.clip(z_mid, hi - half, lo + half))
    return x, (y, z_mid)


def prepare(volume: CTVolume, identify: bool = True) -> Annotation:
    """Canal detection, the vertebral-body chain with its numbering (``identify``) and the sagittal images of a CT
    (no files written). An oblique volume is first resampled onto an axial LPS grid (:func:`~LumbarBMDLib.volume.
    axial_grid`) and damaged slices are replaced by their neighbours (:func:`~LumbarBMDLib.volume.
    repair_damaged_slices`); :attr:`Annotation.volume` is the volume the analysis used."""
    t0 = time.perf_counter()
    volume = repair_damaged_slices(axial_grid(volume))
    canal = find_canal(volume)
    t1 = time.perf_counter()
    spine = identify_spine(volume, canal) if identify else None
    t2 = time.perf_counter()
    x, centre = sagittal_plane(volume, canal, spine)
    images = sagittal_images(volume, x, centre)
    t3 = time.perf_counter()
    return Annotation(volume, canal, images, spine, {"canal": t1 - t0, "spine": t2 - t1, "sagittal": t3 - t2})


def preview_png(ann: Annotation, path: str | Path) -> None:
    """Three panels: the annotation image with the projected canal centres; an axial slice with the detected
    centre and the sagittal plane; a coronal CT slice through the canal with the 16 mm slab the annotation
    image averages (where it lies on the CT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from LumbarBMDLib.figures import WINDOW_HU

    vol, canal, images = ann.volume, ann.canal, ann.images
    plane_x = images.annotation_geometry.sagittal_x_lps
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.6))
    axes[0].imshow(images.annotation_hu, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1])
    px = images.annotation_geometry.lps_to_pixel(canal.centres_lps)
    axes[0].plot(px[:, 0], px[:, 1], ".", color=(1.0, 0.8, 0.0), ms=3, label="canal centres (projected)")
    axes[0].legend(loc="lower left", fontsize=8)
    axes[0].set_title(
        f"annotation image: mean of {ANNOTATION_SLICES} sagittal slices at x = {plane_x:.1f} mm"
    )
    mid = len(canal.slice_indices) // 2
    k = int(canal.slice_indices[mid])
    axes[1].imshow(vol.hu[k], cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=vol.spacing[1] / vol.spacing[0])
    ijk = vol.lps_to_index(canal.centres_lps[mid])
    axes[1].plot([ijk[0]], [ijk[1]], "+", color=(1.0, 0.8, 0.0), ms=14, mew=2)
    line = vol.lps_to_index(
        np.array(
            [
                [plane_x, -500.0, canal.centres_lps[mid][2]],
                [plane_x, 500.0, canal.centres_lps[mid][2]],
            ]
        )
    )
    axes[1].plot(line[:, 0], line[:, 1], "--", color=(0.3, 0.8, 1.0), lw=1, label="sagittal plane")
    axes[1].set_xlim(0, vol.shape[2] - 1)
    axes[1].set_ylim(vol.shape[1] - 1, 0)
    axes[1].legend(loc="lower left", fontsize=8)
    axes[1].set_title(f"axial slice {k}: detected canal centre")
    # coronal slice of the CT through the mean canal centre, superior up, with the annotation slab's extent
    j = int(np.clip(round(float(vol.lps_to_index(canal.mean_centre_lps)[1])), 0, vol.shape[1] - 1))
    axes[2].imshow(vol.hu[:, j, :], cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], origin="lower",
                   aspect=vol.spacing[2] / vol.spacing[0])
    half = (ANNOTATION_SLICES - 1) / 2.0 * SAGITTAL_STEP_MM
    for dx in (-half, half):
        edge = vol.lps_to_index([plane_x + dx, canal.mean_centre_lps[1], canal.mean_centre_lps[2]])
        axes[2].axvline(edge[0], color=(0.3, 0.8, 1.0), lw=1, ls="--")
    cij = vol.lps_to_index(canal.centres_lps)
    axes[2].plot(cij[:, 0], cij[:, 2], ".", color=(1.0, 0.8, 0.0), ms=3)
    axes[2].set_title("coronal CT: canal centres and the 16 mm slab")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_annotation(ann: Annotation, out_dir: str | Path) -> Path:
    """Write the annotation files into ``out_dir`` atomically; returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".annotate.", dir=out_dir))
    try:
        images = ann.images
        write_image(
            images.annotation_geometry.to_sitk(images.annotation_hu.astype(np.float32)), tmp / "annotation_image.nii.gz"
        )
        write_image(
            images.candidate_geometry.to_sitk(images.candidates_hu.astype(np.float32)), tmp / "candidates.nii.gz"
        )
        (tmp / "canal.json").write_text(json.dumps(ann.canal_json(), indent=1), encoding="utf-8")
        preview_png(ann, tmp / "annotation_preview.png")
        for name in ANNOTATION_FILES:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def annotate(input_path: str | Path, out_dir: str | Path) -> Annotation:
    """Read a CT file or DICOM folder, prepare the annotation images and write them to ``out_dir``."""
    t0 = time.perf_counter()
    volume = read_ct(input_path)
    load = time.perf_counter() - t0
    ann = prepare(volume)
    ann.timings_s = {"load": load, **ann.timings_s}
    write_annotation(ann, out_dir)
    return ann
