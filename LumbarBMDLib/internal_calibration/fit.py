"""Scanner-response fit (issue 15): the scanner's effective energy and water/air calibration from the HU of the
reference tissues every abdominal CT contains, and the K2HPO4 calibration it implies, onto which the pipeline maps
every case's HU (:mod:`LumbarBMDLib.internal_calibration.assess`).

Idea (Michalski AS, Besler BA, Michalak GJ, Boyd SK 2020, "CT-based internal density calibration for opportunistic
skeletal assessment using abdominal CT scans", Med Eng Phys 78:55; implemented in Bonelab's Ogo,
``ogo/calib/internal_calibration.py``): tissues of known elemental composition (air, adipose tissue, blood,
skeletal muscle, cortical bone) have known attenuation at every energy; the scanner's spectrum moves all their HU
together and predictably, so their measured HU fix the scanner's effective energy, and with it the HU that
K2HPO4 mineral would read. Ogo grid-searches the energy that maximises r² between the tissues' HU and their mass
attenuation coefficients (NIST / ICRU-46 tables), then maps each voxel's HU to μ/ρ and density with two linear
regressions and a two-component (K2HPO4 / triglyceride) model. This module keeps the idea and fits a physical
forward model instead, on top of :mod:`LumbarBMDLib.phantom.physics`:

Forward model (what physics.py computes for a polyenergetic spectrum, indexed here by one number):

1. The scanner's spectrum is represented by its effective energy E (keV; the energy at which water's μ equals
   the spectrum's detected-energy-weighted mean μ̄_water). For each element the weighted mean mass attenuation
   (μ/ρ)‾_el(E) comes from ``response_table.json`` (336 SpekPy spectra, kVp 80–140, 3–12 mm Al, 0–0.4 mm Cu,
   15–45 cm of water; ``build_response_table.py``), smoothed as ln (μ/ρ)‾_el = Σ_k c_el,k (ln E)^k over the
   spectra of the DICOM kVp (or all spectra without it). A material's mean attenuation is then
   μ̄_m(E) = ρ_m Σ_el f_el,m (μ/ρ)‾_el(E) (exact in physics.py's first-order model, which is linear in
   composition); only "kVp + filtration + patient size → E" is an approximation (spectral shape at fixed E).
2. The scanner's water/air calibration: water reads w, air reads −1000 + a (physics.apply_calibration_error):
   HU_m = w + (1000 + w − a) · (μ̄_m − μ̄_water) / (μ̄_water − μ̄_air).
3. Parameters θ = (E, w, a), fitted by weighted least squares (``scipy.optimize.least_squares``):
   χ²(θ) = Σ_t ((HU_t,measured − HU_t(θ)) / σ_t)² + ((E − E_kVp) / σ_kVp)²,
   σ_t² = (1.2533 · sd_t · √(k / n_t))² + floor_t² (standard error of a median of n_t voxels whose noise is
   correlated over k ≈ :data:`NOISE_CORRELATION_VOXELS` voxels, plus the tissue's biological variation between
   people, :data:`REFERENCE_TISSUES`), and the prior term from the DICOM kVp when present: E_kVp, σ_kVp are the
   mean and SD of the effective energies of the table's spectra at that kVp (filtration and patient size
   unknown).
4. The implied K2HPO4 calibration (the QCT reference, a solution of c mg/cm³ K2HPO4 displacing 0.2174 c mg of
   water, physics.k2hpo4_solution): HU(c) = intercept + slope · c with
   intercept = w,  slope = (1000 + w − a) · 10⁻³ [(μ/ρ)‾_K2HPO4 − 0.2174 (μ/ρ)‾_water] / (μ̄_water − μ̄_air)
   (HU per mg/cm³), so trabecular BMD = (HU − intercept) / slope (mg/cm³ K2HPO4-equivalent, as with a phantom).
5. Onto the regression model's reference scanner (slope_ref, intercept_ref, a ``ScannerCalibration``):
   HU_ref = intercept_ref + slope_ref · (HU − intercept) / slope, i.e. HU_ref = A · HU + B with
   A = slope_ref / slope, B = intercept_ref − A · intercept (what ``ScannerCalibration.to_reference`` gives).

Quality (:class:`InternalCalibration.verdict` "ok" or "poor", with one sentence per reason): a required tissue
missing (air, fat, muscle), fewer than :data:`MIN_TISSUES` tissues, a tissue off the model by more than
:data:`MAX_PULL` σ or its own HU limit, an effective energy outside 50–90 keV, a DICOM kVp that contradicts the
tissues' own (prior-free) effective energy, or a metal flag from the ROI finder. Blood flagged as
contrast-enhanced (the phase module) is excluded and said so. :func:`choose_calibration` then decides, and says,
what the pipeline uses: a phantom-scan calibration when given, else this fit when ok, else the nominal line of an
ideal scanner at the DICOM kVp (:func:`nominal_line`), visibly.

Runtime needs numpy and scipy only (not xraydb or spekpy): the table is committed.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.phantom import physics as ph

SCHEMA = "lumbarbmd-internal-calibration/1"
TABLE_PATH = Path(__file__).with_name("response_table.json")

#: Degree of the ln μ̄/ρ versus ln E polynomial per element (3 keeps the spectral-shape error below ~0.5 % of the
#: K2HPO4 slope over the table, see the README; higher degrees chase grid noise).
POLY_DEGREE = 3

#: Effective energies (keV) outside which a fit is called poor: clinical abdominal CT at 80–140 kVp lies within
#: (physics.py: 56.8 keV at 80 kVp, 80.6 keV at 140 kVp with 6 mm Al and 25 cm of water).
ENERGY_RANGE_KEV = (50.0, 90.0)

#: A tissue whose residual exceeds this many σ_t makes the fit poor (χ² tail: 4 σ is p ≈ 6e-5 per tissue).
MAX_PULL = 4.0

#: Fewest tissues (all used, the kVp prior not counted) for a fit of three parameters with one check left over.
MIN_TISSUES = 4

#: The DICOM kVp contradicts the tissues when their prior-free effective energy differs from the kVp's by more than
#: this many combined SDs.
MAX_KVP_Z = 3.0

#: Independent noise samples per this many voxels (the kernel and overlapping slices correlate neighbouring
#: voxels' noise; ≈ 4 for a standard abdominal kernel at 0.7 mm pixels and 1 mm slices: assumption).
NOISE_CORRELATION_VOXELS = 4.0

#: Standard error of a median relative to that of a mean for Gaussian noise (√(π/2)).
MEDIAN_EFFICIENCY = math.sqrt(math.pi / 2.0)

#: Weak bounds on the calibration offsets (HU): ACR allows water 0 ± 7 HU; these only keep the search finite.
OFFSET_BOUNDS_HU = 60.0

#: Prior SD (HU) of what water reads: the ACR CT accreditation criterion is water 0 ± 7 HU (taken as 2 SD) and
#: scanners are water-calibrated daily. Without it the soft tissues' between-person spread (myosteatosis,
#: haematocrit, fat water content; ± 10 HU) passes straight into the intercept: the real abdomen's fatty muscle
#: (24 HU) read as a −13 HU water error (measured, issue 15).
WATER_OFFSET_PRIOR_SD_HU = 3.5
#: Prior SD (HU) of the air offset: the ACR range for air is −1005..−970 HU (≈ 4 SD wide).
AIR_OFFSET_PRIOR_SD_HU = 8.0


@dataclass(frozen=True)
class ReferenceTissue:
    """A reference tissue: its assumed composition and how much it varies between people.

    Attributes:
        kind: "air", "fat", "muscle", "blood" or "bone".
        material: the composition (physics.py) whose HU the model predicts.
        floor_hu: biological (between-person) SD of its HU at 120 kVp, added in quadrature to the ROI's
            measurement error (HU).
        max_residual_hu: a residual above this makes the fit poor whatever the σ (HU).
        source: where the composition and the floor come from.
    """

    kind: str
    material: ph.Material
    floor_hu: float
    max_residual_hu: float
    source: str


_LAMBA = "Lamba R et al. 2014, Abdom Imaging 39:1073 (unenhanced abdominal CT, 120 kVp)"
#: The tissues the fit knows, by the name the ROI finder gives them. Floors: a quarter of the published normal
#: range (≈ ±2 SD), except air (no biology: residual partial volume, streaks) and bone (assumed).
REFERENCE_TISSUES: dict[str, ReferenceTissue] = {
    "air": ReferenceTissue("air", ph.AIR, 2.0, 15.0,
                           "NIST dry air; floor assumed (air outside the body varies only by streaks and the "
                           "table/partial volume)"),
    "subcutaneous_fat": ReferenceTissue("fat", ph.ADIPOSE_3, 10.0, 40.0,
                                        "Woodard & White 1986 adipose tissue 3 (−100 HU at 120 kVp in physics.py, "
                                        "the centre of the published −120..−80 HU); floor: range/4 of " + _LAMBA),
    "visceral_fat": ReferenceTissue("fat", ph.ADIPOSE_3, 10.0, 40.0,
                                    "as subcutaneous fat; visceral fat is often a few HU denser (more water, "
                                    "vessels), within the floor"),
    "muscle": ReferenceTissue("muscle", ph.MUSCLE, 10.0, 35.0,
                              "ICRU-44 skeletal muscle; floor: range/4 of 20–60 HU (40–60 HU, " + _LAMBA
                              + ", extended down for the fatty infiltration of older and obese patients' paraspinal "
                              "muscle: the real abdomen CT here reads 24 HU)"),
    "blood": ReferenceTissue("blood", ph.BLOOD, 5.0, 25.0,
                             "ICRU-44 whole blood; floor: range/4 of 35–55 HU (unenhanced; it follows the "
                             "hematocrit), " + _LAMBA),
    "cortical_bone": ReferenceTissue("bone", ph.CORTICAL_BONE, 150.0, 600.0,
                                     "ICRU-44 cortical bone (1.92 g/cm³); floor assumed (porosity, partial volume "
                                     "of thin cortices)"),
}

#: Other names the ROI finder may use, mapped onto :data:`REFERENCE_TISSUES`.
ALIASES = {"fat": "subcutaneous_fat", "sat": "subcutaneous_fat", "vat": "visceral_fat",
           "paraspinal_muscle": "muscle", "psoas": "muscle", "aorta": "blood", "ivc": "blood",
           "aorta_blood": "blood", "ivc_blood": "blood", "bone": "cortical_bone", "cortical": "cortical_bone"}

#: A fit needs at least one tissue of each of these kinds.
REQUIRED_KINDS = ("air", "fat", "muscle")


# ---------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class TissueMeasurement:
    """One tissue's HU statistics as the ROI finder measured them.

    Attributes:
        median_hu: median HU of the ROI.
        sd_hu: SD of the ROI's HU (image noise plus texture).
        n_voxels: voxels in the ROI.
        roi: optional description of the ROI (passed through to results.json).
    """

    median_hu: float
    sd_hu: float
    n_voxels: int
    roi: dict | None = None


def as_measurement(value: Any) -> TissueMeasurement:
    """A :class:`TissueMeasurement` from a tuple ``(median, sd, n[, roi])``, a mapping or an object with the fields."""
    if isinstance(value, TissueMeasurement):
        return value
    if isinstance(value, Mapping):
        get = value.get
    elif isinstance(value, Sequence) and not isinstance(value, str):
        keys = ("median_hu", "sd_hu", "n_voxels", "roi")
        get = dict(zip(keys, value)).get
    else:
        def get(key: str, default: Any = None) -> Any:
            return getattr(value, key, default)
    try:
        m = TissueMeasurement(float(get("median_hu")), float(get("sd_hu")), int(get("n_voxels")), get("roi", None))
    except (TypeError, ValueError):
        raise LumbarBMDError(f"a tissue measurement needs numeric median_hu, sd_hu and n_voxels, not {value!r}") \
            from None
    if not (math.isfinite(m.median_hu) and math.isfinite(m.sd_hu) and m.sd_hu >= 0 and m.n_voxels >= 1):
        raise LumbarBMDError(f"implausible tissue measurement {value!r} (finite HU, SD ≥ 0, ≥ 1 voxel)")
    return m


def measurement_sigma_hu(m: TissueMeasurement, floor_hu: float) -> float:
    """σ_t (HU): the median's standard error with correlated noise, plus the biological floor, in quadrature."""
    se = MEDIAN_EFFICIENCY * m.sd_hu * math.sqrt(NOISE_CORRELATION_VOXELS / m.n_voxels)
    return math.hypot(se, floor_hu)


