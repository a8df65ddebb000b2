"""Render a phantom patient into a CT volume, its 3-D truth labels and a tissue map.

Order of work (each a small function):

1. :func:`place_patient` puts the spine inside the body (canal at a realistic depth under the back).
2. :func:`render_soft_tissue` draws axial soft-tissue cross-sections (skin, fat, muscles, organs, vessels,
   table) on nodes every few mm and interpolates between them (they change slowly along z).
3. :func:`render_bowel`, :func:`render_canal`, :func:`render_spine`, :func:`render_sacrum_and_pelvis`,
   :func:`render_ribs` draw the 3-D structures with partial-volume edges in their bounding boxes.
4. :func:`render_metal` adds pedicle screws and rods (implant variant).
5. :func:`acquire` applies the scanner: point-spread and slice profile, correlated noise, metal streaks,
   the reconstruction circle, int16 quantisation.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from LumbarBMDLib._compat import pairwise, zip_strict
from LumbarBMDLib.internal_calibration.phase import POMPE_2015, POMPE_2015_INCREASE_HU
from LumbarBMDLib.phantom.anatomy import POSTERIOR_OFFSET, Patient, Vertebra
from LumbarBMDLib.phantom.scanner import ScannerProfile
from LumbarBMDLib.phantom.shapes import (
    Frame,
    Grid,
    box_distance,
    ellipse_distance,
    ellipsoid_distance,
    fraction,
    paint,
    rotation,
    segment_distance,
    stamp,
)


def _max(arrays: list[np.ndarray]) -> np.ndarray:
    """Element-wise maximum of broadcastable arrays (intersection of signed-distance shapes)."""
    return functools.reduce(np.maximum, arrays)


def _min(arrays: list[np.ndarray]) -> np.ndarray:
    """Element-wise minimum of broadcastable arrays (union of signed-distance shapes)."""
    return functools.reduce(np.minimum, arrays)


AIR_HU = -1000.0
METAL_HU = 3071.0
CORTICAL_BMD = 700.0  # mg/cm³ K2HPO4-equivalent of the body's thin (0.5 mm) cortical shell
DENSE_CORTICAL_BMD = 1100.0  # thicker cortex of posterior elements, sacrum, pelvis and ribs (≈ 1200 HU)
# Posterior elements: fatty marrow inside a thick dense cortex. The real example's posterior elements at 3 mm
# span 82–579 HU (10th–90th percentile), 77 % above 150 HU; these values reproduce that spread.
POSTERIOR_MARROW_FACTOR = 0.35  # spongiosa mineral relative to the body's
POSTERIOR_CORTEX_MM = 0.9


class Tissue:
    """Codes of the in-memory tissue map (not written to disk)."""

    AIR, FAT, SOFT, ORGAN, BLOOD, CSF, DISC, TRABECULAR, CORTICAL, GAS, TABLE, METAL, EPIDURAL_FAT = range(13)
    BONE = (TRABECULAR, CORTICAL)


@dataclass
class Variants:
    """Which variants a case has (all False = a standard case).

    ``contrast_phase`` is the intravenous contrast phase (:data:`CONTRAST_PHASES`; None = unenhanced); ``contrast``
    means "any phase" and is kept in step with it: ``Variants(contrast=True)`` is the portal venous phase.
    """

    fracture: str | None = None  # level name with a compression fracture
    implant_levels: tuple[str, ...] = ()  # levels with pedicle screws
    contrast: bool = False
    calcification: bool = False
    scoliosis: bool = False
    six_lumbar: bool = False
    missing_level: str | None = None  # "L1" or "L4": out of the field of view
    low_dose: bool = False
    contrast_phase: str | None = None  # "arterial", "portal_venous", "delayed"; None: unenhanced

    def __post_init__(self) -> None:
        if self.contrast_phase is not None and self.contrast_phase not in CONTRAST_PHASES:
            raise ValueError(f"unknown contrast phase {self.contrast_phase!r}: choose one of "
                             f"{', '.join(CONTRAST_PHASES)} or None")
        if self.contrast and self.contrast_phase is None:
            self.contrast_phase = "portal_venous"
        self.contrast = self.contrast_phase is not None

    def phase(self) -> str | None:
        """The contrast phase (None: unenhanced); ``contrast`` set without a phase is the portal venous phase."""
        if self.contrast_phase is not None:
            return self.contrast_phase
        return "portal_venous" if self.contrast else None

    def flags(self) -> dict:
        """Plain dict for truth.json."""
        return {
            "fracture": self.fracture,
            "implant_levels": list(self.implant_levels),
            "contrast": self.phase() is not None,
            "contrast_phase": self.phase(),
            "calcification": self.calcification,
            "scoliosis": self.scoliosis,
            "six_lumbar": self.six_lumbar,
            "missing_level": self.missing_level,
            "low_dose": self.low_dose,
        }


# ----------------------------------------------------------------------------------------------------
# intravenous contrast
# ----------------------------------------------------------------------------------------------------
CONTRAST_PHASES = ("arterial", "portal_venous", "delayed")
REFERENCE_IODINE_HU_PER_MG_ML = 26.6  # 120 kVp, LumbarBMDLib.phantom.physics.iodine_hu_per_mg_ml (blood + iodine)
ENHANCED_COMPARTMENTS = ("aorta", "ivc", "portal_vein", "liver", "spleen", "kidney", "bowel_wall", "spongiosa")
PORTAL_VEIN_XY_MM = (-45.0, -65.0)  # from the vertebral body's centre: right (−x) and in front (−y) of it, in the
# liver hilum, ≈ 40 mm in front of the IVC (internal_calibration.tissues looks for it at (−45, −70) ± 25 mm)
PORTAL_VEIN_RADIUS_MM = 7.0  # main portal vein ≤ 13–15 mm across
HILUM_HALF_WIDTH_MM = 18.0  # the liver tissue drawn around the hilum (caudate/quadrate lobes): the vein lies in liver
BOLUS_VARIATION = 0.10  # per case, every compartment × U(0.9, 1.1): dose per kg, cardiac output, bolus timing

#: Enhancement over the unenhanced scan (HU at 120 kVp) per phase and compartment, from the literature:
#:
#: * [G] "MDCT of the liver and hypervascular hepatocellular carcinomas: optimizing scan delays for bolus-tracking
#:   techniques of hepatic arterial and portal venous phases", AJR Am J Roentgenol 2006 (abstract verified: 171
#:   patients, 2 mL/kg of 300 mg I/mL at 4 mL/s, trigger +50 HU in the lower thoracic aorta; authors Goshima,
#:   Kanematsu et al. and the pages as recalled, not verified). Gains at 10–15 s after the trigger (late arterial):
#:   aorta 300–336, spleen 97–108, liver 15–25, proximal portal veins 75–104, hepatic veins 24–51 HU; at 45–55 s
#:   (portal venous): liver 59–63 (its peak), aorta 117–125, spleen 73–82 HU.
#: * [R] Radiopaedia, "Late arterial phase" (rev. 23 Mar 2023): aorta 290–360 HU, liver +20–30 HU, portal vein
#:   145 ± 20 HU.
#: * [K] "Multi-detector row CT of the kidney: optimizing scan delays for bolus tracking techniques of arterial,
#:   corticomedullary, and nephrographic phases", Eur J Radiol 2007;63:420–426, doi:10.1016/j.ejrad.2007.02.005
#:   (abstract verified; authors not verified): 128 patients, 2 mL/kg of 300 mg I/mL at 4 mL/s; renal cortex
#:   +195–217 HU at 10–30 s after the trigger; medulla +145 HU at 55 s, cortex–medulla difference < 30 HU from
#:   45 s (nephrographic: the parenchyma ≈ +145–175 HU).
#: * [N] Naruo K et al., Radiat Med 2007;25:106–112: portal-phase hepatic enhancement 56.2 ± 13.7 HU in
#:   non-cirrhotic patients (100 mL of 300 mg I/mL).
#: * [P] Pompe E et al., Eur Radiol 2015;25:283–289 (``POMPE_2015_INCREASE_HU`` of
#:   :mod:`LumbarBMDLib.internal_calibration.phase`): L1 trabecular +13.5 HU arterial, +18.2 HU portal venous.
#: * [D] the ranges :mod:`LumbarBMDLib.internal_calibration.phase` and ``tissues.py`` quote (portal venous: aorta
#:   150–250 HU, portal vein 150–200 HU and the veins above half the aorta; equilibrium: aorta ≈ IVC ≈ 80–180 HU).
#:
#: Values (mid-range; unenhanced blood ≈ 40 HU, liver ≈ 58 HU on vendor A):
#:
#: * arterial (late arterial): aorta +300 ([G] 300–336, [R] 290–360 absolute), portal vein +90 ([G] 75–104; [R]
#:   145 ± 20 absolute), infrarenal IVC +15 (not yet reached by the bolus; below [G]'s hepatic veins, 24–51:
#:   **not a published figure**), liver +20 ([G], [R]), spleen +100 ([G]), kidney (cortex) +205 ([K]), bowel
#:   wall +30 (**not verified**), spongiosa +13.5 ([P]);
#: * portal venous: aorta +160 (≈ 200 HU, mid of [D]'s 150–250; [G]'s protocol gained only 117–125), portal vein
#:   +135 (≈ 175 HU, mid of [D]'s 150–200), infrarenal IVC +110 (above half the aorta, [D]; **not a published
#:   figure**), liver +60 ([G] 59–63, [N] 56), spleen +78 ([G] 73–82), kidney +160 ([K]), bowel wall +50
#:   (**not verified**), spongiosa +18.2 ([P]);
#: * delayed (equilibrium, 3–5 min): aorta +95, IVC +90, portal vein +90 (≈ 130–135 HU, mid of [D]'s 80–180 with
#:   aorta ≈ IVC), liver +45, spleen +45, kidney +110, bowel wall +35 (**no verified publication found for the
#:   delayed phase**: between the portal-venous values and baseline as the blood pool dilutes), spongiosa +18.2:
#:   Pompe et al. scanned no delayed phase; the portal-venous value is used (the trabecular enhancement plateaus
#:   after ≈ 40 s in the perfusion series of Eur Radiol Exp 2022;6:8, doi:10.1186/s41747-021-00259-5, which does not
#:   report a delayed-phase figure).
PUBLISHED_ENHANCEMENT_HU: dict[str, dict[str, float]] = {
    "arterial": {"aorta": 300.0, "ivc": 15.0, "portal_vein": 90.0, "liver": 20.0, "spleen": 100.0, "kidney": 205.0,
                 "bowel_wall": 30.0, "spongiosa": POMPE_2015_INCREASE_HU["arterial"]},
    "portal_venous": {"aorta": 160.0, "ivc": 110.0, "portal_vein": 135.0, "liver": 60.0, "spleen": 78.0,
                      "kidney": 160.0, "bowel_wall": 50.0, "spongiosa": POMPE_2015_INCREASE_HU["portal_venous"]},
    "delayed": {"aorta": 95.0, "ivc": 90.0, "portal_vein": 90.0, "liver": 45.0, "spleen": 45.0, "kidney": 110.0,
                "bowel_wall": 35.0, "spongiosa": POMPE_2015_INCREASE_HU["portal_venous"]},
}
ENHANCEMENT_SOURCES = {
    "G": "MDCT of the liver and hypervascular HCCs: optimizing scan delays for bolus-tracking techniques of hepatic "
         "arterial and portal venous phases. AJR 2006 (abstract)",
    "R": "Radiopaedia, Late arterial phase (rev. 2023)",
    "K": "Multi-detector row CT of the kidney: optimizing scan delays for bolus tracking. Eur J Radiol "
         "2007;63:420-426",
    "N": "Naruo K et al. Radiat Med 2007;25:106-112",
    "P": POMPE_2015,
}


def iodine_mg_ml(phase: str) -> dict[str, float]:
    """The published mean enhancement of ``phase`` as iodine concentration (mg I/mL) per compartment."""
    if phase not in CONTRAST_PHASES:
        raise ValueError(f"unknown contrast phase {phase!r}: choose one of {', '.join(CONTRAST_PHASES)}")
    return {k: v / REFERENCE_IODINE_HU_PER_MG_ML for k, v in PUBLISHED_ENHANCEMENT_HU[phase].items()}


@dataclass(frozen=True)
class Enhancement:
    """The contrast enhancement of one case.

    Attributes:
        phase: one of :data:`CONTRAST_PHASES`.
        bolus_factor: the case's variation around the published mean (1.0 = the mean).
        iodine_mg_ml: iodine concentration per compartment (published HU at 120 kVp / 26.6, × ``bolus_factor``).
        hu_per_mg_ml: the scanner's iodine enhancement (HU per mg I/mL).
    """

    phase: str
    bolus_factor: float
    iodine_mg_ml: dict[str, float]
    hu_per_mg_ml: float

    @property
    def hu(self) -> dict[str, float]:
        """Enhancement (HU) per compartment on this scanner."""
        return {k: v * self.hu_per_mg_ml for k, v in self.iodine_mg_ml.items()}

    def as_json(self) -> dict:
        """Plain dict (truth.json)."""
        return {
            "phase": self.phase,
            "bolus_factor": round(self.bolus_factor, 4),
            "scanner_iodine_hu_per_mg_ml": round(self.hu_per_mg_ml, 3),
            "iodine_mg_ml": {k: round(v, 4) for k, v in self.iodine_mg_ml.items()},
            "enhancement_hu": {k: round(v, 2) for k, v in self.hu.items()},
            "published_enhancement_hu_120kvp": dict(PUBLISHED_ENHANCEMENT_HU[self.phase]),
            "sources": dict(ENHANCEMENT_SOURCES),
        }


def contrast_enhancement(phase: str, scanner: ScannerProfile, rng: np.random.Generator | None = None
                         ) -> Enhancement:
    """The enhancement of ``phase`` on ``scanner``: published mean, × U(0.9, 1.1) drawn from ``rng`` when given."""
    factor = 1.0 if rng is None else float(rng.uniform(1.0 - BOLUS_VARIATION, 1.0 + BOLUS_VARIATION))
    iodine = {k: v * factor for k, v in iodine_mg_ml(phase).items()}
    return Enhancement(phase, factor, iodine, float(scanner.iodine_hu_per_mg_ml))


def _enhancement(variants: Variants, scanner: ScannerProfile, enhancement: Enhancement | None) -> Enhancement | None:
    """The enhancement to paint: the one given, else the published mean of the variants' phase, else None."""
    if enhancement is not None:
        return enhancement
    phase = variants.phase()
    return None if phase is None else contrast_enhancement(phase, scanner)


