"""Canal-centre detection on the axial slices (paper §3.1).

Per axial slice: threshold at 150 HU (bone), morphological closing, NOT, background removal (drop the
regions that touch the image border): what remains are the regions enclosed by bone. Then 3-D denoising
keeps the vertebral foramen only: the chain of enclosed regions that forms a continuous, roughly vertical
tube through many slices. Bowel gas and vessels are never enclosed by bone; the marrow of osteoporotic
vertebral bodies, renal sinus fat inside enhancing kidneys, holes in the pelvis or ribs are enclosed but
either too large, off the tube, or form a much shorter chain than the canal, which runs the whole length
of the spine in view.

Speed: the bone mask is max-pooled 2 × 2 in-plane before the morphology (the thin cortex survives a
max-pool, so rings stay closed), which makes a 512 × 512 × 400 volume a 256 × 256 × 400 problem.

The canal is enclosed by bone only at the pedicle levels (roughly 40 % of the slices at 1 mm; on 3–5 mm slices the
thin pedicles and laminae blur below 150 HU and the ring closes on a few slices only). A second pass, guided by that
tube, follows the canal on the other slices as the dark region of CSF and epidural fat bounded by the vertebral
body or the disc in front and the laminae behind (:func:`track_canal`, a star-shaped contour cast from the tube's
prediction); it accepts a centre only where the contour is closed on most sides, dark inside and within a few mm
of the prediction, so a wrong centre is refused rather than reported. :attr:`CanalResult.interpolated_centres_lps`
fills the slices in between along the tube for users that need every slice.

The sagittal position is the **median** of the centres' x (:attr:`CanalResult.sagittal_x_lps`), not their mean: a
few centres in the wrong structure (a contrast-filled vessel, a kidney's medulla) cannot move the plane.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.volume import CTVolume

BONE_THRESHOLD_HU = 150.0
CLOSING_RADIUS_MM = 2.5
MIN_AREA_MM2 = 40.0  # smallest plausible lumbar/thoracic canal cross-section is ≈ 100 mm²
MAX_AREA_MM2 = 700.0  # lumbar canal ≈ 200–450 mm²; a vertebral body's marrow ≈ 800–1600 mm²
MIN_FILL = 0.45  # area / bounding-box area: rejects thin crescents and irregular gaps
MAX_WIDTH_MM = 33.0  # interpedicular canal width is 21–30 mm; a vertebral body's marrow is 38–48 mm wide, which
# separates the two even when severe osteoporosis makes the marrow as dark as the canal
MAX_MEAN_HU = 40.0  # canal contents (CSF 0–15 HU, epidural fat ≈ −80 HU, cord ≈ 35 HU; real example: mean 13) vs the
# marrow of even osteoporotic bone (pedicles, facets: 45–80 HU)
SOFT_MAX_HU = 100.0  # enclosed pixels above this are marrow, not canal: cuts the canal from a vertebral body's
# marrow where the thin posterior wall of the body drops below 150 HU (common at 2–3 mm slices)
MAX_LINK_MM = 3.0  # largest in-plane step between linked slices ...
LINK_SLOPE = 0.45  # ... plus this much per mm of z front-to-back (the canal's lordotic tilt; tan 24°) ...
LINK_SLOPE_X = 0.2  # ... and this much per mm of z sideways (scoliosis moves the canal far less than lordosis)
OUTLIER_MM = 7.0  # a centre this far from the running median of its neighbours is dropped
PARTIAL_AREA = 0.75  # a foramen smaller than this × the running median area is only partly enclosed (endplates)
MIN_BODY_FRACTION = 0.04  # bone fraction of the box in front of the canal (a vertebral body's cortex and marrow)
MIN_WIDTH_MM = 10.0  # the canal is at least this wide and MIN_DEPTH_MM deep (thoracic 15–17 × 14 mm, lumbar wider);
MIN_DEPTH_MM = 8.0  # the marrow of a pedicle or a facet (4–8 mm across) is not
MIDLINE_MM = 10.0  # the bone in front of the canal is centred within this of it (see candidate_regions)
MAX_GAP_MM = 45.0  # longest run without a closed ring: one vertebral pitch (on 3 mm slices the ring may close
# on a single slice per vertebra)
MIN_CHAIN_MM = 40.0  # a canal shorter than this is not trusted
MIN_FOUND_SLICES = 5
MIN_SEED_MM = 15.0  # the bone-closed tube that guides the tracking must span this (3 mm slices: one vertebra) …
MIN_SEED_SLICES = 3  # … over this many slices

# Second pass (track_canal): the canal where bone does not close it, as a star-shaped dark region.
TRACK_WALL_HU = 60.0  # canal contents (CSF 0–15 HU, epidural fat ≈ −100, cord ≈ 35) lie below; the disc (median
# 84 HU on the real example, 10th percentile 61), ligamentum flavum, muscle and bone above
TRACK_RAYS = 32
TRACK_MAX_RADIUS_MM = 18.0  # a ray that meets no wall within this distance escaped (an intervertebral foramen)
TRACK_STEP_MM = 0.5
TRACK_SMOOTH_MM = 1.0  # in-plane Gaussian before casting (thin-slice noise ≈ 20–40 HU would end rays early)
TRACK_MIN_CLOSED = 0.65  # fraction of rays that must meet a wall: the foramina open at most a third of the contour
TRACK_ANTERIOR_MM = 14.0  # the body's posterior wall or the disc must close the front within this distance ...
TRACK_POSTERIOR_MM = 25.0  # ... and the laminae / ligamentum flavum the back within this one
TRACK_SECTOR_DEG = 35.0  # half-width of the anterior and posterior sectors
TRACK_AREA_MM2 = (50.0, 650.0)  # the contour's area (thoracic canal ≈ 150 mm², lumbar 200–450 mm²)
TRACK_MAX_MEAN_HU = 45.0  # mean inside the contour: CSF and fat, not myocardium or renal medulla (40–80 HU)
TRACK_MAX_SHIFT_MM = 5.0  # from the tube's prediction: farther is another structure, refused
TRACK_TREND_MM = 15.0  # beyond the tube's ends the prediction continues the trend of the last this-many mm (short
# enough to follow the lordosis as it turns)
TRACK_BEYOND_MM = 45.0  # beyond the ends of the bone-closed tube, follow the canal until this long without a centre
# (one vertebral pitch: the contour may fail on every slice through a disc at 5 mm slices)
TRACK_SIDEWAYS_MM = 3.0  # ... and within this (+ 0.1 mm per mm beyond the end) of the tube's sideways trend
TRACK_ITERATIONS = 4  # re-centre the contour on its own centroid this many times
SMOOTH_WINDOW_MM = 15.0  # the final centre line: a centre farther than OUTLIER_FINAL_MM from the median of its
OUTLIER_FINAL_MM = 4.0  # neighbours within ±SMOOTH_WINDOW_MM is dropped


@dataclass
class CanalResult:
    """Where the spinal canal is.

    Attributes:
        centres_lps: ``(n, 3)`` canal centres (LPS mm), one per axial slice where the canal was found.
        slice_indices: ``(n,)`` axial slice index ``k`` of each centre.
        areas_mm2: ``(n,)`` cross-section area of the foramen (mm²): the bone-enclosed region, or the tracked
            contour where bone does not close the canal.
        mean_centre_lps: mean of the centres (LPS mm).
        interpolated_centres_lps: ``(m, 3)`` centres on every slice from the lowest to the highest found
            slice, linearly interpolated between found slices.
        interpolated_slice_indices: ``(m,)`` their slice indices.
        drift_mm: lateral (x) range of the found centres (mm): how far the canal leaves the single
            sagittal plane (scoliosis).
    """

    centres_lps: np.ndarray
    slice_indices: np.ndarray
    areas_mm2: np.ndarray
    mean_centre_lps: np.ndarray
    interpolated_centres_lps: np.ndarray = field(repr=False)
    interpolated_slice_indices: np.ndarray = field(repr=False)
    drift_mm: float = 0.0
    enclosed: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.enclosed is None:
            self.enclosed = np.ones(len(self.slice_indices), bool)

    @property
    def sagittal_x_lps(self) -> float:
        """LPS x (mm) of the sagittal plane: the median of the centres' x (robust to a few wrong centres)."""
        return float(np.median(self.centres_lps[:, 0]))

    def sagittal_x_between(self, z_lo_mm: float, z_hi_mm: float) -> float:
        """Median x (LPS mm) of the centres with z in ``[z_lo_mm, z_hi_mm]`` (e.g. the levels to be measured, so a
        scoliotic thoracic spine does not move the lumbar plane); all centres when fewer than 3 lie there."""
        z = self.centres_lps[:, 2]
        sel = (z >= z_lo_mm) & (z <= z_hi_mm)
        return float(np.median(self.centres_lps[sel if sel.sum() >= 3 else slice(None), 0]))

    def centre_at_z(self, z_mm: np.ndarray | float) -> np.ndarray:
        """The canal centre line at LPS height(s) ``z_mm``: ``(..., 3)`` LPS points, linear between the centres and
        constant beyond the ends."""
        z = np.asarray(z_mm, dtype=float)
        pts = self.interpolated_centres_lps
        order = np.argsort(pts[:, 2])
        zz = pts[order, 2]
        out = np.stack([np.interp(z, zz, pts[order, d]) for d in (0, 1)] + [z], axis=-1)
        return out

    def as_json(self) -> dict:
        """The canal.json object (DESIGN.md contract, plus extra fields)."""
        return {
            "centres_lps": np.round(self.centres_lps, 3).tolist(),
            "mean_centre_lps": np.round(self.mean_centre_lps, 3).tolist(),
            "sagittal_x_lps": round(self.sagittal_x_lps, 3),
            "slices_found": len(self.slice_indices),
            "slice_indices": self.slice_indices.astype(int).tolist(),
            "areas_mm2": np.round(self.areas_mm2, 1).tolist(),
            "enclosed_by_bone": [bool(v) for v in self.enclosed],
            "drift_x_mm": round(float(self.drift_mm), 2),
        }