def reference_name(name: str) -> str | None:
    """The :data:`REFERENCE_TISSUES` key of a tissue name (``None`` if unknown)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in REFERENCE_TISSUES else None


# ---------------------------------------------------------------------------------------------------------------
# Response table


@dataclass(frozen=True)
class ResponseCurve:
    """ln (μ/ρ)‾_el(E) = Σ_k coef[el, k] (ln E)^k over a set of table spectra.

    Attributes:
        elements: element symbols, the rows of ``coef``.
        coef: polynomial coefficients, highest power first (numpy.polyval order), shape (n_elements, degree + 1).
        energy_range_kev: effective energies of the spectra it was fitted to (keV).
        prior_kev: (mean, SD) of those spectra's effective energies (keV): the prior a DICOM kVp gives.
        kvp: the kVp it stands for (``None``: all spectra).
    """

    elements: tuple[str, ...]
    coef: np.ndarray
    energy_range_kev: tuple[float, float]
    prior_kev: tuple[float, float]
    kvp: float | None

    def mu_rho_vector(self, energy_kev: float) -> np.ndarray:
        """(μ/ρ)‾ of each element of :attr:`elements` (cm²/g) at effective energy ``energy_kev``."""
        x = math.log(energy_kev)
        return np.exp(self.coef @ (x ** np.arange(self.coef.shape[1] - 1, -1, -1)))

    def mu_rho(self, energy_kev: float) -> dict[str, float]:
        """(μ/ρ)‾ of each element (cm²/g) at effective energy ``energy_kev``, by symbol."""
        return dict(zip(self.elements, self.mu_rho_vector(energy_kev).tolist()))

    def partial_densities(self, materials: Sequence[ph.Material]) -> np.ndarray:
        """Matrix ρ_m · f_el,m (g/cm³), shape (n_materials, n_elements): μ̄ = this @ :meth:`mu_rho_vector`."""
        index = {el: i for i, el in enumerate(self.elements)}
        out = np.zeros((len(materials), len(self.elements)))
        for row, m in enumerate(materials):
            for el, f in m.mass_fractions:
                out[row, index[el]] = m.density_g_cm3 * f
        return out

    def material_mu(self, material: ph.Material, energy_kev: float) -> float:
        """μ̄ (1/cm) of ``material`` at ``energy_kev``."""
        return float(self.partial_densities([material])[0] @ self.mu_rho_vector(energy_kev))


@functools.lru_cache(maxsize=1)
def load_table(path: str = str(TABLE_PATH)) -> dict:
    """The committed response table (``build_response_table.py``)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LumbarBMDError(f"the scanner-response table {path} cannot be read ({err}): regenerate it with  "
                             "python -m LumbarBMDLib.internal_calibration.build_response_table") from None


