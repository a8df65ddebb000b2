"""A curved frame along the spinal canal, and the CT straightened on it.

The frame follows the canal's centre line (:class:`~LumbarBMDLib.canal.CanalResult`) by arc length ``s`` (mm, from
the top of the scan downwards). At each ``s`` it has three unit axes: the tangent (inferior), ``lateral`` (toward the
patient's left, the LPS +x axis made perpendicular to the tangent) and ``anterior`` (perpendicular to both, toward
the patient's front). A point is ``(s, a, u)``: ``a`` mm in front of the canal's centre and ``u`` mm to the left.

Sampling the CT on the planes perpendicular to the tangent "straightens" the spine: the vertebral bodies lie in
front of the canal at ``a`` ≈ 5–60 mm, their endplates and discs run across the frame (tilted by the discs' wedge
only), and this holds for a lordotic lumbar spine, a kyphotic thoracic one, a scoliotic curve, a patient lying
obliquely or a volume with oblique direction cosines alike: every position is physical (LPS), never an index.

Beyond the canal's found ends the frame continues the last 30 mm's direction for ``EXTEND_MM`` (the sacrum below the
last found canal slice, the vertebra above the first), within the scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from LumbarBMDLib.canal import CanalResult
from LumbarBMDLib.volume import CTVolume

STEP_MM = 1.0  # spacing of the frame's planes along the centre line
SMOOTH_MM = 10.0  # σ of the centre line's smoothing: removes the per-slice jitter of the centres (≈ 1 mm) and keeps
# the spine's curves (lordosis, lumbosacral angle: radius of curvature ≥ 100 mm)
TANGENT_SMOOTH_MM = 4.0  # σ of the tangent's smoothing
EXTEND_MM = 80.0  # the frame continues this far beyond the canal's found ends (inside the scan): the canal may be lost
# for two vertebrae (an implant's streaks, the sacrum's flat canal) and the bodies there still belong to the chain
TREND_MM = 30.0  # ... in the direction of its last this-many mm


@dataclass
class Straightened:
    """The CT (or a label map) sampled on the frame's planes.

    Attributes:
        values: float32 ``(n_s, n_a, n_u)``; NaN outside the scan.
        s_mm: ``(n_s,)`` arc length of each plane (mm).
        a_mm: ``(n_a,)`` anterior offset of each row from the canal centre (mm; positive = in front).
        u_mm: ``(n_u,)`` lateral offset of each column (mm; positive = patient's left).
        plane_index: ``(n_s,)`` index of each plane in the frame.
    """

    values: np.ndarray
    s_mm: np.ndarray
    a_mm: np.ndarray
    u_mm: np.ndarray
    plane_index: np.ndarray

    @property
    def step_mm(self) -> float:
        """Distance between consecutive planes (mm)."""
        return float(self.s_mm[1] - self.s_mm[0]) if len(self.s_mm) > 1 else STEP_MM


@dataclass
class SpineFrame:
    """The curved frame along the canal, superior → inferior.

    Attributes:
        s_mm: ``(n,)`` arc length (mm) of each plane, 0 at the top.
        centre_lps: ``(n, 3)`` the canal centre line (LPS mm).
        tangent: ``(n, 3)`` unit vectors along the line, pointing inferior.
        lateral: ``(n, 3)`` unit vectors toward the patient's left (⊥ tangent).
        anterior: ``(n, 3)`` unit vectors toward the patient's front (⊥ tangent, ⊥ lateral).
        measured: ``(n,)`` True where the line comes from found canal centres, False where it was extended.
        top_at_scan / bottom_at_scan: whether the frame's first / last plane lies at the scan's edge (else the
            frame ends because the extension stopped, inside the scan).
    """

    s_mm: np.ndarray
    centre_lps: np.ndarray
    tangent: np.ndarray
    lateral: np.ndarray
    anterior: np.ndarray
    measured: np.ndarray
    top_at_scan: bool = True
    bottom_at_scan: bool = True

    @property
    def n(self) -> int:
        """Number of planes."""
        return len(self.s_mm)

    def points(self, plane: np.ndarray | int, a_mm: np.ndarray | float, u_mm: np.ndarray | float) -> np.ndarray:
        """LPS points ``(..., 3)`` of frame coordinates (plane index, a, u), broadcast together."""
        plane = np.asarray(plane, dtype=int)
        a = np.asarray(a_mm, dtype=float)[..., None]
        u = np.asarray(u_mm, dtype=float)[..., None]
        return self.centre_lps[plane] + a * self.anterior[plane] + u * self.lateral[plane]

    def plane_at(self, s_mm: float) -> int:
        """Index of the plane nearest to arc length ``s_mm``."""
        return int(np.clip(round((s_mm - self.s_mm[0]) / STEP_MM), 0, self.n - 1))

    def straighten(self, volume: CTVolume | np.ndarray, a_range: tuple[float, float], u_range: tuple[float, float],
                   step_mm: float = 1.0, every: int = 1, order: int = 1, reference: CTVolume | None = None
                   ) -> Straightened:
        """Sample ``volume`` (a CT, or an array on ``reference``'s grid such as a label map with ``order=0``) on
        every ``every``-th plane, over ``a`` and ``u`` in the given ranges (mm) at ``step_mm``."""
        grid = volume if isinstance(volume, CTVolume) else reference
        data = volume.hu if isinstance(volume, CTVolume) else volume
        planes = np.arange(0, self.n, max(1, int(every)))
        a = np.arange(a_range[0], a_range[1] + 1e-6, step_mm)
        u = np.arange(u_range[0], u_range[1] + 1e-6, step_mm)
        pts = self.points(planes[:, None, None], a[None, :, None], u[None, None, :])
        ijk = grid.lps_to_index(pts.reshape(-1, 3))
        out = np.empty(len(ijk), np.float32)
        ndimage.map_coordinates(data, [ijk[:, 2], ijk[:, 1], ijk[:, 0]], output=out, order=order, cval=np.nan,
                                prefilter=False)
        return Straightened(out.reshape(pts.shape[:3]), self.s_mm[planes], a, u, planes)


def _scan_z_range(volume: CTVolume) -> tuple[float, float]:
    nz, ny, nx = volume.shape
    corners = np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)], dtype=float)
    z = volume.index_to_lps(corners)[:, 2]
    return float(z.min()), float(z.max())


def spine_frame(volume: CTVolume, canal: CanalResult) -> SpineFrame:
    """The frame along the canal's centre line, smoothed and extended ``EXTEND_MM`` beyond its ends inside the scan.

    The centres (one per slice where the canal was found, linearly interpolated between) are resampled every mm of
    z, smoothed (σ ``SMOOTH_MM``), extended along the trend of their last ``TREND_MM`` and resampled by arc length.
    """
    pts = canal.interpolated_centres_lps[np.argsort(canal.interpolated_centres_lps[:, 2])]
    z = pts[:, 2]
    zz = np.arange(z.min(), z.max() + 1e-6, 1.0) if np.ptp(z) > 0 else z[:1]
    xy = np.stack([np.interp(zz, z, pts[:, d]) for d in (0, 1)], axis=1)
    xy = ndimage.gaussian_filter1d(xy, SMOOTH_MM, axis=0, mode="nearest")
    z_lo, z_hi = _scan_z_range(volume)

    def trend(sel: np.ndarray) -> np.ndarray:
        return np.polyfit(zz[sel], xy[sel], 1)[0] if sel.sum() >= 2 else np.zeros(2)

    below = np.arange(max(z_lo, zz[0] - EXTEND_MM), zz[0] - 0.5, 1.0)
    above = np.arange(zz[-1] + 1.0, min(z_hi, zz[-1] + EXTEND_MM) + 1e-6, 1.0)
    bottom_at_scan = zz[0] - EXTEND_MM <= z_lo + 1.0
    top_at_scan = zz[-1] + EXTEND_MM >= z_hi - 1.0
    xy_below = xy[0] + (below[:, None] - zz[0]) * trend(zz <= zz[0] + TREND_MM)
    xy_above = xy[-1] + (above[:, None] - zz[-1]) * trend(zz >= zz[-1] - TREND_MM)
    line = np.r_[np.c_[xy_below, below], np.c_[xy, zz], np.c_[xy_above, above]][::-1]  # superior → inferior
    measured_z = (line[:, 2] >= zz[0] - 0.5) & (line[:, 2] <= zz[-1] + 0.5)
    arc = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(line, axis=0), axis=1))]
    s = np.arange(0.0, arc[-1] + 1e-6, STEP_MM)
    centre = np.stack([np.interp(s, arc, line[:, d]) for d in range(3)], axis=1)
    measured = np.interp(s, arc, measured_z.astype(float)) > 0.5
    tangent = np.gradient(centre, axis=0) if len(s) > 1 else np.array([[0.0, 0.0, -1.0]])
    tangent = ndimage.gaussian_filter1d(tangent, TANGENT_SMOOTH_MM / STEP_MM, axis=0, mode="nearest")
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    left = np.array([1.0, 0.0, 0.0])
    lateral = left - (tangent @ left)[:, None] * tangent
    lateral /= np.linalg.norm(lateral, axis=1, keepdims=True)
    anterior = np.cross(tangent, lateral)
    anterior *= -np.sign(anterior[:, 1:2] + 1e-12)  # anterior is −y (LPS +y is posterior)
    return SpineFrame(s, centre, tangent, lateral, anterior, measured, top_at_scan, bottom_at_scan)
