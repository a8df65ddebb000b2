"""Vertebra localisation (paper §3.3, DESIGN.md "Method" 4): L1–L4 label image → one centre per level.

The sagittal label image (network output or an annotator's / radiologist's edited labels) lies on a plane
with an exact pixel → LPS mapping (:class:`~LumbarBMDLib.sagittal.SagittalGeometry`). For each level the
largest 8-connected component gives the centre (column, row) → an LPS point; in the axial LPS CT that point
gives the axial slice z (the paper's "z coordinate selects the axial slice") and the row y (anterior →
posterior) on which the trabecular patch is cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from LumbarBMDLib._compat import zip_strict
from LumbarBMDLib.sagittal import SagittalGeometry
from LumbarBMDLib.volume import CTVolume

LEVEL_NAMES = ("L1", "L2", "L3", "L4")
#: A vertebral body in a mid-sagittal section covers several hundred mm²; less is a fragment.
MIN_LEVEL_AREA_MM2 = 150.0

REASON_NOT_LABELLED = "not found: no pixels of this level in the label image"
REASON_FRAGMENT = "not found: the labelled region is too small for a vertebral body"
REASON_OUTSIDE_CT = "not found: the level's centre lies outside the CT volume"


@dataclass
class LevelLocation:
    """Where one level lies.

    Attributes:
        level: "L1".."L4".
        found: whether the level has a usable centre inside the CT.
        reason: why not ("" when found).
        centre_lps: float ``(3,)`` LPS point (mm) of the component's centroid on the label plane.
        area_mm2: area of the component on the sagittal plane (mm²).
        index: continuous (i, j, k) = (column x, row y, axial slice z) voxel coordinates of the centre in the
            axial LPS CT; None when the level is missing.
    """

    level: str
    found: bool
    reason: str = ""
    centre_lps: np.ndarray | None = None
    area_mm2: float = 0.0
    index: np.ndarray | None = None


def level_centres(labels: np.ndarray, geometry: SagittalGeometry, min_area_mm2: float = MIN_LEVEL_AREA_MM2
                  ) -> list[LevelLocation]:
    """Centre of each level's largest connected component on a sagittal label image.

    Args:
        labels: int ``(rows, cols)`` label image (0 background, 1–4 = L1–L4) on ``geometry``'s plane.
        geometry: the label image's grid; a single-slice grid (``n_slices == 1``) or a slab, in which case the
            labels are taken to lie on its central plane.
        min_area_mm2: smaller components do not count as a level (edited-away remnants, stray pixels).

    Returns:
        Four :class:`LevelLocation` (L1..L4) with ``centre_lps``; ``index`` is filled by :func:`locate_in_ct`.
    """
    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != 2:
        raise ValueError(f"expected a 2-D sagittal label image, got shape {labels.shape}")
    pixel_area = geometry.pixel_mm**2
    plane = (geometry.n_slices - 1) / 2.0
    out = []
    for value, name in enumerate(LEVEL_NAMES, start=1):
        mask = labels == value
        if not mask.any():
            out.append(LevelLocation(name, False, REASON_NOT_LABELLED))
            continue
        comps, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        sizes = np.bincount(comps.ravel())[1:]
        biggest = int(np.argmax(sizes)) + 1
        area = float(sizes[biggest - 1] * pixel_area)
        rows, cols = np.nonzero(comps == biggest)
        centre = geometry.pixel_to_lps([cols.mean(), rows.mean(), plane])
        if area < min_area_mm2:
            out.append(LevelLocation(name, False, f"{REASON_FRAGMENT} ({area:.0f} mm²)", centre, area))
            continue
        out.append(LevelLocation(name, True, "", centre, area))
    return out


def level_centres_in_image(label_image: sitk.Image, min_area_mm2: float = MIN_LEVEL_AREA_MM2) -> list[LevelLocation]:
    """Centre of each level's largest connected component in any label image with geometry (LPS).

    Works for the annotator's sagittal ``annotation_labels.nii.gz`` (512 × 512 × 1) as for 3-D body labels
    (e.g. the phantom's ``vertebrae.nii.gz``, values 1–4 for the L1–L4 bodies; other values are ignored).
    For a 3-D image the size limit applies to the component's largest cross-section in any axial slice.
    """
    arr = sitk.GetArrayFromImage(label_image)  # (k, j, i)
    spacing = label_image.GetSpacing()
    out = []
    for value, name in enumerate(LEVEL_NAMES, start=1):
        mask = arr == value
        if not mask.any():
            out.append(LevelLocation(name, False, REASON_NOT_LABELLED))
            continue
        comps, _ = ndimage.label(mask, structure=np.ones((3,) * arr.ndim, dtype=bool))
        sizes = np.bincount(comps.ravel())[1:]
        keep = comps == int(np.argmax(sizes)) + 1
        idx = np.argwhere(keep).mean(axis=0)[::-1]  # (i, j, k)
        centre = np.array(label_image.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx]))
        if arr.ndim == 3 and arr.shape[0] > 1 and arr.shape[1] > 1 and arr.shape[2] > 1:
            area = float(keep.sum(axis=(1, 2)).max() * spacing[0] * spacing[1])  # axial cross-section
        else:
            flat = [s for s, n in zip_strict(spacing, arr.shape[::-1]) if n > 1]
            area = float(keep.sum() * np.prod(flat))
        if area < min_area_mm2:
            out.append(LevelLocation(name, False, f"{REASON_FRAGMENT} ({area:.0f} mm²)", centre, area))
            continue
        out.append(LevelLocation(name, True, "", centre, area))
    return out


def locate_in_ct(locations: list[LevelLocation], volume: CTVolume) -> list[LevelLocation]:
    """Add each found level's voxel coordinates in the axial LPS CT; a centre outside the volume is missing."""
    upper = np.array(volume.hu.shape[::-1], dtype=float) - 0.5  # (i, j, k) bounds
    out = []
    for loc in locations:
        if not loc.found:
            out.append(loc)
            continue
        ijk = volume.lps_to_index(loc.centre_lps)
        if np.any(ijk < -0.5) or np.any(ijk > upper):
            out.append(LevelLocation(loc.level, False, REASON_OUTSIDE_CT, loc.centre_lps, loc.area_mm2))
            continue
        out.append(LevelLocation(loc.level, True, "", loc.centre_lps, loc.area_mm2, ijk))
    return out


def locate_vertebrae(labels: np.ndarray, geometry: SagittalGeometry, volume: CTVolume) -> list[LevelLocation]:
    """Label image → per-level centre, axial slice and row in ``volume`` (``level_centres`` + ``locate_in_ct``)."""
    return locate_in_ct(level_centres(labels, geometry), volume)