def _fit_curve(rows: list[dict], elements: tuple[str, ...], kvp: float | None) -> ResponseCurve:
    e = np.array([r["effective_energy_kev"] for r in rows])
    mu = np.log(np.array([r["mu_rho"] for r in rows]))
    coef = np.stack([np.polyfit(np.log(e), mu[:, i], POLY_DEGREE) for i in range(len(elements))])
    return ResponseCurve(elements, coef, (float(e.min()), float(e.max())), (float(e.mean()), float(e.std())), kvp)


@functools.lru_cache(maxsize=32)
def response_curve(kvp: float | None = None) -> ResponseCurve:
    """The response curve for a DICOM ``kvp`` (spectra of the two grid kVps around it), or over all spectra."""
    table = load_table()
    elements = tuple(table["elements"])
    rows = table["rows"]
    if kvp is None:
        return _fit_curve(rows, elements, None)
    grid = sorted({r["kvp"] for r in rows})
    k = float(kvp)
    if not grid[0] <= k <= grid[-1]:
        raise LumbarBMDError(f"DICOM kVp {k:g} is outside the response table's {grid[0]:g}–{grid[-1]:g} kVp")
    near = [g for g in grid if abs(g - k) < 1e-6] or [max(g for g in grid if g < k), min(g for g in grid if g > k)]
    return _fit_curve([r for r in rows if r["kvp"] in near], elements, k)


