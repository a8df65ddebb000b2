"""Reference tissues for the internal (phantomless) calibration: air, fat, muscle and blood found in the CT.

Every abdominal CT contains tissues of known composition. This module finds them by anatomy, on a slab around the
lumbar levels (L1–L4 ± a margin), and returns robust HU statistics for each, with the ROI and, where a tissue is not
found, a sentence saying why:

* **air**: outside the body, in front of it (the table lies behind a supine patient), away from the body surface, the
  image edge and the scanner's padding outside the reconstruction circle;
* **subcutaneous fat**: fat-range voxels in the layer that touches the skin (the fat between skin and the abdominal
  muscular wall), eroded against partial volume;
* **visceral fat**: fat-range components enclosed by the muscular wall (not connected to the subcutaneous layer),
  eroded so that bowel walls and vessels do not contaminate them;
* **paraspinal muscle**: the erector spinae, the soft-tissue mass on each side behind the vertebral body and lateral of
  the spinous process, eroded;
* **aorta**: the round, homogeneous structure anterior-left of the vertebral body that differs from its surroundings
  (bright when enhanced, 150–400 HU; blood-dense against fat when not, 30–55 HU). A disc-versus-ring detector is
  accumulated along the slab (the aorta is a tube that follows the spine) and refined per slice;
* **IVC**: the same detector anterior-right of the vertebral body;
* **portal vein**: best effort, at the top of the slab, anterior-right in the liver hilum, accepted only when clearly
  brighter than the liver around it (enhanced); otherwise "not found", never a guess.

The spine's position per slice comes from the vertebral-body centres when the caller has them (the chain or a label
map) or from the bone itself (the dense midline structure in the posterior half of the body) otherwise.

Speed: the slab is taken every ~3 mm along z and pooled in-plane to ≈ 1.5 mm; the detectors run on small boxes around
the spine. A full 512 × 512 × 300 case takes well under 0.5 s on two cores.

Arrays are numpy ``(z, y, x)``; physical positions are LPS mm (+x left, +y posterior, +z superior).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.signal import fftconvolve

from LumbarBMDLib._compat import zip_strict
from LumbarBMDLib.volume import CTVolume

TISSUE_NAMES = ("air", "subcutaneous_fat", "visceral_fat", "paraspinal_muscle", "aorta", "ivc", "portal_vein")

# --- sampling -------------------------------------------------------------------------------------------------
SLAB_MARGIN_MM = 20.0  # around the given levels: the aorta and the liver hilum (T12–L1) stay in view
SLAB_STEP_MM = 3.0  # slices are taken this far apart: tissues change slowly along z; 3 mm keeps a case < 0.5 s
MAX_SLICES = 24  # at most this many slices are analysed (thinned evenly beyond): 24 slices give > 10^4 voxels
# per tissue, and keep a full case < 0.5 s
POOL_TARGET_MM = 2.0  # in-plane pooling to about this pixel size (2.0–2.5 mm): the IVC's inner disc keeps ≥ 2 px

# --- HU ranges (published tissue ranges; wide enough for any kVp 80–140) ------------------------------------------
BODY_HU = -500.0  # body outline: skin and fat (> −190) against air (≈ −1000); lung/bowel gas filled as holes
FAT_HU = (-190.0, -30.0)  # adipose tissue (Yoshizumi et al. 1999 window used for fat area on CT)
SOFT_HU = (-20.0, 110.0)  # muscle ≈ 40–60 HU; the window excludes fat, fluid below −20 and bone/contrast above
SPINE_BONE_HU = 150.0  # the vertebra's outline when looking for the spine (canal.py's bone threshold): its cortex
# stays above this even at 3 mm, and the marrow is filled in
BONE_HU = 200.0  # trabecular and cortical bone of the vertebra (marrow of old vertebrae ≈ 50–150 stays below)
METAL_HU = 2500.0  # implants (titanium ≥ 3000 HU, steel clipped at the maximum); cortical bone stays < 2000
AIR_MAX_HU = -900.0  # outside-body voxels counted as air

# --- geometry (adult lumbar anatomy) --------------------------------------------------------------------------
AIR_GAP_MM = 10.0  # air ROI starts this far from the skin (partial volume, clothing, blankets) ...
AIR_DEPTH_MM = 30.0  # ... and is this deep in front of the body
AIR_HALF_WIDTH_MM = 50.0  # ... and this wide either side of the body's centre
EDGE_MM = 5.0  # the air ROI keeps this far from the image edge
SKIN_MM = 2.0  # the dermis: skipped
SUBCUT_SEED_MM = 5.0  # a fat component reaching this close to the skin is subcutaneous
SUBCUT_MAX_MM = 40.0  # the subcutaneous ROI is restricted to this depth (thick layers: keep it near the skin)
ERODE_MM = 2.0  # fat ROIs are eroded by this much (partial volume with skin, muscle, bowel wall; 1 px at 3 mm)
MUSCLE_ERODE_MM = 3.0  # the muscle ROI is eroded more (fat planes between its fascicles)
VISCERAL_MIN_DEPTH_MM = 15.0  # visceral fat lies at least this deep (inside the muscular wall)
PARASPINAL_LATERAL_MM = (12.0, 65.0)  # erector spinae: lateral of the spinous process, medial of the flank ...
PARASPINAL_POSTERIOR_MM = (30.0, 90.0)  # ... and behind the vertebral body's centre (behind canal and laminae)
SPINE_ANTERIOR_FRACTION = 0.3  # the vertebral body starts behind this fraction of the body's AP depth (sternum,
# costal cartilage and anterior ribs lie in front of it; a thin patient's lumbar body reaches the AP middle)
BONE_CLEARANCE_MM = 4.0  # muscle ROI voxels keep this far from bone (laminae, transverse processes)
MIN_ROI_VOXELS = 20  # fewer voxels than this (after erosion) make no ROI
METAL_CLEARANCE_MM = 15.0  # ROI voxels this close to metal are excluded (streak artefacts)

# --- vessels ---------------------------------------------------------------------------------------------------
AORTA_BOX_X_MM = (-15.0, 55.0)  # relative to the vertebral-body centre: the aorta lies left (+x) ...
AORTA_BOX_Y_MM = (-75.0, 15.0)  # ... and in front (−y); at T5–T10 it lies beside the body, hence +15 mm
IVC_BOX_X_MM = (-60.0, 5.0)  # the IVC lies right (−x) ...
IVC_BOX_Y_MM = (-75.0, 10.0)  # ... and in front of the vertebral body
AORTA_EXPECTED_MM = (15.0, -35.0)  # typical aortic centre from the vertebral-body centre at L1–L3 (left, anterior)
IVC_EXPECTED_MM = (-25.0, -30.0)  # typical IVC centre (right, anterior)
PORTAL_EXPECTED_MM = (-45.0, -70.0)  # the portal vein in the hilum, anterior-right
PRIOR_SD_MM = 25.0  # the score is weighted by a Gaussian of this SD around the expected place: bowel loops far
# from the spine, as round and homogeneous as a vessel, lose against the retroperitoneal vessel
AORTA_RADII_MM = (8.0, 10.0, 12.5, 15.0)  # abdominal aorta 15–25 mm across, thoracic up to 30 mm
IVC_RADII_MM = (7.0, 9.0, 11.0)  # IVC 15–25 mm, often flattened: the inner disc stays inside
PORTAL_BOX_X_MM = (-85.0, -10.0)  # portal vein: right of the spine ...
PORTAL_BOX_Y_MM = (-110.0, -40.0)  # ... well in front of it (hilum), clear of the IVC
PORTAL_RADII_MM = (6.0, 8.0)  # portal vein 10–16 mm across
PORTAL_SLAB_MM = 45.0  # searched on the top this-many mm of the slab (T12–L1)
INNER_FRACTION = 0.6  # the HU are measured in the inner 60 % of the radius (wall, partial volume, plaque)
RING_MM = 5.0  # the surroundings: an annulus this wide outside the vessel
VESSEL_MIN_HU = 15.0  # blood below this is not blood (water, fluid, bile) ...
VESSEL_MAX_HU = 650.0  # ... above this it is bone or calcium (enhanced lumen ≤ 500 at 120 kVp)
VESSEL_MAX_SD_HU = 45.0  # a lumen is homogeneous (noise 10–30 HU); bowel contents, bone marrow are not
VESSEL_MIN_CONTRAST_HU = 40.0  # the lumen differs from its ring by this much (fat −100 vs blood 40: > 100)
SPINE_HALF_WIDTH_MM = 30.0  # the canal is searched this far either side of the body's midline
CANAL_AREA_MM2 = (40.0, 700.0)  # canal cross-section (canal.py: MIN_AREA_MM2, MAX_AREA_MM2); a body's marrow is larger
CANAL_TO_BODY_MM = 24.0  # canal centre to vertebral-body centre: canal AP radius 7–9 mm + body half-depth 13–18 mm
BODY_HALF_WIDTH_MM = 22.0  # a vessel's centre lies outside the vertebral body: half its width (lumbar 40–50 mm) ...
BODY_HALF_DEPTH_MM = 16.0  # ... and half its depth (30–35 mm), each plus the vessel's radius
TRACK_MM = 8.0  # the per-slice vessel centre stays within this of the slab-wide one ...
TRACK_SD_MM = 4.0  # ... and is drawn towards it (Gaussian weight of this SD)
LUMEN_HU_TOLERANCE = 10.0  # a slice whose lumen HU differs from the slab's median by more (and by > 3 MAD) is a
# neighbour taken for the vessel (bowel 20–35 HU next to unenhanced blood 40 HU): dropped
MIN_VESSEL_SLICES = 3  # a vessel seen on fewer slices is not trusted
PLAQUE_HU = 150.0  # ROI voxels this much above the median are calcified plaque or a rib: excluded and counted
PORTAL_MIN_EXCESS_HU = 40.0  # the portal vein must be this much brighter than the liver around it
PORTAL_RING_HU = (60.0, 180.0)  # ... and the ring must be liver (unenhanced 50–70, arterial 70–90, portal venous
# 100–130 HU)
PORTAL_MIN_HU = 120.0  # an enhanced portal vein: arterial 145 ± 20 HU, portal venous 150–200 HU


@dataclass
class TissueROI:
    """One reference tissue: its HU statistics and where they were measured.

    Attributes:
        name: one of :data:`TISSUE_NAMES`.
        found: whether the tissue was found; when False ``reason`` says why.
        median_hu, mean_hu, sd_hu: HU statistics of the ROI voxels (None when not found).
        n_voxels: ROI voxels (on the analysed, pooled grid).
        centre_lps: centroid of the ROI (mm).
        radius_mm: vessel radius used (vessels only).
        bbox_lps: ``(min_xyz, max_xyz)`` of the ROI (mm).
        reason: the sentence for a tissue that was not found.
        notes: QC remarks (metal excluded, plaque excluded, ...).
        voxels_kji: ``(n, 3)`` int full-resolution (k, j, i) indices of the ROI's pooled voxels' centres.
    """

    name: str
    found: bool
    median_hu: float | None = None
    mean_hu: float | None = None
    sd_hu: float | None = None
    n_voxels: int = 0
    centre_lps: tuple[float, float, float] | None = None
    radius_mm: float | None = None
    bbox_lps: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    voxels_kji: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), int), repr=False)

    def as_json(self) -> dict:
        """Plain dict (results.json); the voxel list is left out."""
        def r(v):
            return None if v is None else round(float(v), 1)

        return {
            "found": self.found,
            "median_hu": r(self.median_hu), "mean_hu": r(self.mean_hu), "sd_hu": r(self.sd_hu),
            "n_voxels": int(self.n_voxels),
            "centre_lps": None if self.centre_lps is None else [r(c) for c in self.centre_lps],
            "radius_mm": r(self.radius_mm),
            "bbox_lps": None if self.bbox_lps is None else [[r(c) for c in b] for b in self.bbox_lps],
            "reason": self.reason,
            "notes": list(self.notes),
        }


@dataclass
class ReferenceTissues:
    """The reference tissues found in one CT.

    Attributes:
        tissues: one :class:`TissueROI` per name of :data:`TISSUE_NAMES`.
        slab_z_mm: the z range analysed (mm, LPS).
        n_slices: slices analysed.
        spine_source: "given" (vertebral-body centres from the caller) or "bone" (found here) or "none".
        notes: remarks that concern the whole search.
        seconds: time taken.
    """

    tissues: dict[str, TissueROI]
    slab_z_mm: tuple[float, float]
    n_slices: int
    spine_source: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    water_equivalent_diameter_cm: float | None = None

    def __getitem__(self, name: str) -> TissueROI:
        return self.tissues[name]

    def median(self, name: str) -> float | None:
        """The median HU of ``name`` (None when not found)."""
        t = self.tissues.get(name)
        return t.median_hu if t is not None and t.found else None

    def missing(self) -> list[str]:
        """Names of the tissues not found."""
        return [n for n, t in self.tissues.items() if not t.found]

    def as_json(self) -> dict:
        """Plain dict (results.json)."""
        return {
            "tissues": {n: t.as_json() for n, t in self.tissues.items()},
            "slab_z_mm": [round(float(z), 1) for z in self.slab_z_mm],
            "n_slices": self.n_slices,
            "spine_source": self.spine_source,
            "water_equivalent_diameter_cm": (None if self.water_equivalent_diameter_cm is None
                                             else round(self.water_equivalent_diameter_cm, 1)),
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _Slab:
    """The analysed slab: pooled HU ``(n, ny', nx')``, its slice indices and the pooling factor."""

    hu: np.ndarray
    ks: np.ndarray
    pool: int
    px_mm: tuple[float, float]  # pooled pixel size (x, y)
    volume: CTVolume

    def mm(self, d_mm: float, axis: int = 0) -> float:
        """``d_mm`` in pooled pixels along x (axis 0) or y (axis 1)."""
        return d_mm / self.px_mm[axis]

    def to_kji(self, idx: np.ndarray) -> np.ndarray:
        """Pooled ``(n, 3)`` (slab slice, row, column) indices → full-resolution (k, j, i) of the pooled centres."""
        idx = np.asarray(idx).reshape(-1, 3)
        k = self.ks[idx[:, 0]]
        off = (self.pool - 1) // 2
        return np.stack([k, idx[:, 1] * self.pool + off, idx[:, 2] * self.pool + off], axis=1).astype(int)


def _disk(radius_px: float) -> np.ndarray:
    """Boolean disc of ``radius_px`` (at least the 3 × 3 cross)."""
    r = max(1, int(np.ceil(radius_px)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx * xx + yy * yy) <= max(radius_px, 1.0) ** 2


# 3 × 3 × 3 structuring elements that connect within a slice, never across slices (nested lists: no array work at
# import time): 4-connected, and the full 3 × 3 square.
_OFF = [[0, 0, 0], [0, 0, 0], [0, 0, 0]]
_IN_PLANE = [_OFF, [[0, 1, 0], [1, 1, 1], [0, 1, 0]], _OFF]
_IN_PLANE_8 = [_OFF, [[1, 1, 1], [1, 1, 1], [1, 1, 1]], _OFF]


def _erode2d(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """In-plane erosion of a ``(n, ny, nx)`` mask by ≈ ``radius_px`` (repeated 3 × 3 steps: fast, octagonal)."""
    it = round(radius_px)
    return mask if it < 1 else ndimage.binary_erosion(mask, structure=_IN_PLANE_8, iterations=it)


def _dilate2d(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """In-plane dilation of a ``(n, ny, nx)`` mask by ≈ ``radius_px``."""
    it = round(radius_px)
    return mask if it < 1 else ndimage.binary_dilation(mask, structure=_IN_PLANE_8, iterations=it)


def _depth_from_skin(body: np.ndarray, px_mm: tuple[float, float]) -> np.ndarray:
    """Per-slice in-plane distance (mm) of each body voxel from the outline, ``(n, ny, nx)`` float32.

    Computed on a 2 × 2 coarser grid (the depth thresholds used are ≥ 2 mm apart; halves the cost four-fold).
    """
    coarse = body[:, ::2, ::2]
    d = ndimage.distance_transform_edt(coarse, sampling=(1e6, 2 * px_mm[1], 2 * px_mm[0])).astype(np.float32)
    d = np.repeat(np.repeat(d, 2, axis=1), 2, axis=2)[:, : body.shape[1], : body.shape[2]]
    return np.where(body, np.maximum(d - 0.5 * (px_mm[0] + px_mm[1]) * 0.5, 0.0), 0.0).astype(np.float32)


def select_slab(volume: CTVolume, z_range_mm: tuple[float, float] | None) -> tuple[_Slab, tuple[float, float]]:
    """The slices to analyse (every ~3 mm of ``z_range_mm`` ± the margin) pooled in-plane to ≈ 1.5 mm."""
    nz = volume.shape[0]
    z = volume.index_to_lps(np.stack([np.zeros(nz), np.zeros(nz), np.arange(nz)], axis=1))[:, 2]
    if z_range_mm is None:
        ks = np.arange(nz)
    else:
        lo, hi = min(z_range_mm) - SLAB_MARGIN_MM, max(z_range_mm) + SLAB_MARGIN_MM
        ks = np.flatnonzero((z >= lo) & (z <= hi))
        if ks.size == 0:
            ks = np.arange(nz)
    step = max(1, round(SLAB_STEP_MM / max(volume.spacing[2], 1e-3)))
    ks = ks[::step]
    if ks.size > MAX_SLICES:
        ks = ks[np.linspace(0, ks.size - 1, MAX_SLICES).round().astype(int)]
    pool = max(1, int(np.ceil(POOL_TARGET_MM / min(volume.spacing[0], volume.spacing[1]) - 0.2)))  # 0.84 mm → 3
    sub = np.asarray(volume.hu[ks], dtype=np.float32)
    ny, nx = sub.shape[1] // pool * pool, sub.shape[2] // pool * pool
    sub = sub[:, :ny, :nx]
    if pool > 1:
        sub = sub.reshape(len(ks), ny // pool, pool, nx // pool, pool).mean(axis=(2, 4))
    slab = _Slab(sub, ks, pool, (volume.spacing[0] * pool, volume.spacing[1] * pool), volume)
    return slab, (float(z[ks].min()), float(z[ks].max()))


def body_outline(hu: np.ndarray) -> np.ndarray:
    """The patient's body per slice ``(n, ny, nx)`` bool: above −500 HU, holes filled, the largest in-plane component.

    The table (a thin dense shell under the patient) and clothing are separate components or are cut off by a small
    opening; the lungs and bowel gas are holes inside the outline and are filled.
    """
    dense = ndimage.binary_opening(hu > BODY_HU, structure=_IN_PLANE)
    lab, m = ndimage.label(dense, structure=_IN_PLANE)
    if m == 0:
        return dense
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = np.zeros(m + 1, bool)
    for objs in _labels_per_slice(lab, m).values():
        keep[objs[int(np.argmax(sizes[objs]))]] = True
    return ndimage.binary_fill_holes(keep[lab], structure=_IN_PLANE)


def _labels_per_slice(lab: np.ndarray, m: int) -> dict[int, np.ndarray]:
    """Label ids per slice of an in-plane labelling (each label lies in one slice)."""
    per: dict[int, list[int]] = {}
    for i, sl in enumerate(ndimage.find_objects(lab, max_label=m), start=1):
        if sl is not None:
            per.setdefault(sl[0].start, []).append(i)
    return {n: np.array(v) for n, v in per.items()}


def _canal_centre(crop: np.ndarray, px_mm: tuple[float, float]) -> np.ndarray | None:
    """The spinal canal in a bone crop ``(h, w)``: the largest hole of canal size, its centroid (row, col), or None."""
    closed = ndimage.binary_closing(crop, structure=_disk(1.5))
    holes = ndimage.binary_fill_holes(closed) & ~closed
    lab, m = ndimage.label(holes)
    if m == 0:
        return None
    area = np.bincount(lab.ravel())[1:] * px_mm[0] * px_mm[1]
    ok = (area >= CANAL_AREA_MM2[0]) & (area <= CANAL_AREA_MM2[1])
    if not ok.any():
        return None
    best = int(np.argmax(np.where(ok, area, 0.0))) + 1
    return np.array(ndimage.center_of_mass(lab == best))


def spine_centres_from_bone(slab: _Slab, body: np.ndarray) -> np.ndarray | None:
    """Vertebral-body centre per slice ``(n, 2)`` in pooled (col, row) pixels, from the bone; None if no spine.

    On the slices where the vertebral arch closes around the spinal canal (bone > 150 HU near the body's midline,
    behind its front 30 %), the canal is the enclosed hole of canal size (as in ``canal.py``) and the vertebral body's
    centre lies :data:`CANAL_TO_BODY_MM` in front of it; the other slices are interpolated. The vertebral body itself
    is not used: the cortex of an osteoporotic body blurs below 150 HU on pooled or thick slices, while the arch stays
    dense.
    """
    n = slab.hu.shape[0]
    out = np.full((n, 2), np.nan)
    half = slab.mm(SPINE_HALF_WIDTH_MM, 0)
    for s in range(n):
        if not body[s].any():
            continue
        rows, cols = np.nonzero(body[s])
        mid_x = 0.5 * (cols.min() + cols.max())
        r_lo = int(rows.min() + SPINE_ANTERIOR_FRACTION * (rows.max() - rows.min()))  # behind sternum and cartilage
        c_lo = max(0, int(mid_x - half))
        box = (slice(r_lo, None), slice(c_lo, int(mid_x + half) + 1))
        crop = (slab.hu[s][box] > SPINE_BONE_HU) & body[s][box]
        c = _canal_centre(crop, slab.px_mm)
        if c is not None:
            out[s] = (c[1] + c_lo, c[0] + r_lo - slab.mm(CANAL_TO_BODY_MM, 1))
    ok = np.isfinite(out[:, 0])
    if ok.sum() < max(2, n // 5):
        return None
    for a in range(2):  # running median against a rib or a foramen taken for the canal on one slice
        good = out[ok, a]
        med = ndimage.median_filter(good, size=min(5, good.size), mode="nearest")
        out[ok, a] = np.where(np.abs(good - med) > slab.mm(10.0, a), med, good)
        out[~ok, a] = np.interp(np.flatnonzero(~ok), np.flatnonzero(ok), out[ok, a])
    return out


def spine_centres_given(slab: _Slab, centres_lps: np.ndarray) -> np.ndarray:
    """The given vertebral-body centres ``(m, 3)`` LPS interpolated to the slab's slices, in pooled (col, row) px."""
    c = np.asarray(centres_lps, float).reshape(-1, 3)
    ijk = slab.volume.lps_to_index(c)
    order = np.argsort(ijk[:, 2])
    ijk = ijk[order]
    ks = slab.ks.astype(float)
    col = np.interp(ks, ijk[:, 2], ijk[:, 0])
    row = np.interp(ks, ijk[:, 2], ijk[:, 1])
    return np.stack([col, row], axis=1) / slab.pool


