"""The vertebral-body chain in front of the canal, found on the CT (classical image analysis, no network).

On the straightened CT (:mod:`~LumbarBMDLib.spine.frame`) the vertebral bodies form a column in front of the canal,
and each disc is a band across it between two endplates. The endplates are the one feature every vertebra keeps:
a dense normal body is brighter than its discs, but an osteoporotic one (spongiosa 40–80 HU, the real TPTBox L3:
54 HU) is darker than them (disc 70–110 HU), while its endplates stay bright. So a disc is found as a **valley
between two close endplate peaks** of the column's profile, whatever the density:

1. **Column profile.** The mid-sagittal slab (|u| ≤ 8 mm) of the straightened CT, ``M(s, a)``. The column's
   front–back centre ``a_c(s)`` is the centroid of its bone-like pixels (smoothed along ``s``), so the profile
   follows the bodies where the frame does not (the sacrum below the canal's last slice).
2. **Disc evidence.** For tilts θ of ±45° (wedged discs, L5–S1, the lumbosacral angle), the profile along lines
   through ``(s, a_c(s))`` at tilt θ (median over 24 mm of depth); the valley depth
   ``D(s) = min(max above within w, max below within w) − P(s)`` with ``w = VALLEY_HALF_MM``: high in a disc (both
   endplates close), low inside a body (its endplates farther than ``w``). ``D`` is the best over the tilts.
3. **Chain.** Discs are the valley peaks chosen by dynamic programming: each chosen peak scores its normalised
   depth minus ``DISC_COST``; consecutive discs are one vertebral pitch apart (hard limits ``PITCH_LIMITS_MM``, a
   soft prior ``PITCH_PRIOR_MM``) and consecutive pitches change smoothly (``PITCH_CHANGE_WEIGHT`` × log-ratio²),
   so a basivertebral vein, a bone island or a Schmorl node inside a body does not split it, and a fractured or a
   transitional body is still one body. No disc is placed on a plane with metal in the body, and beside screws and
   rods only a valley of a disc's usual depth counts (an implant's streaks make far deeper ones); the evidence is
   normalised by a typical disc.
4. **Bodies** lie between consecutive discs, and between a disc and the scan's edge (marked as cut) when that piece
   holds bone (the 90th percentile of its column ≥ ``BODY_BONE_HU``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from LumbarBMDLib._compat import zip_strict
from LumbarBMDLib.canal import CanalResult
from LumbarBMDLib.spine.frame import SpineFrame, Straightened, spine_frame
from LumbarBMDLib.volume import CTVolume

MID_SLAB_MM = 8.0  # half-width of the mid-sagittal slab (a lumbar body is 40–50 mm wide, a thoracic one 28–36)
A_RANGE_MM = (-25.0, 80.0)  # rows of the straightened column: canal and posterior wall … front of the largest body
COLUMN_A_DEFAULT_MM = 22.0  # the body's centre in front of the canal's (canal radius 7–9 mm + half a body depth)
COLUMN_BONE_HU = (100.0, 300.0)  # weights of the column's centroid ramp from 0 to 1 between these
COLUMN_SMOOTH_MM = 8.0
COLUMN_FRONT_MM = 50.0  # the bodies end within this in front of the canal (posterior wall 6–10 mm + depth ≤ 40 mm)
COLUMN_A_LIMITS_MM = (6.0, 34.0)  # the body's centre lies here (thoracic ≈ 18, lumbar ≈ 25 mm in front; the
# sacrum curves back)
COLUMN_HALF_DEPTH_MAX_MM = 18.0  # half the deepest lumbar body's depth (27–35 mm in adults, osteophytes aside;
# thoracic 22–28 mm)
WALL_HU = 90.0  # bone behind the wall (osteoporotic trabecular bone 60–120 HU, the cortex brighter); the canal in
# front of it holds CSF and fat (≤ 40 HU)
WALL_RUN_MM = 4.0  # … over at least this depth (a single bright pixel may be an enhancing epidural vein)
WALL_SEARCH_MM = 25.0  # the wall lies within this of the canal's centre (canal radius 6–12 mm, frame error ≤ 8 mm)
WALL_MEDIAN_MM = 21.0  # the wall carried across a disc (≤ 16 mm) from the bodies above and below
DISC_DARK_HU = 130.0  # a disc (70–110 HU) or a vacuum disc, seen between bodies; a contrast-filled aorta or heart
# (200–500 HU) stays brighter along its whole length
INTERRUPTED_HALF_MM = 22.0  # a row of the column meets a disc within this (half the longest pitch, 45 mm)
INTERRUPTED_MIN = 0.08  # … over at least this fraction of the window (a disc's 4 mm in 45)
INTERRUPTED_SHIFT_MM = 4.0  # the interrupted rows' centre replaces the column's only when this far behind it (a
# vessel pulls it 5–15 mm forward; smaller differences come from the bodies' own front rows, e.g. an osteophyte)
PROFILE_HALF_DEPTH_MM = 12.0  # the disc profile takes the median over a_c ± this (the body's central 24 mm)
TILTS_DEG = np.arange(-45.0, 45.1, 5.0)  # disc tilts tried across the frame (wedged L5–S1 discs reach 30–40°)
VALLEY_HALF_MM = 8.0  # a valley needs an endplate within this distance above and below (disc ≤ 16 mm; a body's
# centre is ≥ 9 mm from its endplates: thoracic bodies are ≥ 18 mm tall, lumbar 24–30)
PROFILE_SMOOTH_MM = 0.7
MIN_VALLEY = 0.12  # peaks of the normalised valley below this are not disc candidates
VALLEY_SCALE_MIN_HU = 40.0  # the valley's normalisation (:func:`valley_scale`) is at least this
PROFILE_MAX_HU = 1000.0  # the column profile is clipped here (dense cortex ≤ 1000 HU; metal is far brighter)
METAL_HU = 2500.0  # titanium and steel implants; no bone reaches it
STEP_MM_FRAME = 1.0  # (the frame's plane spacing)
METAL_VALLEY_RATIO = 2.0  # beside metal, a valley deeper than this × a typical disc's is a streak
DISC_COST = 0.25  # a chosen disc scores its normalised valley minus this
PITCH_LIMITS_MM = (15.0, 58.0)  # disc-to-disc distance: upper thoracic ≈ 18 mm … lumbar ≤ 45 mm (+ margin)
PITCH_PRIOR_MM = (19.0, 48.0)  # no cost inside, quadratic outside (scale PITCH_PRIOR_SCALE_MM)
PITCH_PRIOR_SCALE_MM = 4.0
PITCH_CHANGE_WEIGHT = 4.0  # cost of log(pitch ratio)² between consecutive pitches (neighbours differ by ≤ 15 %)
BODY_BONE_HU = 120.0  # a piece between a disc and the scan's edge is a body when its column reaches this (90th
# percentile, endplate included): spongiosa, cortex or endplate; soft tissue (muscle ≈ 50, organs ≤ 70 HU) does not
MIN_BODY_MM = 6.0  # an edge piece shorter than this is not reported as a body


@dataclass
class Disc:
    """One intervertebral disc of the chain.

    Attributes:
        s_mm: arc length of the disc's centre on the column (mm).
        tilt_deg: tilt of the disc across the frame (degrees; positive = its front lies lower).
        strength: normalised valley depth (≥ ``MIN_VALLEY``; ≈ 1 for a clear disc).
        top_s_mm / bottom_s_mm: the endplate peaks above and below (mm).
        centre_lps: LPS point (mm) of the disc's centre on the column.
        normal_lps: unit LPS normal of the disc plane, pointing inferior.
    """

    s_mm: float
    tilt_deg: float
    strength: float
    top_s_mm: float
    bottom_s_mm: float
    centre_lps: np.ndarray
    normal_lps: np.ndarray

    @property
    def height_mm(self) -> float:
        """Endplate-to-endplate distance across the disc (mm)."""
        return self.bottom_s_mm - self.top_s_mm

    def below(self, lps: np.ndarray) -> np.ndarray:
        """Whether LPS points ``(..., 3)`` lie below (inferior to) the disc's plane."""
        return (np.asarray(lps, dtype=float) - self.centre_lps) @ self.normal_lps > 0.0