def energy_prior(kvp: float, patient_water_cm: float | None = None) -> tuple[float, float]:
    """(mean, SD) effective energy (keV) the DICOM ``kvp`` implies, over the table's filtrations.

    With ``patient_water_cm`` (the patient's water-equivalent diameter, e.g. AAPM TG-220 from the body outline)
    the mean and SD are interpolated linearly between the table's patient sizes (clamped to 15–45 cm), which
    halves the SD (at 120 kVp 4.6 keV over all sizes, 2.3 keV at 25 cm); without it, all sizes count.
    """
    curve = response_curve(kvp)
    if patient_water_cm is None:
        return curve.prior_kev
    table = load_table()
    kvps = {r["kvp"] for r in table["rows"]}
    near = [g for g in kvps if abs(g - kvp) < 10.0 - 1e-6] or [min(kvps, key=lambda g: abs(g - kvp))]
    sizes = sorted({r["patient_water_cm"] for r in table["rows"]})
    means, sds = [], []
    for size in sizes:
        e = []
        for g in near:  # weight the two bracketing kVps linearly
            vals = [r["effective_energy_kev"] for r in table["rows"] if r["kvp"] == g and r["patient_water_cm"] == size]
            e.append((1.0 - abs(g - kvp) / 10.0, float(np.mean(vals)), float(np.std(vals))))
        total = sum(wt for wt, _, _ in e)
        means.append(sum(wt * m for wt, m, _ in e) / total)
        sds.append(sum(wt * sd for wt, _, sd in e) / total)
    x = float(np.clip(patient_water_cm, sizes[0], sizes[-1]))
    return float(np.interp(x, sizes, means)), float(np.interp(x, sizes, sds))


#: How well a site knows its scanner's equivalent filtration at the centre ray (mm Al, mm Cu), e.g. from the service
#: manual or the medical physicist's half-value-layer measurement: ± 1 mm Al, ± 0.05 mm Cu (1 SD, an assumption).
FILTRATION_SD = (1.0, 0.05)
#: Interpolation and spectral-shape error of the table's effective energy at a given filtration (keV, assumed).
FILTRATION_MODEL_SD_KEV = 0.5
#: Patient size assumed, and its spread, when the water-equivalent diameter is unknown (cm): adult abdomens 25–35.
DEFAULT_PATIENT_WATER_CM = (30.0, 5.0)


@functools.lru_cache(maxsize=1)
def _energy_grid():
    """Linear interpolator of the table's effective energy over (kVp, mm Al, mm Cu, patient cm)."""
    from scipy.interpolate import RegularGridInterpolator

    rows = load_table()["rows"]
    keys = ("kvp", "filtration_mm_al", "filtration_mm_cu", "patient_water_cm")
    axes = [sorted({float(r[k]) for r in rows}) for k in keys]
    grid = np.full([len(a) for a in axes], np.nan)
    for r in rows:
        grid[tuple(axes[i].index(float(r[k])) for i, k in enumerate(keys))] = r["effective_energy_kev"]
    return RegularGridInterpolator(axes, grid), axes


def energy_prior_from_filtration(kvp: float, mm_al: float, mm_cu: float = 0.0,
                                 patient_water_cm: float | None = None) -> tuple[float, float]:
    """(mean, SD) effective energy (keV) of a scanner whose kVp and equivalent filtration are known (a site's
    scanner description, ``lumbarbmd run --scanner-spec``), interpolated in the response table; the SD combines
    :data:`FILTRATION_SD`, the patient's size when unknown (:data:`DEFAULT_PATIENT_WATER_CM`) and
    :data:`FILTRATION_MODEL_SD_KEV`. Values are clamped to the table (80–140 kVp, 3–12 mm Al, 0–0.4 mm Cu,
    15–45 cm)."""
    interp, axes = _energy_grid()

    def e(k: float, al: float, cu: float, size: float) -> float:
        point = [float(np.clip(v, ax[0], ax[-1])) for v, ax in zip((k, al, cu, size), axes)]
        return float(interp([point])[0])

    size, size_sd = (patient_water_cm, 0.0) if patient_water_cm is not None else DEFAULT_PATIENT_WATER_CM
    mean = e(kvp, mm_al, mm_cu, size)
    d_al = 0.5 * (e(kvp, mm_al + FILTRATION_SD[0], mm_cu, size) - e(kvp, mm_al - FILTRATION_SD[0], mm_cu, size))
    d_cu = 0.5 * (e(kvp, mm_al, mm_cu + FILTRATION_SD[1], size) - e(kvp, mm_al, max(mm_cu - FILTRATION_SD[1], 0.0),
                                                                     size))
    d_size = 0.5 * (e(kvp, mm_al, mm_cu, size + size_sd) - e(kvp, mm_al, mm_cu, size - size_sd)) if size_sd else 0.0
    return mean, float(math.sqrt(d_al ** 2 + d_cu ** 2 + d_size ** 2 + FILTRATION_MODEL_SD_KEV ** 2))


# ---------------------------------------------------------------------------------------------------------------
# Model


def model_hu(curve: ResponseCurve, material: ph.Material, energy_kev: float, water_offset_hu: float,
             air_offset_hu: float) -> float:
    """HU of ``material`` at effective energy ``energy_kev`` with the water/air calibration (w, a) (module step 2)."""
    mu_w = curve.material_mu(ph.WATER, energy_kev)
    mu_a = curve.material_mu(ph.AIR, energy_kev)
    mu_m = curve.material_mu(material, energy_kev)
    return water_offset_hu + (1000.0 + water_offset_hu - air_offset_hu) * (mu_m - mu_w) / (mu_w - mu_a)


