"""The case's L1–L4 segmentation and trabecular patches as binary masks on the source series' axial frames.

**What the method looked at.** The R2U-Net segments the 10 candidate sagittal slices (0.8 mm apart: an 8 mm slab
centred on the spinal canal's sagittal plane, :data:`~LumbarBMDLib.sagittal.CANDIDATE_SLICES` ×
:data:`~LumbarBMDLib.sagittal.SAGITTAL_STEP_MM`); their probabilities are fused into ONE label image
(``CaseResult.labels``, uint8 ``(512, 512)``) on the slab's central plane (``CaseResult.label_geometry``). The method
therefore claims each vertebral body only on that 8 mm slab: it says nothing about the rest of the body (a lumbar
body is 35–60 mm wide). The body segment is that claim, neither more nor less:

* **vertebral body** = the fused sagittal label extruded across the slab: a CT voxel belongs to level L when its
  centre lies within half the slab (:func:`slab_half_thickness_mm`, 4 mm) of the label plane and the label pixel
  nearest to it (in the plane: the exact LPS → pixel inverse of ``SagittalGeometry.pixel_to_lps``) is L. No
  smoothing, no interpolation of labels; a voxel is in or out.
* **trabecular ROI** = the 32 × 32 patch of the level (0.5 mm pixels: 16 × 16 mm in the axial plane, rows
  anterior → posterior, columns right → left) at the patch's position (``TrabecularPatch.centre_lps`` is the LPS
  point of window pixel (16, 16), so the window spans −8.25 … +7.75 mm from it along x and y), through the three
  channels at −1, 0, +1 mm: a voxel belongs to it when its centre lies inside the 16 × 16 mm square and within
  1 mm + half a slice of the patch's plane (so that at least the slice the centre plane lies in, and the slices
  the outer channels were interpolated from, are in it).

Every mask is computed per source frame from that frame's own ImagePositionPatient / ImageOrientationPatient /
PixelSpacing, so it is valid for any orientation the series was stored in; only frames that the slab or a window can
reach are computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from LumbarBMDLib.dicom.source import SourceSeries
from LumbarBMDLib.patches import CHANNEL_STEP_MM, PATCH_PIXEL_MM, PATCH_SIZE
from LumbarBMDLib.sagittal import CANDIDATE_SLICES, SagittalGeometry

LEVELS = ("L1", "L2", "L3", "L4")


@dataclass
class LevelMasks:
    """Binary masks on the source frames that any of them reaches.

    Attributes:
        frames: int ``(m,)`` indices (ascending) of the source frames the arrays below hold: every frame that the
            body slab or a trabecular window can reach (the other frames are empty).
        bodies: ``{level: bool (m, rows, columns)}`` for every level with pixels in the label image.
        rois: ``{level: bool (m, rows, columns)}`` for every level with a trabecular patch.
        slab_half_mm: half the thickness of the slab the body labels were extruded across (mm).
    """

    frames: np.ndarray
    bodies: dict[str, np.ndarray]
    rois: dict[str, np.ndarray]
    slab_half_mm: float


def slab_half_thickness_mm(candidate_geometry: SagittalGeometry | None) -> float:
    """Half the thickness (mm) of the candidate slab the network segmented: ``n_slices × step / 2`` (10 × 0.8 mm / 2
    = 4 mm by default; the default slab when the candidates' geometry is unknown)."""
    if candidate_geometry is None:
        from LumbarBMDLib.sagittal import SAGITTAL_STEP_MM

        return CANDIDATE_SLICES * SAGITTAL_STEP_MM / 2.0
    return candidate_geometry.n_slices * candidate_geometry.step_mm / 2.0


def body_labels_on_frame(points_lps: np.ndarray, labels: np.ndarray, geometry: SagittalGeometry,
                         half_mm: float) -> np.ndarray:
    """Label value (0–4) of each point: the nearest label pixel when the point lies within ``half_mm`` of the plane.

    Args:
        points_lps: float ``(..., 3)`` LPS points (mm).
        labels: uint8 ``(size, size)`` label image on ``geometry``'s (single-slice) plane.
        geometry: its grid; its slice coordinate 0 is the label plane.
        half_mm: half the slab thickness (mm).

    Returns:
        uint8 array of shape ``points_lps.shape[:-1]``.
    """
    q = geometry.lps_to_pixel(points_lps)
    col = np.rint(q[..., 0]).astype(np.int64)
    row = np.rint(q[..., 1]).astype(np.int64)
    offset_mm = q[..., 2] * geometry.step_mm
    inside = ((np.abs(offset_mm) <= half_mm + 1e-6) & (col >= 0) & (col < labels.shape[1]) & (row >= 0)
              & (row < labels.shape[0]))
    out = np.zeros(points_lps.shape[:-1], dtype=np.uint8)
    out[inside] = labels[row[inside], col[inside]]
    return out


def roi_box_lps(centre_lps: np.ndarray, slice_spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) LPS corners (mm) of the box a trabecular patch covers (see the module docstring)."""
    c = np.asarray(centre_lps, dtype=float)
    lo_xy = -(PATCH_SIZE // 2) * PATCH_PIXEL_MM - PATCH_PIXEL_MM / 2
    hi_xy = (PATCH_SIZE - 1 - PATCH_SIZE // 2) * PATCH_PIXEL_MM + PATCH_PIXEL_MM / 2
    half_z = CHANNEL_STEP_MM + slice_spacing_mm / 2.0
    return c + np.array([lo_xy, lo_xy, -half_z]), c + np.array([hi_xy, hi_xy, half_z])


def _frames_reaching(source: SourceSeries, lo_z: float, hi_z: float) -> list[int]:
    """Indices of frames whose pixel centres can have a z in [lo_z, hi_z] (mm)."""
    n, rows, cols = source.shape
    out = []
    for k in range(n):
        corners = source.pixel_lps(k, np.array([0, rows - 1]), np.array([0, cols - 1])).reshape(-1, 3)
        if corners[:, 2].max() >= lo_z - 1e-6 and corners[:, 2].min() <= hi_z + 1e-6:
            out.append(k)
    return out


def level_masks(source: SourceSeries, labels: np.ndarray, label_geometry: SagittalGeometry,
                patch_centres: dict[str, np.ndarray], candidate_geometry: SagittalGeometry | None = None
                ) -> LevelMasks:
    """The body and trabecular-ROI masks of every level on the source frames (rules in the module docstring).

    Args:
        source: the source series (frames in the CT volume's order).
        labels: uint8 ``(512, 512)`` fused L1–L4 labels (``CaseResult.labels``).
        label_geometry: their single-slice sagittal grid (``CaseResult.label_geometry``).
        patch_centres: ``{level: LPS centre (mm)}`` of the levels that have a trabecular patch.
        candidate_geometry: the candidate slab's grid (its thickness is the extrusion's); default slab when None.
    """
    labels = np.asarray(labels, dtype=np.uint8)
    if labels.ndim == 3:
        labels = labels[0]
    _, rows, cols = source.shape
    half = slab_half_thickness_mm(candidate_geometry)
    present = [(v, name) for v, name in enumerate(LEVELS, start=1) if (labels == v).any()]
    body_frames: list[int] = []
    if present:
        rr, cc = np.nonzero(np.isin(labels, [v for v, _ in present]))
        pts = label_geometry.pixel_to_lps(np.stack([cc, rr, np.zeros_like(cc)], axis=1).astype(float))
        body_frames = _frames_reaching(source, pts[:, 2].min() - label_geometry.pixel_mm,
                                       pts[:, 2].max() + label_geometry.pixel_mm)
    boxes = {name: roi_box_lps(centre, source.slice_spacing_mm) for name, centre in patch_centres.items()}
    roi_frames = {name: _frames_reaching(source, lo[2], hi[2]) for name, (lo, hi) in boxes.items()}
    frames = np.array(sorted(set(body_frames).union(*roi_frames.values())), dtype=int)
    at = {int(k): i for i, k in enumerate(frames)}
    bodies = {name: np.zeros((len(frames), rows, cols), dtype=bool) for _, name in present}
    for k in body_frames:
        frame = body_labels_on_frame(source.pixel_lps(k), labels, label_geometry, half)
        for v, name in present:
            bodies[name][at[k]] = frame == v
    rois = {}
    for name, (lo, hi) in boxes.items():
        mask = np.zeros((len(frames), rows, cols), dtype=bool)
        for k in roi_frames[name]:
            p = source.pixel_lps(k)
            mask[at[k]] = np.all((p >= lo) & (p <= hi), axis=-1)
        rois[name] = mask
    return LevelMasks(frames, bodies, rois, half)