@dataclass
class VertebralBody:
    """One vertebral body of the chain (superior → inferior order in :attr:`VertebralChain.bodies`).

    Attributes:
        top_s_mm / bottom_s_mm: its extent along the column (mm): endplate peaks, or the scan's edge.
        centre_lps: LPS point (mm) of its centre (mid-height, on the column's centre).
        column_a_mm / lateral_u_mm: the centre in frame coordinates (mm in front of / left of the canal).
        cut_above / cut_below: whether the scan's edge cuts it (no disc found on that side, and the scan ends there).
        open_above / open_below: whether the chain ends at it on that side without a disc (cut by the scan, or where
            the frame stopped following the spine).
        bone_hu: 90th percentile of the column's HU inside it (cortex, endplates).
        width_mm / depth_mm: size of its mid-height cross-section (mm).
        zone_top_s_mm / zone_bottom_s_mm: its zone along the column: from the centre of the disc above to the centre
            of the disc below (or the scan's edge); every point of the column belongs to one zone or none.
    """

    top_s_mm: float
    bottom_s_mm: float
    centre_lps: np.ndarray
    column_a_mm: float
    lateral_u_mm: float
    cut_above: bool
    cut_below: bool
    bone_hu: float
    width_mm: float = 0.0
    depth_mm: float = 0.0
    zone_top_s_mm: float = 0.0
    zone_bottom_s_mm: float = 0.0
    open_above: bool = False
    open_below: bool = False

    @property
    def height_mm(self) -> float:
        """Visible height along the column (mm)."""
        return self.bottom_s_mm - self.top_s_mm

    @property
    def centre_s_mm(self) -> float:
        """Arc length of the body's centre (mm)."""
        return 0.5 * (self.top_s_mm + self.bottom_s_mm)

    @property
    def complete(self) -> bool:
        """Both endplates found (a disc on both sides)."""
        return not (self.open_above or self.open_below)