def bone_mask(hu: np.ndarray, pool: int) -> np.ndarray:
    """Threshold at 150 HU after max-pooling ``pool × pool`` in-plane: bool ``(nz, ny // pool, nx // pool)``.

    Max-pooling the HU before the threshold equals pooling the thresholded mask ("any bone in the block").
    """
    _, ny, nx = hu.shape
    ny2, nx2 = ny // pool * pool, nx // pool * pool
    pooled = hu[:, :ny2:pool, :nx2:pool]
    for dj in range(pool):
        for di in range(pool):
            if dj or di:
                pooled = np.maximum(pooled, hu[:, dj:ny2:pool, di:nx2:pool])
    return pooled > BONE_THRESHOLD_HU


_IN_PLANE = np.array([[[0] * 3] * 3, [[0, 1, 0], [1, 1, 1], [0, 1, 0]], [[0] * 3] * 3])  # slices independent


def enclosed_regions(bone: np.ndarray, closing_px: int, workers: int = 2) -> np.ndarray:
    """Per slice: closing, NOT, background removal → bool mask of regions enclosed by bone, same shape.

    Slices are independent, so chunks of slices run in parallel threads (scipy.ndimage releases the GIL).
    """
    bounds = np.linspace(0, bone.shape[0], 2 * workers + 1).astype(int)
    out = np.empty_like(bone)

    def run(i: int) -> None:
        out[bounds[i] : bounds[i + 1]] = _enclosed_chunk(bone[bounds[i] : bounds[i + 1]], closing_px)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, range(len(bounds) - 1)))
    return out