def _stats(name: str, slab: _Slab, idx: np.ndarray, notes: list[str], radius_mm: float | None = None,
           exclude_plaque: bool = False) -> TissueROI:
    """A found :class:`TissueROI` from pooled ROI indices ``(n, 3)`` (slice, row, col)."""
    vals = slab.hu[idx[:, 0], idx[:, 1], idx[:, 2]]
    if exclude_plaque and vals.size:
        med = float(np.median(vals))
        keep = vals < med + PLAQUE_HU
        if (~keep).sum():
            notes.append(f"{int((~keep).sum())} voxels > median + {PLAQUE_HU:.0f} HU excluded (calcified plaque?)")
        idx, vals = idx[keep], vals[keep]
    kji = slab.to_kji(idx)
    lps = slab.volume.index_to_lps(kji[:, ::-1].astype(float))
    return TissueROI(
        name=name, found=True, median_hu=float(np.median(vals)), mean_hu=float(vals.mean()), sd_hu=float(vals.std()),
        n_voxels=int(vals.size), centre_lps=tuple(float(v) for v in lps.mean(axis=0)), radius_mm=radius_mm,
        bbox_lps=(tuple(float(v) for v in lps.min(axis=0)), tuple(float(v) for v in lps.max(axis=0))),
        notes=notes, voxels_kji=kji,
    )