@dataclass
class VertebralChain:
    """The bodies and discs in front of the canal, superior → inferior.

    Attributes:
        frame: the curved frame the chain was found on.
        bodies / discs: the chain; ``discs[i]`` lies between ``bodies`` above and below it (a cut body may be
            missing at either end).
        column: the straightened mid-sagittal slab ``M(s, a)`` (float32, NaN outside the scan) and its axes.
        column_a_mm: ``(n_s,)`` the column's centre ``a_c(s)``.
        valley: ``(n_s,)`` the normalised disc evidence; ``valley_tilt_deg`` its best tilt.
        valid: ``(n_s,)`` planes inside the scan.
    """

    frame: SpineFrame
    bodies: list[VertebralBody]
    discs: list[Disc]
    column: Straightened
    column_a_mm: np.ndarray
    valley: np.ndarray
    valley_tilt_deg: np.ndarray
    valid: np.ndarray
    timings_s: dict = field(default_factory=dict)

    def body_containing(self, s_mm: float) -> int | None:
        """Index of the body whose extent contains arc length ``s_mm`` (None when it lies in a disc or outside)."""
        for i, b in enumerate(self.bodies):
            if b.top_s_mm <= s_mm <= b.bottom_s_mm:
                return i
        return None


# ---------------------------------------------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------------------------------------------
def mid_sagittal_column(frame: SpineFrame, volume: CTVolume) -> tuple[Straightened, np.ndarray]:
    """The mid-sagittal slab of the straightened CT: ``(Straightened (n_s, n_a, 1), valid (n_s,))``; the slab's
    columns are averaged (|u| ≤ ``MID_SLAB_MM``)."""
    st = frame.straighten(volume, A_RANGE_MM, (-MID_SLAB_MM, MID_SLAB_MM), step_mm=1.0)
    with np.errstate(invalid="ignore"), _quiet():
        m = np.nanmean(st.values, axis=2)
    column = Straightened(m[:, :, None].astype(np.float32), st.s_mm, st.a_mm, np.zeros(1), st.plane_index)
    central = (st.a_mm >= 10.0) & (st.a_mm <= 35.0)  # the bodies' band: a plane is usable where it is in the scan
    valid = np.isfinite(m[:, central]).mean(axis=1) > 0.8
    return column, valid