@dataclass
class Rendered:
    """The ideal (noise-free) scene.

    Attributes:
        hu: float32 ``(nz, ny, nx)`` HU before acquisition.
        labels: uint8 ``(nz, ny, nx)`` 3-D truth (DESIGN.md label values).
        tissue: uint8 ``(nz, ny, nx)`` :class:`Tissue` codes.
        grid: the voxel grid.
        metal: bool ``(nz, ny, nx)`` or None.
    """

    hu: np.ndarray
    labels: np.ndarray
    tissue: np.ndarray
    grid: Grid
    metal: np.ndarray | None = None


def place_patient(patient: Patient, rng: np.random.Generator) -> None:
    """Translate the spine (built with S1 at the origin) into the body, in place.

    The most posterior lumbar canal point lies 55–75 mm (plus part of the subcutaneous fat) in front of
    the flat back that rests on the table.
    """
    bx = float(patient.body_centre[0])
    back = float(patient.body_ry)  # body centre y = 0, back surface at +ry
    lumbar = [v for v in patient.vertebrae if v.name.startswith("L")]
    deepest = max(v.canal_centre[1] for v in lumbar)
    depth = float(rng.uniform(55.0, 70.0)) + 0.5 * patient.subcut_fat_mm
    shift = np.array([bx + float(rng.normal(0.0, 3.0)), back - depth - deepest, 0.0])
    for v in patient.vertebrae:
        v.centre = v.centre + shift
    patient.sacrum_centre = patient.sacrum_centre + shift