def _from_mask(name: str, slab: _Slab, mask: np.ndarray, metal_near: np.ndarray | None, why_empty: str,
               notes: list[str] | None = None) -> TissueROI:
    """A :class:`TissueROI` from a pooled ROI mask, metal-near voxels excluded; not found with ``why_empty``."""
    notes = list(notes or [])
    if metal_near is not None:
        hit = mask & metal_near
        if hit.any():
            notes.append(f"{int(hit.sum())} voxels within {METAL_CLEARANCE_MM:.0f} mm of metal excluded")
            mask = mask & ~metal_near
            if mask.sum() < MIN_ROI_VOXELS:
                return TissueROI(name, False, reason=f"{why_empty} once the voxels near metal are excluded",
                                 notes=notes)
    if mask.sum() < MIN_ROI_VOXELS:
        return TissueROI(name, False, reason=why_empty, notes=notes)
    return _stats(name, slab, np.argwhere(mask), notes)


def find_air(slab: _Slab, body: np.ndarray, hu_floor: float | None) -> TissueROI:
    """Air in front of the body (away from the table behind a supine patient), the skin and the image edge."""
    n, ny, nx = slab.hu.shape
    mask = np.zeros((n, ny, nx), bool)
    gap, depth, half = slab.mm(AIR_GAP_MM, 1), slab.mm(AIR_DEPTH_MM, 1), slab.mm(AIR_HALF_WIDTH_MM, 0)
    edge = int(np.ceil(slab.mm(EDGE_MM, 1)))
    for s in range(n):
        if not body[s].any():
            continue
        rows, cols = np.nonzero(body[s])
        cx = 0.5 * (cols.min() + cols.max())
        front = rows.min()  # anterior skin (smallest y)
        r0, r1 = max(edge, int(front - gap - depth)), int(front - gap)
        c0, c1 = max(edge, int(cx - half)), min(nx - edge, int(cx + half))
        if r1 > r0 and c1 > c0:
            mask[s, r0:r1, c0:c1] = True
    mask &= ~body  # the box lies ≥ AIR_GAP_MM in front of the most anterior skin; this guards the flanks
    mask &= slab.hu < AIR_MAX_HU
    if hu_floor is not None:
        mask &= slab.hu > hu_floor + 0.5  # the scanner's padding outside the reconstruction circle
    if not body.any():
        return TissueROI("air", False, reason="no body in the slab: air cannot be told from the space around it")
    return _from_mask("air", slab, mask, None, "no air in front of the body: the body fills the field of view or "
                      "something dense lies in front of it")