class _quiet:
    """Silence numpy's all-NaN warnings (planes outside the scan are NaN by design)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def column_centre(m: np.ndarray, a_mm: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``a_c(s)``: centroid (mm in front of the canal) of the column's bone-like pixels per plane, smoothed.

    Args:
        m: ``(n_s, n_a)`` the mid-sagittal slab (HU, NaN outside the scan).
        a_mm: ``(n_a,)`` its rows' offsets.
        valid: ``(n_s,)`` planes inside the scan.
    """
    # the body ends at most a body's depth in front of its posterior wall: a contrast-filled aorta or heart touching
    # the bodies' front must not pull the centre forward (a wall found too far forward, as in osteoporotic bone whose
    # spongiosa is darker than the threshold, only loosens this limit)
    wall = posterior_wall(m, a_mm)
    front = ((a_mm[None, :] >= 2.0) & (a_mm[None, :] <= COLUMN_FRONT_MM)
             & (a_mm[None, :] <= (wall + 2.0 * COLUMN_HALF_DEPTH_MAX_MM)[:, None]))
    lo, hi = COLUMN_BONE_HU
    w = np.clip((np.nan_to_num(m, nan=-1000.0) - lo) / (hi - lo), 0.0, 1.0) * front
    total = w.sum(axis=1)
    ac = np.where(total > 3.0, (w * a_mm[None, :]).sum(axis=1) / np.maximum(total, 1e-6), np.nan)
    # … nor may it where it touches them with no gap: the column's rows are interrupted by a disc at least every
    # pitch, a vessel's or the heart's are not; the centre of the interrupted rows alone is taken where it lies
    # well behind (in the fused sacrum, where no row is interrupted, the first estimate stands)
    wi = w * interrupted_rows(m)
    total_i = wi.sum(axis=1)
    with np.errstate(invalid="ignore"):
        ac_i = np.where(total_i > 1.0, (wi * a_mm[None, :]).sum(axis=1) / np.maximum(total_i, 1e-6), np.nan)
    ac = np.where(np.isfinite(ac_i) & (ac - ac_i > INTERRUPTED_SHIFT_MM), ac_i, ac)
    ac = np.clip(ac, *COLUMN_A_LIMITS_MM)
    ac[~valid] = np.nan
    if np.isfinite(ac).sum() == 0:
        return np.full(len(m), COLUMN_A_DEFAULT_MM)
    idx = np.arange(len(ac))
    good = np.isfinite(ac)
    ac = np.interp(idx, idx[good], ac[good])
    return ndimage.gaussian_filter1d(ac, COLUMN_SMOOTH_MM, mode="nearest")


def interrupted_rows(m: np.ndarray) -> np.ndarray:
    """Bool ``(n_s, n_a)``: pixels of the slab with a dark pixel (< ``DISC_DARK_HU``: a disc, or bone's marrow) on
    at least ``INTERRUPTED_MIN`` of the planes within ±``INTERRUPTED_HALF_MM`` in the same row."""
    dark = (np.nan_to_num(m, nan=1e4) < DISC_DARK_HU).astype(np.float32)
    size = 2 * round(INTERRUPTED_HALF_MM / STEP_MM_FRAME) + 1
    return ndimage.uniform_filter1d(dark, size, axis=0, mode="nearest") >= INTERRUPTED_MIN