def k2hpo4_line(curve: ResponseCurve, energy_kev: float, water_offset_hu: float,
                air_offset_hu: float) -> tuple[float, float]:
    """``(slope, intercept)``: HU = intercept + slope · c for c mg/cm³ K2HPO4 in water (module step 4)."""
    mu = curve.mu_rho(energy_kev)
    mu_w = curve.material_mu(ph.WATER, energy_kev)
    mu_a = curve.material_mu(ph.AIR, energy_kev)
    salt = sum(f * mu[el] for el, f in ph.K2HPO4.items())
    water = sum(f * mu[el] for el, f in ph.WATER.mass_fractions)
    per_mg = 1e-3 * (salt - ph.K2HPO4_WATER_DISPLACEMENT * water)  # Δμ̄ (1/cm) per mg/cm³
    gain = (1000.0 + water_offset_hu - air_offset_hu) / 1000.0
    return gain * 1000.0 * per_mg / (mu_w - mu_a), water_offset_hu


# ---------------------------------------------------------------------------------------------------------------
# Result


@dataclass
class TissueFit:
    """One tissue in the fit.

    Attributes:
        name: as given by the ROI finder.
        reference: the :data:`REFERENCE_TISSUES` key (``None``: unknown, not used).
        measured_hu, sd_hu, n_voxels: the measurement.
        sigma_hu: σ_t used as its weight (HU; measurement error and biological floor).
        model_hu: the fitted model's HU (``None`` if the fit failed).
        residual_hu: measured − model (HU).
        pull: residual / σ_t.
        used: whether it entered the fit.
        note: why it was not used, or why it is suspicious ("" otherwise).
        roi: the ROI description passed through.
    """

    name: str
    reference: str | None
    measured_hu: float
    sd_hu: float
    n_voxels: int
    sigma_hu: float
    model_hu: float | None = None
    residual_hu: float | None = None
    pull: float | None = None
    used: bool = True
    note: str = ""
    roi: dict | None = None


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become ``None``, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass
class InternalCalibration:
    """The fitted scanner response and the K2HPO4 calibration it implies.

    Attributes:
        effective_energy_kev: fitted effective energy (keV).
        effective_energy_sd_kev: its standard error from the fit's covariance (keV).
        water_offset_hu: fitted w, what water reads (HU).
        air_offset_hu: fitted a, air reads −1000 + a (HU).
        slope: K2HPO4 calibration slope (HU per mg/cm³).
        slope_sd: its standard error (HU per mg/cm³).
        intercept: HU of 0 mg/cm³ (= w).
        tissues: every tissue given, used or not, with its residual.
        chi2: χ² at the minimum (tissues and the kVp prior).
        dof: degrees of freedom (used tissues + prior − 3).
        rms_hu: RMS residual of the used tissues (HU).
        kvp: the DICOM kVp (``None`` if absent).
        kvp_prior_kev: (mean, SD) effective energy the kVp implies (keV), or ``None``.
        tissue_only_energy_kev: the effective energy from the tissues alone (no prior), or ``None``.
        verdict: "ok" or "poor".
        reasons: one sentence per reason the fit is poor.
        notes: sentences on what was excluded or assumed (not making it poor).
    """

    effective_energy_kev: float
    effective_energy_sd_kev: float
    water_offset_hu: float
    air_offset_hu: float
    slope: float
    slope_sd: float
    intercept: float
    tissues: list[TissueFit] = field(default_factory=list)
    chi2: float = float("nan")
    dof: int = 0
    rms_hu: float = float("nan")
    kvp: float | None = None
    kvp_prior_kev: tuple[float, float] | None = None
    tissue_only_energy_kev: float | None = None
    verdict: str = "poor"
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the fit may be used."""
        return self.verdict == "ok"

    @property
    def message(self) -> str:
        """One paragraph for the log and results.json."""
        head = (f"internal calibration {self.verdict}: effective energy {self.effective_energy_kev:.1f} ± "
                f"{self.effective_energy_sd_kev:.1f} keV, K2HPO4 HU = {self.intercept:+.1f} + {self.slope:.3f} × "
                f"BMD (± {self.slope_sd:.3f}), RMS residual {self.rms_hu:.1f} HU")
        return " ".join([head + ".", *self.reasons, *self.notes])

    def bmd_from_hu(self, hu: float | np.ndarray) -> float | np.ndarray:
        """K2HPO4-equivalent BMD (mg/cm³) of trabecular ``hu`` measured on this scanner: (HU − intercept) / slope."""
        return (np.asarray(hu, dtype=float) - self.intercept) / self.slope if np.ndim(hu) else \
            (float(hu) - self.intercept) / self.slope

    def hu_transform(self, reference: Any) -> tuple[float, float]:
        """``(A, B)`` with HU_ref = A · HU + B onto ``reference`` (anything with ``slope`` and ``intercept``)."""
        a = float(reference.slope) / self.slope
        return a, float(reference.intercept) - a * self.intercept

    def to_reference_scale(self, hu: float | np.ndarray, reference: Any) -> float | np.ndarray:
        """HU the reference scanner would have measured: intercept_ref + slope_ref · (HU − intercept) / slope."""
        a, b = self.hu_transform(reference)
        return a * np.asarray(hu, dtype=float) + b if np.ndim(hu) else a * float(hu) + b

    def as_scanner_calibration(self):
        """The K2HPO4 line as a :class:`LumbarBMDLib.calibration.ScannerCalibration` (r² not defined: NaN)."""
        from LumbarBMDLib.calibration import ScannerCalibration

        return ScannerCalibration(self.slope, self.intercept, float("nan"), [],
                                  f"internal calibration, {self.effective_energy_kev:.1f} keV")

    def as_dict(self) -> dict:
        """Plain JSON-safe dict for results.json (non-finite numbers as ``null``)."""
        d = asdict(self)
        d["tissues"] = [asdict(t) for t in self.tissues]
        return {"schema": SCHEMA, "message": self.message, **_clean(d)}

    @classmethod
    def from_dict(cls, data: Mapping) -> InternalCalibration:
        """Inverse of :meth:`as_dict`."""
        if data.get("schema") != SCHEMA:
            raise LumbarBMDError(f"not an internal calibration ({SCHEMA}): schema {data.get('schema')!r}")

        def num(v: Any) -> float:
            return float("nan") if v is None else float(v)

        tissues = [TissueFit(**t) for t in data.get("tissues", [])]
        prior = data.get("kvp_prior_kev")
        return cls(num(data["effective_energy_kev"]), num(data["effective_energy_sd_kev"]),
                   num(data["water_offset_hu"]), num(data["air_offset_hu"]), num(data["slope"]),
                   num(data["slope_sd"]), num(data["intercept"]), tissues, num(data.get("chi2")),
                   int(data.get("dof", 0)), num(data.get("rms_hu")), data.get("kvp"),
                   None if prior is None else (float(prior[0]), float(prior[1])), data.get("tissue_only_energy_kev"),
                   str(data.get("verdict", "poor")), list(data.get("reasons", [])), list(data.get("notes", [])))


# ---------------------------------------------------------------------------------------------------------------
# Fit


@dataclass(frozen=True)
class _Solution:
    theta: np.ndarray
    cov: np.ndarray
    chi2: float
    success: bool


def _solve(curve: ResponseCurve, used: list[TissueFit], prior: tuple[float, float] | None) -> _Solution:
    """Weighted least squares for θ = (E, w, a) (module step 3)."""
    from scipy.optimize import least_squares

    rho = curve.partial_densities([ph.WATER, ph.AIR] + [REFERENCE_TISSUES[t.reference].material for t in used])
    hu = np.array([t.measured_hu for t in used])
    sig = np.array([t.sigma_hu for t in used])

    def residuals(theta: np.ndarray) -> np.ndarray:
        e, w, a = theta
        mu = rho @ curve.mu_rho_vector(e)
        model = w + (1000.0 + w - a) * (mu[2:] - mu[0]) / (mu[0] - mu[1])
        r = np.append((hu - model) / sig, (w / WATER_OFFSET_PRIOR_SD_HU, a / AIR_OFFSET_PRIOR_SD_HU))
        return np.append(r, (e - prior[0]) / prior[1]) if prior is not None else r

    lo, hi = curve.energy_range_kev
    air = [t.measured_hu for t in used if REFERENCE_TISSUES[t.reference].kind == "air"]
    a0 = float(np.clip(air[0] + 1000.0, -OFFSET_BOUNDS_HU + 1, OFFSET_BOUNDS_HU - 1)) if air else 0.0
    starts = [prior[0]] if prior is not None else [lo + 0.25 * (hi - lo), 0.5 * (lo + hi), lo + 0.75 * (hi - lo)]
    best = None
    bounds = ([lo, -OFFSET_BOUNDS_HU, -OFFSET_BOUNDS_HU], [hi, OFFSET_BOUNDS_HU, OFFSET_BOUNDS_HU])
    for e0 in starts:
        sol = least_squares(residuals, np.array([float(np.clip(e0, lo, hi)), 0.0, a0]), bounds=bounds,
                            x_scale=np.array([5.0, 5.0, 5.0]), method="trf")
        if best is None or sol.cost < best.cost:
            best = sol
    jac = best.jac
    try:
        cov = np.linalg.inv(jac.T @ jac)
    except np.linalg.LinAlgError:
        cov = np.full((3, 3), np.nan)
    return _Solution(best.x, cov, float(2.0 * best.cost), bool(best.success))


def _slope_sd(curve: ResponseCurve, theta: np.ndarray, cov: np.ndarray) -> float:
    """Standard error of the K2HPO4 slope from θ's covariance (numerical gradient)."""
    steps = np.array([0.05, 0.05, 0.05])
    grad = np.zeros(3)
    for i in range(3):
        hi, lo = theta.copy(), theta.copy()
        hi[i] += steps[i]
        lo[i] -= steps[i]
        lo[0], hi[0] = np.clip(lo[0], *curve.energy_range_kev), np.clip(hi[0], *curve.energy_range_kev)
        grad[i] = (k2hpo4_line(curve, *hi)[0] - k2hpo4_line(curve, *lo)[0]) / (hi[i] - lo[i])
    var = float(grad @ cov @ grad)
    return math.sqrt(var) if var >= 0 else float("nan")


