"""The scanner and contrast assessment of one case: reference tissues → contrast phase → scanner-response fit → the
calibration and contrast correction **applied** to the HU before the trabecular patches.

The regression model reads HU on its reference scale (the training scanner's K2HPO4 line, kept in its model card,
``reference_calibration``). Every case's HU are mapped onto that scale with the calibration chosen by
:func:`~LumbarBMDLib.internal_calibration.fit.choose_calibration`: a phantom scan (``--calibration``) when given, else
the internal calibration from the reference tissues when its fit is good, else the nominal line of an ideal scanner
at the DICOM kVp, with a QC flag. Contrast-enhanced spongiosa reads higher (Pompe et al. 2015); the published mean
increase of the detected phase, measured at 120 kVp, is scaled to this scanner's iodine response (iodine
enhancement in HU grows as the effective energy falls: the fitted response curve, ``response_table.json``) and
subtracted from the case's HU before the mapping:

    HU_ref = intercept_ref + slope_ref · (HU − Δ_contrast − intercept) / slope

which :class:`AppliedCalibration` holds as ``HU_ref = A · HU + B``. The patient's water-equivalent diameter (AAPM
Report 220, from the body outline) narrows the kVp prior of the fit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from LumbarBMDLib.internal_calibration.fit import (
    NOMINAL_KVP,
    CalibrationChoice,
    InternalCalibration,
    choose_calibration,
    energy_prior,
    fit_scanner_response,
    model_hu,
    response_curve,
)
from LumbarBMDLib.internal_calibration.phase import (
    ContrastPhase,
    TrabecularCorrection,
    contrast_phase,
    trabecular_correction,
)
from LumbarBMDLib.internal_calibration.tissues import ReferenceTissues, find_reference_tissues
from LumbarBMDLib.phantom import physics as ph
from LumbarBMDLib.spine.numbering import QCFlag
from LumbarBMDLib.volume import CTVolume

#: Iodine concentration (mg/mL in blood) at which the iodine response (HU per mg/mL) is evaluated: within the
#: linear range of enhanced blood (aorta 150–350 HU at 120 kVp ≈ 5–13 mg/mL).
IODINE_PROBE_MG_ML = 10.0
#: Tube voltages (kV) the committed response table covers (build_response_table.py).
KVP_RANGE = (80.0, 140.0)
#: The tube voltage of the published contrast correction (Pompe et al. 2015 scanned at 120 kVp).
CORRECTION_KVP = 120.0


def iodine_response_hu_per_mg_ml(energy_kev: float, kvp: float | None = None) -> float:
    """HU added by 1 mg iodine per mL of blood at effective energy ``energy_kev`` (keV), from the response curve."""
    curve = response_curve(kvp)
    blood = model_hu(curve, ph.BLOOD, energy_kev, 0.0, 0.0)
    return (model_hu(curve, ph.iodinated_blood(IODINE_PROBE_MG_ML), energy_kev, 0.0, 0.0) - blood) \
        / IODINE_PROBE_MG_ML


def iodine_ratio_to_120kvp(energy_kev: float, kvp: float | None = None) -> float:
    """Iodine's HU per mg/mL at 120 kVp (the response table's mean effective energy there) over that at
    ``energy_kev`` (> 1 for a harder beam, < 1 for a softer one)."""
    return iodine_response_hu_per_mg_ml(energy_prior(CORRECTION_KVP)[0], CORRECTION_KVP) \
        / iodine_response_hu_per_mg_ml(energy_kev, kvp)


def iodine_scale_to_120kvp(kvp: float | None) -> float:
    """:func:`iodine_ratio_to_120kvp` at the mean effective energy of ``kvp``'s spectra; 1 without a kVp (the phase
    thresholds are then taken as they are)."""
    return 1.0 if kvp is None else iodine_ratio_to_120kvp(energy_prior(kvp)[0], kvp)


@dataclass(frozen=True)
class AppliedCalibration:
    """What was done to the case's HU before the patches.

    Attributes:
        source: "phantom", "internal" or "nominal" (the choice), or "reference" when the regression model has no
            reference scale (the HU are then taken as they are, contrast-corrected only).
        slope, intercept: the case's K2HPO4 line used (HU per mg/cm³, HU).
        contrast_delta_hu: HU subtracted from the trabecular HU for contrast, on this scanner (0 when none).
        contrast_delta_120kvp_hu: the published correction it was scaled from (HU at 120 kVp).
        hu_transform: ``(A, B)``: HU_ref = A · HU + B, contrast correction included.
        sentence: what was applied, for the log, results.json and the report.
    """

    source: str
    slope: float
    intercept: float
    contrast_delta_hu: float
    contrast_delta_120kvp_hu: float
    hu_transform: tuple[float, float]
    sentence: str

    def as_json(self) -> dict:
        """Plain dict (results.json)."""
        return {"source": self.source, "slope": round(self.slope, 5), "intercept": round(self.intercept, 2),
                "contrast_delta_hu": round(self.contrast_delta_hu, 2),
                "contrast_delta_120kvp_hu": round(self.contrast_delta_120kvp_hu, 2),
                "hu_transform": [round(self.hu_transform[0], 6), round(self.hu_transform[1], 3)],
                "sentence": self.sentence}


#: The fit's inputs: the ROI finder's tissue names it uses (the fit maps aorta/IVC onto blood).
FIT_TISSUES = ("air", "subcutaneous_fat", "visceral_fat", "paraspinal_muscle", "aorta", "ivc")


@dataclass
class ScannerAssessment:
    """Reference tissues, contrast phase, the trabecular correction it implies and the scanner-response fit.

    Attributes:
        tissues: the ROIs and their HU.
        phase: the contrast phase read from the blood pool.
        correction: the published trabecular correction for that phase (at 120 kVp; :meth:`applied` scales it).
        calibration: the internal calibration (None when too few tissues were found to try).
        choice: which calibration the pipeline uses and why (a phantom scan wins).
        seconds: wall time of the assessment (s).
        kvp: the DICOM kVp (None when absent).
        filtration: the site's stated equivalent filtration (mm Al, mm Cu), None when not given.
    """

    tissues: ReferenceTissues
    phase: ContrastPhase
    correction: TrabecularCorrection
    calibration: InternalCalibration | None
    choice: CalibrationChoice
    seconds: float
    kvp: float | None = None
    filtration: tuple[float, float] | None = None

    def with_phantom(self, phantom_calibration: Any | None) -> ScannerAssessment:
        """This assessment with the calibration choice remade for ``phantom_calibration`` (given or withdrawn after
        the assessment, as in Slicer between a run and an edit): a phantom scan wins, else the internal fit, else
        the nominal line."""
        choice = choose_calibration(phantom_calibration, self.calibration, self.kvp,
                                    self.tissues.water_equivalent_diameter_cm, self.filtration)
        return replace(self, choice=choice)

    def contrast_delta_hu(self) -> float:
        """The published correction scaled to this scanner's iodine response (HU; 0 when not applied)."""
        if not self.correction.applied or self.correction.delta_hu == 0.0:
            return 0.0
        e = self.choice.effective_energy_kev
        if not np.isfinite(e):
            e = energy_prior(self.kvp if self.kvp is not None else NOMINAL_KVP)[0]
        return self.correction.delta_hu / iodine_ratio_to_120kvp(e, self.kvp)

    def applied(self, reference: Any | None) -> AppliedCalibration:
        """The calibration and contrast correction applied, onto ``reference`` (the regression model's reference
        scanner: anything with ``slope`` and ``intercept``; None: the model has none, HU taken as they are)."""
        delta = self.contrast_delta_hu()
        contrast = (f" Contrast ({self.phase.phase.replace('_', ' ')}): {delta:.1f} HU subtracted from the trabecular "
                    f"HU ({self.correction.delta_hu:.1f} HU at 120 kVp, Pompe et al. 2015, scaled to this scanner's "
                    "iodine response)." if delta else "")
        if reference is None:
            return AppliedCalibration("reference", float("nan"), float("nan"), delta, self.correction.delta_hu,
                                      (1.0, -delta), "The regression model has no reference scale: the HU are used as "
                                      "measured (no scanner calibration)." + contrast)
        a = float(reference.slope) / self.choice.slope
        b = float(reference.intercept) - a * (self.choice.intercept + delta)
        return AppliedCalibration(self.choice.source, self.choice.slope, self.choice.intercept, delta,
                                  self.correction.delta_hu if delta else 0.0, (a, b), self.choice.sentence + contrast)

    def qc_flags(self) -> list[QCFlag]:
        """``contrast_enhanced`` when contrast is seen; ``contrast_phase_unknown`` when no blood pool was read."""
        flags = []
        if self.phase.enhanced:
            delta = self.contrast_delta_hu()
            flags.append(QCFlag("contrast_enhanced", f"contrast-enhanced CT ({self.phase.phase.replace('_', ' ')} "
                                f"phase: {self.phase.evidence}); the trabecular HU were corrected by −{delta:.1f} HU "
                                "(Pompe et al. 2015, the mean of 152 patients: a person's own enhancement varies, so "
                                "BMD from an enhanced CT is less certain than from an unenhanced one)"
                                + ("; " + self.correction.sentence if self.correction.qc != "ok" else "")))
        elif self.phase.enhanced is None:
            flags.append(QCFlag("contrast_phase_unknown", f"the contrast phase could not be read "
                                f"({self.phase.evidence}): no contrast correction; if the CT is contrast-enhanced, "
                                "BMD reads high"))
        if self.choice.source == "nominal":
            flags.append(QCFlag("calibration_nominal", self.choice.sentence.replace("Calibration: ", "calibration: ")))
        return flags

    def as_json(self) -> dict:
        """Plain dict for results.json."""
        return {
            "tissues": self.tissues.as_json(),
            "contrast_phase": self.phase.as_json(),
            "contrast_correction": self.correction.as_json(),
            "internal_calibration": None if self.calibration is None else self.calibration.as_dict(),
            "calibration_choice": {"source": self.choice.source, "slope": self.choice.slope,
                                   "intercept": self.choice.intercept, "sentence": self.choice.sentence},
            "kvp": self.kvp,
            "filtration_mm": None if self.filtration is None else {"al": self.filtration[0], "cu": self.filtration[1]},
            "seconds": round(self.seconds, 3),
        }