def posterior_wall(m: np.ndarray, a_mm: np.ndarray) -> np.ndarray:
    """``(n_s,)`` the bodies' posterior wall (mm in front of the canal's centre): the first row from the canal on
    which the column holds ``WALL_RUN_MM`` of bone (≥ ``WALL_HU``); across a disc, where no wall is seen, it is
    carried over from the bodies beside it (running median over ``WALL_MEDIAN_MM``). NaN where no body shows."""
    sel = (a_mm >= 0.0) & (a_mm <= WALL_SEARCH_MM)
    bone = np.nan_to_num(m[:, sel], nan=-1000.0) >= WALL_HU
    run = max(1, round(WALL_RUN_MM / float(np.median(np.diff(a_mm)))))
    solid = ndimage.binary_erosion(bone, np.ones((1, run), bool), border_value=0)  # centre of a run of ``run`` rows
    solid = ndimage.binary_dilation(solid, np.ones((1, run), bool))
    has = solid.any(axis=1)
    wall = np.where(has, a_mm[sel][np.argmax(solid, axis=1)], np.nan)
    if not has.any():
        return np.full(len(m), np.inf)
    size = max(3, round(WALL_MEDIAN_MM) | 1)
    filled = np.interp(np.arange(len(wall)), np.flatnonzero(has), wall[has])
    return ndimage.median_filter(filled, size=size, mode="nearest")


def valley_depth(profile: np.ndarray, half: int) -> np.ndarray:
    """``min(max(P[s−half..s]), max(P[s..s+half])) − P[s]``: how far ``P`` dips between two peaks ≤ ``half`` away."""
    return np.minimum(_window_max(profile, half, before=True), _window_max(profile, half, before=False)) - profile


def _window_max(p: np.ndarray, half: int, before: bool) -> np.ndarray:
    """Max of ``p`` over ``[s − half, s]`` (``before``) or ``[s, s + half]``."""
    pad = np.full(half, -np.inf)
    q = np.r_[pad, p] if before else np.r_[p, pad]
    win = np.lib.stride_tricks.sliding_window_view(q, half + 1)
    return win.max(axis=1)


def metal_planes(frame: SpineFrame, volume: CTVolume, a_range_mm: tuple[float, float] = (5.0, 50.0),
                 half_width_mm: float = 15.0, margin_mm: float = 0.0) -> np.ndarray:
    """Bool ``(n_planes,)``: planes with metal (≥ ``METAL_HU``) in the given part of the cross-section (default: the
    vertebral body in front of the canal, where pedicle screws and cages end), dilated by ``margin_mm``."""
    st = frame.straighten(volume, a_range_mm, (-half_width_mm, half_width_mm), step_mm=2.0)
    hit = (np.nan_to_num(st.values, nan=-1000.0) >= METAL_HU).any(axis=(1, 2))
    steps = round(margin_mm / STEP_MM_FRAME)
    return ndimage.binary_dilation(hit, iterations=steps) if steps else hit


def valley_scale(raw: np.ndarray, valid: np.ndarray) -> float:
    """The disc evidence's unit (HU): the upper quartile of its peaks of ≥ ``VALLEY_SCALE_MIN_HU`` / 2 (a typical
    disc's valley; a few extreme valleys, next to an implant or a calcified vessel, do not shrink every other disc)."""
    peaks = [raw[m] for m in range(1, len(raw) - 1) if valid[m] and raw[m] >= raw[m - 1] and raw[m] > raw[m + 1]
             and raw[m] >= VALLEY_SCALE_MIN_HU / 2]
    return max(float(np.percentile(peaks, 75)) if peaks else 0.0, VALLEY_SCALE_MIN_HU)


