"""Scanner profiles of the phantom: calibration, noise, sharpness and slice profile per vendor.

The paper trained on one vendor (uCT760) and saw a systematic BMD bias on two other vendors' scanners.
What differs between scanners at the same 120 kVp is the effective beam energy and the reconstruction
kernel. Effective energy changes the HU of mineral per mg/cm³ (the QCT calibration slope, measured with
a K2HPO4 phantom such as the European Spine Phantom) far more than that of water-like tissue, and it
shifts fat slightly (fat is more negative at lower effective energy). The profiles below mimic that:

* vendor **A** is the training scanner (uCT760-like): slope 1.10 HU per mg/cm³, intercept +5 HU;
* vendor **B**: lower effective energy is *not* assumed; a softer calibration (slope 0.95, +14 HU) with a
  sharper kernel and more noise;
* vendor **C**: steeper calibration (slope 1.22, −10 HU), smoother kernel, thicker slice profile.

Typical published K2HPO4 calibration slopes at 120 kVp lie between about 0.9 and 1.3 HU per mg/cm³
(Cann & Genant 1980, J Comput Assist Tomogr 4:493; Kalender et al. 1995, Med Phys 22:1237), and vendor
offsets of ±15 HU are common in cross-calibration studies with the ESP (Kalender et al. 1995). Noise
figures (SD in water, 1 mm, standard dose) of 10–20 HU are typical for abdominal protocols.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


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


SCANNERS: dict[str, ScannerProfile] = {
    "A": ScannerProfile("A", 1.10, 5.0, -100.0, 52.0, 40.0, 58.0, 32.0, 8.0, 84.0, 11.0, 0.45, 1.0,
                        "training scanner, 128-row MDCT with iterative reconstruction (uCT760-like)"),
    "B": ScannerProfile("B", 0.95, 14.0, -92.0, 55.0, 42.0, 60.0, 34.0, 10.0, 88.0, 15.0, 0.35, 1.25,
                        "other vendor, sharper kernel, softer mineral calibration"),
    "C": ScannerProfile("C", 1.22, -10.0, -108.0, 50.0, 38.0, 55.0, 30.0, 6.0, 82.0, 18.0, 0.6, 1.5,
                        "other vendor, smooth kernel, thicker slice profile, steeper mineral calibration"),
}


def scanner_profile(vendor: str, low_dose: bool = False) -> ScannerProfile:
    """The profile of ``vendor`` ("A", "B", "C"); ``low_dose`` multiplies the noise by 2.5 (≈ 1/6 of the dose)."""
    key = vendor.upper()
    if key not in SCANNERS:
        raise ValueError(f"unknown vendor {vendor!r}: choose one of {', '.join(SCANNERS)}")
    prof = SCANNERS[key]
    return replace(prof, noise_sd=prof.noise_sd * 2.5) if low_dose else prof