def make_grid(patient: Patient, size: str, rng: np.random.Generator, missing_level: str | None) -> Grid:
    """The voxel grid: ``full`` 512² at 0.6–0.9 mm and 1 mm slices, ``small`` 192² at 2 mm and 2.5 mm slices.

    The z range spans the lower sacrum (S3) to just above T11, cut at L1 or L4 for partial coverage.
    """
    top = patient.level("T11")
    z_hi = top.centre[2] + top.height / 2.0 + 5.0
    z_lo = patient.sacrum_centre[2] - 62.0
    if missing_level == "L1":
        l2 = patient.level("L2")
        z_hi = l2.centre[2] + l2.height / 2.0 + l2.disc_below * 0.0 + 4.0
    elif missing_level == "L4":
        l3 = patient.level("L3")
        z_lo = l3.centre[2] - l3.height / 2.0 - 4.0
    if size == "full":
        n_xy = 512
        pixel = float(np.clip((2.0 * patient.body_rx + 70.0) / n_xy * rng.uniform(1.0, 1.15), 0.6, 0.9))
        dz = 1.0
    elif size == "small":
        n_xy, pixel, dz = 192, 2.0, 2.5
    else:
        raise ValueError(f"unknown phantom size {size!r}: 'full' or 'small'")
    nz = int(np.ceil((z_hi - z_lo) / dz)) + 1
    half = (n_xy - 1) / 2.0 * pixel
    return Grid(shape=(nz, n_xy, n_xy), spacing=(pixel, pixel, dz), origin=(-half, -half, float(z_lo)))