def disc_evidence(m: np.ndarray, a_mm: np.ndarray, ac: np.ndarray, valid: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The disc evidence ``D(s)`` (HU), its best tilt (deg) and, per tilt, the column profiles ``(n_tilts, n_s)``."""
    n = len(m)
    # metal (implants, 2000–3000+ HU) and its dark streaks would make valleys beside it that dwarf every disc
    filled = np.clip(np.where(np.isfinite(m), m, -1000.0), -1000.0, PROFILE_MAX_HU).astype(np.float32)
    filled = ndimage.gaussian_filter1d(filled, PROFILE_SMOOTH_MM, axis=0)
    depth = np.arange(-PROFILE_HALF_DEPTH_MM, PROFILE_HALF_DEPTH_MM + 1e-6, 1.0)
    rows = np.interp(ac[:, None] + depth[None], a_mm, np.arange(len(a_mm)))  # (n, n_depth)
    half = round(VALLEY_HALF_MM)
    best = np.zeros(n, np.float32)
    tilt = np.zeros(n, np.float32)
    profiles = np.empty((len(TILTS_DEG), n), np.float32)
    for t, th in enumerate(TILTS_DEG):
        ss = np.arange(n)[:, None] + depth[None] * np.tan(np.deg2rad(th))
        vals = ndimage.map_coordinates(filled, [ss.ravel(), rows.ravel()], order=1, cval=-1000.0).reshape(ss.shape)
        p = np.median(vals, axis=1)
        p[~valid] = -1000.0
        profiles[t] = p
        d = valley_depth(p, half)
        d[~valid] = 0.0
        better = d > best
        best[better], tilt[better] = d[better], th
    return best, tilt, profiles


# ---------------------------------------------------------------------------------------------------------------
# chain
# ---------------------------------------------------------------------------------------------------------------
def _pitch_cost(g: np.ndarray | float) -> np.ndarray:
    g = np.asarray(g, dtype=float)
    lo, hi = PITCH_PRIOR_MM
    return np.where(g < lo, ((lo - g) / PITCH_PRIOR_SCALE_MM) ** 2,
                    np.where(g > hi, ((g - hi) / PITCH_PRIOR_SCALE_MM) ** 2, 0.0))


def choose_discs(valley: np.ndarray, step_mm: float = 1.0) -> np.ndarray:
    """Indices of the discs along the column: the chain of valley peaks that maximises the sum of
    (valley − ``DISC_COST``) minus the pitch prior and the pitch-change cost (dynamic programming over the peaks).

    Args:
        valley: ``(n,)`` normalised disc evidence.
    """
    n = len(valley)
    peaks = np.array([m for m in range(1, n - 1) if valley[m] >= MIN_VALLEY and valley[m] >= valley[m - 1]
                      and valley[m] > valley[m + 1]], dtype=int)
    k = len(peaks)
    if k == 0:
        return peaks
    node = valley[peaks] - DISC_COST
    gmin, gmax = PITCH_LIMITS_MM
    neg = -1e18
    # best[j, i]: best chain whose last two discs are peaks i then j (i = k: j starts the chain)
    best = np.full((k, k + 1), neg)
    back = np.full((k, k + 1), -1, dtype=int)
    best[:, k] = node
    gaps = (peaks[None, :] - peaks[:, None]) * step_mm  # gaps[i, j] = s_j − s_i
    for j in range(k):
        for i in range(j):
            g = gaps[i, j]
            if not gmin <= g <= gmax:
                continue
            prev = best[i].copy()
            ok = prev > neg / 2
            if not ok.any():
                continue
            change = np.zeros(k + 1)
            g0 = gaps[np.arange(k), i]
            valid_h = np.r_[(g0 > 0) & ok[:k], ok[k]]
            change[:k] = np.where(g0 > 0, PITCH_CHANGE_WEIGHT * np.log(np.maximum(g, 1e-6) / np.maximum(g0, 1e-6)) ** 2,
                                  0.0)
            cand = np.where(valid_h, prev - change, neg)
            h = int(np.argmax(cand))
            if cand[h] <= neg / 2:
                continue
            best[j, i] = cand[h] + node[j] - float(_pitch_cost(g))
            back[j, i] = h
    j, i = np.unravel_index(int(np.argmax(best)), best.shape)
    chain = [int(j)]
    while i != k:
        chain.append(int(i))
        j, i = i, back[j, i]
    return peaks[np.array(chain[::-1], dtype=int)]


def _disc_from_peak(frame: SpineFrame, column: Straightened, ac: np.ndarray, profiles: np.ndarray,
                    valley: np.ndarray, tilt: np.ndarray, idx: int) -> Disc:
    th = float(tilt[idx])
    p = profiles[int(np.argmin(np.abs(TILTS_DEG - th)))]
    half = round(VALLEY_HALF_MM)
    lo, hi = max(0, idx - half), min(len(p) - 1, idx + half)
    top = lo + int(np.argmax(p[lo : idx + 1]))
    bottom = idx + int(np.argmax(p[idx : hi + 1]))
    plane = int(column.plane_index[idx])
    centre = frame.points(plane, ac[idx], 0.0)
    t = np.tan(np.deg2rad(th))
    normal = frame.tangent[plane] - t * frame.anterior[plane]
    normal /= np.linalg.norm(normal)
    s = column.s_mm
    return Disc(float(s[idx]), th, float(valley[idx]), float(s[top]), float(s[bottom]), centre, normal)


def _cross_section(frame: SpineFrame, volume: CTVolume, plane: int, ac: float) -> tuple[float, float, float]:
    """Lateral centre (mm, left +), width and depth (mm) of the body's cross-section on one plane."""
    a = np.arange(0.0, ac + 30.0 + 1e-6, 1.0)  # from the canal's front wall: the body's posterior cortex closes it
    u = np.arange(-35.0, 35.0 + 1e-6, 1.0)
    pts = frame.points(plane, a[:, None], u[None, :])
    ijk = volume.lps_to_index(pts.reshape(-1, 3))
    vals = ndimage.map_coordinates(volume.hu, [ijk[:, 2], ijk[:, 1], ijk[:, 0]], order=1, cval=-1000.0,
                                   output=np.float32).reshape(pts.shape[:2])
    vals = ndimage.gaussian_filter(vals, 1.0)
    bone = ndimage.binary_fill_holes(ndimage.binary_closing(vals > 100.0, iterations=3))  # cortex + spongiosa
    lab, n = ndimage.label(bone)
    if n == 0:
        return 0.0, 0.0, 0.0
    core = (np.abs(a[:, None] - ac) <= 8.0) & (np.abs(u[None, :]) <= 8.0)
    ids, counts = np.unique(lab[core & (lab > 0)], return_counts=True)
    if len(ids) == 0:
        return 0.0, 0.0, 0.0
    body = lab == ids[int(np.argmax(counts))]
    ja, _ = np.nonzero(body)
    body &= (a >= ac - 5.0)[:, None]  # width and centre in front of the pedicles, which join the body behind
    _, iu = np.nonzero(body)
    if len(iu) == 0:
        return 0.0, 0.0, 0.0
    return float(u[iu].mean()), float(np.ptp(u[iu]) + 1.0), float(np.ptp(a[ja]) + 1.0)


def _bone_extent(s: np.ndarray, m: np.ndarray, a_mm: np.ndarray, ac: np.ndarray, valid: np.ndarray, top: float,
                 bottom: float, cut_top: bool, cut_bottom: bool) -> tuple[float, float]:
    """Shrink an edge piece's open end to the last plane whose column (a_c ± 15 mm) still holds bone."""
    sel = np.flatnonzero((s >= top) & (s <= bottom) & valid)
    rows = np.abs(a_mm[None, :] - ac[sel][:, None]) <= 15.0
    with _quiet():
        peak = np.nanmax(np.where(rows, m[sel], np.nan), axis=1)
    has_bone = np.nan_to_num(peak, nan=-1000.0) >= BODY_BONE_HU
    if not has_bone.any():
        return top, top
    if cut_top:
        top = float(s[sel[np.argmax(has_bone)]])
    if cut_bottom:
        bottom = float(s[sel[len(has_bone) - 1 - np.argmax(has_bone[::-1])]])
    return top, bottom


def find_chain(volume: CTVolume, canal: CanalResult, frame: SpineFrame | None = None) -> VertebralChain:
    """The vertebral-body chain of a CT whose canal was found (see the module docstring)."""
    import time

    t0 = time.perf_counter()
    frame = spine_frame(volume, canal) if frame is None else frame
    column, valid = mid_sagittal_column(frame, volume)
    m = column.values[:, :, 0]
    ac = column_centre(m, column.a_mm, valid)
    raw, tilt, profiles = disc_evidence(m, column.a_mm, ac, valid)
    # an implant's streaks make valleys of their own: none is a disc on a plane with metal in the body (a screw), and
    # beside screws and rods only a valley of a disc's usual depth is (the streaks' are far deeper)
    near_metal = metal_planes(frame, volume, (-40.0, 60.0), 40.0)
    scale = valley_scale(np.where(near_metal, 0.0, raw), valid)
    raw[metal_planes(frame, volume) | (near_metal & (raw > METAL_VALLEY_RATIO * scale))] = 0.0
    valley = np.clip(raw / scale, 0.0, 1.5) * valid
    picks = choose_discs(valley, column.step_mm)
    discs = [_disc_from_peak(frame, column, ac, profiles, valley, tilt, int(p)) for p in picks]
    t1 = time.perf_counter()
    bodies = _bodies_between(frame, volume, column, ac, valid, discs)
    return VertebralChain(frame, bodies, discs, column, ac, valley.astype(np.float32), tilt, valid,
                          {"frame_and_discs": t1 - t0, "bodies": time.perf_counter() - t1})


def _bodies_between(frame: SpineFrame, volume: CTVolume, column: Straightened, ac: np.ndarray, valid: np.ndarray,
                    discs: list[Disc]) -> list[VertebralBody]:
    s = column.s_mm
    inside = np.flatnonzero(valid)
    if len(inside) == 0:
        return []
    first, last = float(s[inside[0]]), float(s[inside[-1]])
    # a piece at an end of the chain is cut by the scan when the planes beyond it leave the scan (or the frame ends
    # at the scan's edge); where the frame only stopped following the spine, the chain ends but the scan does not
    cut_first = inside[0] > 0 or frame.top_at_scan
    cut_last = inside[-1] < len(s) - 1 or frame.bottom_at_scan
    edges = [(first, cut_first, first)] + [(d.bottom_s_mm, False, d.s_mm) for d in discs]
    ends = [(d.top_s_mm, False, d.s_mm) for d in discs] + [(last, cut_last, last)]
    m = column.values[:, :, 0]
    bodies = []
    for (top, cut_top, zone_top), (bottom, cut_bottom, zone_bottom) in zip_strict(edges, ends):
        if bottom - top < MIN_BODY_MM:
            continue
        sel = (s >= zone_top) & (s <= zone_bottom) & valid  # with its endplates
        if not sel.any():
            continue
        rows = np.abs(column.a_mm[None, :] - ac[sel][:, None]) <= 15.0
        vals = m[sel][rows]
        vals = vals[np.isfinite(vals)]
        bone = float(np.percentile(vals, 90)) if len(vals) else -1000.0
        at_end = zone_top == first or zone_bottom == last
        if at_end and bone < BODY_BONE_HU:
            continue
        if at_end:  # at an end of the chain the piece ends where its bone ends (not in the soft tissue)
            top, bottom = _bone_extent(s, m, column.a_mm, ac, valid, top, bottom, zone_top == first,
                                       zone_bottom == last)
            if bottom - top < MIN_BODY_MM:
                continue
        mid = 0.5 * (top + bottom)
        plane = frame.plane_at(mid)
        i_mid = int(np.argmin(np.abs(s - mid)))
        u_c, width, depth = _cross_section(frame, volume, plane, float(ac[i_mid]))
        centre = frame.points(plane, ac[i_mid], u_c)
        bodies.append(VertebralBody(top, bottom, centre, float(ac[i_mid]), u_c, cut_top, cut_bottom, bone, width,
                                    depth, zone_top, zone_bottom, zone_top == first, zone_bottom == last))
    return bodies
