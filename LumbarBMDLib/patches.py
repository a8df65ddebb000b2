"""Trabecular patches (paper §3.3, DESIGN.md "Method" 5): one 3-channel 32 × 32 patch per located vertebra.

The paper cuts, in the axial slice z of the vertebra's centre, a strip of height h = 32 centred on the centre's
row y, thresholds it, keeps the largest connected component (the vertebral body) and places an h × w = 32 × 32
window inside it that holds no cortex; channels 1 and 3 are the same window in slices z − 1 and z + 1; the
patch is windowed to [0, 255] and min–max normalised to [0, 1].

What this module does, stage by stage:

1. **Spacing policy** (so that 32 pixels cover the same bone on every scanner): each axial plane is resampled
   (linear) on a local grid of ``PATCH_PIXEL_MM`` = 0.5 mm, so the window covers 16 × 16 mm = 2.6 cm², the size
   of a QCT trabecular ROI. (The paper's native ≈ 0.7 mm pixels give 22 mm, which does not fit, clear of the
   blurred cortex, in a small body 24 mm deep scanned with 2 mm pixels: measured on the phantom.)
   The outer channels lie ``CHANNEL_STEP_MM`` = 1 mm above and below the centre plane
   (the paper's neighbouring 1 mm slices), interpolated between slices when the scan's slices are thicker.
2. **Vertebral body in the strip**: the strip (``STRIP_WIDTH_MM`` wide, ±20 mm anterior–posterior,
   centred on the level's centre) is thresholded at the body's own trabecular level plus ``CORTEX_MARGIN_HU``
   (the cortex and end plates are the bright structures: at least that much above the spongiosa after the
   scanner's blur, on every profile and thickness we model); the largest connected component of the
   *below-threshold* pixels that contains the centre is the spongiosa bounded by the cortex — the paper's
   "largest connected component" seen from the inside, which is what must hold no cortex. An osteoporotic body
   (spongiosa at muscle density) cannot be told from the psoas by a fixed threshold; a cortex-relative one can.
3. **Cortex-free window**: among the 32 × 32 positions whose pixels (all three channels) lie inside the spongiosa
   component, eroded by ``CORTEX_CLEARANCE_MM``, the one nearest the centre is chosen, if its centre lies within
   ``MAX_WINDOW_OFFSET_MM`` of the level's centre (a faint cortex must not let the window slide into the psoas).
   When none exists the level gets no patch and a reason (small or fractured body, end plate in the window),
   instead of a value measured on cortex.
4. **Normalisation**: the window [−150, 850] HU → [0, 255], then min–max to [0, 1] *over that fixed range*
   (i.e. ÷ 255). A per-patch min–max would erase the absolute density the regression needs.
5. **Metal**: a level with metal (> ``METAL_HU``) within ``METAL_SEARCH_MM`` of its centre gets no patch
   (ISCD: instrumented vertebrae are excluded; streaks also corrupt the HU around them).
6. **Damaged slices** (:func:`~LumbarBMDLib.volume.repair_damaged_slices`): a level whose patch would use a
   repaired slice gets no patch (its HU are interpolated, not measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from LumbarBMDLib.localisation import LevelLocation
from LumbarBMDLib.sagittal import WINDOW_HU
from LumbarBMDLib.volume import CTVolume

PATCH_SIZE = 32  # h = w = 32 (paper)
PATCH_PIXEL_MM = 0.5  # 32 px = 16 mm on every scanner
CHANNEL_STEP_MM = 1.0  # channels at z − 1 mm, z, z + 1 mm
STRIP_WIDTH_MM = 96.0  # left–right extent of the searched strip (a lumbar body is 35–60 mm wide)
SEARCH_ROWS_MM = 12.0  # the window may move up to this far anterior/posterior of the centre row
CORTEX_MARGIN_HU = 100.0  # threshold = spongiosa median + this: cortex, end plates, sclerosis lie above
CORTEX_CLEARANCE_MM = 0.5  # keep this far from any supra-threshold (cortical, already blurred) pixel
MAX_WINDOW_OFFSET_MM = 8.0  # the window centre stays this close to the level's centre (a body is ≥ 35 mm wide)
MIN_CORTEX_PIXELS = 17  # 4.3 mm²: smaller bright specks are noise or trabecular texture, not cortex
METAL_HU = 2500.0
METAL_SEARCH_MM = 35.0  # in-plane half-size of the box searched for metal around the centre
METAL_HALF_HEIGHT_MM = 18.0  # and its half-height (a lumbar body is 25–30 mm high)

REASON_NO_WINDOW = "no patch: no cortex-free 16 × 16 mm window fits in the vertebral body"
REASON_METAL = "no patch: metal (implant) in or next to the vertebral body"
REASON_OUTSIDE = "no patch: the neighbouring slices of the centre lie outside the CT"
REASON_DAMAGED = "no patch: a damaged slice of the CT (replaced by its neighbours' mean) passes through the patch"


@dataclass
class TrabecularPatch:
    """The trabecular patch of one level.

    Attributes:
        level: "L1".."L4".
        found: whether a patch was cut.
        reason: why not ("" when found); the level's localisation reason when it was not located.
        image: float32 ``(3, 32, 32)`` in [0, 1] (channels z − 1 mm, z, z + 1 mm; rows anterior → posterior,
            columns patient right → left); None when not found.
        centre_lps: LPS point (mm) of the window centre on the central channel; None when not found.
        mean_hu: mean HU of the window (all channels): the quantity a QCT ROI would report, for QA.
        spongiosa_hu: median HU of the spongiosa used for the cortex threshold.
    """

    level: str
    found: bool
    reason: str = ""
    image: np.ndarray | None = None
    centre_lps: np.ndarray | None = None
    mean_hu: float = float("nan")
    spongiosa_hu: float = float("nan")


def sample_axial_planes(volume: CTVolume, centre_lps: np.ndarray, half_rows: int, half_cols: int,
                        offsets_mm: tuple[float, ...] = (-CHANNEL_STEP_MM, 0.0, CHANNEL_STEP_MM),
                        pixel_mm: float = PATCH_PIXEL_MM) -> tuple[np.ndarray, np.ndarray]:
    """Resample axial planes around ``centre_lps`` on a square grid of ``pixel_mm``.

    Returns:
        ``planes`` float32 ``(len(offsets), 2·half_rows + 1, 2·half_cols + 1)`` HU (rows +P, columns +L; −1024
        outside the CT) and ``lps`` float ``(len(offsets), rows, cols, 3)``, the LPS point of every pixel.
    """
    rows = (np.arange(-half_rows, half_rows + 1) * pixel_mm)[:, None]
    cols = (np.arange(-half_cols, half_cols + 1) * pixel_mm)[None, :]
    planes, points = [], []
    for dz in offsets_mm:
        lps = np.empty(rows.shape[:1] + cols.shape[1:] + (3,))
        lps[..., 0] = centre_lps[0] + cols
        lps[..., 1] = centre_lps[1] + rows
        lps[..., 2] = centre_lps[2] + dz
        ijk = volume.lps_to_index(lps)
        plane = ndimage.map_coordinates(volume.hu, [ijk[..., 2], ijk[..., 1], ijk[..., 0]], order=1,
                                        mode="constant", cval=-1024.0, output=np.float32)
        planes.append(plane)
        points.append(lps)
    return np.stack(planes), np.stack(points)


def window_to_patch_unit(hu: np.ndarray) -> np.ndarray:
    """Window [−150, 850] HU → [0, 255] → [0, 1] (min–max over the fixed window range)."""
    lo, hi = WINDOW_HU
    grey = np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * 255.0
    return (grey / 255.0).astype(np.float32)


def _drop_specks(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """``mask`` without its 8-connected components smaller than ``min_pixels``."""
    lab, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[lab]


def spongiosa_mask(planes: np.ndarray, centre_rc: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The spongiosa bounded by the cortex: the connected below-threshold region around the centre.

    Args:
        planes: ``(3, rows, cols)`` HU, the centre at pixel ``centre_rc`` (row, column) of each plane.
    Returns:
        bool ``(rows, cols)`` mask common to the three planes, and the spongiosa median HU.
    """
    r, c = centre_rc
    k = max(2, round(5.0 / PATCH_PIXEL_MM))  # a 10 × 10 mm core
    core = planes[:, r - k : r + k + 1, c - k : c + k + 1]
    ref = float(np.median(core))
    smooth = ndimage.gaussian_filter(planes, sigma=(0, 1.4, 1.4))  # 0.7 mm: noise down, a cortex stays bright
    cortex = np.stack([_drop_specks(c, MIN_CORTEX_PIXELS) for c in smooth > ref + CORTEX_MARGIN_HU])
    outside_body = smooth < ref - 250.0  # fat or air: the body has ended without a visible cortex
    free = ~(cortex | outside_body)
    clearance = max(1, round(CORTEX_CLEARANCE_MM / PATCH_PIXEL_MM))
    common = np.ones(planes.shape[1:], dtype=bool)
    for plane_free in free:
        lab, _ = ndimage.label(plane_free)
        keep = lab == lab[r, c] if lab[r, c] else np.zeros_like(plane_free)
        common &= ndimage.binary_erosion(keep, iterations=clearance, border_value=0)
    return common, ref


