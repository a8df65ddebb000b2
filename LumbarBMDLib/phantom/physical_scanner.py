"""A phantom scanner defined physically (issue 15): a :class:`ScannerPhysics` turned into a :class:`ScannerProfile`.

The phantom's three vendors A, B, C keep their fixed values (:data:`~LumbarBMDLib.phantom.scanner.SCANNERS`):
the default models were trained on A, and every test and figure depends on them. A scanner the project never
saw is instead described by its physics (tube voltage, filtration, patient path, calibration error, noise,
kernel, slice profile: the JSON of :mod:`LumbarBMDLib.phantom.physics`), and :func:`profile_from_physics`
derives the HU the phantom paints from the elemental compositions of the tissues:

* mineral: the K2HPO4 line of that scanner, ``bone_intercept`` = HU of 0 mg/cm³ (water) and ``bone_slope`` =
  (HU(200 mg/cm³) − HU(0)) / 200 HU per mg/cm³, so the phantom's "mineral" is on the QCT reference's footing;
* fat: Woodard & White 1986 adipose tissue 3 (what the internal calibration assumes for fat,
  ``internal_calibration.fit.REFERENCE_TISSUES``);
* muscle, blood: ICRU-44 skeletal muscle and whole blood; liver, kidney: ICRU-44 adult liver and kidney;
* CSF: ICRU Report 46 cerebrospinal fluid; intervertebral disc: ICRU-44 cartilage's composition at an assumed
  1.07 g/cm³ (physics.INTERVERTEBRAL_DISC; physics.py cites each);
* noise, kernel, slice profile: the scanner's ``noise_sd_hu``, ``kernel_psf_mm``, ``slice_fwhm_mm``.

Such a case's ``vendor`` is ``"P:<name>"`` (never "A", "B" or "C"), its case id ``P-<slug>_<seed>``, and its
noise stream is keyed by a stable integer of the name (:func:`noise_key`). Deriving a profile needs the
optional extra ``phantom-physics`` (xraydb, spekpy); without it the call raises a sentence naming the extra.
"""

from __future__ import annotations

import functools
import re
import zlib
from pathlib import Path

from LumbarBMDLib.phantom import physics as ph
from LumbarBMDLib.phantom.scanner import ScannerProfile

#: Prefix of the ``vendor`` field of a physically defined scanner ("P:<name>").
VENDOR_PREFIX = "P:"
#: K2HPO4 concentration (mg/cm³) of the upper point of the derived mineral line.
MINERAL_POINT_MG_CM3 = 200.0


def scanner_vendor(physics: ph.ScannerPhysics) -> str:
    """The ``vendor`` field of cases on ``physics``: ``"P:<name>"`` (cannot collide with "A", "B", "C")."""
    return VENDOR_PREFIX + physics.name.strip()


def case_prefix(physics: ph.ScannerPhysics) -> str:
    """Folder-safe case-id prefix: ``"P-"`` + the name with every run of other than letters/digits/-. as "-"."""
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", physics.name.strip()).strip("-.") or "scanner"
    return "P-" + slug


def noise_key(physics: ph.ScannerPhysics) -> int:
    """Stable integer for the scanner's noise stream: 3 + CRC-32 of the name (0, 1, 2 are vendors A, B, C)."""
    return 3 + zlib.crc32(physics.name.strip().encode("utf-8"))


def as_physics(scanner: ph.ScannerPhysics | str | Path) -> ph.ScannerPhysics:
    """``scanner`` itself, or the scanner JSON file at that path (:func:`physics.read_scanner_json`)."""
    return scanner if isinstance(scanner, ph.ScannerPhysics) else ph.read_scanner_json(scanner)


@functools.lru_cache(maxsize=32)
def profile_from_physics(physics: ph.ScannerPhysics, name: str | None = None) -> ScannerProfile:
    """The phantom profile of ``physics``: tissue HU from compositions, image fields carried over.

    Args:
        physics: the scanner.
        name: the profile's ``vendor`` field; default :func:`scanner_vendor` (``"P:<name>"``).

    Returns a :class:`ScannerProfile` (HU, HU per mg/cm³, mm); raises ``LumbarBMDError`` naming the
    ``phantom-physics`` extra when xraydb or spekpy is missing.
    """
    def hu(material: ph.Material) -> float:
        return round(ph.tissue_hu(physics, material), 3)

    intercept = hu(ph.k2hpo4_solution(0.0))
    slope = (hu(ph.k2hpo4_solution(MINERAL_POINT_MG_CM3)) - intercept) / MINERAL_POINT_MG_CM3
    model = (f"physical scanner {physics.name!r}: {physics.kvp:g} kVp, {physics.filtration_mm_al:g} mm Al + "
             f"{physics.filtration_mm_cu:g} mm Cu, {physics.patient_water_cm:g} cm water patient path"
             + (f"; {physics.description}" if physics.description else ""))
    return ScannerProfile(
        vendor=name if name is not None else scanner_vendor(physics),
        bone_slope=round(slope, 5),
        bone_intercept=intercept,
        fat_hu=hu(ph.ADIPOSE_3),
        muscle_hu=hu(ph.MUSCLE),
        blood_hu=hu(ph.BLOOD),
        liver_hu=hu(ph.LIVER),
        kidney_hu=hu(ph.KIDNEY),
        csf_hu=hu(ph.CSF),
        disc_hu=hu(ph.INTERVERTEBRAL_DISC),
        noise_sd=physics.noise_sd_hu,
        psf_mm=physics.kernel_psf_mm,
        slice_fwhm_mm=physics.slice_fwhm_mm,
        model=model,
        iodine_hu_per_mg_ml=round(ph.iodine_hu_per_mg_ml(physics), 3),
    )


def physics_truth(physics: ph.ScannerPhysics) -> dict:
    """truth.json's ``scanner_physics``: the scanner's JSON fields plus its effective energy (keV) and HVL (mm Al)."""
    return {**physics.as_dict(), "effective_energy_kev": round(ph.effective_energy_kev(physics), 3),
            "hvl_mm_al": round(ph.hvl_mm_al(physics), 4)}