def _collect(measurements: Mapping[str, Any], blood_enhanced: bool,
             floor_scale: float = 1.0) -> tuple[list[TissueFit], list[str]]:
    """The tissues as :class:`TissueFit` rows, with unknown or enhanced ones marked unused; and notes."""
    rows, notes = [], []
    for name, value in measurements.items():
        ref = reference_name(str(name))
        m = as_measurement(value)
        floor = REFERENCE_TISSUES[ref].floor_hu * floor_scale if ref else 0.0
        row = TissueFit(str(name), ref, m.median_hu, m.sd_hu, m.n_voxels, measurement_sigma_hu(m, floor), roi=m.roi)
        if ref is None:
            row.used, row.note = False, "unknown tissue: not a reference of the fit"
            notes.append(f"Tissue {name!r} is not one the fit knows ({', '.join(REFERENCE_TISSUES)}); ignored.")
        elif REFERENCE_TISSUES[ref].kind == "blood" and blood_enhanced:
            row.used, row.note = False, "contrast-enhanced: excluded"
            notes.append(f"Blood ({name}, {m.median_hu:.0f} HU) is contrast-enhanced (phase module) and was "
                         "excluded from the fit.")
        rows.append(row)
    return rows, notes


def _missing_kinds(used: list[TissueFit]) -> list[str]:
    kinds = {REFERENCE_TISSUES[t.reference].kind for t in used}
    return [k for k in REQUIRED_KINDS if k not in kinds]


