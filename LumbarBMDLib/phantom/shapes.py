"""Signed-distance shape primitives and partial-volume painting for the phantom.

Every anatomical structure is an implicit shape evaluated on the voxel centres of a bounding box
in a local frame. ``signed distance < 0`` is inside (mm). Painting converts the signed distance to a
partial-volume fraction ``clip(0.5 - d / h, 0, 1)`` with ``h`` the voxel size, so thin structures
(a 0.6 mm cortical shell on a 2 mm grid) keep their correct mean value instead of aliasing away, which
is what a real scanner's detector integration does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Grid:
    """The phantom's voxel grid: axial LPS, identity direction.

    Attributes:
        shape: ``(nz, ny, nx)``.
        spacing: ``(sx, sy, sz)`` in mm.
        origin: LPS of voxel (0, 0, 0) in mm.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @property
    def voxel_mm(self) -> float:
        """Edge of the voxel of equal volume (mm): the partial-volume ramp width."""
        return float(np.prod(self.spacing) ** (1.0 / 3.0))

    def bbox(self, lo_lps: np.ndarray, hi_lps: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices ``(z, y, x)`` of the voxels inside the LPS box [lo, hi]; None if empty."""
        lo = (np.asarray(lo_lps) - self.origin) / self.spacing
        hi = (np.asarray(hi_lps) - self.origin) / self.spacing
        i0 = np.maximum(np.floor(np.minimum(lo, hi)).astype(int), 0)
        n = np.array(self.shape[::-1])
        i1 = np.minimum(np.ceil(np.maximum(lo, hi)).astype(int) + 1, n)
        if np.any(i1 <= i0):
            return None
        return (slice(i0[2], i1[2]), slice(i0[1], i1[1]), slice(i0[0], i1[0]))

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable LPS coordinate arrays (x ``(1,1,nx)``, y ``(1,ny,1)``, z ``(nz,1,1)``) of a box, mm."""
        zs, ys, xs = box
        x = self.origin[0] + self.spacing[0] * np.arange(xs.start, xs.stop, dtype=np.float32)
        y = self.origin[1] + self.spacing[1] * np.arange(ys.start, ys.stop, dtype=np.float32)
        z = self.origin[2] + self.spacing[2] * np.arange(zs.start, zs.stop, dtype=np.float32)
        return x[None, None, :], y[None, :, None], z[:, None, None]


@dataclass
class Frame:
    """A local orthonormal frame: ``centre`` (LPS mm) and rows ``axes`` = (u, v, w) unit vectors in LPS."""

    centre: np.ndarray
    axes: np.ndarray

    def local(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local coordinates (u, v, w) in mm of broadcastable LPS coordinate arrays."""
        dx, dy, dz = x - self.centre[0], y - self.centre[1], z - self.centre[2]
        a = self.axes.astype(np.float32)
        u = a[0, 0] * dx + a[0, 1] * dy + a[0, 2] * dz
        v = a[1, 0] * dx + a[1, 1] * dy + a[1, 2] * dz
        w = a[2, 0] * dx + a[2, 1] * dy + a[2, 2] * dz
        return u, v, w

    def to_lps(self, uvw: np.ndarray) -> np.ndarray:
        """LPS point(s) ``(..., 3)`` of local coordinates ``(..., 3)``."""
        return np.asarray(self.centre) + np.asarray(uvw, dtype=float) @ self.axes

    def corners(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """LPS axis-aligned bounding box of the local box [lo, hi]."""
        c = np.array([[a, b, d] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for d in (lo[2], hi[2])])
        p = self.to_lps(c)
        return p.min(axis=0), p.max(axis=0)


def rotation(tilt_rad: float = 0.0, roll_rad: float = 0.0, yaw_rad: float = 0.0) -> np.ndarray:
    """Rows (u, v, w) of a frame: u ≈ +L, v ≈ +P, w ≈ +S, tilted in the sagittal plane (about L),
    rolled in the coronal plane (about P) and turned about the long axis (yaw), in that order."""
    ct, st = np.cos(tilt_rad), np.sin(tilt_rad)
    cr, sr = np.cos(roll_rad), np.sin(roll_rad)
    cy, sy = np.cos(yaw_rad), np.sin(yaw_rad)
    rx = np.array([[1, 0, 0], [0, ct, st], [0, -st, ct]])  # tilt: w = (0, sin, cos) leans toward +P
    ry = np.array([[cr, 0, sr], [0, 1, 0], [-sr, 0, cr]])  # roll: w leans toward +L
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    m = ry @ rx @ rz
    return m.T  # rows = images of the unit axes


def ellipse_distance(u: np.ndarray, v: np.ndarray, a: float | np.ndarray, b: float | np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm) to the ellipse (u/a)² + (v/b)² = 1 (first-order, exact on the axes)."""
    f = np.sqrt((u / a) ** 2 + (v / b) ** 2) + 1e-6
    grad = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2) / f + 1e-6
    return (f - 1.0) / grad


def ellipsoid_distance(u, v, w, a: float, b: float, c: float) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipsoid with semi-axes a, b, c."""
    f = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2) + 1e-6
    grad = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2 + (w / c**2) ** 2) / f + 1e-6
    return (f - 1.0) / grad


def box_distance(u, v, w, hu: float, hv: float, hw: float) -> np.ndarray:
    """Signed distance (mm) to a box of half-sizes hu, hv, hw (max-norm approximation, exact on faces)."""
    return np.maximum(np.maximum(np.abs(u) - hu, np.abs(v) - hv), np.abs(w) - hw)


def segment_distance(x, y, z, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Unsigned distance (mm) of LPS points to the segment p0–p1."""
    d = np.asarray(p1, dtype=np.float32) - np.asarray(p0, dtype=np.float32)
    length2 = float(d @ d) + 1e-9
    t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / length2
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2)


def fraction(distance: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Partial-volume fraction in [0, 1] of a signed distance (mm): 1 inside, 0 outside, linear ramp."""
    return np.clip(0.5 - distance / voxel_mm, 0.0, 1.0).astype(np.float32)


def paint(target: np.ndarray, box: tuple[slice, slice, slice], frac: np.ndarray, value: float | np.ndarray) -> None:
    """Composite ``value`` over ``target[box]`` with partial-volume weights ``frac`` (in place)."""
    view = target[box]
    view += frac * (np.asarray(value, dtype=np.float32) - view)


def stamp(labels: np.ndarray, box: tuple[slice, slice, slice], frac: np.ndarray, label: int) -> None:
    """Write ``label`` into ``labels[box]`` where the structure covers at least half the voxel (in place)."""
    view = labels[box]
    view[np.broadcast_to(frac >= 0.5, view.shape)] = label
