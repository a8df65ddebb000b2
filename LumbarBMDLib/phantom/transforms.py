"""Faults and unusual geometry applied to a phantom case, its 3-D truth labels carried along.

For the tests and the identification benchmark (``benchmarks/eval_identification.py``): the anatomy stays known, so
whether every level is identified on the right vertebra, or refused for the right reason, can be checked.

* :func:`flip_head_foot`: the voxels reversed along z with the header unchanged (a mislabelled export): the sacrum
  then lies above the ribs and the numbering must be refused.
* :func:`crop_to_levels`: only some levels in the field of view (e.g. L1–L2, or T12–L4 without the sacrum).
* :func:`oblique_grid`: the same anatomy on a grid with rotated direction cosines (an oblique reconstruction).
* :func:`tilted_patient`: the anatomy rotated (a patient lying obliquely, a tilted spine), on an axial grid.
* :func:`damage_slice`: one axial slice replaced by air (a dropped slice) or by noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from LumbarBMDLib._compat import zip_strict
from LumbarBMDLib.phantom import PhantomCase
from LumbarBMDLib.phantom.anatomy import BODY_LABELS
from LumbarBMDLib.volume import CTVolume, reorient_to_lps


@dataclass
class Transformed:
    """A transformed phantom CT with its truth labels on the same grid (uint8, :data:`BODY_LABELS` values)."""

    ct: CTVolume
    labels: np.ndarray
    name: str


def _as_volume(img: sitk.Image, source: str) -> CTVolume:
    return CTVolume.from_sitk(reorient_to_lps(img), source=source)


def flip_head_foot(case: PhantomCase) -> Transformed:
    """The slices in reverse order, origin and direction unchanged: the anatomy is upside down in LPS."""
    ct = CTVolume(hu=np.ascontiguousarray(case.ct.hu[::-1]), spacing=case.ct.spacing, origin=case.ct.origin,
                  direction=case.ct.direction, source=case.ct.source + " (flipped head to foot)")
    return Transformed(ct, np.ascontiguousarray(case.labels[::-1]), "flipped head/foot")


def crop_to_levels(case: PhantomCase, top: str, bottom: str, margin_mm: float = 6.0) -> Transformed:
    """The axial slices from ``margin_mm`` above body ``top`` to ``margin_mm`` below body ``bottom`` (names of
    :data:`BODY_LABELS`, e.g. "L1", "L2"; "S" for the sacrum)."""
    z = case.ct.index_to_lps(np.c_[np.zeros(case.ct.shape[0]), np.zeros(case.ct.shape[0]),
                                   np.arange(case.ct.shape[0])])[:, 2]
    def extent(name: str) -> np.ndarray:
        return z[np.flatnonzero((case.labels == BODY_LABELS[name]).any(axis=(1, 2)))]

    z_hi = extent(top).max() + margin_mm
    z_lo = extent(bottom).min() - margin_mm
    k = np.flatnonzero((z >= z_lo) & (z <= z_hi))
    ct = CTVolume(hu=case.ct.hu[k[0] : k[-1] + 1].copy(), spacing=case.ct.spacing,
                  origin=tuple(case.ct.index_to_lps([0, 0, k[0]])), direction=case.ct.direction,
                  source=case.ct.source + f" ({top}–{bottom} only)")
    return Transformed(ct, case.labels[k[0] : k[-1] + 1].copy(), f"{top}–{bottom} only")


def _rotation(angle_deg: float, axis: str) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def _resample(case: PhantomCase, direction: np.ndarray, transform: sitk.Transform, name: str) -> Transformed:
    img = case.ct.to_sitk(np.float32)
    lab = sitk.GetImageFromArray(case.labels)
    lab.CopyInformation(img)
    size = np.array(img.GetSize())
    spacing = np.array(img.GetSpacing())
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size]))
    extent = np.abs(direction) @ (spacing * size)  # enlarge so that the rotated anatomy stays inside
    new_size = np.ceil(extent / spacing).astype(int)
    ref = sitk.Image([int(v) for v in new_size], sitk.sitkFloat32)
    ref.SetSpacing(tuple(spacing))
    ref.SetDirection(tuple(direction.flatten()))
    ref.SetOrigin(tuple(centre - direction @ (spacing * (new_size - 1) / 2)))
    ct = sitk.Resample(img, ref, transform, sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    labels = sitk.Resample(lab, ref, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    vol = _as_volume(ct, case.ct.source + f" ({name})")
    return Transformed(vol, sitk.GetArrayFromImage(reorient_to_lps(labels)), name)


def oblique_grid(case: PhantomCase, angle_deg: float = 30.0, axis: str = "x") -> Transformed:
    """The same anatomy sampled on a grid whose direction cosines are rotated by ``angle_deg`` about ``axis``."""
    return _resample(case, _rotation(angle_deg, axis), sitk.Transform(), f"oblique grid {angle_deg:g}° about {axis}")


def tilted_patient(case: PhantomCase, angle_deg: float = 30.0, axis: str = "x") -> Transformed:
    """The anatomy rotated by ``angle_deg`` about ``axis`` through the volume's centre, on an axial grid."""
    img = case.ct.to_sitk(np.float32)
    centre = img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()])
    rot = sitk.Euler3DTransform()
    rot.SetCenter(centre)
    rot.SetMatrix(tuple(_rotation(-angle_deg, axis).flatten()))  # Resample maps output → input points
    return _resample(case, np.eye(3), rot, f"patient tilted {angle_deg:g}° about {axis}")


