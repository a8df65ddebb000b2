"""Physical scanner model: a tissue's HU from its elemental composition and the scanner's X-ray spectrum.

Issue 15, step 1. The phantom's vendors A, B, C do not use it (their HU are the fixed values in
:mod:`LumbarBMDLib.phantom.scanner`); a scanner given by this JSON is rendered through
:func:`LumbarBMDLib.phantom.physical_scanner.profile_from_physics` (``lumbarbmd phantom --scanner FILE``).

Model (single-energy CT with an energy-integrating detector, first order):

1. The tube spectrum Φ₀(E) of a tungsten anode at ``kvp`` with anode angle θ and added filtration (mm Al,
   mm Cu) comes from **SpekPy** (Poludniowski G, Omar A, Bujila R, Andreo P 2021, "SpekPy v2.0 — a software
   toolkit for modeling x-ray tube spectra", Med Phys 48:3630; its data tables ship inside the wheel, nothing
   is downloaded). It is hardened by the patient, ``patient_water_cm`` of liquid water:
   Φ(E) = Φ₀(E) · exp(−μ_water(E) · L).
2. An energy-integrating detector weights each photon by its energy, so a small amount of material changes
   the log signal by the detected-energy-weighted mean of its attenuation coefficient:
   μ̄ = Σ w(E) μ(E) / Σ w(E), w(E) = E · Φ(E). This is the effective-energy approximation of a polyenergetic
   beam (what a water-precorrected reconstruction shows for tissue inside a water-like patient); it ignores
   second-order (material-specific) beam hardening, scatter and detector efficiency.
3. HU = 1000 · (μ̄_m − μ̄_water) / (μ̄_water − μ̄_air); the scanner's water/air calibration error then maps
   0 → ``water_offset_hu`` and −1000 → −1000 + ``air_offset_hu`` linearly (:func:`tissue_hu`).

Mass attenuation coefficients come from **xraydb** (Newville M, xraydb, tables of Elam WT, Ravel BD,
Sieber JR 2002, Radiat Phys Chem 63:121; its SQLite database ships inside the wheel): ``mu_elam(element,
E, kind="total")`` is the total attenuation *including coherent (Rayleigh) scattering*, i.e. NIST XCOM's
"total attenuation with coherent scattering" (Berger MJ, Hubbell JH et al., XCOM: Photon Cross Sections
Database, NIST SRD 8). Checked against XCOM / NIST X-ray mass attenuation tables (Hubbell JH, Seltzer SM,
NISTIR 5632, Table 4): water 0.2059 cm²/g at 60 keV and 0.1837 at 80 keV, xraydb 0.2059 and 0.1837;
ICRU-44 cortical bone 0.3148 at 60 keV, xraydb 0.315. Coherent scattering is included because CT measures
narrow-beam (primary) attenuation: photons scattered coherently leave the primary ray and the anti-scatter
collimator rejects most of them. ``coherent=False`` gives the values without it; at 120 kVp that moves
ICRU-44 adipose tissue from −78 to −67 HU, muscle from 43 to 45 HU and cortical bone from 1609 to 1535 HU,
so the choice matters for fat (a doubt that a measured fat/water pair would settle).

Materials (elemental mass fractions and densities, :class:`Material`):

* water, liquid (H 0.111894, O 0.888106, 1.000 g/cm³) and dry air near sea level (C 0.000124, N 0.755268,
  O 0.231781, Ar 0.012827, 1.20479 mg/cm³): NIST, Hubbell & Seltzer NISTIR 5632, Table 2;
* ICRU-44 body tissues, adipose tissue (0.95), skeletal muscle (1.05), whole blood (1.06), soft tissue
  (1.06) and cortical bone (1.92 g/cm³): ICRU Report 44 (1989), Tissue substitutes in radiation dosimetry
  and measurement, whose compositions are those of Woodard HQ, White DR 1986, "The composition of body
  tissues", Br J Radiol 59:1209 (adipose = their adipose tissue 2), as listed in NISTIR 5632 Table 2 (the
  same values are Geant4's ``G4_ADIPOSE_TISSUE_ICRP``, ``G4_BONE_CORTICAL_ICRP``, ICRU Report 46 (1992));
* Woodard & White 1986 adipose tissue 3 (0.93 g/cm³, the fattiest of their three adipose tissues);
* ICRU-44 adult liver (1.06), kidney (1.05) and cartilage (1.10 g/cm³; the phantom's intervertebral disc):
  ICRU Report 44 (1989) Table 4.2 = Woodard & White 1986 (liver 2 and kidney 2, the adult means), as
  reproduced in Schneider W, Bortfeld T, Schlegel W 2000, Phys Med Biol 45:459, Table 1;
* cerebrospinal fluid (1.01 g/cm³: H 0.111, O 0.880, Na 0.005, Cl 0.004): ICRU Report 46 (1992), Photon,
  electron, proton and neutron interaction data for body tissues (water with ≈ 0.9 % NaCl-equivalent salts);
* K2HPO4 solution (the QCT reference, Cann CE, Genant HK 1980, J Comput Assist Tomogr 4:493): water with
  c mg/cm³ of K2HPO4, each mg of salt displacing 0.2174 mg of water (the Mindways QCT PRO calibration,
  σ_CT = σ_ref − 0.2174: QCT PRO User Guide v5.0, Mindways Software 2011, as quoted by the ogo
  documentation, ogo.readthedocs.io, ``ogo.calibration.mindways_calibration``); density
  1.000 + 0.7826 · c / 1000 g/cm³ (100 mg/cm³: 1.078 g/cm³);
* iodinated blood: ICRU-44 blood plus c mg of iodine per mL (contrast medium volume neglected).

Scanner JSON (:func:`read_scanner_json`, :meth:`ScannerPhysics.to_json`), one object, keys as in
:class:`ScannerPhysics`; ``name`` and ``kvp`` are required, every other key is optional with the default
shown, an unknown key is an error::

    {
      "schema": "lumbarbmd-scanner-physics/1",
      "name": "site-3 CT",
      "kvp": 120,                    // tube voltage, 80-140 kV
      "anode_angle_deg": 12.0,       // tungsten anode angle, 5-20 degrees
      "filtration_mm_al": 6.0,       // added + inherent filtration at the centre ray, mm Al (0-20)
      "filtration_mm_cu": 0.0,       // extra copper / tin-equivalent filtration, mm Cu (0-2)
      "patient_water_cm": 25.0,      // water-equivalent patient path that hardens the beam (0-50 cm)
      "water_offset_hu": 0.0,        // calibration error: what water reads (HU, |x| <= 20)
      "air_offset_hu": 0.0,          // calibration error: air reads -1000 + this (HU, |x| <= 50)
      "noise_sd_hu": 12.0,           // image noise SD in water (HU, 0-200): used by the phantom only
      "kernel_psf_mm": 0.45,         // in-plane Gaussian sigma of the kernel (mm, 0-3): phantom only
      "slice_fwhm_mm": 1.0,          // slice-sensitivity FWHM (mm, 0.2-10): phantom only
      "description": ""
    }

(JSON has no comments; they only explain the keys here.)
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from LumbarBMDLib.errors import LumbarBMDError

SCHEMA = "lumbarbmd-scanner-physics/1"

#: Relative atomic masses (IUPAC 2013 standard atomic weights, conventional values) of what the materials use.
ATOMIC_MASS = {
    "H": 1.008, "C": 12.011, "N": 14.007, "O": 15.999, "Na": 22.990, "Mg": 24.305, "P": 30.974, "S": 32.06,
    "Cl": 35.45, "Ar": 39.948, "K": 39.098, "Ca": 40.078, "Fe": 55.845, "I": 126.904,
}

#: mg of water displaced per mg of K2HPO4 dissolved (Mindways QCT PRO User Guide v5.0, 2011: σ_CT = σ_ref − 0.2174).
K2HPO4_WATER_DISPLACEMENT = 0.2174


class ScannerSpecError(LumbarBMDError, ValueError):
    """A scanner or material definition that cannot be right (both a LumbarBMDError and a ValueError)."""


def _missing(package: str) -> LumbarBMDError:
    return LumbarBMDError(
        f"the scanner physics model needs the Python package '{package}', which is not installed: install the "
        f"optional extra with  pip install 'lumbarbmd[phantom-physics]'  (or  pip install {package})")


# ---------------------------------------------------------------------------------------------------------------
# Materials


@dataclass(frozen=True)
class Material:
    """A material by elemental mass fractions and density.

    Attributes:
        name: a label.
        density_g_cm3: mass density (g/cm³).
        mass_fractions: ``((element symbol, mass fraction), ...)``, summing to 1 (within 0.5 %, renormalised).
        source: where the composition and density come from.
    """

    name: str
    density_g_cm3: float
    mass_fractions: tuple[tuple[str, float], ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.density_g_cm3) and self.density_g_cm3 > 0):
            raise ScannerSpecError(f"material {self.name!r}: density must be positive, not {self.density_g_cm3}")
        unknown = [el for el, _ in self.mass_fractions if el not in ATOMIC_MASS]
        if unknown:
            raise ScannerSpecError(f"material {self.name!r}: unknown element(s) {', '.join(unknown)}: "
                                   f"use {', '.join(ATOMIC_MASS)}")
        if any(not (f >= 0) for _, f in self.mass_fractions):
            raise ScannerSpecError(f"material {self.name!r}: mass fractions must be non-negative")
        total = sum(f for _, f in self.mass_fractions)
        if abs(total - 1.0) > 5e-3:
            raise ScannerSpecError(f"material {self.name!r}: mass fractions sum to {total:.4f}, not 1")
        merged: dict[str, float] = {}
        for el, f in self.mass_fractions:
            merged[el] = merged.get(el, 0.0) + f / total
        object.__setattr__(self, "mass_fractions", tuple(sorted(merged.items(), key=lambda kv: ATOMIC_MASS[kv[0]])))

    @classmethod
    def of(cls, name: str, density_g_cm3: float, fractions: Mapping[str, float], source: str = "") -> Material:
        """From a ``{element: mass fraction}`` mapping."""
        return cls(name, float(density_g_cm3), tuple((str(k), float(v)) for k, v in fractions.items()), source)

    def mass_attenuation(self, energy_kev: np.ndarray, coherent: bool = True) -> np.ndarray:
        """μ/ρ (cm²/g) at ``energy_kev`` (keV), total with (default) or without coherent scattering."""
        energy_kev = np.asarray(energy_kev, dtype=float)
        out = np.zeros_like(energy_kev)
        for el, f in self.mass_fractions:
            out += f * _element_mu_rho(el, energy_kev, coherent)
        return out

    def linear_attenuation(self, energy_kev: np.ndarray, coherent: bool = True) -> np.ndarray:
        """μ (1/cm) at ``energy_kev`` (keV)."""
        return self.density_g_cm3 * self.mass_attenuation(energy_kev, coherent)


def compound(formula: Mapping[str, int]) -> dict[str, float]:
    """Mass fractions of a compound given as ``{element: atoms per formula unit}``."""
    mass = {el: n * ATOMIC_MASS[el] for el, n in formula.items()}
    total = sum(mass.values())
    return {el: m / total for el, m in mass.items()}


def mix(name: str, parts: Sequence[tuple[Material | Mapping[str, float], float]], source: str = "") -> Material:
    """A mixture from ``(material or mass fractions, partial density in g/cm³ of the mixture)`` parts.

    The mixture's density is the sum of the partial densities (each part's mass per cm³ of the mixture).
    """
    if not parts:
        raise ScannerSpecError(f"mixture {name!r} has no parts")
    density = float(sum(rho for _, rho in parts))
    fractions: dict[str, float] = {}
    for part, rho in parts:
        if rho < 0:
            raise ScannerSpecError(f"mixture {name!r}: a partial density is negative ({rho})")
        items = part.mass_fractions if isinstance(part, Material) else tuple(part.items())
        for el, f in items:
            fractions[el] = fractions.get(el, 0.0) + f * rho / density
    return Material.of(name, density, fractions, source)


_NIST_T2 = "NIST (Hubbell JH, Seltzer SM, NISTIR 5632, 1995/2004), Table 2"
_ICRU44 = ("ICRU Report 44 (1989) = Woodard HQ, White DR 1986, Br J Radiol 59:1209; as listed in " + _NIST_T2
           + "; same as ICRU Report 46 (1992)")

WATER = Material.of("water, liquid", 1.000, {"H": 0.111894, "O": 0.888106}, _NIST_T2 + ", 'Water, Liquid'")
AIR = Material.of("air, dry (near sea level)", 1.20479e-3,
                  {"C": 0.000124, "N": 0.755268, "O": 0.231781, "Ar": 0.012827},
                  _NIST_T2 + ", 'Air, Dry (near sea level)'")
ADIPOSE = Material.of("adipose tissue (ICRU-44)", 0.95,
                      {"H": 0.114, "C": 0.598, "N": 0.007, "O": 0.278, "Na": 0.001, "S": 0.001, "Cl": 0.001},
                      _ICRU44 + " (Woodard & White adipose tissue 2, the adult mean)")
ADIPOSE_3 = Material.of("adipose tissue 3 (Woodard & White)", 0.93,
                        {"H": 0.116, "C": 0.681, "N": 0.002, "O": 0.198, "Na": 0.001, "S": 0.001, "Cl": 0.001},
                        "Woodard HQ, White DR 1986, Br J Radiol 59:1209, adipose tissue 3 (ICRP 23 adipose "
                        "as used by e.g. TOPAS ADIPOSE_TISSUE_ICRP)")
MUSCLE = Material.of("skeletal muscle (ICRU-44)", 1.05,
                     {"H": 0.102, "C": 0.143, "N": 0.034, "O": 0.710, "Na": 0.001, "P": 0.002, "S": 0.003,
                      "Cl": 0.001, "K": 0.004}, _ICRU44)
BLOOD = Material.of("whole blood (ICRU-44)", 1.06,
                    {"H": 0.102, "C": 0.110, "N": 0.033, "O": 0.745, "Na": 0.001, "P": 0.001, "S": 0.002,
                     "Cl": 0.003, "K": 0.002, "Fe": 0.001}, _ICRU44)
SOFT_TISSUE = Material.of("soft tissue (ICRU-44)", 1.06,
                          {"H": 0.102, "C": 0.143, "N": 0.034, "O": 0.708, "Na": 0.002, "P": 0.003, "S": 0.003,
                           "Cl": 0.002, "K": 0.003}, _ICRU44)
CORTICAL_BONE = Material.of("cortical bone (ICRU-44)", 1.92,
                            {"H": 0.034, "C": 0.155, "N": 0.042, "O": 0.435, "Na": 0.001, "Mg": 0.002,
                             "P": 0.103, "S": 0.003, "Ca": 0.225}, _ICRU44)

# ICRU-44 Table 4.2 (Woodard & White 1986; Schneider et al. 2000 Phys Med Biol 45:459, Table 1): adult liver
# ("liver 2") and kidney ("kidney 2") and cartilage; ICRU Report 46 (1992): cerebrospinal fluid.
_ICRU44_ORGANS = "ICRU Report 44 (1989) Table 4.2 = Woodard HQ, White DR 1986, Br J Radiol 59:1209"
LIVER = Material.of("liver, adult (ICRU-44)", 1.06,
                    {"H": 0.102, "C": 0.139, "N": 0.030, "O": 0.716, "Na": 0.002, "P": 0.003, "S": 0.003,
                     "Cl": 0.002, "K": 0.003}, _ICRU44_ORGANS + " (liver 2, adult mean)")
KIDNEY = Material.of("kidney, adult (ICRU-44)", 1.05,
                     {"H": 0.103, "C": 0.132, "N": 0.030, "O": 0.724, "Na": 0.002, "P": 0.002, "S": 0.002,
                      "Cl": 0.002, "K": 0.002, "Ca": 0.001}, _ICRU44_ORGANS + " (kidney 2, adult mean)")
CARTILAGE = Material.of("cartilage (ICRU-44)", 1.10,
                        {"H": 0.096, "C": 0.099, "N": 0.022, "O": 0.744, "Na": 0.005, "P": 0.022, "S": 0.009,
                         "Cl": 0.003}, _ICRU44_ORGANS + " (cartilage)")
#: The intervertebral disc: ICRU-44 cartilage's composition at an assumed 1.07 g/cm³. ICRU-44's 1.10 g/cm³ is
#: articular cartilage; the disc's nucleus pulposus is 70–90 % water, so the hydrated disc is lighter (an assumption,
#: not a tabulated value). At 1.10 the disc read 107 HU at 120 kVp against 86 HU on the real example CT (3 mm) and the
#: ≈ 70–100 HU usual for discs; at 1.07 it reads ≈ 75 HU.
INTERVERTEBRAL_DISC = Material.of("intervertebral disc (ICRU-44 cartilage composition, 1.07 g/cm³ assumed)", 1.07,
                                  dict(CARTILAGE.mass_fractions), _ICRU44_ORGANS + " (cartilage composition); "
                                  "density assumed for the hydrated disc")
CSF = Material.of("cerebrospinal fluid (ICRU-46)", 1.01, {"H": 0.111, "O": 0.880, "Na": 0.005, "Cl": 0.004},
                  "ICRU Report 46 (1992), cerebrospinal fluid (water with ~0.9 % NaCl-equivalent salts)")

K2HPO4 = compound({"K": 2, "H": 1, "P": 1, "O": 4})  # dipotassium hydrogen phosphate, 174.17 g/mol

MATERIALS: dict[str, Material] = {
    "water": WATER, "air": AIR, "adipose": ADIPOSE, "adipose_3": ADIPOSE_3, "muscle": MUSCLE, "blood": BLOOD,
    "soft_tissue": SOFT_TISSUE, "cortical_bone": CORTICAL_BONE, "liver": LIVER, "kidney": KIDNEY,
    "cartilage": CARTILAGE, "intervertebral_disc": INTERVERTEBRAL_DISC, "csf": CSF,
}


def k2hpo4_solution(concentration_mg_cm3: float) -> Material:
    """Water with ``concentration_mg_cm3`` mg of K2HPO4 per cm³ of solution (the QCT reference material).

    Each mg of salt displaces :data:`K2HPO4_WATER_DISPLACEMENT` mg of water (Mindways QCT PRO User Guide v5.0),
    so the solution holds 1000 − 0.2174 · c mg of water per cm³ and its density is 1 + 0.7826 · c / 1000 g/cm³.
    """
    c = float(concentration_mg_cm3)
    if not 0.0 <= c <= 1000.0:
        raise ScannerSpecError(f"K2HPO4 concentration {c} mg/cm³ is outside 0–1000")
    water = WATER.density_g_cm3 - K2HPO4_WATER_DISPLACEMENT * c / 1000.0
    source = "K2HPO4 in water; water displacement 0.2174 mg/mg (Mindways QCT PRO User Guide v5.0, 2011)"
    if c == 0.0:
        return Material(f"K2HPO4 solution {c:g} mg/cm³", WATER.density_g_cm3, WATER.mass_fractions, source)
    return mix(f"K2HPO4 solution {c:g} mg/cm³", [(WATER, water), (K2HPO4, c / 1000.0)], source)


def iodinated_blood(iodine_mg_ml: float, blood: Material = BLOOD) -> Material:
    """``blood`` with ``iodine_mg_ml`` mg of iodine per mL added (the contrast medium's own volume is neglected)."""
    c = float(iodine_mg_ml)
    if not 0.0 <= c <= 400.0:
        raise ScannerSpecError(f"iodine concentration {c} mg/mL is outside 0–400")
    return mix(f"{blood.name} + {c:g} mg I/mL", [(blood, blood.density_g_cm3), ({"I": 1.0}, c / 1000.0)],
               blood.source + "; iodine added by mass")


@functools.lru_cache(maxsize=256)
def _element_mu_rho_cached(element: str, energies: tuple[float, ...], coherent: bool) -> np.ndarray:
    try:
        import xraydb
    except ImportError:
        raise _missing("xraydb") from None
    ev = np.asarray(energies) * 1000.0
    mu = np.asarray(xraydb.mu_elam(element, ev, kind="total"), dtype=float)
    if not coherent:
        mu = mu - np.asarray(xraydb.mu_elam(element, ev, kind="coh"), dtype=float)
    mu.setflags(write=False)
    return mu


def _element_mu_rho(element: str, energy_kev: np.ndarray, coherent: bool) -> np.ndarray:
    flat = tuple(float(e) for e in np.ravel(energy_kev))
    if any(not 1.0 <= e <= 1000.0 for e in flat):
        raise ScannerSpecError("attenuation coefficients are tabulated here for 1–1000 keV only")
    return _element_mu_rho_cached(element, flat, coherent).reshape(np.shape(energy_kev))


# ---------------------------------------------------------------------------------------------------------------
# Scanner

#: (key, low, high) of the numeric fields of :class:`ScannerPhysics`.
_RANGES = {
    "kvp": (80.0, 140.0),
    "anode_angle_deg": (5.0, 20.0),
    "filtration_mm_al": (0.0, 20.0),
    "filtration_mm_cu": (0.0, 2.0),
    "patient_water_cm": (0.0, 50.0),
    "water_offset_hu": (-20.0, 20.0),
    "air_offset_hu": (-50.0, 50.0),
    "noise_sd_hu": (0.0, 200.0),
    "kernel_psf_mm": (0.0, 3.0),
    "slice_fwhm_mm": (0.2, 10.0),
}
_UNITS = {"kvp": "kV", "anode_angle_deg": "degrees", "filtration_mm_al": "mm Al", "filtration_mm_cu": "mm Cu",
          "patient_water_cm": "cm of water", "water_offset_hu": "HU", "air_offset_hu": "HU", "noise_sd_hu": "HU",
          "kernel_psf_mm": "mm", "slice_fwhm_mm": "mm"}


@dataclass(frozen=True)
class ScannerPhysics:
    """A CT scanner as physics: spectrum, patient hardening, calibration error (and carried image fields).

    Attributes:
        name: a label.
        kvp: tube voltage (kV), 80–140.
        anode_angle_deg: tungsten anode angle (degrees).
        filtration_mm_al: total filtration of the centre ray (inherent + added + bow-tie centre), mm Al.
        filtration_mm_cu: extra copper filtration (mm Cu).
        patient_water_cm: water-equivalent path through the patient that hardens the beam (cm).
        water_offset_hu: calibration error, the HU that water reads.
        air_offset_hu: calibration error, air reads −1000 + this.
        noise_sd_hu: image noise SD in water (HU). Not used for HU; the phantom's noise (physical_scanner).
        kernel_psf_mm: in-plane Gaussian sigma of the reconstruction kernel (mm). The phantom's kernel.
        slice_fwhm_mm: slice-sensitivity profile FWHM (mm). The phantom's slice profile.
        description: free text.
    """

    name: str
    kvp: float
    anode_angle_deg: float = 12.0
    filtration_mm_al: float = 6.0
    filtration_mm_cu: float = 0.0
    patient_water_cm: float = 25.0
    water_offset_hu: float = 0.0
    air_offset_hu: float = 0.0
    noise_sd_hu: float = 12.0
    kernel_psf_mm: float = 0.45
    slice_fwhm_mm: float = 1.0
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ScannerSpecError("a scanner needs a non-empty 'name'")
        if not isinstance(self.description, str):
            raise ScannerSpecError(f"scanner {self.name!r}: 'description' must be text")
        for key, (low, high) in _RANGES.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ScannerSpecError(f"scanner {self.name!r}: '{key}' must be a number, not {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ScannerSpecError(f"scanner {self.name!r}: '{key}' must be finite")
            if key.startswith(("filtration", "patient", "noise", "kernel")) and value < 0:
                raise ScannerSpecError(f"scanner {self.name!r}: '{key}' = {value:g} {_UNITS[key]} is negative")
            if not low <= value <= high:
                what = "tube voltage" if key == "kvp" else f"'{key}'"
                raise ScannerSpecError(f"scanner {self.name!r}: {what} {value:g} {_UNITS[key]} is outside the "
                                       f"supported range {low:g}–{high:g} {_UNITS[key]}")
            object.__setattr__(self, key, value)

    def as_dict(self) -> dict:
        """Plain dict with the schema tag (what :meth:`to_json` writes)."""
        return {"schema": SCHEMA, **asdict(self)}

    def to_json(self, path: str | Path | None = None) -> str:
        """The JSON text; written atomically to ``path`` when given."""
        text = json.dumps(self.as_dict(), indent=1, ensure_ascii=False) + "\n"
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        return text

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "scanner definition") -> ScannerPhysics:
        """Validate and build from a dict (JSON object); every problem is a :class:`ScannerSpecError` sentence."""
        if not isinstance(data, Mapping):
            raise ScannerSpecError(f"{where}: expected a JSON object with 'name' and 'kvp', got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        schema = data.get("schema", SCHEMA)
        if schema != SCHEMA:
            raise ScannerSpecError(f"{where}: schema {schema!r} is not {SCHEMA!r}")
        unknown = sorted(set(data) - known - {"schema"})
        if unknown:
            raise ScannerSpecError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
                                   f"{', '.join(sorted(known))}")
        missing = [k for k in ("name", "kvp") if k not in data]
        if missing:
            raise ScannerSpecError(f"{where}: the required key(s) {', '.join(map(repr, missing))} are missing")
        return cls(**{k: v for k, v in data.items() if k in known})


def read_scanner_json(path: str | Path) -> ScannerPhysics:
    """A scanner definition from a JSON file (format in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ScannerSpecError(f"scanner file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScannerSpecError(f"scanner file {path} is not valid JSON: {err}") from None
    return ScannerPhysics.from_dict(data, where=f"scanner file {path}")


# ---------------------------------------------------------------------------------------------------------------
# Spectrum and HU


@functools.lru_cache(maxsize=64)
def _spectra(kvp: float, anode_angle_deg: float, mm_al: float, mm_cu: float,
             patient_water_cm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    try:
        import spekpy
    except ImportError:
        raise _missing("spekpy") from None
    spek = spekpy.Spek(kvp=kvp, th=anode_angle_deg, dk=0.5)
    if mm_al > 0:
        spek.filter("Al", mm_al)
    if mm_cu > 0:
        spek.filter("Cu", mm_cu)
    hvl = float(spek.get_hvl1())
    energy, tube = (np.asarray(a, dtype=float) for a in spek.get_spectrum())
    detected = tube * np.exp(-WATER.linear_attenuation(energy) * patient_water_cm)
    for a in (energy, tube, detected):
        a.setflags(write=False)
    return energy, tube, detected, hvl


def spectrum(scanner: ScannerPhysics, at_detector: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(energy_kev, fluence)``: bin centres (keV, 0.5 keV bins) and relative photon fluence per bin.

    ``at_detector``: after the patient's ``patient_water_cm`` of water (default), else as it leaves the tube.
    """
    energy, tube, detected, _ = _spectra(scanner.kvp, scanner.anode_angle_deg, scanner.filtration_mm_al,
                                         scanner.filtration_mm_cu, scanner.patient_water_cm)
    return energy, detected if at_detector else tube


def hvl_mm_al(scanner: ScannerPhysics) -> float:
    """First half-value layer (mm Al) of the tube output, before the patient (SpekPy, air kerma)."""
    return _spectra(scanner.kvp, scanner.anode_angle_deg, scanner.filtration_mm_al, scanner.filtration_mm_cu,
                    scanner.patient_water_cm)[3]


def detector_weights(scanner: ScannerPhysics) -> tuple[np.ndarray, np.ndarray]:
    """``(energy_kev, w)`` with w ∝ E · Φ_detected(E), summing to 1 (energy-integrating detector)."""
    energy, fluence = spectrum(scanner)
    w = energy * fluence
    total = float(w.sum())
    if not total > 0:
        raise ScannerSpecError(f"scanner {scanner.name!r}: no photons reach the detector (patient path too long?)")
    return energy, w / total


def mean_attenuation(scanner: ScannerPhysics, material: Material, coherent: bool = True) -> float:
    """Detected-energy-weighted mean linear attenuation μ̄ (1/cm) of ``material`` on ``scanner``."""
    energy, w = detector_weights(scanner)
    return float(np.sum(w * material.linear_attenuation(energy, coherent)))


def effective_energy_kev(scanner: ScannerPhysics, coherent: bool = True) -> float:
    """The monoenergetic energy (keV) at which water's μ equals the spectrum's mean μ̄_water."""
    from scipy.optimize import brentq

    target = mean_attenuation(scanner, WATER, coherent)

    def gap(e: float) -> float:
        return float(WATER.linear_attenuation(np.array([e]), coherent)[0]) - target

    return float(brentq(gap, 10.0, float(scanner.kvp), xtol=1e-4))


def hu_uncalibrated(scanner: ScannerPhysics, material: Material, coherent: bool = True) -> float:
    """HU of ``material`` with a perfect water/air calibration: 1000 (μ̄_m − μ̄_w) / (μ̄_w − μ̄_air)."""
    mu_w = mean_attenuation(scanner, WATER, coherent)
    mu_a = mean_attenuation(scanner, AIR, coherent)
    return 1000.0 * (mean_attenuation(scanner, material, coherent) - mu_w) / (mu_w - mu_a)


def apply_calibration_error(scanner: ScannerPhysics, hu: float | np.ndarray) -> float | np.ndarray:
    """Map ideal HU through the scanner's calibration error: 0 → water_offset, −1000 → −1000 + air_offset."""
    w, a = scanner.water_offset_hu, scanner.air_offset_hu
    return w + hu * (1000.0 + w - a) / 1000.0


def tissue_hu(scanner: ScannerPhysics, material: Material, coherent: bool = True) -> float:
    """HU that ``scanner`` shows for ``material``, including its water/air calibration error."""
    return float(apply_calibration_error(scanner, hu_uncalibrated(scanner, material, coherent)))


def k2hpo4_slope(scanner: ScannerPhysics, concentration_mg_cm3: float = 200.0) -> float:
    """QCT calibration slope (HU per mg/cm³ K2HPO4) between water and a ``concentration_mg_cm3`` solution."""
    return (tissue_hu(scanner, k2hpo4_solution(concentration_mg_cm3)) - tissue_hu(scanner, k2hpo4_solution(0.0))) \
        / concentration_mg_cm3


def iodine_hu_per_mg_ml(scanner: ScannerPhysics, concentration_mg_ml: float = 10.0) -> float:
    """Enhancement of blood per mg I/mL (HU per mg/mL) between unenhanced blood and ``concentration_mg_ml``."""
    return (tissue_hu(scanner, iodinated_blood(concentration_mg_ml)) - tissue_hu(scanner, BLOOD)) \
        / concentration_mg_ml


def hu_table(kvps: Sequence[float] = (80, 100, 120, 140), **scanner_fields) -> dict[str, dict[float, float]]:
    """``{row: {kvp: value}}`` for the README table: effective energy, HVL and the HU of the reference materials.

    Extra keyword arguments are :class:`ScannerPhysics` fields shared by every column.
    """
    rows: dict[str, dict[float, float]] = {}
    for kvp in kvps:
        sc = ScannerPhysics(name=f"{kvp:g} kVp", kvp=kvp, **scanner_fields)
        values = {"HVL (mm Al)": hvl_mm_al(sc), "effective energy (keV)": effective_energy_kev(sc)}
        values.update({m.name: tissue_hu(sc, m) for m in MATERIALS.values()})
        values["K2HPO4 100 mg/cm³"] = tissue_hu(sc, k2hpo4_solution(100.0))
        values["K2HPO4 slope (HU per mg/cm³)"] = k2hpo4_slope(sc)
        values["iodine (HU per mg I/mL, in blood)"] = iodine_hu_per_mg_ml(sc)
        for row, value in values.items():
            rows.setdefault(row, {})[kvp] = value
    return rows
