"""Patient anatomy of the phantom: the spine's shape, vertebral sizes, densities and body habitus.

Ranges and their sources (adult lumbar spine):

* Vertebral body width 40–50 mm, depth 32–38 mm, posterior height 25–29 mm, increasing caudally;
  disc height 8–12 mm (Zhou SH et al. 2000, Eur Spine J 9:242; Panjabi MM et al. 1992, Spine 17:299).
* Canal (vertebral foramen) interpedicular width 21–27 mm, mid-sagittal depth 15–19 mm; pedicle width
  L1 ≈ 8–9 mm to L5 ≈ 15–18 mm, pedicle height 13–16 mm (Panjabi 1992; Zindrick MR et al. 1987, Spine
  12:160). Transverse processes longest at L3 (≈ 25 mm from the lamina).
* Lumbar lordosis L1–S1 40–60°, sacral slope 35–45° (Been E, Kalichman L 2014, Spine J 14:87).
* Vertebral cortical shell 0.2–0.6 mm (Ritzel H et al. 1997, J Bone Miner Res 12:89), seen on CT with a
  thickness about the voxel size because of partial volume.
* Trabecular BMD categories (ACR 2018 QCT practice parameter; ISCD): < 80 osteoporosis, 80–120
  osteopenia, > 120 mg/cm³ normal. Cohort prevalence 17 % / 42 % / 41 % as in the method paper.
* Marrow fat lowers trabecular HU by roughly 1 HU per percentage point of fat (fat −100 HU vs red marrow
  ≈ +40 HU); marrow fat rises as BMD falls (Griffith JF et al. 2005, Radiology 236:945).
* Intravenous contrast raises trabecular HU by about 10–15 HU in the portal-venous phase (Pompe E et al.
  2015, Eur Radiol 25:283); the QCT reference (unenhanced) does not change.
* Soft-tissue HU (unenhanced): fat −120..−80, muscle 40–60, blood 35–45, liver 55–65, kidney 30–35,
  CSF 0–15 (Lamba R et al. 2014, Abdom Imaging 39:1073). Abdominal AP diameter 200–300 mm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from LumbarBMDLib._compat import zip_strict

LUMBAR_LEVELS = ("L1", "L2", "L3", "L4")
CATEGORY_PROBABILITIES = {"osteoporosis": 0.17, "osteopenia": 0.42, "normal": 0.41}

#: Body label values of the 3-D truth (DESIGN.md). Posterior elements carry 100 + the body's value.
BODY_LABELS = {"T11": 11, "T12": 12, "L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5, "L6": 6, "S": 20}
POSTERIOR_OFFSET = 100

# Typical dimensions per level (mm): body width, depth, posterior height, disc below (Zhou 2000, Panjabi 1992).
_LEVEL_SIZES = {
    "T11": (36.0, 29.0, 23.5, 6.0),
    "T12": (39.0, 30.0, 24.5, 7.5),
    "L1": (42.0, 31.5, 25.5, 9.0),
    "L2": (44.0, 32.5, 26.5, 10.0),
    "L3": (46.0, 33.5, 27.0, 10.5),
    "L4": (48.0, 34.5, 27.0, 11.5),
    "L5": (50.0, 35.0, 26.0, 11.0),
    "L6": (50.0, 35.0, 25.0, 10.0),
}
# canal width, canal depth, pedicle width, pedicle height, transverse-process length (mm)
_POSTERIOR_SIZES = {
    "T11": (20.0, 16.5, 7.5, 15.5, 14.0),
    "T12": (21.0, 16.5, 8.0, 15.5, 12.0),
    "L1": (22.0, 17.0, 8.5, 15.0, 16.0),
    "L2": (22.5, 16.5, 9.0, 14.5, 20.0),
    "L3": (23.5, 16.0, 10.5, 14.0, 25.0),
    "L4": (24.0, 16.0, 13.0, 14.0, 21.0),
    "L5": (25.5, 16.5, 16.0, 14.0, 18.0),
    "L6": (25.5, 16.5, 16.0, 14.0, 16.0),
}


@dataclass
class Vertebra:
    """One vertebra of the phantom in its own frame (u → left, v → posterior, w → superior).

    Attributes:
        name: "T11" … "L5" ("L6" in the six-lumbar variant).
        width, depth, height: vertebral body size (mm); height is the posterior height.
        disc_below: height of the disc under this vertebra (mm).
        canal_width, canal_depth: vertebral foramen size (mm).
        pedicle_width, pedicle_height, tp_length: posterior element sizes (mm).
        bmd: trabecular BMD (mg/cm³, K2HPO4-equivalent QCT value).
        marrow_fat: marrow fat fraction (0–1).
        wedge: anterior height loss of a compression fracture (0 = intact, 0.3 = 30 %).
        centre: LPS position (mm) of the body's centre, set when the spine is built.
        axes: 3 × 3, rows = LPS directions of u, v, w, set when the spine is built.
    """

    name: str
    width: float
    depth: float
    height: float
    disc_below: float
    canal_width: float
    canal_depth: float
    pedicle_width: float
    pedicle_height: float
    tp_length: float
    bmd: float
    marrow_fat: float
    wedge: float = 0.0
    centre: np.ndarray = field(default_factory=lambda: np.zeros(3))
    axes: np.ndarray = field(default_factory=lambda: np.eye(3))

    @property
    def label(self) -> int:
        """Body label value (posterior elements: + 100)."""
        return BODY_LABELS[self.name]

    @property
    def canal_offset(self) -> float:
        """Distance (mm) from the body centre to the canal centre along +v (posterior).

        The canal's contents fill the bony foramen: its anterior edge lies on the body's flat posterior
        wall (2.5 mm in front of the body's elliptic outline; the body is painted over the 0.5 mm overlap).
        """
        return self.depth / 2.0 - 3.0 + self.canal_depth / 2.0

    @property
    def canal_centre(self) -> np.ndarray:
        """LPS position (mm) of the canal centre at this vertebra's mid-height."""
        return self.centre + self.canal_offset * self.axes[1]


@dataclass
class Patient:
    """Everything the phantom draws for one patient.

    Attributes:
        seed: random seed of the case.
        age, sex: cohort characteristics (years, "F"/"M").
        mean_bmd: patient's mean L1–L4 BMD (mg/cm³) = the mean of the four level values.
        vertebrae: bottom-up list of vertebrae above the sacrum (L5 … T11).
        sacrum_centre, sacrum_axes: frame of the S1 body.
        lordosis_deg, sacral_slope_deg, scoliosis_mm: spine shape.
        body_centre: LPS (x, y) of the abdomen's centre (mm); body_rx, body_ry: abdominal semi-axes (mm).
        subcut_fat_mm: subcutaneous fat thickness (mm).
    """

    seed: int
    age: float
    sex: str
    mean_bmd: float
    vertebrae: list[Vertebra]
    sacrum_centre: np.ndarray
    sacrum_axes: np.ndarray
    lordosis_deg: float
    sacral_slope_deg: float
    scoliosis_mm: float
    body_centre: np.ndarray
    body_rx: float
    body_ry: float
    subcut_fat_mm: float

    def level(self, name: str) -> Vertebra | None:
        """The vertebra called ``name``, or None."""
        return next((v for v in self.vertebrae if v.name == name), None)

    @property
    def bmd_by_level(self) -> dict[str, float]:
        """Trabecular BMD (mg/cm³) of every vertebra."""
        return {v.name: float(v.bmd) for v in self.vertebrae}


def category_of(bmd_mg_cm3: float) -> str:
    """ACR/ISCD category: < 80 osteoporosis, 80–120 osteopenia (inclusive), > 120 normal."""
    if bmd_mg_cm3 < 80.0:
        return "osteoporosis"
    if bmd_mg_cm3 <= 120.0:
        return "osteopenia"
    return "normal"


def sample_mean_bmd(rng: np.random.Generator, category: str | None = None) -> float:
    """A patient's mean L1–L4 BMD (mg/cm³) from the cohort distribution (17/42/41 %), or within ``category``."""
    if category is None:
        names = list(CATEGORY_PROBABILITIES)
        category = names[rng.choice(len(names), p=list(CATEGORY_PROBABILITIES.values()))]
    if category == "osteoporosis":
        return float(max(80.0 - rng.gamma(2.0, 9.0) - 0.5, 20.0))  # mostly 55–79, tail floored at 20
    if category == "osteopenia":
        return float(rng.uniform(80.0, 120.0))
    if category == "normal":
        return float(120.5 + rng.gamma(2.2, 18.0))  # mostly 125–200
    raise ValueError(f"unknown category {category!r}")


def _sample_vertebra(name: str, rng: np.random.Generator, scale: float, bmd: float) -> Vertebra:
    w, d, h, disc = _LEVEL_SIZES[name]
    cw, cd, pw, ph, tp = _POSTERIOR_SIZES[name]
    jitter = lambda sd: float(rng.normal(1.0, sd))  # noqa: E731
    fat = float(np.clip(0.30 + 0.0025 * (150.0 - bmd) + rng.normal(0.0, 0.01), 0.08, 0.75))
    return Vertebra(
        name=name,
        width=w * scale * jitter(0.03),
        depth=d * scale * jitter(0.03),
        height=h * scale * jitter(0.03),
        disc_below=disc * jitter(0.08),
        canal_width=cw * jitter(0.05),
        canal_depth=cd * jitter(0.05),
        pedicle_width=pw * jitter(0.06),
        pedicle_height=ph * jitter(0.05),
        tp_length=tp * jitter(0.08),
        bmd=bmd,
        marrow_fat=fat,
    )


def sample_patient(
    rng: np.random.Generator,
    seed: int,
    *,
    category: str | None = None,
    scoliosis: bool = False,
    six_lumbar: bool = False,
    fracture_level: str | None = None,
) -> Patient:
    """Draw one patient: sizes, BMD per level, spine curve. Positions are relative to S1 at the origin."""
    mean_bmd = sample_mean_bmd(rng, category)
    sex = "F" if rng.random() < 0.55 else "M"
    age = float(np.clip(88.0 - 0.22 * (mean_bmd - 40.0) + rng.normal(0.0, 7.0), 25.0, 95.0))
    scale = float(rng.normal(1.0 if sex == "M" else 0.93, 0.04))

    names = (["L6"] if six_lumbar else []) + ["L5", "L4", "L3", "L2", "L1", "T12", "T11"]
    # Level-to-level variation around the patient's mean, re-centred so the L1–L4 mean is exact.
    level_offsets = {n: float(rng.normal(0.0, 5.0)) for n in names}
    lumbar_mean_offset = np.mean([level_offsets[n] for n in LUMBAR_LEVELS])
    vertebrae = []
    for n in names:
        bmd = max(15.0, mean_bmd + level_offsets[n] - lumbar_mean_offset)
        vertebrae.append(_sample_vertebra(n, rng, scale, bmd))
    # re-centre again after the floor at 15 (rarely active)
    lumbar = [v for v in vertebrae if v.name in LUMBAR_LEVELS]
    shift = mean_bmd - float(np.mean([v.bmd for v in lumbar]))
    for v in lumbar:
        v.bmd += shift
    if fracture_level is not None:
        target = next(v for v in vertebrae if v.name == fracture_level)
        target.wedge = float(rng.uniform(0.25, 0.4))

    lordosis = float(rng.uniform(40.0, 60.0))
    sacral_slope = float(rng.uniform(35.0, 45.0))
    scol = float(rng.uniform(5.0, 10.0) * rng.choice([-1.0, 1.0])) if scoliosis else float(rng.normal(0.0, 1.0))

    _place_spine(vertebrae, lordosis, sacral_slope, scol)
    tilt_s1 = np.deg2rad(-sacral_slope)
    from LumbarBMDLib.phantom.shapes import rotation

    sacrum_axes = rotation(tilt_s1)
    sacrum_centre = -14.0 * sacrum_axes[2]  # S1 body centre 14 mm below the S1 endplate centre (origin)

    rx = float(rng.uniform(140.0, 180.0) * (1.0 if sex == "M" else 0.97))
    ry = float(rng.uniform(100.0, 135.0))
    return Patient(
        seed=seed,
        age=age,
        sex=sex,
        mean_bmd=float(mean_bmd),
        vertebrae=vertebrae,
        sacrum_centre=sacrum_centre,
        sacrum_axes=sacrum_axes,
        lordosis_deg=lordosis,
        sacral_slope_deg=sacral_slope,
        scoliosis_mm=scol,
        body_centre=np.array([float(rng.normal(0.0, 8.0)), 0.0]),
        body_rx=rx,
        body_ry=ry,
        subcut_fat_mm=float(rng.uniform(10.0, 35.0)),
    )


def spine_tilt_deg(s: np.ndarray, s_top_l1: float, lordosis: float, sacral_slope: float) -> np.ndarray:
    """Sagittal tilt of the spine axis (degrees; > 0 leans posterior going up) at arc length ``s`` (mm from S1).

    −sacral slope at S1, rising by the lordosis angle up to L1's upper endplate, fastest at the bottom
    (about two thirds of lumbar lordosis lies at L4–S1; Been & Kalichman 2014), which puts the apex of
    the curve at L3–L4; then a slow thoracic kyphosis (0.12°/mm) above L1.
    """
    s = np.asarray(s, dtype=float)
    t = np.clip(s / s_top_l1, 0.0, 1.0)
    base = -sacral_slope + lordosis * (1.0 - (1.0 - t) ** 2)
    return base + 0.12 * np.clip(s - s_top_l1, 0.0, None)


def _place_spine(vertebrae: list[Vertebra], lordosis: float, sacral_slope: float, scol_mm: float) -> None:
    """Set centre and axes of each vertebra, bottom-up from the S1 endplate at the origin."""
    from LumbarBMDLib.phantom.shapes import rotation

    # arc lengths of body centres along the axis through the body centres
    s = 0.0
    centres_s = []
    for v in vertebrae:
        s += v.disc_below + v.height / 2.0
        centres_s.append(s)
        s += v.height / 2.0
    top_l1 = next(c + v.height / 2 for c, v in zip_strict(centres_s, vertebrae) if v.name == "L1")
    total = s
    ds = 0.5
    grid = np.arange(0.0, total + ds, ds)
    tilt = np.deg2rad(spine_tilt_deg(grid, top_l1, lordosis, sacral_slope))
    lateral = scol_mm * np.sin(np.pi * grid / total)
    dlat = np.gradient(lateral, ds)
    roll = np.arctan(dlat)
    y = np.concatenate([[0.0], np.cumsum(np.sin(tilt[1:]) * ds)])
    z = np.concatenate([[0.0], np.cumsum(np.cos(tilt[1:]) * ds)])
    for v, cs in zip_strict(vertebrae, centres_s):
        i = round(cs / ds)
        yaw = np.deg2rad(0.6 * lateral[i])  # axial rotation follows the scoliotic curve (≈ 0.6°/mm)
        v.axes = rotation(float(tilt[i]), float(roll[i]), float(yaw))
        v.centre = np.array([lateral[i], y[i], z[i]])
