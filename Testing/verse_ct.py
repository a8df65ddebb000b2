"""A CT-like volume rendered from the real VerSe vertebra label map (sub-verse004, T9–L5), for tests of the level
counting on a real chain: real vertebral shapes, sizes, pitch and curve, with the intensities of a CT.

The label map has no CT, no ribs and no sacrum. Each vertebra's mask becomes bone (a 1 mm cortex of 700 HU around
200 HU spongiosa); the canal it encloses is CSF; the rest of the trunk is soft tissue (45 HU) inside a fat layer and
air. Ribs are added to T9–T12 (the vertebrae that bear them): tubes of 5 mm radius from beside each body's upper
half, laterally and backwards, then forwards around the trunk, descending; T12's is the shortest. L1–L5 get none,
so T12 is the last rib-bearing vertebra, as in this subject. Noise (SD 15 HU) and a 0.7 mm blur make it a scan.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from LumbarBMDLib.volume import CTVolume, reorient_to_lps

VERSE_LEVELS = {16: "T9", 17: "T10", 18: "T11", 19: "T12", 20: "L1", 21: "L2", 22: "L3", 23: "L4", 24: "L5"}
RIB_LENGTH = {16: 1.0, 17: 1.0, 18: 0.85, 19: 0.6}  # relative lengths (the 11th and 12th ribs are floating, short)


def _segment_distance(pts: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    d = p1 - p0
    t = np.clip(((pts - p0) @ d) / max(float(d @ d), 1e-9), 0.0, 1.0)
    return np.linalg.norm(pts - (p0 + t[:, None] * d), axis=1)


def render_verse_ct(path: Path, seed: int = 0, ribs: bool = True) -> tuple[CTVolume, np.ndarray]:
    """The CT-like volume (axial LPS, HU) and its label map (VerSe ids) on the same grid."""
    img = reorient_to_lps(sitk.ReadImage(str(path)))
    labels = sitk.GetArrayFromImage(img).astype(np.uint8)
    ct = CTVolume(hu=np.zeros(labels.shape, np.float32), spacing=img.GetSpacing(), origin=img.GetOrigin(),
                  direction=np.array(img.GetDirection()).reshape(3, 3), source="VerSe sub-verse004 (rendered)")
    # pad the narrow label map (161 mm wide) to a trunk-sized field of view on 1 mm pixels, 2 mm slices
    pad_x = 110
    labels = np.pad(labels, ((0, 0), (40, 40), (pad_x, pad_x)))
    origin = ct.index_to_lps([-pad_x, -40, 0])
    ct = CTVolume(hu=np.zeros(labels.shape, np.float32), spacing=ct.spacing, origin=tuple(origin),
                  direction=ct.direction, source=ct.source)
    nz, ny, nx = labels.shape
    jj, ii = np.arange(ny)[None, :, None], np.arange(nx)[None, None, :]
    bone = labels > 0
    spine_x = np.mean(np.nonzero(bone)[2])
    spine_y = np.mean(np.nonzero(bone)[1])
    # trunk: an ellipse centred 60 mm in front of the spine, 150 × 120 mm semi-axes; 15 mm of fat under the skin
    sx, sy = ct.spacing[0], ct.spacing[1]
    ex = (ii - spine_x) * sx / 150.0
    ey = (jj - (spine_y - 60.0 / sy)) * sy / 120.0
    r = np.sqrt(ex**2 + ey**2)
    trunk = np.where(r < 1.0, 45.0, -1000.0).astype(np.float32)
    trunk[(r < 1.0) & (r > 0.88)] = -100.0
    hu = np.repeat(trunk, nz, axis=0)
    # the canal: the hole each vertebra's mask encloses (per slice), and CSF between the laminae of neighbours
    canal = np.zeros_like(bone)
    for k in range(nz):
        canal[k] = ndimage.binary_fill_holes(bone[k]) & ~bone[k]
    hu[canal] = 10.0
    # bone: cortex (the outer 1 mm) and spongiosa
    inside = ndimage.binary_erosion(bone, iterations=1)
    hu[bone] = 700.0
    hu[inside] = 200.0
    if ribs:
        _add_ribs(hu, labels, ct)
    rng = np.random.default_rng(seed)
    hu = ndimage.gaussian_filter(hu, (0.35, 0.7, 0.7)) + rng.normal(0.0, 15.0, hu.shape).astype(np.float32)
    return CTVolume(hu=hu.astype(np.float32), spacing=ct.spacing, origin=ct.origin, direction=ct.direction,
                    source=ct.source), labels


def _add_ribs(hu: np.ndarray, labels: np.ndarray, ct: CTVolume) -> None:
    for value, scale in RIB_LENGTH.items():
        k, j, i = np.nonzero(labels == value)
        pts = ct.index_to_lps(np.c_[i, j, k].astype(float))
        # the body: the mask's front half; ribs leave beside its back half, in the upper part of its height
        y_front, y_back = np.percentile(pts[:, 1], 5), np.percentile(pts[:, 1], 60)
        body = pts[pts[:, 1] <= 0.5 * (y_front + y_back)]
        centre = body.mean(axis=0)
        half_width = 0.5 * np.ptp(body[:, 0])
        for side in (-1.0, 1.0):
            start = centre + np.array([side * (half_width + 2.0), 0.6 * (y_back - centre[1]), 6.0])
            path = [start]
            for step in (np.array([side * 30.0, 14.0, -8.0]), np.array([side * 35.0, 2.0, -14.0]),
                         np.array([side * 25.0, -40.0, -16.0]), np.array([side * 10.0, -50.0, -12.0])):
                path.append(path[-1] + step * scale)
            lo = np.min(path, axis=0) - 8.0
            hi = np.max(path, axis=0) + 8.0
            i0, j0, k0 = np.floor(ct.lps_to_index(lo)).astype(int)
            i1, j1, k1 = np.ceil(ct.lps_to_index(hi)).astype(int)
            i0, j0, k0 = max(i0, 0), max(j0, 0), max(k0, 0)
            i1, j1, k1 = min(i1, hu.shape[2] - 1), min(j1, hu.shape[1] - 1), min(k1, hu.shape[0] - 1)
            kk, jj, ii = np.meshgrid(np.arange(k0, k1 + 1), np.arange(j0, j1 + 1), np.arange(i0, i1 + 1), indexing="ij")
            box = ct.index_to_lps(np.c_[ii.ravel(), jj.ravel(), kk.ravel()].astype(float))
            dist = np.min([_segment_distance(box, p0, p1) for p0, p1 in itertools.pairwise(path)],
                          axis=0).reshape(kk.shape)
            region = hu[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1]
            free = labels[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1] == 0
            region[(dist <= 5.0) & free] = 700.0
            region[(dist <= 3.8) & free] = 250.0