# ----------------------------------------------------------------------------------------------------
# soft tissue (2-D nodes interpolated along z)
# ----------------------------------------------------------------------------------------------------
def _spine_track(patient: Patient) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z (mm) of each vertebral body centre bottom-up, with their canal (x, y) and body (x, y)."""
    vs = patient.vertebrae
    z = np.array([v.centre[2] for v in vs])
    canal = np.array([v.canal_centre[:2] for v in vs])
    body = np.array([v.centre[:2] for v in vs])
    s1 = np.concatenate([[patient.sacrum_centre[2]], z])
    sac_canal = patient.sacrum_centre + (17.5 + 8.0) * patient.sacrum_axes[1]
    canal = np.vstack([sac_canal[:2], canal])
    body = np.vstack([patient.sacrum_centre[:2], body])
    return s1, canal, body


def _level_z(patient: Patient, name: str) -> float:
    v = patient.level(name)
    return float(v.centre[2]) if v is not None else float("nan")


def _ellipse2d(img, tis, x, y, cx, cy, a, b, value, code, h, inside=None, angle=0.0) -> None:
    """Paint a filled ellipse on a 2-D node (restricted to its bounding box)."""
    r = max(a, b) + 2 * h
    xs = np.flatnonzero((x[0] >= cx - r) & (x[0] <= cx + r))
    ys = np.flatnonzero((y[:, 0] >= cy - r) & (y[:, 0] <= cy + r))
    if xs.size == 0 or ys.size == 0:
        return
    box = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    dx, dy = x[:, box[1]] - cx, y[box[0], :] - cy
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    f = fraction(ellipse_distance(dx, dy, a, b), h)
    if inside is not None:
        f = f * inside[box]
    img[box] += f * (np.float32(value) - img[box])
    tis[box][f >= 0.5] = code


def _body_wall(x, y, bx, rx, ry, sub, table_top, fat, muscle, h) -> tuple:
    """Table, skin, subcutaneous fat and the muscular wall of one axial cross-section (2-D).

    Returns (HU image, tissue codes, fraction inside the muscular wall, fraction inside the skin).
    """
    ny, nx = y.shape[0], x.shape[1]
    img = np.full((ny, nx), AIR_HU, np.float32)
    tis = np.zeros((ny, nx), np.uint8)
    # table: curved carbon-fibre shell with a foam core under the flat back
    curve = table_top + 0.0006 * (x - bx) ** 2
    in_table = (np.abs(x - bx) < 230.0) & (y > curve) & (y < curve + 14.0)
    shell = in_table & ((y < curve + 2.0) | (y > curve + 12.0))
    img[in_table] = -850.0
    img[shell] = 250.0
    tis[in_table] = Tissue.TABLE
    # body outline, flat where it rests on the table
    d_body = np.maximum(ellipse_distance(x - bx, y, rx, ry * 1.12), y - ry)
    body = fraction(d_body, h)
    img += body * (np.float32(muscle - 15.0) - img)  # skin / dermis
    tis[body >= 0.5] = Tissue.SOFT
    _ellipse2d(img, tis, x, y, bx, 0.0, rx - 2.5, ry * 1.12 - 2.5, fat, Tissue.FAT, h, inside=fraction(d_body + 2.5, h))
    inner = fraction(np.maximum(ellipse_distance(x - bx, y + 5.0, rx - sub - 2.5, ry * 1.1 - sub),
                                y - (ry - sub * 0.6)), h)
    img += inner * (np.float32(muscle) - img)  # abdominal wall and back muscles
    tis[inner >= 0.5] = Tissue.SOFT
    return img, tis, inner, body


def render_soft_tissue(
    patient: Patient, grid: Grid, scanner: ScannerProfile, variants: Variants, rng: np.random.Generator,
    enhancement: Enhancement | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Axial soft tissue of the whole volume: float32 HU and uint8 tissue codes, shape ``(nz, ny, nx)``.

    With a contrast phase (``enhancement``, else the published mean of ``variants``' phase) the aorta, IVC, liver,
    spleen, kidneys and bowel get the unenhanced HU of ``scanner`` plus the phase's enhancement, and the portal vein
    is drawn in the liver hilum (unenhanced it is blood against liver, 40 vs 58 HU, and is not drawn: unenhanced cases
    stay as they were).
    """
    nz, ny, nx = grid.shape
    h = min(grid.spacing[:2])
    x = (grid.origin[0] + grid.spacing[0] * np.arange(nx, dtype=np.float32))[None, :]
    y = (grid.origin[1] + grid.spacing[1] * np.arange(ny, dtype=np.float32))[:, None]
    zc = grid.origin[2] + grid.spacing[2] * np.arange(nz)
    node_step = 6.0  # soft tissue changes slowly along z; bowel, vessels' wall and bone are drawn in 3-D
    nodes_z = np.arange(zc[0], zc[-1] + node_step, node_step)
    track_z, canal_xy, body_xy = _spine_track(patient)
    enh = _enhancement(variants, scanner, enhancement)
    e = enh.hu if enh is not None else dict.fromkeys(ENHANCED_COMPARTMENTS, 0.0)
    fat, muscle = scanner.fat_hu, scanner.muscle_hu
    blood = scanner.blood_hu + e["aorta"] if enh else scanner.blood_hu
    ivc = scanner.blood_hu + e["ivc"] if enh else scanner.blood_hu
    portal = scanner.blood_hu + e["portal_vein"] if enh else None
    liver = scanner.liver_hu + e["liver"] if enh else scanner.liver_hu
    kidney = scanner.kidney_hu + e["kidney"] if enh else scanner.kidney_hu
    spleen = scanner.liver_hu - 10.0 + e["spleen"] if enh else scanner.liver_hu - 10.0
    z_l1, z_l2 = _level_z(patient, "L1"), _level_z(patient, "L2")
    z_l4, z_l5 = _level_z(patient, "L4"), _level_z(patient, "L5")
    kidney_z = {+1: 0.5 * (z_l1 + z_l2) + 10.0, -1: 0.5 * (z_l1 + z_l2) - 5.0}  # left (+x) higher
    bx, rx, ry, sub = float(patient.body_centre[0]), patient.body_rx, patient.body_ry, patient.subcut_fat_mm
    table_top = ry + 2.0

    wall_cache: dict[float, tuple] = {}
    field = np.zeros((ny, nx), np.float32)
    rho = float(np.exp(-node_step / 25.0))  # bowel pattern decorrelates over ~25 mm along z
    visceral_fat = float(rng.uniform(0.3, 0.65))  # fraction of the visceral cavity that is fat
    bowel_cut = float(np.quantile(rng.standard_normal(4000), visceral_fat))
    bowel_hu = 28.0 + e["bowel_wall"] if enh else 28.0  # bowel and mesentery
    node_img = np.empty((len(nodes_z), ny, nx), np.float32)
    node_tis = np.empty((len(nodes_z), ny, nx), np.uint8)
    for n, z in enumerate(nodes_z):
        cx, cy = (np.interp(z, track_z, canal_xy[:, i]) for i in range(2))
        vx, vy = (np.interp(z, track_z, body_xy[:, i]) for i in range(2))
        # body wall layers depend on z only through the pelvic widening: cache them
        widen = 1.0 + 0.08 * float(np.clip((z_l5 - z) / 60.0, 0.0, 1.0))
        key = round(widen, 3)
        if key not in wall_cache:
            wall_cache[key] = _body_wall(x, y, bx, rx * widen, ry, sub, table_top, fat, muscle, h)
        base_img, base_tis, inner, body = wall_cache[key]
        img, tis = base_img.copy(), base_tis.copy()
        _ellipse2d(img, tis, x, y, bx, vy - 20.0, rx * widen - sub - 14.0, (vy - 20.0) - (-ry * 1.1 + sub + 12.0),
                   fat + 12.0, Tissue.FAT, h, inside=inner)  # visceral fat cavity, anterior to the spine
        # bowel and mesentery packed in the visceral fat: smooth random blobs, coherent from node to node
        field = rho * field + np.sqrt(1.0 - rho**2) * ndimage.gaussian_filter(
            rng.standard_normal((ny, nx)).astype(np.float32), sigma=9.0 / h)
        blobs = np.clip((field / (field.std() + 1e-6) - bowel_cut) * 2.0, 0.0, 1.0)
        blobs *= (tis == Tissue.FAT) & (y < vy - 15.0)
        img += blobs * (np.float32(bowel_hu) - img)
        tis[blobs >= 0.5] = Tissue.SOFT
        # retroperitoneal fat lateral of the spine (makes psoas and kidneys stand out)
        for side in (-1, 1):
            _ellipse2d(img, tis, x, y, vx + side * 55.0, vy + 10.0, 45.0, 30.0, fat + 10.0, Tissue.FAT, h, inside=inner)
        # paraspinal (erector spinae) and quadratus lumborum
        for side in (-1, 1):
            _ellipse2d(img, tis, x, y, cx + side * 31.0, cy + 32.0, 26.0, 29.0, fat + 20.0, Tissue.FAT, h,
                       inside=body)  # fat plane around the erector spinae
            _ellipse2d(img, tis, x, y, cx + side * 31.0, cy + 32.0, 23.5, 26.5, muscle + 3.0, Tissue.SOFT, h,
                       inside=body)
            if z < z_l1 + 10.0 and z > z_l4 - 10.0:
                _ellipse2d(img, tis, x, y, cx + side * 58.0, cy + 2.0, 15.0, 10.0, muscle, Tissue.SOFT, h, inside=inner)
        # psoas: appears at L1 and thickens caudally
        if z < z_l1:
            r = 5.0 + 17.0 * np.clip((z_l1 - z) / max(z_l1 - z_l5, 1.0), 0.0, 1.0)
            w_half = 0.5 * patient.level("L3").width
            for side in (-1, 1):
                _ellipse2d(img, tis, x, y, vx + side * (w_half + 0.8 * r), vy + 4.0, r, 0.85 * r, muscle,
                           Tissue.SOFT, h, inside=inner)
        # liver (right = −x), spleen (left), kidneys
        if z > z_l2:
            f = np.sqrt(np.clip((z - z_l2) / 70.0, 0.0, 1.0))
            _ellipse2d(img, tis, x, y, bx - 0.42 * rx, -0.15 * ry, 0.42 * rx * f + 1, 0.6 * ry * f + 1, liver,
                       Tissue.ORGAN, h, inside=inner)
            if portal is not None and z_l1 - 5.0 < z < z_l1 + 35.0:
                # portal vein (Ø 14 mm) in the hilum, from L1 up towards T12, right of and in front of the IVC, in
                # liver: the liver's medial part (caudate/quadrate lobes) reaches from its centre to the hilum
                px, py = vx + PORTAL_VEIN_XY_MM[0], vy + PORTAL_VEIN_XY_MM[1]
                lx, ly = bx - 0.42 * rx, -0.15 * ry
                half = 0.5 * float(np.hypot(px - lx, py - ly))
                _ellipse2d(img, tis, x, y, 0.5 * (px + lx), 0.5 * (py + ly), half + HILUM_HALF_WIDTH_MM,
                           HILUM_HALF_WIDTH_MM, liver, Tissue.ORGAN, h, inside=inner,
                           angle=float(np.arctan2(py - ly, px - lx)))
                _ellipse2d(img, tis, x, y, px, py, HILUM_HALF_WIDTH_MM, HILUM_HALF_WIDTH_MM, liver, Tissue.ORGAN, h,
                           inside=inner)
                _ellipse2d(img, tis, x, y, px, py, PORTAL_VEIN_RADIUS_MM, PORTAL_VEIN_RADIUS_MM, portal, Tissue.BLOOD,
                           h, inside=inner)
        if z > z_l1:
            f = np.sqrt(np.clip((z - z_l1) / 50.0, 0.0, 1.0))
            _ellipse2d(img, tis, x, y, bx + 0.55 * rx, 0.2 * ry, 0.18 * rx * f + 1, 0.3 * ry * f + 1, spleen,
                       Tissue.ORGAN, h, inside=inner)
        for side in (-1, 1):
            t = (z - kidney_z[side]) / 55.0
            if abs(t) < 1.0:
                f = np.sqrt(1.0 - t * t)
                kx, ky = vx + side * 68.0, vy + 14.0
                _ellipse2d(img, tis, x, y, kx, ky, 26.0 * f + 0.5, 21.0 * f + 0.5, kidney, Tissue.ORGAN, h,
                           inside=inner, angle=side * 0.5)
                _ellipse2d(img, tis, x, y, kx - side * 8.0 * f, ky - 4.0, 8.0 * f + 0.3, 6.0 * f + 0.3, fat + 10.0,
                           Tissue.FAT, h, inside=inner)
        # aorta (left-anterior of the body) bifurcating at L4 into the common iliac arteries; IVC on the right
        depth = 0.5 * patient.level("L3").depth
        if z > z_l4:
            _ellipse2d(img, tis, x, y, vx + 14.0, vy - depth - 13.0, 11.0, 11.0, blood, Tissue.BLOOD, h, inside=inner)
        else:
            spread = 14.0 + 0.45 * (z_l4 - z)
            for side in (-1, 1):
                _ellipse2d(img, tis, x, y, vx + side * spread, vy - depth - 10.0, 6.5, 6.5, blood, Tissue.BLOOD, h,
                           inside=inner)
        if z > z_l5:
            _ellipse2d(img, tis, x, y, vx - 22.0, vy - depth - 9.0, 13.0, 9.0, ivc, Tissue.BLOOD, h, inside=inner)
        node_img[n], node_tis[n] = img, tis

    hu = np.empty(grid.shape, np.float32)
    tissue = np.empty(grid.shape, np.uint8)
    pos = (zc - nodes_z[0]) / node_step
    for k in range(nz):
        i0 = min(int(np.floor(pos[k])), len(nodes_z) - 2) if len(nodes_z) > 1 else 0
        t = np.float32(pos[k] - i0) if len(nodes_z) > 1 else np.float32(0.0)
        i1 = min(i0 + 1, len(nodes_z) - 1)
        np.multiply(node_img[i0], 1.0 - t, out=hu[k])
        hu[k] += t * node_img[i1]
        tissue[k] = node_tis[i0 if t < 0.5 else i1]
    return hu, tissue


# ----------------------------------------------------------------------------------------------------
# 3-D structures
# ----------------------------------------------------------------------------------------------------
def _frame_box(grid: Grid, frame: Frame, lo, hi) -> tuple[tuple[slice, slice, slice], tuple] | None:
    """Bounding box (index slices) of a local box and the local coordinates of its voxels."""
    p0, p1 = frame.corners(np.asarray(lo, float), np.asarray(hi, float))
    box = grid.bbox(p0, p1)
    if box is None:
        return None
    return box, frame.local(*grid.coords(box))