def _enclosed_chunk(bone: np.ndarray, closing_px: int) -> np.ndarray:
    if bone.shape[0] == 0:
        return bone.copy()
    pad = closing_px + 1
    padded = np.pad(bone, ((0, 0), (pad, pad), (pad, pad)))
    closed = ndimage.binary_closing(padded, structure=_disk(closing_px)[None])[:, pad:-pad, pad:-pad]
    labels, _ = ndimage.label(~closed, structure=_IN_PLANE)
    border = np.unique(np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(),
                                       labels[:, :, -1].ravel()]))
    keep = np.ones(labels.max() + 1, bool)
    keep[border] = False
    keep[0] = False
    return keep[labels]


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 1)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx**2 + yy**2) <= r * r + 0.5


@dataclass
class _Candidates:
    k: np.ndarray  # slice index
    xy: np.ndarray  # (n, 2) centroid in mm, in-plane physical offsets from voxel (0, 0)
    ij: np.ndarray  # (n, 2) centroid in full-resolution (i, j) index units
    area: np.ndarray  # mm²
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # label id in ``labels``
    labels: np.ndarray | None = None  # the (pooled) label volume of the enclosed regions


def candidate_regions(
    enclosed: np.ndarray, hu_pooled: np.ndarray, spacing_xy_mm: tuple[float, float], pool: int,
    bone: np.ndarray | None = None,
) -> _Candidates:
    """Connected enclosed regions per slice with plausible canal size (``MIN_WIDTH_MM``–``MAX_WIDTH_MM`` wide, at least
    ``MIN_DEPTH_MM`` deep), shape and content (mean HU), and, when
    ``bone`` (the pooled bone mask) is given, with a vertebral body in front: at least ``MIN_BODY_FRACTION`` of
    bone in the box 8–50 mm anterior and ±15 mm lateral of the region's centroid, the bone of the box ±25 mm wide
    centred within ``MIDLINE_MM`` of it (the canal is in the vertebra's midline; a hole in a pedicle is not)."""
    labels, n = ndimage.label(enclosed, structure=_IN_PLANE)
    if n == 0:
        return _Candidates(np.zeros(0, int), np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), np.zeros(0, int), labels)
    idx = np.arange(1, n + 1)
    kk, jj, ii = np.nonzero(labels)
    lab = labels[kk, jj, ii]
    counts = np.bincount(lab, minlength=n + 1)[1:]
    mean_j = np.bincount(lab, weights=jj, minlength=n + 1)[1:] / np.maximum(counts, 1)
    mean_i = np.bincount(lab, weights=ii, minlength=n + 1)[1:] / np.maximum(counts, 1)
    k = np.bincount(lab, weights=kk, minlength=n + 1)[1:] / np.maximum(counts, 1)
    mean_hu = np.bincount(lab, weights=hu_pooled[kk, jj, ii], minlength=n + 1)[1:] / np.maximum(counts, 1)
    objects = ndimage.find_objects(labels)
    bbox_area = np.array([(o[1].stop - o[1].start) * (o[2].stop - o[2].start) for o in objects], float)
    width_mm = np.array([o[2].stop - o[2].start for o in objects], float) * spacing_xy_mm[0] * pool
    depth_mm = np.array([o[1].stop - o[1].start for o in objects], float) * spacing_xy_mm[1] * pool
    px_area = spacing_xy_mm[0] * spacing_xy_mm[1] * pool * pool
    area = counts * px_area
    fill = counts / np.maximum(bbox_area, 1.0)
    ok = (area >= MIN_AREA_MM2) & (area <= MAX_AREA_MM2) & (fill >= MIN_FILL) & (mean_hu <= MAX_MEAN_HU)
    ok &= (width_mm <= MAX_WIDTH_MM) & (width_mm >= MIN_WIDTH_MM) & (depth_mm >= MIN_DEPTH_MM)
    # centroid of a pooled pixel p covers full-resolution pixels p*pool … p*pool+pool-1
    ci = (mean_i + 0.5) * pool - 0.5
    cj = (mean_j + 0.5) * pool - 0.5
    if bone is not None:
        px_x, px_y = spacing_xy_mm[0] * pool, spacing_xy_mm[1] * pool
        for m in np.flatnonzero(ok):
            kk_, j0, j1 = round(float(k[m])), int(mean_j[m] - 50.0 / px_y), int(mean_j[m] - 8.0 / px_y)
            i0, i1 = int(mean_i[m] - 15.0 / px_x), int(mean_i[m] + 15.0 / px_x) + 1
            rows = slice(max(j0, 0), max(j1, 0))
            box = bone[kk_, rows, max(i0, 0) : max(i1, 0)]
            # the canal lies in the vertebra's midline: the bone in front of it (±25 mm) is centred on it (a patient
            # rotated 15° or a rotated scoliotic vertebra moves it ≤ 8 mm), where a hole in a pedicle or a facet
            # has the body 15 mm or more to one side
            w0, w1 = int(mean_i[m] - 25.0 / px_x), int(mean_i[m] + 25.0 / px_x) + 1
            cols = np.nonzero(bone[kk_, rows, max(w0, 0) : max(w1, 0)])[1]
            offset = abs(cols.mean() + max(w0, 0) - mean_i[m]) * px_x if cols.size else np.inf
            ok[m] = box.size > 0 and box.mean() >= MIN_BODY_FRACTION and offset <= MIDLINE_MM
    sel = idx[ok] - 1
    return _Candidates(
        k=np.rint(k[sel]).astype(int),
        xy=np.c_[ci[sel] * spacing_xy_mm[0], cj[sel] * spacing_xy_mm[1]],
        ij=np.c_[ci[sel], cj[sel]],
        area=area[sel],
        label=idx[ok],
        labels=labels,
    )