def fit_inputs(tissues: ReferenceTissues) -> dict[str, tuple[float, float, int]]:
    """``name → (median HU, SD HU, voxels)`` of the found tissues the fit uses."""
    out = {}
    for name in FIT_TISSUES:
        roi = tissues.tissues.get(name)
        if roi is not None and roi.found and roi.median_hu is not None:
            out[name] = (float(roi.median_hu), float(roi.sd_hu or 0.0), int(roi.n_voxels))
    return out


def assess_scanner(volume: CTVolume, body_centres_lps: np.ndarray | None = None, phantom_calibration: Any = None
                   ) -> ScannerAssessment:
    """Assess the scanner and contrast of ``volume``.

    Args:
        volume: axial LPS CT (HU); ``metadata["kvp"]`` (DICOM KVP) sets the fit's energy prior when present.
        body_centres_lps: ``(m, 3)`` centres (mm) of the identified L1–L4 bodies; None: found from the bone.
        phantom_calibration: a ``--calibration`` phantom-scan calibration, which wins over the internal one.
    """
    t0 = time.perf_counter()
    tissues = find_reference_tissues(volume, body_centres_lps)
    kvp = volume.metadata.get("kvp")
    kvp = float(kvp) if isinstance(kvp, (int, float)) and np.isfinite(kvp) else None
    if kvp is not None and not KVP_RANGE[0] <= kvp <= KVP_RANGE[1]:
        tissues.notes.append(f"the DICOM kVp {kvp:g} is outside the response table's {KVP_RANGE[0]:g}–"
                             f"{KVP_RANGE[1]:g} kV: the fit ignores it")
        kvp = None
    phase = contrast_phase(tissues, iodine_scale_to_120kvp(kvp))
    correction = trabecular_correction(phase)
    inputs = fit_inputs(tissues)
    # Voxels near metal are already left out of every ROI (tissues.py); streaks beyond that show as residuals.
    wed = tissues.water_equivalent_diameter_cm
    filtration = scanner_filtration(volume.metadata)
    calibration = fit_scanner_response(inputs, kvp=kvp, blood_enhanced=bool(phase.enhanced),
                                       patient_water_cm=wed, filtration=filtration) if inputs else None
    choice = choose_calibration(phantom_calibration, calibration, kvp, wed, filtration)
    return ScannerAssessment(tissues, phase, correction, calibration, choice, time.perf_counter() - t0, kvp,
                             filtration)


def scanner_filtration(metadata: dict) -> tuple[float, float] | None:
    """The site's stated equivalent filtration ``(mm Al, mm Cu)`` from a volume's metadata (``filtration_mm_al``,
    ``filtration_mm_cu``: set from ``lumbarbmd run --scanner-spec``), None when not given."""
    al = metadata.get("filtration_mm_al")
    if not isinstance(al, (int, float)) or not np.isfinite(al):
        return None
    cu = metadata.get("filtration_mm_cu", 0.0)
    return float(al), float(cu) if isinstance(cu, (int, float)) and np.isfinite(cu) else 0.0
