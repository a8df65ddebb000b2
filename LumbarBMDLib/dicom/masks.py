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
    """Binary masks on the source frames that any of them reaches, one array for all segments (what the SEG takes).

    Attributes:
        frames: int ``(m,)`` indices (ascending) of the source frames ``array`` holds: every frame that the body slab
            or a trabecular window can reach (the other frames are empty).
        array: bool ``(m, rows, columns, S)``: segment ``s`` of frame ``frames[i]`` is ``array[i, :, :, s]``.
        segments: ``[(level, kind), …]`` of the ``S`` segments, kind ``"body"`` or ``"roi"``: the bodies of the levels
            with pixels in the label image (L1 … L4 order), then the ROIs of the levels with a trabecular patch.
        slab_half_mm: half the thickness of the slab the body labels were extruded across (mm).

    Memory: ``m × rows × columns × S`` bytes, e.g. 137 × 512 × 512 × 8 = 287 MB for L1–L4 at 1 mm slices.
    """

    frames: np.ndarray
    array: np.ndarray
    segments: list[tuple[str, str]]
    slab_half_mm: float

    def _of(self, kind: str) -> dict[str, np.ndarray]:
        return {lv: self.array[..., s] for s, (lv, kd) in enumerate(self.segments) if kd == kind}

    @property
    def bodies(self) -> dict[str, np.ndarray]:
        """``{level: bool (m, rows, columns)}`` views of the body segments."""
        return self._of("body")

    @property
    def rois(self) -> dict[str, np.ndarray]:
        """``{level: bool (m, rows, columns)}`` views of the trabecular-ROI segments."""
        return self._of("roi")


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


def pixel_window(source: SourceSeries, k: int, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice]:
    """(rows, columns) slices of frame ``k`` that hold every pixel centre inside the LPS box [lo, hi] (mm), plus one
    pixel of margin; empty slices when the box misses the frame."""
    n_rows, n_cols = source.shape[1:]
    ipp, row_dir, col_dir = source.frame_lps[k]
    dr, dc = source.pixel_spacing
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    c = (corners - ipp) @ row_dir / dc
    r = (corners - ipp) @ col_dir / dr
    r0, r1 = max(int(np.floor(r.min())) - 1, 0), min(int(np.ceil(r.max())) + 2, n_rows)
    c0, c1 = max(int(np.floor(c.min())) - 1, 0), min(int(np.ceil(c.max())) + 2, n_cols)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _window_lps(source: SourceSeries, k: int, window: tuple[slice, slice]) -> np.ndarray:
    rows, cols = window
    return source.pixel_lps(k, np.arange(rows.start, rows.stop), np.arange(cols.start, cols.stop))


def level_masks(source: SourceSeries, labels: np.ndarray, label_geometry: SagittalGeometry,
                patch_centres: dict[str, np.ndarray], candidate_geometry: SagittalGeometry | None = None
                ) -> LevelMasks:
    """The body and trabecular-ROI masks of every level on the source frames (rules in the module docstring).

    Only the pixels of each frame that the slab's (or a window's) LPS bounding box can reach are computed.

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
    body_box = None
    if present:
        rr, cc = np.nonzero(np.isin(labels, [v for v, _ in present]))
        ends = np.array([[cc.min(), rr.min(), 0.0], [cc.max(), rr.max(), 0.0]], dtype=float)
        pts = label_geometry.pixel_to_lps(ends)
        margin = label_geometry.pixel_mm
        plane_x = float(pts[0, 0])
        body_box = (np.array([plane_x - half, pts[:, 1].min() - margin, pts[:, 2].min() - margin]),
                    np.array([plane_x + half, pts[:, 1].max() + margin, pts[:, 2].max() + margin]))
        body_frames = _frames_reaching(source, body_box[0][2], body_box[1][2])
    boxes = {name: roi_box_lps(patch_centres[name], source.slice_spacing_mm) for name in LEVELS
             if name in patch_centres}
    roi_frames = {name: _frames_reaching(source, lo[2], hi[2]) for name, (lo, hi) in boxes.items()}
    frames = np.array(sorted(set(body_frames).union(*roi_frames.values())), dtype=int)
    at = {int(k): i for i, k in enumerate(frames)}
    segments = [(name, "body") for _, name in present] + [(name, "roi") for name in boxes]
    array = np.zeros((len(frames), rows, cols, len(segments)), dtype=bool)
    for k in body_frames:
        win = pixel_window(source, k, *body_box)
        frame = body_labels_on_frame(_window_lps(source, k, win), labels, label_geometry, half)
        for s, (v, _) in enumerate(present):
            array[at[k], win[0], win[1], s] = frame == v
    for s, (name, (lo, hi)) in enumerate(boxes.items(), start=len(present)):
        for k in roi_frames[name]:
            win = pixel_window(source, k, lo, hi)
            p = _window_lps(source, k, win)
            array[at[k], win[0], win[1], s] = np.all((p >= lo) & (p <= hi), axis=-1)
    return LevelMasks(frames, array, segments, half)
