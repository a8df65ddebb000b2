"""The scanner and contrast assessment of one case: reference tissues → contrast phase → scanner-response fit.

What the pipeline records for every CT (``results.json`` ``"scanner"``, the report's QC flags). In this version it
is **recorded, not applied**: the phantom cohorts on which the default regression model was trained and validated do
not yet render tissues from the scanner physics (``LumbarBMDLib.phantom.physics``), so the benefit of applying the
internal calibration (or the contrast correction) to the BMD cannot be measured yet, and an unmeasured correction is
not put into a clinical number. The contrast phase is reported as a QC flag, because contrast-enhanced scans read
trabecular HU, and so BMD, high (Pompe et al. 2015).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from LumbarBMDLib.internal_calibration.fit import (
    CalibrationChoice,
    InternalCalibration,
    choose_calibration,
    fit_scanner_response,
)
from LumbarBMDLib.internal_calibration.phase import (
    ContrastPhase,
    TrabecularCorrection,
    contrast_phase,
    trabecular_correction,
)
from LumbarBMDLib.internal_calibration.tissues import ReferenceTissues, find_reference_tissues
from LumbarBMDLib.spine.numbering import QCFlag
from LumbarBMDLib.volume import CTVolume

#: Why the assessment is recorded and not applied (results.json, README).
NOT_APPLIED = ("recorded, not applied to the BMD: the phantom cohorts the default model was validated on do not yet "
               "model scanner physics, so the effect of applying it cannot be measured yet (issue 15, in progress)")

#: The fit's inputs: the ROI finder's tissue names it uses (the fit maps aorta/IVC onto blood).
FIT_TISSUES = ("air", "subcutaneous_fat", "visceral_fat", "paraspinal_muscle", "aorta", "ivc")


@dataclass
class ScannerAssessment:
    """Reference tissues, contrast phase, the trabecular correction it implies and the scanner-response fit.

    Attributes:
        tissues: the ROIs and their HU.
        phase: the contrast phase read from the blood pool.
        correction: the published trabecular correction for that phase (not applied, see :data:`NOT_APPLIED`).
        calibration: the internal calibration (None when too few tissues were found to try).
        choice: which calibration the pipeline would use and why (a phantom scan wins).
        seconds: wall time of the assessment (s).
    """

    tissues: ReferenceTissues
    phase: ContrastPhase
    correction: TrabecularCorrection
    calibration: InternalCalibration | None
    choice: CalibrationChoice
    seconds: float

    def qc_flags(self) -> list[QCFlag]:
        """``contrast_enhanced`` when contrast is seen; ``contrast_phase_unknown`` when no blood pool was read."""
        if self.phase.enhanced:
            return [QCFlag("contrast_enhanced", f"contrast-enhanced CT ({self.phase.phase.replace('_', ' ')} "
                           f"phase: {self.phase.evidence}); trabecular bone reads higher than without contrast "
                           f"(about +{self.correction.delta_hu:.0f} HU, Pompe et al. 2015), so BMD reads high; the "
                           "BMD is not corrected for it yet")]
        if self.phase.enhanced is None:
            return [QCFlag("contrast_phase_unknown", f"the contrast phase could not be read ({self.phase.evidence}): "
                           "if the CT is contrast-enhanced, BMD reads high")]
        return []

    def as_json(self) -> dict:
        """Plain dict for results.json."""
        return {
            "status": NOT_APPLIED,
            "tissues": self.tissues.as_json(),
            "contrast_phase": self.phase.as_json(),
            "contrast_correction": self.correction.as_json(),
            "internal_calibration": None if self.calibration is None else self.calibration.as_dict(),
            "calibration_choice": {"source": self.choice.source, "sentence": self.choice.sentence},
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
    phase = contrast_phase(tissues)
    correction = trabecular_correction(phase)
    inputs = fit_inputs(tissues)
    # Voxels near metal are already left out of every ROI (tissues.py); streaks beyond that show as residuals.
    calibration = fit_scanner_response(inputs, kvp=volume.metadata.get("kvp"),
                                       blood_enhanced=bool(phase.enhanced)) if inputs else None
    choice = choose_calibration(phantom_calibration, calibration)
    return ScannerAssessment(tissues, phase, correction, calibration, choice, time.perf_counter() - t0)
