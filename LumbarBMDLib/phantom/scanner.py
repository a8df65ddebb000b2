"""Scanner profiles of the phantom: how each scanner turns tissue into HU, and its noise, kernel and slice profile.

The paper trained on one vendor (uCT760) and saw a systematic BMD bias on two other vendors' scanners. Real scanners
differ by their X-ray spectrum (tube voltage, filtration, beam hardening in the patient) and by a small water/air
calibration error; the spectrum moves the HU of every material together and predictably, which is what internal
(phantomless) calibration uses (issue 15). The vendors A, B, C are therefore **physically defined**
(:data:`VENDOR_PHYSICS`, :class:`~LumbarBMDLib.phantom.physics.ScannerPhysics`): each tissue's HU follows from its
elemental composition (ICRU-44 / Woodard & White) and the NIST/Elam mass attenuation over the scanner's spectrum
(SpekPy), and the mineral line is that of K2HPO4 solutions on the same footing
(:func:`~LumbarBMDLib.phantom.physical_scanner.profile_from_physics`):

* vendor **A** is the training scanner (uCT760-like): 120 kVp, 6 mm Al, water reads +3 HU, air −1002 HU;
* vendor **B**: 135 kVp, 7 mm Al + 0.1 mm Cu (a harder beam: the K2HPO4 slope is 10 % lower), water +6 HU, a sharper
  kernel and more noise;
* vendor **C**: 100 kVp (a softer beam: the slope is 12 % higher, fat reads 16 HU lower), water −6 HU, a smoother
  kernel and a thicker slice profile.

Each beam is hardened by 28 cm of water, the median water-equivalent diameter (AAPM Report 220) of the phantom's
patients at L1–L4 (25.8–29.6 cm over 12 seeds), so that the spectrum agrees with the patients it passes through.

The derived HU are written below as numbers so that generating a phantom needs neither xraydb nor SpekPy (the
``phantom-physics`` extra); ``Testing/test_physical_scanner.py`` re-derives them from :data:`VENDOR_PHYSICS` and fails
if they drift. Noise figures (SD in water, 1 mm, standard dose) of 10–20 HU are typical for abdominal protocols.

Until issue 15 the vendors differed only by an arbitrary mineral slope/intercept (A 1.10 HU per mg/cm³ + 5 HU,
B 0.95 + 14, C 1.22 − 10) while fat, muscle and blood kept their HU: no phantomless method could be taught or tested
on them. The default regression model was trained on that earlier vendor A; its model card keeps that scanner's
rod calibration (1.099 HU per mg/cm³, +5.1 HU) as the model's **reference scale**, onto which every case's HU are
mapped (by a phantom-scan calibration, or by the internal calibration) before the patches go into the network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from LumbarBMDLib.phantom.physics import ScannerPhysics


@dataclass(frozen=True)
class ScannerProfile:
    """How one scanner turns tissue into HU.

    Attributes:
        vendor: "A", "B" or "C".
        bone_slope: HU per mg/cm³ of K2HPO4-equivalent mineral (QCT calibration slope).
        bone_intercept: HU of zero mineral in the calibration (HU).
        fat_hu, muscle_hu, blood_hu, liver_hu, kidney_hu, csf_hu, disc_hu: soft-tissue HU on this scanner.
        noise_sd: image noise SD (HU) for 0.7 × 0.7 × 1 mm voxels, a 230 mm AP patient, standard dose.
        psf_mm: in-plane point-spread (Gaussian sigma, mm) of the reconstruction kernel; the noise
            texture follows the same kernel.
        slice_fwhm_mm: slice-sensitivity profile FWHM (mm).
        model: a description of the mimicked scanner.
        iodine_hu_per_mg_ml: HU added by 1 mg of iodine per mL in blood on this scanner (contrast enhancement
            scales with it; 26.6 at 120 kVp, :func:`LumbarBMDLib.phantom.physics.iodine_hu_per_mg_ml`).
    """

    vendor: str
    bone_slope: float
    bone_intercept: float
    fat_hu: float
    muscle_hu: float
    blood_hu: float
    liver_hu: float
    kidney_hu: float
    csf_hu: float
    disc_hu: float
    noise_sd: float
    psf_mm: float
    slice_fwhm_mm: float
    model: str
    iodine_hu_per_mg_ml: float = 26.6

    def mineral_to_hu(self, bmd_mg_cm3: float) -> float:
        """HU of bone with ``bmd_mg_cm3`` mg/cm³ K2HPO4-equivalent mineral on this scanner."""
        return self.bone_slope * bmd_mg_cm3 + self.bone_intercept

    def as_dict(self) -> dict:
        """Plain dict (for truth.json)."""
        return asdict(self)


#: The vendors' physics (the JSON of ``lumbarbmd phantom --scanner`` would describe them the same way).
VENDOR_PHYSICS: dict[str, ScannerPhysics] = {
    "A": ScannerPhysics("A", 120.0, filtration_mm_al=6.0, patient_water_cm=28.0, water_offset_hu=3.0,
                        air_offset_hu=-2.0, noise_sd_hu=11.0, kernel_psf_mm=0.45, slice_fwhm_mm=1.0,
                        description="training scanner, 128-row MDCT with iterative reconstruction (uCT760-like)"),
    "B": ScannerPhysics("B", 135.0, filtration_mm_al=7.0, filtration_mm_cu=0.1, patient_water_cm=28.0,
                        water_offset_hu=6.0, air_offset_hu=3.0, noise_sd_hu=15.0, kernel_psf_mm=0.35,
                        slice_fwhm_mm=1.25, description="other vendor, 135 kVp hard beam, sharper kernel"),
    "C": ScannerPhysics("C", 100.0, filtration_mm_al=6.0, patient_water_cm=28.0, water_offset_hu=-6.0,
                        air_offset_hu=-4.0, noise_sd_hu=18.0, kernel_psf_mm=0.6, slice_fwhm_mm=1.5,
                        description="other vendor, 100 kVp, smooth kernel, thicker slice profile"),
}

#: Effective energy (keV, detector-weighted) of each vendor's spectrum behind the patient path (physics.py).
VENDOR_EFFECTIVE_ENERGY_KEV = {"A": 74.04, "B": 82.1, "C": 66.06}

#: ``profile_from_physics(VENDOR_PHYSICS[v], v)``, rounded to 0.01 HU (re-derived in test_physical_scanner.py).
SCANNERS: dict[str, ScannerProfile] = {
    "A": ScannerProfile("A", 1.36343, 3.0, -96.39, 46.32, 59.52, 56.88, 47.05, 16.26, 77.1, 11.0, 0.45, 1.0,
                        "training scanner, 120 kVp, 128-row MDCT with iterative reconstruction (uCT760-like)",
                        iodine_hu_per_mg_ml=25.72),
    "B": ScannerProfile("B", 1.22602, 6.0, -87.25, 48.66, 61.22, 59.07, 49.43, 18.38, 76.03, 15.0, 0.35, 1.25,
                        "other vendor, 135 kVp + 0.1 mm Cu (hard beam), sharper kernel", iodine_hu_per_mg_ml=21.14),
    "C": ScannerProfile("C", 1.5317, -6.0, -112.53, 37.78, 51.7, 48.43, 38.45, 8.29, 72.76, 18.0, 0.6, 1.5,
                        "other vendor, 100 kVp (soft beam), smooth kernel, thicker slice profile",
                        iodine_hu_per_mg_ml=31.46),
}


def scanner_profile(vendor: str, low_dose: bool = False) -> ScannerProfile:
    """The profile of ``vendor`` ("A", "B", "C"); ``low_dose`` multiplies the noise by 2.5 (≈ 1/6 of the dose)."""
    key = vendor.upper()
    if key not in SCANNERS:
        raise ValueError(f"unknown vendor {vendor!r}: choose one of {', '.join(SCANNERS)}")
    prof = SCANNERS[key]
    return replace(prof, noise_sd=prof.noise_sd * 2.5) if low_dose else prof