def refine_centre(hu: np.ndarray, c: _Candidates, m: int, pool: int) -> np.ndarray:
    """Centroid (i, j) at full resolution of candidate ``m``: the non-bone pixels (≤ 150 HU) inside its pooled
    region dilated by one full-resolution pixel. Removes the half-pooled-pixel bias of the pooled centroid."""
    k = int(c.k[m])
    region = c.labels[k] == c.label[m]
    if pool == 1:
        jj, ii = np.nonzero(region)
        return np.array([ii.mean(), jj.mean()])
    js, is_ = np.nonzero(region)
    j0, j1, i0, i1 = js.min(), js.max() + 1, is_.min(), is_.max() + 1
    up = np.kron(region[j0:j1, i0:i1], np.ones((pool, pool), bool))
    up = ndimage.binary_dilation(np.pad(up, 1), iterations=1)
    fj0, fi0 = j0 * pool - 1, i0 * pool - 1
    ny, nx = hu.shape[1:]
    sj0, si0 = max(fj0, 0), max(fi0, 0)
    sj1, si1 = min(fj0 + up.shape[0], ny), min(fi0 + up.shape[1], nx)
    up = up[sj0 - fj0 : sj1 - fj0, si0 - fi0 : si1 - fi0]
    sel = up & (hu[k, sj0:sj1, si0:si1] <= BONE_THRESHOLD_HU)
    if sel.sum() < 4:
        return c.ij[m]
    jj, ii = np.nonzero(sel)
    return np.array([ii.mean() + si0, jj.mean() + sj0])