def find_fat(slab: _Slab, body: np.ndarray, depth: np.ndarray, metal_near: np.ndarray | None
             ) -> tuple[TissueROI, TissueROI]:
    """Subcutaneous fat (the fat layer touching the skin) and visceral fat (fat enclosed by the muscular wall)."""
    fat = body & (slab.hu > FAT_HU[0]) & (slab.hu < FAT_HU[1]) & (depth > SKIN_MM)
    lab, m = ndimage.label(fat, structure=_IN_PLANE)
    is_sub = np.zeros(m + 1, bool)
    is_sub[np.unique(lab[fat & (depth <= SUBCUT_SEED_MM)])] = True
    is_sub[0] = False
    sub = is_sub[lab]
    vis = (lab > 0) & ~sub
    sub &= depth < SUBCUT_MAX_MM
    vis &= depth > VISCERAL_MIN_DEPTH_MM
    er = slab.mm(ERODE_MM, 0)
    sub, vis = _erode2d(sub, er), _erode2d(vis, er)
    if not body.any():
        why = "no body in the slab"
        return TissueROI("subcutaneous_fat", False, reason=why), TissueROI("visceral_fat", False, reason=why)
    return (
        _from_mask("subcutaneous_fat", slab, sub, metal_near,
                   f"no fat layer under the skin thicker than {2 * ERODE_MM + SKIN_MM:.0f} mm (a very lean patient?)"),
        _from_mask("visceral_fat", slab, vis, metal_near,
                   "no fat enclosed by the muscular wall apart from the subcutaneous layer (lean patient, or the "
                   "wall is not closed on these slices)"),
    )