def render_bowel(hu, tissue, patient: Patient, grid: Grid, scanner: ScannerProfile, variants: Variants,
                 rng: np.random.Generator, enhancement: Enhancement | None = None) -> None:
    """Small-bowel and colon loops: fluid- or gas-filled ellipsoids with a wall (enhanced with contrast)."""
    z_l1, z_lo = _level_z(patient, "L1"), grid.origin[2]
    body3 = patient.level("L3")
    ant_limit = body3.centre[1] - body3.depth / 2.0 - 25.0
    enh = _enhancement(variants, scanner, enhancement)
    wall_hu = scanner.muscle_hu - 10.0 + enh.hu["bowel_wall"] if enh else scanner.muscle_hu - 10.0
    h = grid.voxel_mm
    y_lo = -0.8 * patient.body_ry + patient.subcut_fat_mm + 10.0
    y_hi = max(ant_limit, y_lo + 20.0)
    for _ in range(int(rng.integers(60, 90))):
        c = np.array([
            patient.body_centre[0] + rng.uniform(-0.65, 0.65) * patient.body_rx,
            rng.uniform(y_lo, y_hi),
            rng.uniform(z_lo, z_l1),
        ])
        if ((c[0] - patient.body_centre[0]) / (patient.body_rx - patient.subcut_fat_mm - 25.0)) ** 2 + (
            c[1] / (patient.body_ry - patient.subcut_fat_mm - 20.0)
        ) ** 2 > 1.0:
            continue
        a, b, cc = rng.uniform(10, 18), rng.uniform(9, 15), rng.uniform(12, 24)
        frame = Frame(c, rotation(rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8), rng.uniform(0, np.pi)))
        got = _frame_box(grid, frame, (-a - 1.5, -b - 1.5, -cc - 1.5), (a + 1.5, b + 1.5, cc + 1.5))
        if got is None:
            continue
        box, (u, v, w) = got
        d = ellipsoid_distance(u, v, w, a, b, cc)
        paint(hu, box, fraction(d, h), wall_hu)
        inner = fraction(d + 2.5, h)
        gas = rng.random() < 0.35
        content = -950.0 if gas else float(rng.uniform(5.0, 30.0))
        if gas and rng.random() < 0.5:  # air–fluid level: gas rises anteriorly (−y) in a supine patient
            _, yy, _ = grid.coords(box)
            level = c[1] + rng.uniform(-0.3, 0.5) * b
            content = np.where(yy < level, -950.0, 15.0).astype(np.float32)
        paint(hu, box, inner, content)
        view = tissue[box]
        view[np.broadcast_to(fraction(d, h) >= 0.5, view.shape)] = Tissue.SOFT
        if gas:
            view[np.broadcast_to((inner >= 0.5) & (np.asarray(content) < -500), view.shape)] = Tissue.GAS


def _trabecular_field(shape, spacing, rng, mean_hu: float, sd_hu: float) -> np.ndarray:
    """Marrow texture: Gaussian noise smoothed 0.7 mm in-plane and 1.8 mm vertically (vertical trabeculae)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    sigma = (1.8 / spacing[2], 0.7 / spacing[1], 0.7 / spacing[0])
    tex = ndimage.gaussian_filter(noise, sigma=sigma, mode="nearest")
    tex *= np.float32(sd_hu / (tex.std() + 1e-6))
    tex += np.float32(mean_hu) - tex.mean()
    return tex


#: The K2HPO4 slope (HU per mg/cm³) at which the spongiosa's texture, the basivertebral vein and the sclerotic band
#: of a fracture were drawn (the phantom's vendor A before issue 15). They are mineral contrast (trabeculae against
#: marrow, bone missing around the vein, extra bone in the band), so on another scanner their HU scale with its
#: K2HPO4 slope (:func:`mineral_contrast_scale`), as the mean does.
TEXTURE_REFERENCE_SLOPE = 1.10
#: Marrow fat lowers trabecular HU by ≈ 1.4 HU per percentage point of fat at 120 kVp (fat −100 HU vs red marrow
#: ≈ +40 HU; Griffith et al. 2005): the HU per unit fat fraction, scaled on other scanners by fat's contrast.
MARROW_FAT_HU_PER_FRACTION = -140.0
#: Fat's HU against water at 120 kVp that :data:`MARROW_FAT_HU_PER_FRACTION` was read at.
FAT_CONTRAST_120KVP_HU = -100.0


def mineral_contrast_scale(scanner: ScannerProfile) -> float:
    """How much stronger mineral contrast is on ``scanner`` than where the texture was drawn (slope ratio)."""
    return scanner.bone_slope / TEXTURE_REFERENCE_SLOPE


def fat_contrast_scale(scanner: ScannerProfile) -> float:
    """Fat's contrast against water on ``scanner`` relative to 120 kVp (> 1 at lower kVp, where fat reads lower)."""
    return (scanner.fat_hu - scanner.bone_intercept) / FAT_CONTRAST_120KVP_HU


def trabecular_hu(v: Vertebra, scanner: ScannerProfile, contrast: Enhancement | bool | None = None) -> float:
    """Mean HU of the vertebral body's spongiosa: calibration + marrow fat + contrast enhancement.

    ``contrast``: the case's :class:`Enhancement` (its spongiosa enhancement is added), True (the published
    portal-venous mean, Pompe et al. 2015, on this scanner), or False/None (unenhanced).
    """
    marrow = MARROW_FAT_HU_PER_FRACTION * (v.marrow_fat - 0.35) * fat_contrast_scale(scanner)
    base = scanner.mineral_to_hu(v.bmd) + marrow
    if contrast is True:
        contrast = contrast_enhancement("portal_venous", scanner)
    if not contrast:
        return base
    return base + contrast.hu["spongiosa"]