def longest_tube(c: _Candidates, spacing_z_mm: float) -> np.ndarray:
    """Indices of the candidates forming the longest vertical chain (3-D denoising).

    Dynamic programming over candidates sorted by slice: a candidate links to one on a lower slice when
    the step is at most ``MAX_LINK_MM`` + ``LINK_SLOPE`` × the z distance front-to-back (``LINK_SLOPE_X``
    sideways) and the z gap at most
    ``MAX_GAP_MM``. The score is the z extent covered plus one per found slice, minus half a point per mm
    of in-plane step; the best chain is traced back. A chain does not jump from the canal into the marrow
    of a vertebral body ~20 mm in front of it.
    """
    order = np.argsort(c.k, kind="stable")
    k = c.k[order]
    xy = c.xy[order]
    n = len(k)
    score = np.zeros(n)
    prev = np.full(n, -1)
    max_gap = max(1, int(np.ceil(MAX_GAP_MM / spacing_z_mm)))
    start = 0
    for m in range(n):
        while k[start] < k[m] - max_gap:
            start += 1
        lo = start
        hi = np.searchsorted(k, k[m], side="left")  # strictly lower slices
        best = 1.0
        if hi > lo:
            dz = (k[m] - k[lo:hi]) * spacing_z_mm
            dx, dy = np.abs(xy[m] - xy[lo:hi]).T
            step = np.hypot(dx, dy)
            ok = (dy <= MAX_LINK_MM + LINK_SLOPE * dz) & (dx <= MAX_LINK_MM + LINK_SLOPE_X * dz)
            if ok.any():
                cand = score[lo:hi] + dz + 1.0 - 0.5 * step
                cand[~ok] = -np.inf
                j = int(np.argmax(cand))
                if cand[j] > best:
                    best = cand[j]
                    prev[m] = lo + j
        score[m] = best
    end = int(np.argmax(score)) if n else -1
    chain = []
    while end >= 0:
        chain.append(end)
        end = prev[end]
    return order[np.array(chain[::-1], dtype=int)] if chain else np.zeros(0, int)


def consistent_segments(chain: np.ndarray, c: _Candidates, spacing_z_mm: float) -> np.ndarray:
    """Keep the part of a chain that forms one smooth tube.

    The chain is split where consecutive members step more than 4 mm + 0.35 × dz front-to-back or
    3 mm + 0.15 × dz sideways. Starting from the best segment (number of slices + z extent / 30 mm),
    neighbouring segments are added while their near end lies within 5 mm + 0.35 × dz front-to-back
    (3 mm + 0.15 × dz sideways) of the straight-line extrapolation of the kept tube's end (fitted over
    its last 30 mm); the others are dropped. This removes runs where the chain followed a parallel
    structure for a while (holes between metal streaks, a vertebral body's marrow).
    """
    if len(chain) < 3:
        return chain
    k, xy = c.k[chain], c.xy[chain]
    z = k * spacing_z_mm
    dx, dy = np.abs(np.diff(xy, axis=0)).T
    dzs = np.diff(z)
    breaks = np.flatnonzero((dy > 4.0 + 0.35 * dzs) | (dx > 3.0 + 0.15 * dzs)) + 1
    segs = np.split(np.arange(len(chain)), breaks)
    # dense runs of found slices are canal; sparse far-apart hits are usually holes beside implants or ribs
    best = int(np.argmax([len(s_) + (z[s_[-1]] - z[s_[0]]) / 30.0 for s_ in segs]))
    kept = list(segs[best])
    for direction in (-1, 1):  # below, then above
        i = best + direction
        while 0 <= i < len(segs):
            seg = segs[i]
            end = kept[0] if direction < 0 else kept[-1]
            near = [m for m in kept if abs(z[m] - z[end]) <= 30.0]
            if len(near) >= 2:
                coef = np.polyfit(z[near], xy[near], 1)
                target_z = z[seg[-1]] if direction < 0 else z[seg[0]]
                pred = coef[0] * target_z + coef[1]
            else:
                target_z = z[seg[-1]] if direction < 0 else z[seg[0]]
                pred = xy[end]
            probe = seg[-1] if direction < 0 else seg[0]
            dz = abs(target_z - z[end])
            ex, ey = np.abs(xy[probe] - pred)
            if ey <= 5.0 + 0.35 * dz and ex <= 3.0 + 0.15 * dz:
                kept = list(seg) + kept if direction < 0 else kept + list(seg)
            i += direction
    return chain[np.array(sorted(kept))]


def drop_outliers(chain: np.ndarray, c: _Candidates, spacing_z_mm: float, window_mm: float = 30.0) -> np.ndarray:
    """Drop chain members farther than ``OUTLIER_MM`` in-plane from the median of their ±``window_mm``
    neighbours, and partly enclosed foramina (area below ``PARTIAL_AREA`` × the neighbours' median): near the
    endplates the bone closes only the front of the canal and that region's centroid lies ~2 mm anterior."""
    k, xy, area = c.k[chain], c.xy[chain], c.area[chain]
    keep = np.ones(len(chain), bool)
    half = window_mm / spacing_z_mm
    for m in range(len(chain)):
        near = np.abs(k - k[m]) <= half
        if near.sum() >= 3:
            keep[m] = (np.hypot(*(xy[m] - np.median(xy[near], axis=0))) <= OUTLIER_MM) and (
                area[m] >= PARTIAL_AREA * np.median(area[near]))
    return chain[keep]