def find_paraspinal_muscle(slab: _Slab, body: np.ndarray, spine: np.ndarray | None, metal_near: np.ndarray | None
                           ) -> TissueROI:
    """The erector spinae on each side: soft tissue behind the vertebral body, lateral of the spinous process."""
    if spine is None:
        return TissueROI("paraspinal_muscle", False, reason="the spine was not found: the paraspinal muscles cannot "
                         "be placed")
    n, ny, nx = slab.hu.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    bone_near = _dilate2d(slab.hu > BONE_HU, slab.mm(BONE_CLEARANCE_MM, 0))
    soft = body & (slab.hu > SOFT_HU[0]) & (slab.hu < SOFT_HU[1]) & ~bone_near
    soft = _erode2d(soft, slab.mm(1.0, 0))  # cut thin bridges to the psoas or the skin
    mask = np.zeros_like(soft)
    for s in range(n):
        dx = (xx - spine[s, 0]) * slab.px_mm[0]
        dy = (yy - spine[s, 1]) * slab.px_mm[1]
        for side in (-1, 1):
            box = ((side * dx > PARASPINAL_LATERAL_MM[0]) & (side * dx < PARASPINAL_LATERAL_MM[1])
                   & (dy > PARASPINAL_POSTERIOR_MM[0]) & (dy < PARASPINAL_POSTERIOR_MM[1]))
            lab, m = ndimage.label(soft[s] & box)
            if m:
                sizes = np.bincount(lab.ravel())[1:]
                mask[s] |= lab == (int(np.argmax(sizes)) + 1)
    mask = _erode2d(mask, slab.mm(MUSCLE_ERODE_MM - 1.0, 0))
    return _from_mask("paraspinal_muscle", slab, mask, metal_near,
                      "no soft tissue behind the spine on either side (atrophied or fatty muscle, or cut off)")