def place_window(mask: np.ndarray, centre_rc: tuple[int, int], size: int = PATCH_SIZE,
                 max_offset_px: float | None = None) -> tuple[int, int] | None:
    """Top-left (row, col) of the ``size`` × ``size`` window fully inside ``mask`` nearest to ``centre_rc``, its
    centre at most ``max_offset_px`` from ``centre_rc`` (default ``MAX_WINDOW_OFFSET_MM``): where the cortex is
    too faint to close the body (coarse or osteoporotic scans), a window far from the centre would lie in the
    psoas, not in bone."""
    if max_offset_px is None:
        max_offset_px = MAX_WINDOW_OFFSET_MM / PATCH_PIXEL_MM
    inside = ndimage.minimum_filter(mask.astype(np.uint8), size=size, mode="constant", cval=0) > 0
    # minimum_filter centres the footprint at size // 2: window top-left = position − size // 2
    rr, cc = np.nonzero(inside)
    if rr.size == 0:
        return None
    top, left = rr - size // 2, cc - size // 2
    ok = (top >= 0) & (left >= 0) & (top + size <= mask.shape[0]) & (left + size <= mask.shape[1])
    if not ok.any():
        return None
    top, left, rr, cc = top[ok], left[ok], rr[ok], cc[ok]
    d2 = (top + (size - 1) / 2 - centre_rc[0]) ** 2 + (left + (size - 1) / 2 - centre_rc[1]) ** 2
    i = int(np.argmin(d2))
    if d2[i] > max_offset_px**2:
        return None
    return int(top[i]), int(left[i])


