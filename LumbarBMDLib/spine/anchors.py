"""The anatomical anchors of the level numbering, detected on the CT (never assumed from the scan's range).

**Ribs** (the last rib-bearing vertebra is T12). A rib leaves the vertebra at the costovertebral joint (the body's
posterolateral side, |u| ≈ 15–30 mm from the canal's centre) and runs laterally far beyond any transverse
process: lumbar transverse processes end 36–54 mm from the midline (measured on the real VerSe and TotalSegmentator
label maps: L1 36–42, L3 45–54, L5 42–48 mm). On the straightened CT, bone is followed in 3-D in the band beside the
spine (|u| from ``RIB_MEDIAL_MM`` to ``RIB_OUTER_MM``, from 45 mm behind to 30 mm in front of the canal's centre).
Where bone enters the band from the spine (its medial face, |u| ≤ ``RIB_MEDIAL_MM`` + 4 mm) is an *origin*; a
component holding several origins (a transverse process touching a rib, ribs touching each other at 5 mm slices) is
shared between them by a watershed from the origins, and an origin whose share reaches ``RIB_OUTER_MM`` − 6 mm is a
rib. It belongs to the chain body whose zone holds the origin. The band stops short of the chest wall (costal
cartilages, sternum) and of the scapula, and a share as large as an iliac wing or longer than ``RIB_MAX_EXTENT_MM``
along the spine is not a rib.

**Sacrum** (S1 is the first segment joined to the alae, with the iliac bones beside it). On axial planes through the
upper part of each chain body (the plane radiologists read the sacrum on, whatever the frame's tilt), the bone in
front of the canal (``JOIN_FROM_A_MM``: behind it the facet joints join every vertebra to the next) that is joined
to the body's centre (≥ ``SACRUM_BONE_HU`` after a 1.5 mm closing) is followed sideways: at S1 the alae carry it
≥ ``ALA_REACH_MM`` from the midline on both sides, toward the sacroiliac joints, and an iliac bone lies beside it; a
lumbar body with its osteophytes stays within 35 mm, and its transverse processes lie behind the canal's front wall.
S1 is the most cranial chain body that passes; the sacral segments below it pass too.

At the levels of the iliac crests (L4–S1), an iliac wing touching a transverse process reaches as far as a rib: a
"rib" there is not counted when an iliac plate runs beside the body (:func:`iliac_plates`: in one of the small boxes
beside it, bone on every axial plane for ``ILIAC_MIN_RUN_MM``, where ribs cross one by one with intercostal gaps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from LumbarBMDLib._compat import zip_strict
from LumbarBMDLib.spine.chain import VertebralChain, metal_planes
from LumbarBMDLib.spine.frame import Straightened
from LumbarBMDLib.volume import CTVolume

RIB_STEP_MM = 2.0  # the band beside the spine is sampled on 2 mm pixels, every 2nd plane (ribs are ≈ 10 mm thick)
BONE_HU = 150.0  # the paper's bone threshold (ribs: cortex 400–1000 HU, marrow 150–300 HU)
RIB_MEDIAL_MM = 30.0  # the band beside the spine starts here (beyond the pedicles and the articular pillars) ...
RIB_OUTER_MM = 72.0  # ... and ends here: 18 mm beyond the longest lumbar transverse process seen (54 mm)
RIB_A_RANGE_MM = (-40.0, 30.0)  # rib neck and angle lie beside and behind the body (the scapula lies further back)
RIB_MAX_VOLUME_MM3 = 20000.0  # the proximal 40 mm of a rib is 2–8 cm³; an iliac wing is far larger
RIB_MAX_EXTENT_MM = 60.0  # ... and spans at most this along the spine inside the band (ribs descend ≈ 30–45°)
RIB_MIN_VOLUME_MM3 = 150.0
RIB_THRESHOLDS_HU = (BONE_HU, 220.0, 350.0)  # bone followed at each (see find_ribs)
RIB_SAME_MM = 8.0
METAL_HU = 2500.0  # titanium and steel implants (and their streaks' cores); no bone reaches it
RIB_METAL_MM = 10.0  # no rib leaves the spine within this of a plane with metal in or beside the vertebra
RIB_EDGE_MM = 8.0  # an origin this close to the scan's first or last plane may be a rib cut by the scan's edge
SACRUM_BONE_HU = 100.0  # alae of the elderly are low in density (cancellous 100–200 HU at 3 mm); soft tissue ≤ 70
SACRUM_PIXEL_MM = 1.5
SACRUM_PLANES_MM = (6.0, 12.0, 18.0)  # axial planes this far below the body's zone top (the disc above): the alae join
# the upper S1 body
JOIN_CORE_MM = 12.0
JOIN_FROM_A_MM = -12.0  # (relative to the body's centre) the canal's front wall: the posterior elements lie behind
JOIN_TO_A_MM = 10.0  # … and the body's front (S1 half-depth 15–20 mm): in front of it lie the (contrast-filled)
# common iliac arteries and veins, which reach as far out as the alae
ALA_REACH_MM = 45.0  # in front of the canal the alae reach toward the sacroiliac joints (sacral width ≥ 100 mm; real
# example 120 mm with the joints bridged); a lumbar body with its osteophytes stays within 35 mm
ILIUM_U_MM = (55.0, 150.0)
ILIUM_MIN_AREA_MM2 = 300.0  # per side: an iliac bone's cross-section beside the sacrum (real example: ≥ 1100 mm²)
ILIAC_U_MM = (55.0, 106.0)  # where the ilium lies beside the sacrum and L5 (sacroiliac joint to the iliac wing)
ILIAC_A_MM = (-40.0, 48.0)  # … beside the body, short of the scapula behind (a plate too, 50–80 mm behind)
ILIAC_BOX_MM = 9.0  # boxes small enough that an oblique rib crosses each in 15–25 mm of z
ILIAC_WINDOW_MM = 30.0
ILIAC_MIN_RUN_MM = 54.0  # of the 61.5 mm window (real example: 62 beside S1 and L5)
#: The iliac crest lies at L4–L5: with the sacrum seen, bone beside a vertebra more than this many levels above S1 is
#: not tested for an iliac plate. Higher up, the kidneys run as plates beside T12–L2 and, enhanced (150–250 HU in the
#: portal-venous and nephrographic phases), read as bone: a contrast phantom's T12 ribs were dropped as "iliac".
ILIAC_MAX_LEVELS_ABOVE_S1 = 2


@dataclass
class Rib:
    """A rib found beside the spine.

    Attributes:
        side: "left" or "right" (the patient's).
        medial_s_mm: arc length of its medial end (where it leaves the spine), mm.
        medial_lps: LPS point (mm) of that end.
        volume_mm3: bone volume inside the band.
        body: index of the chain body it belongs to (None when its medial end lies in no body's zone).
    """

    side: str
    medial_s_mm: float
    medial_lps: np.ndarray
    volume_mm3: float
    body: int | None


@dataclass
class SacrumFinding:
    """Where the sacrum was seen (or why not).

    Attributes:
        seen: whether alae with iliac bones beside them were found on a chain body.
        body: index of the chain body that is S1 (the most cranial one joined to the alae).
        top_s_mm: arc length of S1's top (mm).
        top_lps: LPS point of S1's top on the column.
        sacral_bodies: indices of every chain body joined to the ilia (S1 and the sacral segments below it).
    """

    seen: bool
    body: int | None = None
    top_s_mm: float | None = None
    top_lps: np.ndarray | None = None
    sacral_bodies: list[int] = field(default_factory=list)


@dataclass
class Anchors:
    """Ribs per chain body and the sacrum.

    Attributes:
        ribs: every rib found.
        rib_sides: per chain body, the set of sides ("left", "right") with a rib (not counting, at the levels of
            the sacrum and of the iliac crests, bone that reaches as far as a rib: the iliac bones).
        sacrum: the sacrum finding.
        rib_band: the straightened CT beside the spine the ribs were found on (for figures).
    """

    ribs: list[Rib]
    rib_sides: list[set[str]]
    sacrum: SacrumFinding
    rib_band: Straightened
    timings_s: dict = field(default_factory=dict)

    def rib_bearing(self, body: int) -> bool:
        """Whether chain body ``body`` bears a rib on at least one side."""
        return bool(self.rib_sides[body])


def rib_band(volume: CTVolume, chain: VertebralChain) -> Straightened:
    """The straightened CT beside the spine (|u| ≤ ``RIB_OUTER_MM``, ``RIB_A_RANGE_MM``), 2 mm pixels."""
    every = max(1, round(RIB_STEP_MM / chain.column.step_mm))
    return chain.frame.straighten(volume, RIB_A_RANGE_MM, (-RIB_OUTER_MM, RIB_OUTER_MM), step_mm=RIB_STEP_MM,
                                  every=every)


def _zone_of(chain: VertebralChain, s_mm: float) -> int | None:
    """The chain body whose zone holds ``s_mm``; the first and last zones extend to the frame's ends."""
    last = len(chain.bodies) - 1
    for i, b in enumerate(chain.bodies):
        top = -np.inf if i == 0 else b.zone_top_s_mm
        bottom = np.inf if i == last else b.zone_bottom_s_mm
        if top <= s_mm <= bottom:
            return i
    return None


def find_ribs(band: Straightened, chain: VertebralChain, volume: CTVolume | None = None) -> list[Rib]:
    """Ribs leaving the spine (see the module docstring), each assigned to the chain body at its origin.

    Bone is followed at three thresholds, ``RIB_THRESHOLDS_HU``: at 150 HU a thin rib of a 3–5 mm scan stays whole;
    at 220 HU a rib touching an enhancing kidney (150–250 HU in the portal-venous phase) is cut loose from it; at
    350 HU one touching the renal cortex of the arterial phase (≈ 250–300 HU: +205 HU over unenhanced kidney, Eur J
    Radiol 2007;63:420; the phantom's arterial T12 ribs were lost at 220 HU). A rib found at any counts once (the
    same side, origins within ``RIB_SAME_MM``).
    """
    found: list[Rib] = []
    for threshold in RIB_THRESHOLDS_HU:
        for rib in _ribs_at(band, chain, threshold, volume):
            if not any(r.side == rib.side and abs(r.medial_s_mm - rib.medial_s_mm) < RIB_SAME_MM for r in found):
                found.append(rib)
    return sorted(found, key=lambda r: r.medial_s_mm)


def _ribs_at(band: Straightened, chain: VertebralChain, threshold_hu: float, band_volume: CTVolume | None
             ) -> list[Rib]:
    from skimage.segmentation import watershed

    u, a = band.u_mm, band.a_mm
    values = np.nan_to_num(band.values, nan=-1000.0)
    bone = (values > threshold_hu) & (np.abs(u) >= RIB_MEDIAL_MM)[None, None, :]
    metal = values >= METAL_HU
    # streaks radiate in the plane of the metal: no rib is trusted within RIB_METAL_MM of a plane with an implant
    implant = metal_planes(chain.frame, band_volume, (-40.0, 60.0), 40.0, RIB_METAL_MM) if band_volume is not None \
        else np.zeros(chain.frame.n, bool)
    full = np.ones((3, 3, 3), bool)
    medial = bone & (np.abs(u) <= RIB_MEDIAL_MM + 4.0)[None, None, :]
    origins, n_origins = ndimage.label(medial, structure=full)
    if n_origins == 0:
        return []
    # an origin spanning two vertebrae (transverse processes touching at 5 mm slices) is one origin per body zone
    zone = np.array([_zone_of(chain, float(s)) for s in band.s_mm], dtype=float)
    zone = np.nan_to_num(zone, nan=-1.0) + 1.0
    side = (u > 0).astype(float)
    key = np.where(origins > 0, origins * 4096.0 + zone[:, None, None] * 2.0 + side[None, None, :], 0.0)
    _, origins = np.unique(key, return_inverse=True)
    origins = origins.reshape(key.shape)  # 0 stays 0: it is the smallest key
    shares = watershed(np.zeros(bone.shape, np.float32), markers=origins, mask=bone, connectivity=3)
    voxel = band.step_mm * (u[1] - u[0]) * (a[1] - a[0])
    inside = np.flatnonzero(np.isfinite(band.values).mean(axis=(1, 2)) >= 0.9)
    if len(inside) == 0:
        return []
    first, last = band.s_mm[inside[0]] + RIB_EDGE_MM, band.s_mm[inside[-1]] - RIB_EDGE_MM
    ribs = []
    for m, box in enumerate(ndimage.find_objects(shares), start=1):
        if box is None:
            continue
        region = shares[box] == m
        ks, ja, iu = np.nonzero(region)
        ks, ja, iu = ks + box[0].start, ja + box[1].start, iu + box[2].start
        volume = region.sum() * voxel
        extent = float(np.ptp(band.s_mm[ks]))
        if not (RIB_MIN_VOLUME_MM3 <= volume <= RIB_MAX_VOLUME_MM3 and extent <= RIB_MAX_EXTENT_MM):
            continue
        if np.abs(u[iu]).max() < RIB_OUTER_MM - 6.0:
            continue
        lo = [max(0, sl.start - 2) for sl in box]
        near = ndimage.binary_dilation(np.pad(region, 2), iterations=2)[
            tuple(slice(lo_ - (sl.start - 2), None) for lo_, sl in zip_strict(lo, box))]
        window = metal[lo[0] : lo[0] + near.shape[0], lo[1] : lo[1] + near.shape[1], lo[2] : lo[2] + near.shape[2]]
        if (near[: window.shape[0], : window.shape[1], : window.shape[2]] & window).any():
            continue  # bone joined to an implant: its streaks reach as far as a rib
        at_origin = origins[ks, ja, iu] == m
        s_med = float(band.s_mm[ks[at_origin]].mean())
        if not first <= s_med <= last:  # a rib entering at the scan's edge: where it leaves the spine is not seen
            continue
        if implant[chain.frame.plane_at(s_med)]:
            continue
        a_med = float(a[ja[at_origin]].mean())
        u_med = float(u[iu[at_origin]].mean())
        lps = chain.frame.points(chain.frame.plane_at(s_med), a_med, u_med)
        ribs.append(Rib("left" if u_med > 0 else "right", s_med, lps, float(volume), _zone_of(chain, s_med)))
    return ribs


def _axial_plane(volume: CTVolume, centre_lps: np.ndarray, half_u_mm: float = 150.0, a_range_mm=(-60.0, 60.0)
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An axial (LPS z = const) plane around ``centre_lps``: HU ``(n_a, n_u)`` (NaN outside the scan), u (mm, left
    +) and a (mm in front of the centre)."""
    step = SACRUM_PIXEL_MM
    u = np.arange(-half_u_mm, half_u_mm + 1e-6, step)
    a = np.arange(a_range_mm[1], a_range_mm[0] - 1e-6, -step)
    x, y = np.meshgrid(centre_lps[0] + u, centre_lps[1] - a)
    pts = np.stack([x, y, np.full_like(x, centre_lps[2])], axis=-1).reshape(-1, 3)
    ijk = volume.lps_to_index(pts)
    out = np.empty(len(pts), np.float32)
    ndimage.map_coordinates(volume.hu, [ijk[:, 2], ijk[:, 1], ijk[:, 0]], output=out, order=1, cval=np.nan,
                            prefilter=False)
    return out.reshape(x.shape), u, a


def joined_to_ilia(volume: CTVolume, centre_lps: np.ndarray) -> tuple[bool, float, float]:
    """Whether, on the axial plane through ``centre_lps``, the bone joined to the body's centre reaches
    ``ALA_REACH_MM`` on both sides with an iliac bone beside it; also the smaller reach (mm) and iliac area (mm²)."""
    vals, u, a = _axial_plane(volume, centre_lps)
    hu = np.nan_to_num(vals, nan=-1000.0)
    structure = ndimage.generate_binary_structure(2, 1)
    # in front of the canal only: through the facet joints every vertebra is joined to the next and to the sacrum
    # behind the body's centre only: in front of it lie the (contrast-filled) iliac vessels, which reach as far
    joined = ndimage.binary_closing(hu > SACRUM_BONE_HU, structure, iterations=1) & (
        (a >= JOIN_FROM_A_MM) & (a <= JOIN_TO_A_MM))[:, None]
    labels, _ = ndimage.label(joined, structure)
    core = (a[:, None] ** 2 + u[None] ** 2) <= JOIN_CORE_MM**2  # the body around the point (the sacrum's tilt and
    # the frame's extrapolation below the canal may leave the point a few mm off the body's centre)
    ids = np.unique(labels[core & (labels > 0)])
    if len(ids) == 0:
        return False, 0.0, 0.0
    body = np.isin(labels, ids)
    cols = body.any(axis=0)
    bone = hu > BONE_HU
    px = SACRUM_PIXEL_MM**2
    reach = min(float((side * u[cols]).max()) for side in (1.0, -1.0))
    ilium = min(float(bone[:, (side * u >= ILIUM_U_MM[0]) & (side * u <= ILIUM_U_MM[1])].sum() * px)
                for side in (1.0, -1.0))
    return reach >= ALA_REACH_MM and ilium >= ILIUM_MIN_AREA_MM2, reach, ilium


def iliac_plates(volume: CTVolume, centre_lps: np.ndarray) -> float:
    """How far (mm of z, the shorter side) an iliac plate runs without a gap beside ``centre_lps``.

    Beside the body (``ILIAC_U_MM`` from the midline, ``ILIAC_A_MM`` from its centre) the region is cut into small
    boxes (``ILIAC_BOX_MM`` square): the ilium is a plate running up and down from its crest to the sciatic notch,
    so a box it passes through holds bone on every axial plane within ±``ILIAC_WINDOW_MM``; a rib, descending
    obliquely, crosses a box in 15–25 mm of z, and the next rib is 25–35 mm lower. A plane outside the scan counts
    as holding bone (the run is not cut by the scan's end).
    """
    step = SACRUM_PIXEL_MM
    z = np.arange(-ILIAC_WINDOW_MM, ILIAC_WINDOW_MM + 1e-6, step)
    n_box = max(1, round(ILIAC_BOX_MM / step))
    def axis(lo: float, hi: float) -> np.ndarray:  # whole boxes only
        return np.arange(lo, hi, step)[: (round((hi - lo) / step) // n_box) * n_box]

    uu, aa = axis(*ILIAC_U_MM), axis(*ILIAC_A_MM)
    zz, a3, u3 = np.meshgrid(z, aa, uu, indexing="ij")
    mid = len(z) // 2
    runs = []
    for side in (1.0, -1.0):
        pts = np.stack([centre_lps[0] + side * u3, centre_lps[1] - a3, centre_lps[2] + zz], axis=-1)
        ijk = volume.lps_to_index(pts.reshape(-1, 3))
        vals = np.empty(len(ijk), np.float32)
        ndimage.map_coordinates(volume.hu, [ijk[:, 2], ijk[:, 1], ijk[:, 0]], output=vals, order=1, cval=np.nan,
                                prefilter=False)
        vals = vals.reshape(zz.shape)
        outside = ~np.isfinite(vals).any(axis=(1, 2))
        bone = np.nan_to_num(vals, nan=-1000.0) > BONE_HU
        boxes = bone.reshape(len(z), len(aa) // n_box, n_box, len(uu) // n_box, n_box).sum(axis=(2, 4)) >= 3
        occupied = boxes | outside[:, None, None]
        best = 0.0
        if not outside[mid]:
            for ia in range(boxes.shape[1]):
                for iu in range(boxes.shape[2]):
                    labels, _ = ndimage.label(occupied[:, ia, iu])
                    if labels[mid]:
                        best = max(best, float((labels == labels[mid]).sum() * step))
        runs.append(best)
    return min(runs)


def is_sacral(volume: CTVolume, chain: VertebralChain, body: int) -> bool:
    """A chain body is a sacral segment when, on at least two of the axial planes ``SACRUM_PLANES_MM`` below its top
    (the level of the alae; a body holding an undetected L5 as well fails there), its bone in front of the canal
    reaches toward the ilia with an iliac bone beside it (:func:`joined_to_ilia`)."""
    b = chain.bodies[body]
    for end in (1.0, -1.0):  # from the top, and from the bottom (an image flipped head to foot shows S1 lowest)
        votes = 0
        for d in SACRUM_PLANES_MM:
            s = min(b.zone_top_s_mm + d, b.zone_bottom_s_mm) if end > 0 else max(b.zone_bottom_s_mm - d,
                                                                                   b.zone_top_s_mm)
            plane = chain.frame.plane_at(s)
            a = float(np.interp(s, chain.column.s_mm, chain.column_a_mm))
            votes += joined_to_ilia(volume, chain.frame.points(plane, a, b.lateral_u_mm))[0]
        if votes >= 2:
            return True
    return False


def find_sacrum(volume: CTVolume, chain: VertebralChain) -> SacrumFinding:
    """S1: the most cranial chain body that is a sacral segment (:func:`is_sacral`)."""
    sacral = [i for i in range(len(chain.bodies)) if is_sacral(volume, chain, i)]
    if not sacral:
        return SacrumFinding(False)
    s1 = sacral[0]
    body = chain.bodies[s1]
    return SacrumFinding(True, s1, body.top_s_mm, chain.frame.points(chain.frame.plane_at(body.top_s_mm),
                                                                      body.column_a_mm, body.lateral_u_mm), sacral)


def find_anchors(volume: CTVolume, chain: VertebralChain) -> Anchors:
    """Ribs and sacrum on the CT whose chain was found."""
    import time

    t0 = time.perf_counter()
    band = rib_band(volume, chain)
    ribs = find_ribs(band, chain, volume)
    t1 = time.perf_counter()
    sacrum = find_sacrum(volume, chain)
    sides: list[set[str]] = [set() for _ in chain.bodies]
    iliac: dict[int, bool] = {}
    for r in ribs:
        if r.body is None or r.body in sacrum.sacral_bodies:
            continue
        if sacrum.seen and sacrum.body is not None and r.body < sacrum.body - ILIAC_MAX_LEVELS_ABOVE_S1:
            sides[r.body].add(r.side)  # too high for an iliac crest (L4–L5): no plate test
            continue
        if r.body not in iliac:  # an iliac crest touching a transverse process reaches as far as a rib
            iliac[r.body] = iliac_plates(volume, chain.bodies[r.body].centre_lps) >= ILIAC_MIN_RUN_MM
        if not iliac[r.body]:
            sides[r.body].add(r.side)
    return Anchors(ribs, sides, sacrum, band, {"ribs": t1 - t0, "sacrum": time.perf_counter() - t1})
