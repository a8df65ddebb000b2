"""Contrast phase from the blood pool, and the published correction of trabecular HU for it.

Iodinated contrast raises the HU of the vertebral spongiosa (it is perfused marrow), so a BMD measured on an
enhanced CT reads too high. The phase is read from the HU of the aorta, the IVC and (when found) the portal vein:

* **non-contrast**: blood is 30–55 HU unenhanced (its attenuation follows the haematocrit: New & Aronow 1976,
  Radiology 121:635; in vivo in the aorta and IVC, Di Giandomenico et al. 1993, r = 0.76 with haemoglobin). Above
  :data:`UNENHANCED_MAX_HU` (70 HU) blood is enhanced;
* **arterial**: the aorta peaks at ≈ 290–360 HU in the late arterial phase while the portal vein is ≈ 145 ± 20 HU
  (Radiopaedia, "Late arterial phase", rev. 2023) and the hepatic/IVC venous return is barely enhanced; in a
  bolus-tracking study of the liver (AJR, "MDCT of the liver and hypervascular hepatocellular carcinomas: optimizing
  scan delays for bolus-tracking techniques", abstract) the aorta gained 300–336 HU at 10–15 s after the trigger while
  the proximal portal veins gained 75–104 HU: the veins carry less than half the aorta's enhancement;
* **portal venous**: at 45–55 s after the trigger the aorta's gain fell to 117–125 HU while the liver peaked (same
  study): aorta ≈ 150–250 HU, the portal vein and the IVC enhanced to more than half of it but still below it;
* **delayed (equilibrium)**: the blood pool is mixed, aorta ≈ IVC (within 15 %), both ≈ 80–180 HU.

The thresholds below are read from those ranges; they are not a validated classifier (no phase-labelled CTs here).

Correction (:func:`trabecular_correction`): Pompe et al. 2015 (Eur Radiol 25:283–289, doi:10.1007/s00330-014-3408-2),
152 patients with unenhanced, arterial and portal venous abdominal CT in one session, L1 trabecular HU: without
malignancy 128.8 ± 48.6 (unenhanced), 142.3 ± 47.2 (arterial), 147.0 ± 47.4 HU (portal); with malignancy 112.1, 126.2,
130.1 HU. The mean increases, +13.5 HU (arterial) and +18.2 HU (portal venous) in the patients without malignancy,
are subtracted. Pompe et al. did not scan a delayed phase: for it the portal-venous value is applied and flagged
(no verified published figure). Kaesmacher et al. 2017 (J Comput Assist Tomogr 41:217–223) found the same direction
(contrast biases of > 6 mg/mL on phantom- and internally calibrated BMD, linear in QCT BMD); their fitted equations
were not verified here and are not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from LumbarBMDLib.internal_calibration.tissues import ReferenceTissues

PHASES = ("non_contrast", "arterial", "portal_venous", "delayed", "unknown")

UNENHANCED_MAX_HU = 70.0  # unenhanced blood 30–55 HU (haematocrit 30–50 %), + noise and beam hardening margin
ENHANCED_MIN_HU = 90.0  # between 70 and 90 HU the aorta is ambiguous (polycythaemia, a trace of contrast): unknown
ARTERIAL_VENOUS_RATIO = 0.5  # arterial: the venous side (portal vein, IVC) carries less than half the aorta's HU
EQUILIBRIUM_RATIO = 0.85  # delayed: the IVC (or portal vein) within 15 % of the aorta
DELAYED_MAX_AORTA_HU = 180.0  # in the equilibrium phase the aorta is below this (≈ 80–180 HU)

#: Mean L1 trabecular HU increase over the unenhanced scan, Pompe et al. 2015, patients without malignancy.
POMPE_2015_INCREASE_HU = {"arterial": 142.3 - 128.8, "portal_venous": 147.0 - 128.8}
POMPE_2015 = ("Pompe E, et al. Intravenous contrast injection significantly affects bone mineral density measured on "
              "CT. Eur Radiol 2015;25:283-289. doi:10.1007/s00330-014-3408-2 (L1 HU, patients without malignancy)")


@dataclass
class ContrastPhase:
    """The contrast phase read from the blood pool.

    Attributes:
        phase: one of :data:`PHASES`.
        enhanced: True (contrast seen), False (unenhanced), None (cannot tell).
        confidence: "high" (clear-cut HU), "low" (near a threshold or a reference missing), "none".
        evidence: one sentence with the HU used and the rule applied.
        hu_used: the HU (median) of the vessels used, by name.
        qc: "ok", "check" (low confidence) or "fail" (no blood pool found).
    """

    phase: str
    enhanced: bool | None
    confidence: str
    evidence: str
    hu_used: dict[str, float] = field(default_factory=dict)
    qc: str = "ok"

    def as_json(self) -> dict:
        """Plain dict (results.json)."""
        return {"phase": self.phase, "enhanced": self.enhanced, "confidence": self.confidence,
                "evidence": self.evidence, "hu_used": {k: round(v, 1) for k, v in self.hu_used.items()},
                "qc": self.qc}


@dataclass
class TrabecularCorrection:
    """The correction of trabecular HU for contrast.

    Attributes:
        phase: the phase it is for.
        delta_hu: HU to subtract from the trabecular HU (0 for non-contrast).
        applied: whether a correction applies (False for non-contrast and when the phase is unknown and unenhanced).
        source: the publication the number comes from.
        qc: "ok" or "check" (the number is borrowed from another phase).
        sentence: what was done, for the report.
    """

    phase: str
    delta_hu: float
    applied: bool
    source: str
    qc: str
    sentence: str

    def corrected_hu(self, trabecular_hu: float) -> float:
        """The unenhanced-equivalent trabecular HU."""
        return trabecular_hu - self.delta_hu

    def as_json(self) -> dict:
        """Plain dict (results.json)."""
        return {"phase": self.phase, "delta_hu": round(self.delta_hu, 1), "applied": self.applied,
                "source": self.source, "qc": self.qc, "sentence": self.sentence}


def _venous(hu: dict[str, float]) -> tuple[str, float] | None:
    """The venous reference: the portal vein when found, else the IVC."""
    for name in ("portal_vein", "ivc"):
        if name in hu:
            return name, hu[name]
    return None


def classify_phase(aorta_hu: float | None, ivc_hu: float | None = None, portal_hu: float | None = None
                   ) -> ContrastPhase:
    """The phase from the median HU of the aorta, IVC and portal vein (None: not found)."""
    hu = {k: float(v) for k, v in (("aorta", aorta_hu), ("ivc", ivc_hu), ("portal_vein", portal_hu)) if v is not None}
    if aorta_hu is None:
        if any(v > ENHANCED_MIN_HU for v in hu.values()):
            return ContrastPhase("unknown", True, "low", "the aorta was not found; a vein is enhanced ("
                                 + ", ".join(f"{k} {v:.0f} HU" for k, v in hu.items()) + "): contrast, phase unknown",
                                 hu, "check")
        return ContrastPhase("unknown", None, "none", "the aorta was not found: the contrast phase cannot be read",
                             hu, "fail")
    a = float(aorta_hu)
    ven = _venous(hu)
    if a <= UNENHANCED_MAX_HU:
        if ven is not None and ven[1] > ENHANCED_MIN_HU:
            return ContrastPhase("unknown", True, "low", f"aorta {a:.0f} HU is unenhanced but the {ven[0]} is "
                                 f"{ven[1]:.0f} HU: inconsistent, check the vessels", hu, "check")
        conf = "high" if a <= UNENHANCED_MAX_HU - 10.0 else "low"
        return ContrastPhase("non_contrast", False, conf, f"aorta {a:.0f} HU ≤ {UNENHANCED_MAX_HU:.0f} HU "
                             "(unenhanced blood 30–55 HU)" + (f", {ven[0]} {ven[1]:.0f} HU" if ven else ""), hu,
                             "ok" if conf == "high" else "check")
    if a < ENHANCED_MIN_HU:
        return ContrastPhase("unknown", None, "low", f"aorta {a:.0f} HU lies between unenhanced "
                             f"(≤ {UNENHANCED_MAX_HU:.0f}) and enhanced (≥ {ENHANCED_MIN_HU:.0f}) blood", hu, "check")
    if ven is None:
        return ContrastPhase("unknown", True, "low", f"aorta {a:.0f} HU is enhanced but neither the portal vein nor "
                             "the IVC was found: contrast, phase undetermined", hu, "check")
    name, v = ven
    ratio = v / a
    txt = f"aorta {a:.0f} HU, {name} {v:.0f} HU ({name}/aorta {ratio:.2f})"
    if ratio < ARTERIAL_VENOUS_RATIO:
        conf = "high" if ratio < ARTERIAL_VENOUS_RATIO - 0.1 and a >= 200.0 else "low"
        return ContrastPhase("arterial", True, conf, f"{txt}: the veins carry less than half the aortic "
                             "enhancement", hu, "ok" if conf == "high" else "check")
    if ratio >= EQUILIBRIUM_RATIO and a <= DELAYED_MAX_AORTA_HU:
        conf = "high" if ratio >= 0.92 else "low"
        return ContrastPhase("delayed", True, conf, f"{txt}: aorta ≈ vein and aorta ≤ {DELAYED_MAX_AORTA_HU:.0f} HU "
                             "(equilibrium)", hu, "ok" if conf == "high" else "check")
    near = min(abs(ratio - ARTERIAL_VENOUS_RATIO), abs(ratio - EQUILIBRIUM_RATIO))
    conf = "high" if near > 0.05 else "low"
    return ContrastPhase("portal_venous", True, conf, f"{txt}: veins enhanced to more than half the aorta",
                         hu, "ok" if conf == "high" else "check")


#: Unenhanced blood's HU from which the enhancement is scaled to 120 kVp (the middle of its 35–55 HU).
UNENHANCED_BLOOD_HU = 45.0


def equivalent_120kvp_hu(hu: float | None, iodine_scale: float) -> float | None:
    """A vessel's HU as a 120 kVp scanner would read it: its enhancement over unenhanced blood × ``iodine_scale``
    (iodine's HU per mg/mL at 120 kVp over this scanner's: > 1 above 120 kVp, < 1 below)."""
    return None if hu is None else UNENHANCED_BLOOD_HU + (float(hu) - UNENHANCED_BLOOD_HU) * iodine_scale


def contrast_phase(tissues: ReferenceTissues, iodine_scale: float = 1.0) -> ContrastPhase:
    """The contrast phase from the reference tissues' aorta, IVC and portal vein.

    The thresholds are 120 kVp figures; iodine's HU per mg/mL grows as the tube voltage falls (26.6 at 120, 42 at
    80, 22 at 140 kVp in physics.py), so with ``iodine_scale`` ≠ 1 (:func:`~LumbarBMDLib.internal_calibration.assess.
    iodine_scale_to_120kvp` of the DICOM kVp) the vessels' enhancement is first scaled to 120 kVp; ``hu_used`` keeps
    the measured HU.
    """
    measured = {n: tissues.median(n) for n in ("aorta", "ivc", "portal_vein")}
    if iodine_scale == 1.0:
        return classify_phase(measured["aorta"], measured["ivc"], measured["portal_vein"])
    scaled = {n: equivalent_120kvp_hu(v, iodine_scale) for n, v in measured.items()}
    p = classify_phase(scaled["aorta"], scaled["ivc"], scaled["portal_vein"])
    p.evidence += f" (as at 120 kVp: the enhancement × {iodine_scale:.2f} for this tube voltage)"
    p.hu_used = {k: float(v) for k, v in measured.items() if v is not None and k in p.hu_used}
    return p


def trabecular_correction(phase: ContrastPhase | str) -> TrabecularCorrection:
    """The HU to subtract from the trabecular HU for the contrast phase (Pompe et al. 2015; see the module notes)."""
    p = phase if isinstance(phase, str) else phase.phase
    enhanced = None if isinstance(phase, str) else phase.enhanced
    if p not in PHASES:
        raise ValueError(f"unknown phase {p!r}: choose one of {', '.join(PHASES)}")
    if p == "non_contrast":
        return TrabecularCorrection(p, 0.0, False, "", "ok", "unenhanced: no contrast correction")
    if p in POMPE_2015_INCREASE_HU:
        d = POMPE_2015_INCREASE_HU[p]
        return TrabecularCorrection(p, d, True, POMPE_2015, "ok",
                                    f"{p.replace('_', ' ')} phase: {d:.1f} HU subtracted "
                                    "(mean L1 increase, Pompe 2015)")
    if p == "delayed" or (p == "unknown" and enhanced):
        d = POMPE_2015_INCREASE_HU["portal_venous"]
        why = ("no verified published delayed-phase figure" if p == "delayed"
               else "contrast seen but the phase is undetermined")
        return TrabecularCorrection(p, d, True, POMPE_2015, "check", f"{why}: the portal-venous increase, "
                                    f"{d:.1f} HU, is subtracted (Pompe 2015); check")
    return TrabecularCorrection(p, 0.0, False, "", "check", "phase unknown: no correction applied; check whether "
                                "the CT is enhanced")