def metal_near(volume: CTVolume, centre_lps: np.ndarray, radius_mm: float = METAL_SEARCH_MM,
               half_height_mm: float = METAL_HALF_HEIGHT_MM) -> bool:
    """Whether any voxel above ``METAL_HU`` lies in the box of ±``radius_mm`` (x, y) and ±``half_height_mm`` (z)
    around ``centre_lps`` (the vertebra with its pedicles: where screws go)."""
    corners = np.array([[dx, dy, dz] for dx in (-1, 1) for dy in (-1, 1) for dz in (-1, 1)], dtype=float)
    corners *= [radius_mm, radius_mm, half_height_mm]
    ijk = volume.lps_to_index(np.asarray(centre_lps, dtype=float) + corners)
    lo = np.clip(np.floor(ijk.min(axis=0)).astype(int), 0, None)
    hi = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 1, volume.hu.shape[::-1])
    if np.any(hi <= lo):
        return False
    return bool((volume.hu[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] > METAL_HU).any())


def trabecular_patch(volume: CTVolume, location: LevelLocation,
                     hu_transform: tuple[float, float] = (1.0, 0.0)) -> TrabecularPatch:
    """Cut the 3-channel trabecular patch of one located level.

    Args:
        volume: the axial LPS CT (HU).
        location: the level's centre (from :func:`~LumbarBMDLib.localisation.locate_vertebrae`).
        hu_transform: ``(slope, intercept)`` applied to the sampled HU before windowing (a scanner
            calibration onto the reference scanner's scale; identity by default).
    """
    if not location.found:
        return TrabecularPatch(location.level, False, location.reason)
    half_rows = round(SEARCH_ROWS_MM / PATCH_PIXEL_MM) + PATCH_SIZE // 2
    half_cols = round(STRIP_WIDTH_MM / 2 / PATCH_PIXEL_MM)
    centre = np.asarray(location.centre_lps, dtype=float)
    kz = volume.lps_to_index(centre)[2]
    dz = CHANNEL_STEP_MM / abs(volume.affine[2, 2]) if abs(volume.affine[2, 2]) > 0 else 1.0
    if kz - dz < -0.5 or kz + dz > volume.hu.shape[0] - 0.5:
        return TrabecularPatch(location.level, False, REASON_OUTSIDE)
    reach = CHANNEL_STEP_MM + abs(volume.affine[2, 2])  # the outer channels, interpolated from the next slices
    if any(abs(z - centre[2]) < reach for z in volume.metadata.get("damaged_slices_z_mm", [])):
        return TrabecularPatch(location.level, False, REASON_DAMAGED)
    planes, lps = sample_axial_planes(volume, centre, half_rows, half_cols)
    slope, intercept = hu_transform
    planes = planes * np.float32(slope) + np.float32(intercept)
    if metal_near(volume, centre):
        return TrabecularPatch(location.level, False, REASON_METAL)
    mask, ref = spongiosa_mask(planes, (half_rows, half_cols))
    at = place_window(mask, (half_rows, half_cols))
    if at is None:
        return TrabecularPatch(location.level, False, REASON_NO_WINDOW, spongiosa_hu=ref)
    t, left = at
    window = planes[:, t : t + PATCH_SIZE, left : left + PATCH_SIZE]
    centre_win = lps[1, t + PATCH_SIZE // 2, left + PATCH_SIZE // 2]
    return TrabecularPatch(location.level, True, "", window_to_patch_unit(window), centre_win,
                           float(window.mean()), ref)


def trabecular_patches(volume: CTVolume, locations: list[LevelLocation],
                       hu_transform: tuple[float, float] = (1.0, 0.0)) -> list[TrabecularPatch]:
    """:func:`trabecular_patch` for every level (L1..L4 order kept)."""
    return [trabecular_patch(volume, loc, hu_transform) for loc in locations]