def _body_distance(u, v, w, vert: Vertebra) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance (mm) of the vertebral body and of its spongiosa (inside the cortex and endplates)."""
    a, b, hh = vert.width / 2.0, vert.depth / 2.0, vert.height / 2.0
    waist = 1.0 - 0.05 * np.clip(1.0 - (w / hh) ** 2, 0.0, 1.0)
    d_xs = ellipse_distance(u, v, a * waist, b * waist)
    d_xs = np.maximum(d_xs, v - (b - 2.5))  # flat posterior wall
    d_xs = np.maximum(d_xs, -ellipse_distance(u, v - (b + 3.0), 9.0, 4.5))  # slight posterior concavity
    r2 = np.clip((u / a) ** 2 + (v / b) ** 2, 0.0, 1.0)
    cup = 1.2 * (1.0 - r2)  # endplate concavity (mm)
    top = hh - cup
    if vert.wedge > 0:
        top = top - 2.0 * hh * vert.wedge * np.clip((1.0 - v / b) / 2.0, 0.0, 1.0)
    bottom = -hh + cup
    d = np.maximum(d_xs, np.maximum(w - top, bottom - w))
    d_trab = np.maximum(d_xs + 0.5, np.maximum(w - (top - 0.7), (bottom + 0.7) - w))  # shell 0.5, endplates 0.7 mm
    return d, d_trab


def render_discs(hu, tissue, patient: Patient, grid: Grid, scanner: ScannerProfile) -> None:
    """Intervertebral discs (annulus and a slightly darker nucleus) between consecutive bodies and S1."""
    h = grid.voxel_mm
    below_frames = [Frame(patient.sacrum_centre, patient.sacrum_axes)] + [
        Frame(v.centre, v.axes) for v in patient.vertebrae[:-1]
    ]
    below_half = [14.0] + [v.height / 2.0 for v in patient.vertebrae[:-1]]
    for lower, lower_half, upper in zip_strict(below_frames, below_half, patient.vertebrae):
        top_lower = lower.centre + lower_half * lower.axes[2]
        bottom_upper = upper.centre - upper.height / 2.0 * upper.axes[2]
        mid = 0.5 * (top_lower + bottom_upper)
        w_axis = lower.axes[2] + upper.axes[2]
        w_axis /= np.linalg.norm(w_axis)
        axes = 0.5 * (lower.axes + upper.axes)
        axes[2] = w_axis
        axes[1] -= (axes[1] @ w_axis) * w_axis
        axes[1] /= np.linalg.norm(axes[1])
        axes[0] = np.cross(axes[1], axes[2])
        frame = Frame(mid, axes)
        a, b = upper.width / 2.0 + 1.0, upper.depth / 2.0 + 1.0
        r = np.linalg.norm(bottom_upper - top_lower) / 2.0 + 14.0
        got = _frame_box(grid, frame, (-a - 2, -b - 2, -r), (a + 2, b + 2, r))
        if got is None:
            continue
        box, (u, v, _) = got
        x, y, z = grid.coords(box)
        above_lower = (x - top_lower[0]) * lower.axes[2][0] + (y - top_lower[1]) * lower.axes[2][1] + (
            z - top_lower[2]) * lower.axes[2][2]
        below_upper = (x - bottom_upper[0]) * upper.axes[2][0] + (y - bottom_upper[1]) * upper.axes[2][1] + (
            z - bottom_upper[2]) * upper.axes[2][2]
        d = np.maximum(ellipse_distance(u, v, a, b),
                       np.maximum(-above_lower - 1.0, below_upper - 1.0))
        paint(hu, box, fraction(d, h), scanner.disc_hu - 20.0)
        stamp(tissue, box, fraction(d, h), Tissue.DISC)
        nucleus = fraction(ellipse_distance(u, v + 2.0, a * 0.5, b * 0.45), h) * fraction(d, h)
        paint(hu, box, nucleus, scanner.disc_hu - 36.0)


def render_canal(hu, tissue, patient: Patient, grid: Grid, scanner: ScannerProfile) -> None:
    """Canal contents per vertebra (extended over the disc below): epidural fat around the CSF-filled dural sac."""
    h = grid.voxel_mm
    for vert in patient.vertebrae:
        frame = Frame(vert.canal_centre, vert.axes)
        a, b = vert.canal_width / 2.0, vert.canal_depth / 2.0
        lo_w, hi_w = -vert.height / 2.0 - vert.disc_below - 1.5, vert.height / 2.0 + 1.5
        got = _frame_box(grid, frame, (-a - 2, -b - 2, lo_w), (a + 2, b + 2, hi_w))
        if got is None:
            continue
        box, (u, v, w) = got
        slab = np.maximum(lo_w - w, w - hi_w)
        d = np.maximum(ellipse_distance(u, v, a, b), slab)
        paint(hu, box, fraction(d, h), scanner.fat_hu + 20.0)
        stamp(tissue, box, fraction(d, h), Tissue.EPIDURAL_FAT)
        d_sac = np.maximum(ellipse_distance(u, v - 0.5, a * 0.68, b * 0.72), slab)
        paint(hu, box, fraction(d_sac, h), scanner.csf_hu)
        stamp(tissue, box, fraction(d_sac, h), Tissue.CSF)


def _bone(hu, labels, tissue, box, d_outer, d_inner, cortical_hu, inner_hu, label, h) -> None:
    """Paint a bone: cortex over the whole shape, spongiosa inside; stamp its label and tissue codes."""
    f_out = fraction(d_outer, h)
    paint(hu, box, f_out, cortical_hu)
    stamp(tissue, box, f_out, Tissue.CORTICAL)
    f_in = fraction(d_inner, h)
    paint(hu, box, f_in, inner_hu)
    stamp(tissue, box, f_in, Tissue.TRABECULAR)
    if label:
        stamp(labels, box, f_out, label)


def render_vertebra(hu, labels, tissue, vert: Vertebra, grid: Grid, scanner: ScannerProfile, variants: Variants,
                    rng: np.random.Generator, enhancement: Enhancement | None = None) -> None:
    """One vertebra: body (cortex, endplates, textured spongiosa, basivertebral vein) and posterior elements."""
    h = grid.voxel_mm
    frame = Frame(vert.centre, vert.axes)
    a, b, hh = vert.width / 2.0, vert.depth / 2.0, vert.height / 2.0
    cortical = scanner.mineral_to_hu(CORTICAL_BMD * (0.75 + 0.25 * vert.bmd / 150.0))
    got = _frame_box(grid, frame, (-a - 1, -b - 1, -hh - 1), (a + 1, b + 1, hh + 1))
    if got is not None:
        box, (u, v, w) = got
        d, d_trab = _body_distance(u, v, w, vert)
        mean = trabecular_hu(vert, scanner, _enhancement(variants, scanner, enhancement))
        k = mineral_contrast_scale(scanner)
        sd = (10.0 + 12.0 * np.sqrt(max(vert.bmd, 10.0) / 150.0)) * k
        field = _trabecular_field(hu[box].shape, grid.spacing, rng, mean, sd)
        vein = fraction(np.maximum(ellipse_distance(u, v - (b - 6.0), 3.0, 4.0), np.abs(w) - 3.0), h)
        field -= vein * np.float32(35.0 * k)
        if vert.wedge > 0:  # sclerotic band under the collapsed endplate
            band = fraction(np.abs(w - (hh - 2.0 * hh * vert.wedge * 0.5 - 2.0)) - 2.5, h)
            field += band * np.float32(90.0 * k)
        _bone(hu, labels, tissue, box, d, d_trab, cortical, field, vert.label, h)

    # posterior elements in the same frame
    label = vert.label + POSTERIOR_OFFSET
    cw, cd = vert.canal_width / 2.0, vert.canal_depth / 2.0
    vc = vert.canal_offset
    lam = 5.5
    post_inner = scanner.mineral_to_hu(vert.bmd * POSTERIOR_MARROW_FACTOR)
    reach = cw + lam + vert.tp_length + 6.0
    got = _frame_box(grid, frame, (-reach, b - 6.0, -hh - 10.0), (reach, vc + cd + lam + 36.0, hh + 10.0))
    if got is None:
        return
    box, (u, v, w) = got
    shapes = []
    # pedicles: from the body's posterior wall to the lamina, in the upper part of the body's height
    for side in (-1.0, 1.0):
        uc = side * (cw + vert.pedicle_width / 2.0 - 0.5)
        wc = hh - vert.pedicle_height / 2.0 - 1.0
        vlen = (vc + 0.2 * cd) - (b - 4.0)
        vmid = (b - 4.0) + vlen / 2.0
        shapes.append(np.maximum(ellipse_distance(u - uc, w - wc, vert.pedicle_width / 2.0, vert.pedicle_height / 2.0),
                                 np.abs(v - vmid) - vlen / 2.0))
    # laminae: the arch around the posterior three quarters of the canal
    dv = v - vc
    shapes.append(_max([
        ellipse_distance(u, dv, cw + lam, cd + lam),
        -ellipse_distance(u, dv, cw, cd),
        -0.3 * cd - dv,
        np.abs(w + 0.5) - 0.47 * vert.height,  # spans the pedicle levels (pedicle–lamina junction)
    ]))
    # articular processes (facets), reaching into the level above and below
    for side in (-1.0, 1.0):
        shapes.append(box_distance(u - side * (cw + 2.5), dv - 0.55 * cd, w, 4.5, 5.0, hh + 5.0))
    # transverse processes
    for side in (-1.0, 1.0):
        length = vert.tp_length
        shapes.append(np.maximum(
            ellipse_distance(dv, w - 3.0, 4.5, 5.0), np.abs(u - side * (cw + lam + length / 2.0)) - length / 2.0 - 3.0
        ))
    # spinous process: posterior and caudal, rotated 20°
    ang = np.deg2rad(20.0)
    ps, pw_ = dv - (cd + lam - 2.0), w + 2.0
    sv, sw = np.cos(ang) * ps + np.sin(ang) * pw_, -np.sin(ang) * ps + np.cos(ang) * pw_
    shapes.append(np.maximum(box_distance(u, sv - 15.0, sw, 3.2, 15.0, 8.5 if vert.name.startswith("L") else 6.0),
                             ellipse_distance(u, sw, 3.8, 9.5 if vert.name.startswith("L") else 7.0)))
    d = _min(shapes)
    dense = scanner.mineral_to_hu(DENSE_CORTICAL_BMD * (0.8 + 0.2 * vert.bmd / 150.0))
    _bone(hu, labels, tissue, box, d, d + POSTERIOR_CORTEX_MM, dense, post_inner, label, h)


# Sacral segments S1–S4: (height, half-width, half-depth) in mm, fused by thin rudimentary discs and curving
# anteriorly (sacral kyphosis, ~14° per segment). S1 looks like a lumbar body with endplates, as on real CT,
# which matters to a network that tells L5 from S1 (Cheng JS, Song JK 2003, Neurosurg Focus 15:E3).
SACRAL_SEGMENTS = ((27.0, 24.0, 17.0), (21.0, 19.0, 13.5), (16.0, 14.0, 10.5), (12.0, 10.0, 8.0))
SACRAL_CURVE_DEG = 14.0
SACRAL_REMNANT_MM = 2.5


def _sacral_segment_frames() -> list[tuple[float, float, float]]:
    """Centre (v, w) and angle (rad) of each sacral segment in the S1 frame (v posterior, w superior)."""
    out, v, w = [], 0.0, 0.0
    for k, (height, _, _) in enumerate(SACRAL_SEGMENTS):
        alpha = np.deg2rad(SACRAL_CURVE_DEG * k)
        if k:
            prev_h = SACRAL_SEGMENTS[k - 1][0]
            step = prev_h / 2.0 + SACRAL_REMNANT_MM + height / 2.0
            mid = np.deg2rad(SACRAL_CURVE_DEG * (k - 0.5))
            v, w = v - step * np.sin(mid), w - step * np.cos(mid)
        out.append((v, w, alpha))
    return out


def render_sacrum_and_pelvis(hu, labels, tissue, patient: Patient, grid: Grid, scanner: ScannerProfile,
                             rng: np.random.Generator) -> None:
    """Sacrum (S1–S4 bodies with rudimentary discs, alae, sacral canal, dorsal wall) and the iliac wings."""
    h = grid.voxel_mm
    frame = Frame(patient.sacrum_centre, patient.sacrum_axes)
    s_bmd = patient.level("L5").bmd * 0.95
    inner = scanner.mineral_to_hu(s_bmd)
    cortical = scanner.mineral_to_hu(CORTICAL_BMD)
    dense = scanner.mineral_to_hu(DENSE_CORTICAL_BMD)
    # alae: lateral, in their own box (one shape), painted before the midline structures
    got = _frame_box(grid, frame, (-66.0, -15.0, -42.0), (66.0, 27.0, 16.0))
    if got is not None:
        box_a, (ua, va, wa) = got
        d_ala = ellipsoid_distance(np.abs(ua) - 38.0, va - 6.0, wa + 12.0, 24.0, 17.0, 26.0)
        _bone(hu, labels, tissue, box_a, d_ala, d_ala + 1.2, dense, inner, 20, h)
    got = _frame_box(grid, frame, (-30.0, -45.0, -80.0), (30.0, 40.0, 16.0))
    if got is None:
        return
    box, (u, v, w) = got
    bodies, chain, dorsal, canal = [], [], [], []
    for (vc, wc, alpha), (height, a, b) in zip_strict(_sacral_segment_frames(), SACRAL_SEGMENTS):
        ca, sa = np.cos(alpha), np.sin(alpha)
        wk = (v - vc) * sa + (w - wc) * ca  # along the segment's axis (superior)
        vk = (v - vc) * ca - (w - wc) * sa  # posterior
        along = np.abs(wk) - height / 2.0
        section = ellipse_distance(u, vk, a, b)
        bodies.append(np.maximum(section, along))
        chain.append(np.maximum(section, along - SACRAL_REMNANT_MM))  # body + half of each rudimentary disc
        slab = along - SACRAL_REMNANT_MM
        # the sacral canal fills the space between the bodies' posterior surface and the dorsal wall
        dorsal.append(np.maximum(ellipse_distance(u, vk - (b + 11.5), 0.9 * a, 5.5), slab))
        canal.append(np.maximum(ellipse_distance(u, vk - (b + 3.0), 0.45 * a + 2.0, 3.0), slab))
    # rudimentary discs: a thin soft band between the fused bodies (painted first, the bodies go over it)
    paint(hu, box, fraction(np.maximum(_min(chain), w - 13.5), h), scanner.disc_hu + 20.0)
    d_canal = _min(canal)
    d_post = np.maximum(_min(dorsal), -d_canal)
    _bone(hu, labels, tissue, box, d_post, d_post + 1.2, dense, inner, 20, h)
    d_bodies = _min(bodies)  # separate bodies (the rudimentary discs keep each one's endplates)
    _bone(hu, labels, tissue, box, d_bodies, d_bodies + 0.7, cortical, inner, 20, h)
    f_canal = fraction(np.maximum(d_canal, w - 14.0), h)
    paint(hu, box, f_canal, scanner.fat_hu + 30.0)
    stamp(tissue, box, f_canal, Tissue.EPIDURAL_FAT)
    # iliac wings: vertical curved plates lateral of the sacrum, up to the L4–L5 level (extruded along z)
    for side in (-1.0, 1.0):
        c = patient.sacrum_centre + np.array([side * 95.0, 5.0, 0.0])
        lo = c + np.array([-55.0 if side > 0 else -75.0, -60.0, -65.0])
        hi = c + np.array([75.0 if side > 0 else 55.0, 50.0, 48.0])
        box = grid.bbox(lo, hi)
        if box is None:
            continue
        x, y, _ = grid.coords(box)
        u, v = x - c[0], y - c[1]
        shell = _max([np.abs(ellipse_distance(u, v, 70.0, 55.0)) - 4.5, -side * u - 55.0, v - 45.0])
        _bone(hu, labels, tissue, box, shell, shell + 1.5, cortical, inner, 0, h)


def render_ribs(hu, labels, tissue, patient: Patient, grid: Grid, scanner: ScannerProfile) -> None:
    """Floating ribs of T11 and T12: tubes from the transverse-process tips, curving laterally and anteriorly."""
    h = grid.voxel_mm
    for name, length in (("T11", 1.0), ("T12", 0.7)):
        vert = patient.level(name)
        if vert is None:
            continue
        frame = Frame(vert.centre, vert.axes)
        inner = scanner.mineral_to_hu(vert.bmd + 60.0)
        cortical = scanner.mineral_to_hu(DENSE_CORTICAL_BMD)
        for side in (-1.0, 1.0):
            start = frame.to_lps([side * (vert.canal_width / 2.0 + 5.5 + vert.tp_length), vert.canal_offset, 3.0])
            pts = [start]
            for step in (np.array([side * 38.0, -12.0, -10.0]), np.array([side * 32.0, -45.0, -18.0]),
                         np.array([side * 12.0, -48.0, -16.0])):
                pts.append(pts[-1] + step * length)
            lo, hi = np.min(pts, axis=0) - 8.0, np.max(pts, axis=0) + 8.0
            box = grid.bbox(lo, hi)
            if box is None:
                continue
            x, y, z = grid.coords(box)
            dist = _min([segment_distance(x, y, z, p0, p1) for p0, p1 in pairwise(pts)])
            d = dist - 4.5
            _bone(hu, labels, tissue, box, d, d + 1.2, cortical, inner, vert.label + POSTERIOR_OFFSET, h)


def render_calcification(hu, tissue, patient: Patient, grid: Grid, rng: np.random.Generator) -> None:
    """Calcified plaques (400–1000 HU) on the abdominal aortic wall."""
    h = grid.voxel_mm
    l3 = patient.level("L3")
    z_l4, z_l1 = _level_z(patient, "L4"), _level_z(patient, "L1")
    for _ in range(int(rng.integers(6, 14))):
        z = rng.uniform(z_l4, z_l1)
        # aorta centre relative to the body centre at that level (same as render_soft_tissue)
        vx = np.interp(z, [v.centre[2] for v in patient.vertebrae], [v.centre[0] for v in patient.vertebrae])
        vy = np.interp(z, [v.centre[2] for v in patient.vertebrae], [v.centre[1] for v in patient.vertebrae])
        ang = rng.uniform(0, 2 * np.pi)
        c = np.array([vx + 14.0 + 10.5 * np.cos(ang), vy - l3.depth / 2.0 - 13.0 + 10.5 * np.sin(ang), z])
        frame = Frame(c, rotation(0, 0, ang))
        got = _frame_box(grid, frame, (-4, -4, -6), (4, 4, 6))
        if got is None:
            continue
        box, (u, v, w) = got
        f = fraction(ellipsoid_distance(u, v, w, 1.2, 3.0, rng.uniform(2.0, 5.0)), h)
        paint(hu, box, f, float(rng.uniform(400.0, 1000.0)))
        stamp(tissue, box, f, Tissue.CORTICAL)


def render_metal(hu, tissue, patient: Patient, grid: Grid, levels: tuple[str, ...]) -> np.ndarray:
    """Titanium pedicle screws (Ø 6.5 mm, 45 mm) at ``levels`` joined by rods; returns the metal mask."""
    h = grid.voxel_mm
    metal = np.zeros(grid.shape, bool)
    heads: dict[float, list[np.ndarray]] = {-1.0: [], 1.0: []}
    for name in levels:
        vert = patient.level(name)
        frame = Frame(vert.centre, vert.axes)
        for side in (-1.0, 1.0):
            entry_local = np.array([side * (vert.canal_width / 2.0 + vert.pedicle_width / 2.0),
                                    vert.canal_offset + 6.0, vert.height / 2.0 - vert.pedicle_height / 2.0 - 1.0])
            direction = np.array([-side * np.sin(np.deg2rad(12.0)), -np.cos(np.deg2rad(12.0)), 0.0])
            tip = frame.to_lps(entry_local + 45.0 * direction)
            head = frame.to_lps(entry_local - 8.0 * direction)
            heads[side].append(head)
            for p0, p1, r in ((head, tip, 3.25), (head, head, 6.0)):
                box = grid.bbox(np.minimum(p0, p1) - r - 2, np.maximum(p0, p1) + r + 2)
                if box is None:
                    continue
                f = fraction(segment_distance(*grid.coords(box), p0, p1) - r, h)
                paint(hu, box, f, METAL_HU)
                stamp(tissue, box, f, Tissue.METAL)
                metal[box] |= f >= 0.25
    for pts in heads.values():
        for p0, p1 in pairwise(pts):
            p0e, p1e = p0 + 8.0 * (p0 - p1) / np.linalg.norm(p0 - p1), p1 + 8.0 * (p1 - p0) / np.linalg.norm(p0 - p1)
            box = grid.bbox(np.minimum(p0e, p1e) - 5, np.maximum(p0e, p1e) + 5)
            if box is None:
                continue
            f = fraction(segment_distance(*grid.coords(box), p0e, p1e) - 2.75, h)
            paint(hu, box, f, METAL_HU)
            stamp(tissue, box, f, Tissue.METAL)
            metal[box] |= f >= 0.25
    return metal


# ----------------------------------------------------------------------------------------------------
# acquisition
# ----------------------------------------------------------------------------------------------------
def gaussian_blur_mm(arr: np.ndarray, spacing, sigma_mm, workers: int = 2) -> np.ndarray:
    """Separable Gaussian blur with physical sigmas ``(x, y, z)`` in mm of a float32 ``(nz, ny, nx)`` array.

    Each 1-D pass runs on chunks in ``workers`` threads (scipy.ndimage releases the GIL), several times
    faster than one 3-D call on a 512 × 512 × 300 volume. Returns a new array.
    """
    out = arr
    for axis, sig in ((2, sigma_mm[0] / spacing[0]), (1, sigma_mm[1] / spacing[1]), (0, sigma_mm[2] / spacing[2])):
        if sig < 0.05:
            continue
        src, dst = out, np.empty_like(out)
        split_axis = 1 if axis == 0 else 0
        n = src.shape[split_axis]
        bounds = np.linspace(0, n, 2 * workers + 1).astype(int)

        def run(i: int, src=src, dst=dst, axis=axis, sig=sig, split_axis=split_axis, bounds=bounds) -> None:
            sl = [slice(None)] * 3
            sl[split_axis] = slice(bounds[i], bounds[i + 1])
            ndimage.gaussian_filter1d(src[tuple(sl)], sig, axis=axis, truncate=3.0, mode="nearest",
                                      output=dst[tuple(sl)])

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, range(len(bounds) - 1)))
        out = dst
    return out


def metal_streaks(hu: np.ndarray, metal: np.ndarray, grid: Grid, rng: np.random.Generator) -> None:
    """Streak artefacts of metal in each axial slice: a dark band between implants and radial streaks (in place)."""
    _, ny, nx = grid.shape
    x = (grid.spacing[0] * np.arange(nx, dtype=np.float32))[None, :]
    y = (grid.spacing[1] * np.arange(ny, dtype=np.float32))[:, None]
    angles = rng.uniform(0, np.pi, 10)
    amps = rng.uniform(150.0, 450.0, 10) * np.where(np.arange(10) % 2 == 0, 1.0, -1.0)
    for k in np.flatnonzero(metal.any(axis=(1, 2))):
        lab, n = ndimage.label(metal[k])
        if n == 0:
            continue
        cents = np.array(ndimage.center_of_mass(metal[k], lab, range(1, n + 1)))[:, ::-1] * grid.spacing[:2]
        amount = min(1.0, metal[k].sum() * grid.spacing[0] * grid.spacing[1] / 60.0)
        streak = np.zeros((ny, nx), np.float32)
        cx, cy = cents.mean(axis=0)
        r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        for ang, amp in zip_strict(angles, amps):
            dperp = np.abs(-(x - cx) * np.sin(ang) + (y - cy) * np.cos(ang))
            streak += np.float32(amp) * np.exp(-(dperp**2) / (2 * 1.5**2)) / (1.0 + r / 40.0)
        if n >= 2:
            for i in range(n):
                for j in range(i + 1, n):
                    p0, p1 = np.append(cents[i], 0.0), np.append(cents[j], 0.0)
                    dist = segment_distance(x[None], y[None], np.zeros((1, 1, 1), np.float32), p0, p1)[0]
                    streak -= np.float32(450.0) * np.exp(-(dist**2) / (2 * 4.0**2))
        hu[k] += amount * streak * (~metal[k])


def _white_noise(shape: tuple[int, int, int], rng: np.random.Generator, workers: int = 2) -> np.ndarray:
    """Standard normal float32 noise of ``shape``, filled in parallel from 4 generators spawned from ``rng``.

    Deterministic: chunk i always comes from spawned generator i.
    """
    out = np.empty(shape, np.float32)
    gens = rng.spawn(4)
    bounds = np.linspace(0, shape[0], len(gens) + 1).astype(int)

    def fill(i: int) -> None:
        gens[i].standard_normal(out=out[bounds[i] : bounds[i + 1]], dtype=np.float32)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fill, range(len(gens))))
    return out


def acquire(ideal: np.ndarray, grid: Grid, scanner: ScannerProfile, body_ry_mm: float, metal: np.ndarray | None,
            rng: np.random.Generator) -> np.ndarray:
    """Scanner model → int16 HU.

    White noise is added to the ideal image and both pass through the same point-spread function and
    slice profile, so the noise texture follows the reconstruction kernel as in real CT (sharper kernel,
    finer and stronger noise). The noise SD grows with the body's anterior–posterior half-axis ``body_ry_mm``
    and falls with voxel volume. Then metal streaks, the reconstruction circle (−1024 outside) and quantisation.
    """
    sigma = (scanner.psf_mm, scanner.psf_mm, scanner.slice_fwhm_mm / 2.355)
    size_factor = (2.0 * body_ry_mm / 230.0) ** 1.5
    # noise_sd is quoted for a 0.7 × 0.7 × 1 mm voxel; SD falls as 1/√(voxel volume) on coarser grids
    voxel_factor = float(np.clip(np.sqrt(0.49 / float(np.prod(grid.spacing))), 0.35, 1.3))
    sd = scanner.noise_sd * size_factor * voxel_factor
    probe = gaussian_blur_mm(np.random.default_rng(0).standard_normal((24, 64, 64), dtype=np.float32), grid.spacing,
                             sigma)[6:-6, 12:-12, 12:-12]
    attenuation = float(probe.std())
    scan = _white_noise(grid.shape, rng)
    scan *= np.float32(sd / attenuation)
    scan += ideal
    out = gaussian_blur_mm(scan, grid.spacing, sigma)
    del scan
    if metal is not None and metal.any():
        metal_streaks(out, metal, grid, rng)
    # reconstruction field of view: outside the circle the scanner writes -1024
    _, ny, nx = grid.shape
    radius = (nx - 1) / 2.0
    for j in range(ny):
        half = radius**2 - (j - (ny - 1) / 2.0) ** 2
        if half <= 0:
            out[:, j, :] = -1024.0
            continue
        i0, i1 = int(np.ceil(radius - np.sqrt(half))), int(np.floor(radius + np.sqrt(half))) + 1
        out[:, j, :i0] = -1024.0
        out[:, j, i1:] = -1024.0
    np.rint(out, out=out)
    np.clip(out, -1024.0, 3071.0, out=out)
    return out.astype(np.int16)