def _ray_directions(volume: CTVolume) -> tuple[np.ndarray, np.ndarray]:
    """The contour's rays: their angles (rad; 0 = patient's left, π/2 = posterior, LPS x–y) and the index step
    ``(di, dj)`` per mm along each, ``(TRACK_RAYS, 2)``, through the slice's own in-plane axes."""
    angles = np.linspace(0.0, 2.0 * np.pi, TRACK_RAYS, endpoint=False)
    axes = (volume.direction @ np.diag(volume.spacing))[:, :2]  # LPS mm per index step of i and j
    lps = np.stack([np.cos(angles), np.sin(angles), np.zeros_like(angles)])
    steps = np.linalg.lstsq(axes, lps, rcond=None)[0].T
    return angles, steps


@dataclass
class _Contour:
    """A star-shaped canal contour on one slice: centre (i, j), area (mm²), whether it passed the checks."""

    ij: np.ndarray
    area_mm2: float
    ok: bool


def _contour_radii(img: np.ndarray, centre: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) along each ray from ``centre`` (i, j in ``img``'s index) to the first pixel above
    ``TRACK_WALL_HU`` (NaN where the ray escapes), and the HU along the rays ``(rays, samples)``."""
    t = np.arange(TRACK_STEP_MM, TRACK_MAX_RADIUS_MM + 1e-6, TRACK_STEP_MM)
    ii = centre[0] + steps[:, :1] * t[None]
    jj = centre[1] + steps[:, 1:] * t[None]
    vals = ndimage.map_coordinates(img, [jj.ravel(), ii.ravel()], order=1, cval=-1000.0).reshape(ii.shape)
    wall = vals > TRACK_WALL_HU
    hit = wall.any(axis=1)
    return np.where(hit, t[np.argmax(wall, axis=1)], np.nan), vals


def canal_contour(img: np.ndarray, prior_ij: np.ndarray, angles: np.ndarray, steps: np.ndarray) -> _Contour:
    """The canal as a star-shaped dark region around ``prior_ij`` on one (smoothed) slice.

    Rays cast from the centre stop at the first pixel denser than canal contents; escaped rays (the
    intervertebral foramina) take the radius interpolated from their neighbours; the centre moves to the
    polygon's centroid, ``TRACK_ITERATIONS`` times. The contour passes when most rays are closed, the front
    (vertebral body or disc) and the back (laminae, ligamentum flavum) are closed within their distances, its
    area is a canal's and its inside is dark.
    """
    c = np.asarray(prior_ij, dtype=float)
    fail = _Contour(c, 0.0, False)
    area = 0.0
    for _ in range(TRACK_ITERATIONS):
        r, vals = _contour_radii(img, c, steps)
        closed = ~np.isnan(r)
        if closed.mean() < TRACK_MIN_CLOSED:
            return fail
        idx = np.arange(TRACK_RAYS)
        rr = r.copy()
        rr[~closed] = np.interp(idx[~closed], np.r_[idx[closed] - TRACK_RAYS, idx[closed], idx[closed] + TRACK_RAYS],
                                np.r_[r[closed], r[closed], r[closed]])
        x, y = rr * np.cos(angles), rr * np.sin(angles)
        x2, y2 = np.roll(x, -1), np.roll(y, -1)
        cross = x * y2 - x2 * y
        area = 0.5 * float(cross.sum())
        if area <= 0:
            return fail
        cx, cy = ((x + x2) * cross).sum() / (6 * area), ((y + y2) * cross).sum() / (6 * area)
        # mm offsets in LPS x–y → index steps: the steps matrix maps unit directions; solve with angles 0 and π/2
        c = c + cx * steps[0] + cy * steps[TRACK_RAYS // 4]
    r, vals = _contour_radii(img, c, steps)
    closed = ~np.isnan(r)
    sector = np.deg2rad(TRACK_SECTOR_DEG)
    diff = np.angle(np.exp(1j * (angles[:, None] - np.array([1.5 * np.pi, 0.5 * np.pi])[None])))
    front, back = np.abs(diff[:, 0]) <= sector, np.abs(diff[:, 1]) <= sector
    t = np.arange(TRACK_STEP_MM, TRACK_MAX_RADIUS_MM + 1e-6, TRACK_STEP_MM)
    inside = np.concatenate([vals[m, : max(1, int(np.searchsorted(t, 0.7 * r[m])))] for m in np.flatnonzero(closed)])
    ok = (
        closed.mean() >= TRACK_MIN_CLOSED
        and bool(closed[front].all()) and float(np.nanmax(r[front])) <= TRACK_ANTERIOR_MM
        and bool(closed[back].any()) and float(np.nanmin(r[back])) <= TRACK_POSTERIOR_MM
        and TRACK_AREA_MM2[0] <= area <= TRACK_AREA_MM2[1]
        and float(inside.mean()) <= TRACK_MAX_MEAN_HU
    )
    return _Contour(c, area, bool(ok))


def track_canal(volume: CTVolume, ks: np.ndarray, ij: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The canal on the slices where bone does not close it, guided by the bone-closed tube.

    Between the tube's slices the prediction is the linear interpolation of its centres; beyond its ends the canal
    is followed slice by slice (the prediction continues the last 30 mm's trend) until ``TRACK_BEYOND_MM`` pass
    without a centre. A contour counts only when :func:`canal_contour` accepts it within ``TRACK_MAX_SHIFT_MM`` of
    the prediction.

    Args:
        volume: the CT (axial LPS).
        ks: ``(n,)`` sorted slice indices of the bone-closed centres; ij: ``(n, 2)`` their (i, j).

    Returns:
        ``(k, ij, area_mm2)`` of the tracked centres (slices of ``ks`` excluded), sorted by slice.
    """
    sx, sy, sz = volume.spacing
    nz, ny, nx = volume.shape
    angles, steps = _ray_directions(volume)
    half = (int(np.ceil((TRACK_MAX_RADIUS_MM + 4.0) / sx)), int(np.ceil((TRACK_MAX_RADIUS_MM + 4.0) / sy)))
    sigma = (TRACK_SMOOTH_MM / sy, TRACK_SMOOTH_MM / sx)
    smooth = tuple(sg if sg >= 0.3 else 0.0 for sg in sigma)
    mm_per_index = np.array([sx, sy])

    def contour(k: int, prior: np.ndarray) -> _Contour | None:
        i0, j0 = round(float(prior[0])) - half[0], round(float(prior[1])) - half[1]
        if i0 < 0 or j0 < 0 or i0 + 2 * half[0] + 1 > nx or j0 + 2 * half[1] + 1 > ny:
            return None
        crop = volume.hu[k, j0 : j0 + 2 * half[1] + 1, i0 : i0 + 2 * half[0] + 1].astype(np.float32)
        if any(smooth):
            crop = ndimage.gaussian_filter(crop, smooth)
        got = canal_contour(crop, prior - np.array([i0, j0]), angles, steps)
        got.ij = got.ij + np.array([i0, j0])
        shift = float(np.hypot(*((got.ij - prior) * mm_per_index)))
        return got if got.ok and shift <= TRACK_MAX_SHIFT_MM else None

    found: dict[int, tuple[np.ndarray, float]] = {}
    strict = set(int(k) for k in ks)
    for k in range(int(ks.min()) + 1, int(ks.max())):
        if k in strict:
            continue
        prior = np.array([np.interp(k, ks, ij[:, 0]), np.interp(k, ks, ij[:, 1])])
        got = contour(k, prior)
        if got is not None:
            found[k] = (got.ij, got.area_mm2)
    lateral = np.array([1.0, 0.0]) / np.array([sx, sy])  # the index step along LPS x per mm (axial LPS volume)
    for direction in (-1, 1):
        track_k = list(ks.astype(int))
        track_ij = list(ij)
        end = int(ks.max() if direction > 0 else ks.min())
        # sideways the canal moves little (scoliosis ≤ 0.2 mm per mm of z): beyond the tube's end its sideways
        # position follows the tube's own trend, not the tracked centres, so the tracking cannot drift sideways
        tube = np.abs(ks - end) * sz <= 30.0
        x_trend = np.polyfit(ks[tube], ij[tube, 0], 1) if tube.sum() >= 2 else np.array([0.0, ij[ks == end][0, 0]])
        x_trend[0] = np.clip(x_trend[0], -LINK_SLOPE_X * sz / sx, LINK_SLOPE_X * sz / sx)
        k = end
        missed = 0.0
        while 0 <= k + direction < nz and missed < TRACK_BEYOND_MM:
            k += direction
            near = [m for m, kk in enumerate(track_k) if abs(kk - k) * sz <= max(TRACK_TREND_MM, 2.5 * sz)]
            if len(near) >= 2:
                kk = np.array([track_k[m] for m in near], float)
                pts = np.array([track_ij[m] for m in near])
                coef = np.polyfit(kk, pts, 1)
                prior = coef[0] * k + coef[1]
            else:
                prior = np.array(track_ij[int(np.argmin([abs(kk - k) for kk in track_k]))], float)
            prior = np.array([np.polyval(x_trend, k), prior[1]])
            got = contour(k, prior)
            beyond = abs(k - end) * sz
            if got is not None and abs(got.ij[0] - prior[0]) / lateral[0] > TRACK_SIDEWAYS_MM + 0.1 * beyond:
                got = None
            if got is None:
                missed += sz
                continue
            missed = 0.0
            found[k] = (got.ij, got.area_mm2)
            track_k.append(k)
            track_ij.append(got.ij)
    if not found:
        return np.zeros(0, int), np.zeros((0, 2)), np.zeros(0)
    order = sorted(found)
    return (np.array(order, int), np.array([found[k][0] for k in order]), np.array([found[k][1] for k in order]))


def smooth_centre_line(ks: np.ndarray, xy_mm: np.ndarray, spacing_z_mm: float) -> np.ndarray:
    """Keep the centres within ``OUTLIER_FINAL_MM`` (in-plane) of the median of their neighbours within
    ±``SMOOTH_WINDOW_MM`` (twice that at the ends of the line, where fewer than 4 neighbours lie so close):
    bool ``(n,)``."""
    keep = np.ones(len(ks), bool)
    for m in range(len(ks)):
        for half in (SMOOTH_WINDOW_MM, 2.0 * SMOOTH_WINDOW_MM):
            near = np.abs(ks - ks[m]) * spacing_z_mm <= half
            if near.sum() >= 5:
                break
        if near.sum() >= 3:
            keep[m] = np.hypot(*(xy_mm[m] - np.median(xy_mm[near], axis=0))) <= OUTLIER_FINAL_MM
    return keep


def _no_canal(extent_mm: float, n_slices: int) -> None:
    raise LumbarBMDError(
        "no spinal canal found: is this a CT of the abdomen or lumbar spine? "
        f"(a canal was traced over {extent_mm:.0f} mm in {n_slices} slices; at least "
        f"{MIN_CHAIN_MM:.0f} mm and {MIN_FOUND_SLICES} slices are needed)"
    )


def find_canal(volume: CTVolume) -> CanalResult:
    """Detect the canal centre on the axial slices: where bone encloses the vertebral foramen (the paper's rule),
    then, guided by that tube, where the dark canal is closed by the body or disc and the laminae
    (:func:`track_canal`).

    Args:
        volume: CT in HU, axial LPS (as returned by :func:`LumbarBMDLib.volume.read_ct`).

    Raises:
        LumbarBMDError: when no canal-like tube is found (not an abdomen/spine CT, no spine in view).
    """
    sx, sy, sz = volume.spacing
    pool = 2 if min(sx, sy) < 1.2 else 1
    bone = bone_mask(volume.hu, pool)
    closing_px = max(1, round(CLOSING_RADIUS_MM / (min(sx, sy) * pool)))
    enclosed = enclosed_regions(bone, closing_px)
    hu_pooled = volume.hu[:, : enclosed.shape[1] * pool : pool, : enclosed.shape[2] * pool : pool]
    enclosed &= hu_pooled < SOFT_MAX_HU
    cands = candidate_regions(enclosed, hu_pooled, (sx, sy), pool, bone)
    chain = longest_tube(cands, sz) if len(cands.k) else np.zeros(0, int)
    if len(chain):
        chain = drop_outliers(consistent_segments(chain, cands, sz), cands, sz)
    extent = float(np.ptp(cands.k[chain]) * sz) if len(chain) else 0.0
    if len(chain) < MIN_SEED_SLICES or extent < MIN_SEED_MM:
        _no_canal(extent, len(chain))
    ks = cands.k[chain]
    ij = np.array([refine_centre(volume.hu, cands, m, pool) for m in chain])
    areas = cands.area[chain]
    tk, tij, tarea = track_canal(volume, ks, ij)
    ks, ij = np.r_[ks, tk], np.r_[ij, tij]
    areas = np.r_[areas, tarea]
    enclosed = np.r_[np.ones(len(chain), bool), np.zeros(len(tk), bool)]
    order = np.argsort(ks, kind="stable")
    ks, ij, areas, enclosed = ks[order], ij[order], areas[order], enclosed[order]
    keep = smooth_centre_line(ks, ij * np.array([sx, sy]), sz)
    ks, ij, areas, enclosed = ks[keep], ij[keep], areas[keep], enclosed[keep]
    extent = float(np.ptp(ks) * sz) if len(ks) else 0.0
    if len(ks) < MIN_FOUND_SLICES or extent < MIN_CHAIN_MM:
        _no_canal(extent, len(ks))
    ijk = np.c_[ij, ks.astype(float)]
    centres = volume.index_to_lps(ijk)
    all_k = np.arange(ks.min(), ks.max() + 1)
    interp_ijk = np.c_[np.interp(all_k, ks, ijk[:, 0]), np.interp(all_k, ks, ijk[:, 1]), all_k.astype(float)]
    return CanalResult(
        centres_lps=centres,
        slice_indices=ks,
        areas_mm2=areas,
        mean_centre_lps=centres.mean(axis=0),
        interpolated_centres_lps=volume.index_to_lps(interp_ijk),
        interpolated_slice_indices=all_k,
        drift_mm=float(np.ptp(centres[:, 0])),
        enclosed=enclosed,
    )