@dataclass
class _VesselHit:
    s: np.ndarray  # slab slice indices
    row: np.ndarray  # pooled row (y) of the centre
    col: np.ndarray  # pooled column (x)
    radius_mm: float
    inside_hu: np.ndarray
    ring_hu: np.ndarray


def _boxes(slab: _Slab, spine: np.ndarray, box_x_mm: tuple[float, float], box_y_mm: tuple[float, float],
           slices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crops ``(m, h, w)`` of the slab relative to the spine per slice (padded with −1000), and their origins."""
    c0 = np.round(spine[slices, 0] + box_x_mm[0] / slab.px_mm[0]).astype(int)
    r0 = np.round(spine[slices, 1] + box_y_mm[0] / slab.px_mm[1]).astype(int)
    w = round((box_x_mm[1] - box_x_mm[0]) / slab.px_mm[0])
    h = round((box_y_mm[1] - box_y_mm[0]) / slab.px_mm[1])
    _, ny, nx = slab.hu.shape
    pad = int(max(0, -r0.min(), -c0.min(), (r0 + h).max() - ny, (c0 + w).max() - nx)) + 1  # boxes leaving the image
    padded = np.pad(slab.hu[slices], ((0, 0), (pad, pad), (pad, pad)), constant_values=-1000.0)
    crops = np.stack([padded[i, r + pad:r + pad + h, c + pad:c + pad + w]
                      for i, (r, c) in enumerate(zip_strict(r0, c0))])
    return crops, r0, c0


def _disc_ring_maps(crops: np.ndarray, radius_mm: float, px_mm: float) -> tuple[np.ndarray, ...]:
    """Per pixel: mean and SD in the inner disc, mean in the surrounding ring, for a vessel of ``radius_mm``."""
    r_in = INNER_FRACTION * radius_mm / px_mm
    r_out = (radius_mm + RING_MM) / px_mm
    r_vessel = radius_mm / px_mm
    R = int(np.ceil(r_out))
    yy, xx = np.mgrid[-R:R + 1, -R:R + 1]
    d = np.hypot(xx, yy)
    inner = (d <= max(r_in, 1.0)).astype(np.float32)
    ring = ((d > r_vessel + 0.5) & (d <= r_out)).astype(np.float32)
    inner /= inner.sum()
    ring /= ring.sum()

    def conv(a: np.ndarray, k: np.ndarray) -> np.ndarray:
        return fftconvolve(a, k[None], mode="same", axes=(1, 2))

    m_in = conv(crops, inner)
    var = np.maximum(conv(crops * crops, inner) - m_in * m_in, 0.0)
    return m_in, np.sqrt(var), conv(crops, ring)


def detect_vessel(slab: _Slab, spine: np.ndarray, slices: np.ndarray, box_x_mm, box_y_mm, radii_mm,
                  expected_mm: tuple[float, float], min_contrast: float = VESSEL_MIN_CONTRAST_HU
                  ) -> _VesselHit | None:
    """The best round homogeneous structure in a box fixed to the spine, tracked along the slab.

    The score per pixel and radius is the contrast between the inner disc and the ring (either sign: enhanced blood
    is brighter than anything around, unenhanced blood is brighter than fat and darker than bone) divided by the disc's
    SD. Scores are summed over the slices (the vessel follows the spine), the best position and radius chosen, and the
    centre refined per slice within :data:`TRACK_MM`.
    """
    if slices.size == 0:
        return None
    crops, r0, c0 = _boxes(slab, spine, box_x_mm, box_y_mm, slices)
    px = 0.5 * (slab.px_mm[0] + slab.px_mm[1])
    h, w = crops.shape[1:]
    # pixel offsets (mm) from the vertebral-body centre, the same for every crop (the boxes follow the spine)
    dx = box_x_mm[0] + slab.px_mm[0] * np.arange(w)[None, :]
    dy = box_y_mm[0] + slab.px_mm[1] * np.arange(h)[:, None]

    prior = np.exp(-((dx - expected_mm[0]) ** 2 + (dy - expected_mm[1]) ** 2) / (2.0 * PRIOR_SD_MM**2))

    def outside_body(radius: float) -> np.ndarray:
        return ((dx / (BODY_HALF_WIDTH_MM + radius)) ** 2 + (dy / (BODY_HALF_DEPTH_MM + radius)) ** 2) > 1.0

    best = None
    for radius in radii_mm:
        m_in, sd_in, m_ring = _disc_ring_maps(crops, radius, px)
        contrast = np.abs(m_in - m_ring)
        ok = ((m_in > VESSEL_MIN_HU) & (m_in < VESSEL_MAX_HU) & (sd_in < VESSEL_MAX_SD_HU)
              & (contrast > min_contrast))
        score = np.where(ok, contrast / (sd_in + 10.0), 0.0)
        score[:, outside_body(radius) == 0] = 0.0
        edge = int(np.ceil((radius + RING_MM) / px))
        score[:, :edge], score[:, -edge:], score[:, :, :edge], score[:, :, -edge:] = 0, 0, 0, 0
        total = score.sum(axis=0) * prior * np.sqrt(radius)  # favour the whole lumen over a disc inside a larger vessel
        j, i = np.unravel_index(int(np.argmax(total)), total.shape)
        if best is None or total[j, i] > best[0]:
            best = (float(total[j, i]), radius, j, i, score, m_in, m_ring)
    if best is None or best[0] <= 0:
        return None
    _, radius, j, i, score, m_in, m_ring = best
    t = int(np.ceil(TRACK_MM / px))
    wy, wx = np.mgrid[-t:t + 1, -t:t + 1] * px
    near = np.exp(-(wx**2 + wy**2) / (2.0 * TRACK_SD_MM**2))  # favour the tube's position over a neighbour
    keep, rows, cols = [], [], []
    for m in range(len(slices)):
        j0, i0 = max(0, j - t), max(0, i - t)
        win = score[m, j0:j + t + 1, i0:i + t + 1]
        if win.size == 0 or win.max() <= 0:
            continue
        w = win * near[j0 - (j - t):j0 - (j - t) + win.shape[0], i0 - (i - t):i0 - (i - t) + win.shape[1]]
        a, b = np.unravel_index(int(np.argmax(w)), w.shape)
        keep.append(m)
        rows.append(j0 + a)
        cols.append(i0 + b)
    if len(keep) < MIN_VESSEL_SLICES:
        return None
    keep_a, rows_a, cols_a = np.array(keep), np.array(rows), np.array(cols)
    # drop slices where the vessel is no longer the lumen seen elsewhere (bifurcation, a neighbour taken instead)
    sc, hu = score[keep_a, rows_a, cols_a], m_in[keep_a, rows_a, cols_a]
    best_half = sc >= np.median(sc)  # the lumen's HU is read where the vessel is clearest (not below a bifurcation)
    ref = np.median(hu[best_half])
    mad = np.median(np.abs(hu[best_half] - ref))
    good = (sc >= 0.5 * np.median(sc[best_half])) & (np.abs(hu - ref) <= max(3.0 * mad, LUMEN_HU_TOLERANCE))
    if good.sum() < MIN_VESSEL_SLICES:
        return None
    keep_a, rows_a, cols_a = keep_a[good], rows_a[good], cols_a[good]
    return _VesselHit(slices[keep_a], r0[keep_a] + rows_a, c0[keep_a] + cols_a, radius,
                      m_in[keep_a, rows_a, cols_a], m_ring[keep_a, rows_a, cols_a])


def _vessel_roi(name: str, slab: _Slab, hit: _VesselHit, metal_near: np.ndarray | None) -> TissueROI:
    """The inner discs of a tracked vessel as a :class:`TissueROI` (plaque and metal-near voxels excluded)."""
    r_px = INNER_FRACTION * hit.radius_mm / (0.5 * (slab.px_mm[0] + slab.px_mm[1]))
    R = int(np.ceil(r_px))
    yy, xx = np.mgrid[-R:R + 1, -R:R + 1]
    disc = np.argwhere(np.hypot(xx, yy) <= max(r_px, 1.0)) - R
    _, ny, nx = slab.hu.shape
    parts = []
    for s, r, c in zip_strict(hit.s, hit.row, hit.col):
        rr, cc = disc[:, 0] + r, disc[:, 1] + c
        ok = (rr >= 0) & (rr < ny) & (cc >= 0) & (cc < nx)
        parts.append(np.stack([np.full(ok.sum(), s), rr[ok], cc[ok]], axis=1))
    idx = np.concatenate(parts)
    notes: list[str] = [f"seen on {len(hit.s)} slices, radius {hit.radius_mm:.1f} mm, "
                        f"ring (surroundings) median {np.median(hit.ring_hu):.0f} HU"]
    if metal_near is not None:
        near = metal_near[idx[:, 0], idx[:, 1], idx[:, 2]]
        if near.any():
            notes.append(f"{int(near.sum())} voxels within {METAL_CLEARANCE_MM:.0f} mm of metal excluded")
            idx = idx[~near]
            if len(idx) < MIN_ROI_VOXELS:
                return TissueROI(name, False, reason=f"the {name} lies next to metal: its HU are not usable",
                                 notes=notes)
    return _stats(name, slab, idx, notes, radius_mm=hit.radius_mm, exclude_plaque=True)


def find_vessels(slab: _Slab, spine: np.ndarray | None, metal_near: np.ndarray | None) -> dict[str, TissueROI]:
    """Aorta (anterior-left of the spine), IVC (anterior-right) and portal vein (liver hilum, enhanced only)."""
    names = ("aorta", "ivc", "portal_vein")
    if spine is None:
        return {n: TissueROI(n, False, reason="the spine was not found: the great vessels cannot be placed")
                for n in names}
    every = np.arange(slab.hu.shape[0])
    out: dict[str, TissueROI] = {}
    hit = detect_vessel(slab, spine, every, AORTA_BOX_X_MM, AORTA_BOX_Y_MM, AORTA_RADII_MM, AORTA_EXPECTED_MM)
    out["aorta"] = (_vessel_roi("aorta", slab, hit, metal_near) if hit is not None else TissueROI(
        "aorta", False, reason="no round, homogeneous blood-dense structure anterior-left of the spine on at least "
        f"{MIN_VESSEL_SLICES} slices (aorta out of the field of view or not separable from its surroundings)"))
    hit = detect_vessel(slab, spine, every, IVC_BOX_X_MM, IVC_BOX_Y_MM, IVC_RADII_MM, IVC_EXPECTED_MM)
    if hit is not None and out["aorta"].found:
        d = np.hypot(*(np.array(out["aorta"].centre_lps[:2]) - slab.volume.index_to_lps(
            np.array([[np.median(hit.col) * slab.pool, np.median(hit.row) * slab.pool, 0.0]]))[0, :2]))
        if d < 15.0:
            hit = None  # the same vessel as the aorta
    out["ivc"] = (_vessel_roi("ivc", slab, hit, metal_near) if hit is not None else TissueROI(
        "ivc", False, reason="no round, homogeneous blood-dense structure anterior-right of the spine on at least "
        f"{MIN_VESSEL_SLICES} slices (IVC flattened, out of view or not separable)"))
    z = slab.volume.index_to_lps(np.stack([np.zeros(len(slab.ks)), np.zeros(len(slab.ks)), slab.ks], axis=1))[:, 2]
    top = np.flatnonzero(z >= z.max() - PORTAL_SLAB_MM)
    hit = detect_vessel(slab, spine, top, PORTAL_BOX_X_MM, PORTAL_BOX_Y_MM, PORTAL_RADII_MM, PORTAL_EXPECTED_MM,
                        min_contrast=PORTAL_MIN_EXCESS_HU)
    if hit is not None:
        bright = (hit.inside_hu - hit.ring_hu > PORTAL_MIN_EXCESS_HU) & (hit.ring_hu > PORTAL_RING_HU[0]) & (
            hit.ring_hu < PORTAL_RING_HU[1])
        bright &= hit.inside_hu > PORTAL_MIN_HU
        if bright.sum() >= MIN_VESSEL_SLICES - 1:
            hit = _VesselHit(hit.s[bright], hit.row[bright], hit.col[bright], hit.radius_mm, hit.inside_hu[bright],
                             hit.ring_hu[bright])
        else:
            hit = None
    out["portal_vein"] = (_vessel_roi("portal_vein", slab, hit, metal_near) if hit is not None else TissueROI(
        "portal_vein", False, reason="no vessel clearly brighter (by "
        f"{PORTAL_MIN_EXCESS_HU:.0f} HU) than the liver around it in the hilum region: unenhanced, arterial phase, or "
        "the hilum is out of the slab; not guessed"))
    return out


def _metal_near(volume: CTVolume, slab: _Slab) -> np.ndarray | None:
    """Pooled mask of voxels within :data:`METAL_CLEARANCE_MM` of metal (in-plane, and along z over the slices in
    between the analysed ones), or None when there is none."""
    w = int(np.ceil(METAL_CLEARANCE_MM / max(volume.spacing[2], 1e-3)))
    k0, k1 = max(0, int(slab.ks.min()) - w), min(volume.shape[0], int(slab.ks.max()) + w + 1)
    per_slice = np.asarray(volume.hu[k0:k1]).max(axis=(1, 2)) > METAL_HU
    if not per_slice.any():
        return None
    p = slab.pool
    n, ny, nx = slab.hu.shape
    out = np.zeros((n, ny, nx), bool)
    for s, k in enumerate(slab.ks):
        near = np.flatnonzero(per_slice[max(0, k - w - k0):k + w + 1 - k0]) + max(k0, k - w)
        if near.size == 0:
            continue
        raw = (np.asarray(volume.hu[near]) > METAL_HU).any(axis=0)
        pooled = raw[:ny * p, :nx * p].reshape(ny, p, nx, p).any(axis=(1, 3))
        out[s] = ndimage.distance_transform_edt(~pooled, sampling=(slab.px_mm[1], slab.px_mm[0])) <= METAL_CLEARANCE_MM
    return out


#: Body voxels on the image edge, as a fraction of a slice's outline, above which the body is cut by the field of
#: view: its water-equivalent diameter would be a lower bound, and is not given.
WED_TRUNCATED_EDGE_FRACTION = 0.02


def water_equivalent_diameter_cm(slab: _Slab, body: np.ndarray) -> tuple[float | None, str | None]:
    """The patient's water-equivalent diameter (cm) over the slab (AAPM Report 220, 2014, eq. 3):
    D_w = 2 √((mean HU / 1000 + 1) · A / π) per slice, A the area inside the body outline; the median over the
    slices. ``(None, why)`` when the outline is cut by the field of view or empty."""
    values = []
    for k in range(body.shape[0]):
        inside = body[k]
        n = int(inside.sum())
        if n == 0:
            continue
        edge = int(inside[0].sum() + inside[-1].sum() + inside[:, 0].sum() + inside[:, -1].sum())
        perimeter = max(1.0, float(np.sqrt(n)) * 4.0)
        if edge / perimeter > WED_TRUNCATED_EDGE_FRACTION:
            return None, "the body is cut by the field of view: no water-equivalent diameter"
        area_mm2 = n * slab.px_mm[0] * slab.px_mm[1]
        mean_hu = float(np.clip(slab.hu[k][inside].mean(), -1000.0, 3000.0))
        values.append(2.0 * np.sqrt((mean_hu / 1000.0 + 1.0) * area_mm2 / np.pi) / 10.0)
    if not values:
        return None, "no body outline in the slab: no water-equivalent diameter"
    return float(np.median(values)), None


def find_reference_tissues(volume: CTVolume, body_centres_lps: np.ndarray | None = None,
                           z_range_mm: tuple[float, float] | None = None) -> ReferenceTissues:
    """Find air, subcutaneous and visceral fat, paraspinal muscle, aorta, IVC and portal vein in ``volume``.

    Args:
        volume: axial LPS CT (HU).
        body_centres_lps: ``(m, 3)`` vertebral-body centres (mm), e.g. of L1–L4 from the chain or a label map; None:
            the spine is found from the bone on each slice.
        z_range_mm: the levels' z range (mm); the slab is this ± :data:`SLAB_MARGIN_MM`. None: the centres' range, or
            the whole volume.

    Returns:
        :class:`ReferenceTissues` with one :class:`TissueROI` per tissue; tissues not found carry a reason.
    """
    t0 = time.perf_counter()
    if z_range_mm is None and body_centres_lps is not None and len(body_centres_lps):
        zs = np.asarray(body_centres_lps, float).reshape(-1, 3)[:, 2]
        z_range_mm = (float(zs.min()), float(zs.max()))
    slab, slab_z = select_slab(volume, z_range_mm)
    notes: list[str] = []
    raw = np.asarray(volume.hu[slab.ks])
    raw_min = float(raw.min())
    hu_floor = raw_min if np.mean(raw == raw_min) > 0.01 else None  # padding outside the reconstruction circle
    body = body_outline(slab.hu)
    metal_near = _metal_near(volume, slab)
    if metal_near is not None:
        notes.append("metal in the slab (> 2500 HU): ROI voxels within 15 mm of it are excluded")
    if body_centres_lps is not None and len(body_centres_lps):
        spine, source = spine_centres_given(slab, body_centres_lps), "given"
    else:
        spine = spine_centres_from_bone(slab, body) if body.any() else None
        source = "bone" if spine is not None else "none"
        if spine is None:
            notes.append("no vertebra found in the slab from the bone: muscle and vessels cannot be placed")
    depth = _depth_from_skin(body, slab.px_mm)
    tissues = {"air": find_air(slab, body, hu_floor)}
    tissues["subcutaneous_fat"], tissues["visceral_fat"] = find_fat(slab, body, depth, metal_near)
    tissues["paraspinal_muscle"] = find_paraspinal_muscle(slab, body, spine, metal_near)
    tissues.update(find_vessels(slab, spine, metal_near) if body.any() else {
        n: TissueROI(n, False, reason="no body in the slab") for n in ("aorta", "ivc", "portal_vein")})
    wed, why = water_equivalent_diameter_cm(slab, body)
    if why:
        notes.append(why)
    return ReferenceTissues(tissues={n: tissues[n] for n in TISSUE_NAMES}, slab_z_mm=slab_z, n_slices=len(slab.ks),
                            spine_source=source, notes=notes, seconds=time.perf_counter() - t0,
                            water_equivalent_diameter_cm=wed)