def damage_slice(case: PhantomCase, level: str = "L3", where: float = 0.0, kind: str = "air",
                 seed: int = 0) -> Transformed:
    """Replace the axial slice at fraction ``where`` of body ``level``'s height (0 = its centre, 0.5 = its top) by
    air (``kind="air"``, a dropped slice) or by uniform noise −1000..1000 HU (``kind="noise"``)."""
    value = BODY_LABELS[level]
    ks = np.flatnonzero((case.labels == value).any(axis=(1, 2)))
    k = round(float(np.mean(ks) + where * (ks.max() - ks.min())))
    hu = case.ct.hu.copy()
    if kind == "air":
        hu[k] = -1024
    else:
        hu[k] = np.random.default_rng(seed).uniform(-1000, 1000, hu[k].shape).astype(hu.dtype)
    ct = CTVolume(hu=hu, spacing=case.ct.spacing, origin=case.ct.origin, direction=case.ct.direction,
                  source=case.ct.source + f" (slice {k} damaged: {kind})")
    return Transformed(ct, case.labels, f"damaged slice ({kind}) in {level}")


def contrast_distractors(case: PhantomCase, seed: int = 0) -> Transformed:
    """What a contrast-enhanced CT puts in front of the spine and the phantom lacks: a contrast-filled heart above
    L1 (an ellipsoid of 200–300 HU with brighter chambers, as in a chest CT that reaches L1–L2), a brighter aorta
    touching the bodies' front left (300–400 HU, arterial phase), and bowel gas in front of L3–L5. Bone is never
    painted over; the truth labels are unchanged."""
    rng = np.random.default_rng(seed)
    ct = case.ct
    hu = ct.hu.astype(np.float32)
    bone = case.labels > 0
    nz, ny, nx = hu.shape
    kk, jj, ii = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij", sparse=True)
    x = ct.origin[0] + ii * ct.spacing[0]
    y = ct.origin[1] + jj * ct.spacing[1]
    z = ct.origin[2] + kk * ct.spacing[2]
    levels = case.truth["levels"]
    top = levels.get("T11") or levels["L1"]
    c_top = np.asarray(top["centre_lps"])
    # the heart: 55–75 mm in front of the upper bodies, its lower part at the level of T12–L1
    hc = c_top + np.array([rng.uniform(-20, 20), -rng.uniform(70, 90), rng.uniform(10, 40)])
    a, b, c = rng.uniform(55, 70), rng.uniform(45, 60), rng.uniform(45, 60)
    heart = ((x - hc[0]) / a) ** 2 + ((y - hc[1]) / b) ** 2 + ((z - hc[2]) / c) ** 2 <= 1.0
    chambers = ((x - hc[0]) / (0.55 * a)) ** 2 + ((y - hc[1]) / (0.55 * b)) ** 2 + ((z - hc[2]) / (0.6 * c)) ** 2 <= 1.0
    hu[heart & ~bone] = rng.uniform(180, 230)
    hu[chambers & ~bone] = rng.uniform(280, 350)
    # the aorta: along the bodies' front left, touching them
    names = [n for n in ("T11", "T12", "L1", "L2", "L3", "L4") if n in levels]
    pts = np.array([levels[n]["centre_lps"] for n in names], float)
    depth = np.array([levels[n]["body_mm"]["depth"] for n in names], float)
    value = rng.uniform(300, 400)
    radius = rng.uniform(10, 13)
    for p, d in zip_strict(pts, depth):
        centre = p + np.array([6.0, -(d / 2 + radius - 2.0), 0.0])
        tube = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius**2) & (np.abs(z - centre[2]) <= 20.0)
        hu[tube & ~bone] = value
    # bowel gas in front of L3–L5
    for _ in range(6):
        n = names[min(len(names) - 1, rng.integers(3, len(names) + 1))]
        p = np.asarray(levels[n]["centre_lps"]) + np.array([rng.uniform(-60, 60), -rng.uniform(60, 120),
                                                             rng.uniform(-20, 20)])
        r = rng.uniform(8, 20)
        gas = ((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) <= r**2
        hu[gas & ~bone] = -950.0
    out = CTVolume(hu=hu.astype(np.int16), spacing=ct.spacing, origin=ct.origin, direction=ct.direction,
                   source=ct.source + " (contrast distractors)")
    return Transformed(out, case.labels, "contrast distractors")