def fit_scanner_response(measurements: Mapping[str, Any], kvp: float | None = None, blood_enhanced: bool = False,
                         metal: bool = False, patient_water_cm: float | None = None,
                         floor_scale: float = 1.0, filtration: tuple[float, float] | None = None
                         ) -> InternalCalibration:
    """Fit the scanner response to the reference tissues' HU and derive the K2HPO4 calibration.

    Args:
        measurements: tissue name (:data:`REFERENCE_TISSUES` keys or :data:`ALIASES`) → ``(median HU, SD HU,
            voxel count)`` or a :class:`TissueMeasurement`-like object.
        kvp: the DICOM tube voltage (0018,0060) in kV, when present; it sets the effective-energy prior and the
            response curve.
        blood_enhanced: the contrast phase says the blood is enhanced: blood ROIs are excluded.
        metal: the ROI finder saw metal (streaks bias every ROI): the fit is reported but called poor.
        patient_water_cm: the patient's water-equivalent diameter (cm), when known: narrows the kVp prior
            (:func:`energy_prior`); ignored without ``kvp``.
        floor_scale: multiplies every tissue's biological floor (1: the documented floors; smaller only where a
            site knows its population better, or in tests of the model itself).
        filtration: the scanner's equivalent filtration ``(mm Al, mm Cu)`` when the site states it: with ``kvp``,
            the energy prior comes from it (:func:`energy_prior_from_filtration`) instead of the table's whole
            filtration range.

    Returns:
        the :class:`InternalCalibration`, verdict "ok" or "poor" with its reasons. A poor fit still carries
        numbers (NaN when none could be computed); the caller falls back (:func:`choose_calibration`).
    """
    notes: list[str] = []
    reasons: list[str] = []
    curve = response_curve(kvp)
    if kvp is not None and filtration is not None:
        prior = energy_prior_from_filtration(kvp, filtration[0], filtration[1], patient_water_cm)
        notes.append(f"The site's filtration ({filtration[0]:g} mm Al + {filtration[1]:g} mm Cu at {kvp:g} kVp) sets "
                     f"the effective-energy prior: {prior[0]:.1f} ± {prior[1]:.1f} keV.")
    else:
        prior = energy_prior(kvp, patient_water_cm) if kvp is not None else curve.prior_kev
    if kvp is None:
        notes.append(f"No DICOM kVp: the effective-energy prior spans all the table's 80–140 kVp spectra "
                     f"({prior[0]:.0f} ± {prior[1]:.0f} keV).")
    rows, more = _collect(measurements, blood_enhanced, floor_scale)
    notes += more
    used = [t for t in rows if t.used]
    missing = _missing_kinds(used)
    if missing:
        reasons.append(f"A required reference tissue is missing: {', '.join(missing)} (needs "
                       f"{', '.join(REQUIRED_KINDS)}).")
    if len(used) < MIN_TISSUES:
        reasons.append(f"Too few reference tissues: {len(used)} usable, the fit needs at least {MIN_TISSUES}.")
    if metal:
        reasons.append("Metal was found near the reference ROIs: their HU are unreliable.")
    nan = float("nan")
    if len(used) + (prior is not None) < 3 or not any(REFERENCE_TISSUES[t.reference].kind == "air" for t in used):
        if not any(REFERENCE_TISSUES[t.reference].kind == "air" for t in used) and "air" not in missing:
            reasons.append("No air ROI: the HU scale's gain cannot be fitted.")
        return InternalCalibration(nan, nan, nan, nan, nan, nan, nan, rows, nan, 0, nan, kvp, prior, None,
                                   "poor", reasons, notes)

    def solve_and_score(tissues: list[TissueFit]) -> _Solution:
        solution = _solve(curve, tissues, prior)
        for t in tissues:
            t.model_hu = model_hu(curve, REFERENCE_TISSUES[t.reference].material, *(float(v) for v in solution.theta))
            t.residual_hu = t.measured_hu - t.model_hu
            t.pull = t.residual_hu / t.sigma_hu
        return solution

    def off_model(t: TissueFit) -> bool:
        return abs(t.pull) > MAX_PULL or abs(t.residual_hu) > REFERENCE_TISSUES[t.reference].max_residual_hu

    sol = solve_and_score(used)
    # One tissue off the model (a vessel ROI on a bowel loop, a fatty muscle) is left out and the fit redone, when
    # what remains still fits three parameters with a check left over; a second one makes the fit poor.
    worst = max(used, key=lambda t: abs(t.pull))
    rest = [t for t in used if t is not worst]
    if off_model(worst) and len(rest) >= MIN_TISSUES and not _missing_kinds(rest):
        worst.used, worst.note = False, "off the model: left out, the fit redone without it"
        notes.append(f"{worst.name} read {worst.measured_hu:.0f} HU where the fitted scanner predicted "
                     f"{worst.model_hu:.0f} HU ({worst.pull:+.1f} σ): left out (a wrong ROI or an unusual tissue) and "
                     "the fit redone without it.")
        used = rest
        sol = solve_and_score(used)
    e, w, a = (float(v) for v in sol.theta)
    slope, intercept = k2hpo4_line(curve, e, w, a)
    dof = len(used) + (prior is not None) + 2 - 3  # the tissues, the energy prior and the two offset priors
    rms = float(np.sqrt(np.mean([t.residual_hu ** 2 for t in used])))

    for t in used:
        if off_model(t):
            t.note = "off the model"
            reasons.append(f"{t.name} reads {t.measured_hu:.0f} HU where the fitted scanner predicts "
                           f"{t.model_hu:.0f} HU (residual {t.residual_hu:+.0f} HU, {t.pull:+.1f} σ): a wrong ROI, "
                           "contrast, metal or an unusual tissue.")
    lo, hi = ENERGY_RANGE_KEV
    if not lo <= e <= hi:
        reasons.append(f"The fitted effective energy {e:.1f} keV is outside the {lo:g}–{hi:g} keV of clinical CT.")
    if not sol.success:
        reasons.append("The least-squares fit did not converge.")

    tissue_only = None
    if kvp is not None:
        if len(used) >= 4:
            free = _solve(response_curve(None), used, None)
            tissue_only = float(free.theta[0])
            sd_free = math.sqrt(free.cov[0, 0]) if np.isfinite(free.cov[0, 0]) and free.cov[0, 0] > 0 else nan
            z = abs(tissue_only - prior[0]) / math.hypot(sd_free, prior[1]) if math.isfinite(sd_free) else 0.0
            if z > MAX_KVP_Z:
                reasons.append(f"The DICOM kVp {kvp:g} implies an effective energy of {prior[0]:.0f} ± {prior[1]:.0f} "
                               f"keV but the tissues alone give {tissue_only:.0f} ± {sd_free:.0f} keV ({z:.1f} SD): "
                               "the kVp tag or the ROIs are wrong.")
        else:
            notes.append("Too few tissues to check the DICOM kVp against the tissues alone.")

    e_sd = math.sqrt(sol.cov[0, 0]) if np.isfinite(sol.cov[0, 0]) and sol.cov[0, 0] >= 0 else nan
    return InternalCalibration(e, e_sd, w, a, slope, _slope_sd(curve, sol.theta, sol.cov), intercept, rows,
                               sol.chi2, dof, rms, kvp, prior, tissue_only, "poor" if reasons else "ok", reasons, notes)


# ---------------------------------------------------------------------------------------------------------------
# Which calibration the pipeline would use


#: The tube voltage assumed for the nominal fallback when the DICOM has no kVp: the usual abdominal protocol.
NOMINAL_KVP = 120.0


def nominal_line(kvp: float | None = None, patient_water_cm: float | None = None,
                 filtration: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """``(slope, intercept, energy keV)``: the K2HPO4 line of an ideal scanner at ``kvp`` (default
    :data:`NOMINAL_KVP`), from the table's mean effective energy and no water/air error (the fallback of
    :func:`choose_calibration`: off by the unknown filtration, ≈ ± 5 % of BMD, and a few HU of water error)."""
    k = float(kvp) if kvp is not None else NOMINAL_KVP
    curve = response_curve(k)
    e = (energy_prior_from_filtration(k, filtration[0], filtration[1], patient_water_cm)[0]
         if filtration is not None and kvp is not None else energy_prior(k, patient_water_cm)[0])
    slope, intercept = k2hpo4_line(curve, e, 0.0, 0.0)
    return slope, intercept, e


@dataclass(frozen=True)
class CalibrationChoice:
    """What maps HU to mineral for a case, and why.

    Attributes:
        source: "phantom" (a ``--calibration`` scan), "internal" (this fit) or "nominal" (the ideal scanner at the
            DICOM kVp, or 120 kVp without it: the fallback when the fit is poor or missing).
        slope: HU per mg/cm³.
        intercept: HU.
        sentence: the sentence for the log and results.json.
        effective_energy_kev: the effective energy the choice rests on (keV; NaN for a phantom scan without an
            internal fit).
    """

    source: str
    slope: float
    intercept: float
    sentence: str
    effective_energy_kev: float = float("nan")


def choose_calibration(phantom: Any | None, internal: InternalCalibration | None, kvp: float | None = None,
                       patient_water_cm: float | None = None, filtration: tuple[float, float] | None = None
                       ) -> CalibrationChoice:
    """A phantom-scan calibration wins when given; else the internal fit when ok; else the nominal line of the
    DICOM kVp (120 kVp without it), said visibly with the reasons the internal fit was not used."""
    e_fit = internal.effective_energy_kev if internal is not None and internal.ok else float("nan")
    if phantom is not None:
        extra = "" if internal is None else f" (the internal fit, {internal.verdict}, is recorded but not used)"
        return CalibrationChoice("phantom", float(phantom.slope), float(phantom.intercept),
                                 f"Calibration: phantom scan, HU = {phantom.intercept:+.1f} + {phantom.slope:.3f} × "
                                 f"BMD{extra}.", e_fit)
    if internal is not None and internal.ok:
        return CalibrationChoice("internal", internal.slope, internal.intercept,
                                 f"Calibration: internal (reference tissues), HU = {internal.intercept:+.1f} + "
                                 f"{internal.slope:.3f} × BMD at {internal.effective_energy_kev:.1f} keV.", e_fit)
    why = "no reference tissue was found" if internal is None else "the internal fit is poor: " + " ".join(
        internal.reasons)
    slope, intercept, e = nominal_line(kvp, patient_water_cm, filtration)
    volts = f"the DICOM {kvp:g} kVp" if kvp is not None else f"{NOMINAL_KVP:g} kVp (no DICOM kVp)"
    return CalibrationChoice("nominal", slope, intercept,
                             f"Calibration: nominal, an ideal scanner at {volts}, HU = {intercept:+.1f} + "
                             f"{slope:.3f} × BMD at {e:.1f} keV; the scanner's own water/air error and filtration "
                             f"are unknown, so BMD may be off by about 5 % ({why}).", e)
