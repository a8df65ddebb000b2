"""Which series of a study to measure: :func:`choose_series`, with one sentence per series saying why.

Rules, in order. A series is **refused** when it is:

1. not CT (Modality), a dose report or a secondary capture (SOP class / ImageType / description), a localizer
   (ImageType LOCALIZER) — none holds a measurable CT volume;
2. not axial: the slice normal (from ImageOrientationPatient) more than ``axial_tolerance_deg`` (20°) from the
   patient's head–foot axis (sagittal and coronal reformats);
3. too short: ``n_images × slice spacing`` below ``min_coverage_mm`` (120 mm, the height of L1 to L4 in a small
   adult: four bodies of ≈ 25 mm and three discs of ≈ 8 mm);
4. of a body part that holds no lumbar spine (BodyPartExamined HEAD, BRAIN, NECK, CSPINE, KNEE, … see
   :data:`NO_LUMBAR_PARTS`).

Among the others the choice prefers, each criterion deciding only between series equal on the ones before:

1. ORIGINAL\\PRIMARY images over DERIVED or SECONDARY ones (reformats, MIPs);
2. a body part that holds the lumbar spine (ABDOMEN, LSPINE, PELVIS, … see :data:`LUMBAR_PARTS`) over any other
   or none recorded (a chest CT often ends above L1);
3. a soft-tissue kernel over an unknown one over a sharp (bone, lung, edge) one — sharp kernels overshoot at the
   cortex and add noise in trabecular bone (see :data:`KERNEL_TABLE`);
4. no contrast agent (ContrastBolusAgent empty, description without contrast words) over contrast-enhanced, since
   iodine raises the trabecular HU;
5. thinner slices (SliceThickness, rounded to 0.01 mm);
6. longer coverage, then the later series number, then the larger UID (a choice that never depends on the order
   in which the PACS answers).

Attributes the PACS did not record never refuse a series; the sentence says they are unknown.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from LumbarBMDLib.pacs.query import SeriesInfo

MIN_COVERAGE_MM = 120.0
AXIAL_TOLERANCE_DEG = 20.0
#: BodyPartExamined values (upper case, without spaces, ``_`` or ``-``) of series that hold the lumbar spine.
LUMBAR_PARTS = frozenset({"ABDOMEN", "ABDOMENPELVIS", "ABDPELVIS", "CHESTABDOMEN", "CHESTABDOMENPELVIS", "LSPINE",
                          "LUMBARSPINE", "TLSPINE", "LSSPINE", "SPINE", "WHOLESPINE", "PELVIS", "WHOLEBODY", "TRUNK",
                          "KIDNEY", "RETROPERITONEUM"})
#: BodyPartExamined values of series that cannot hold any lumbar vertebra (refused).
NO_LUMBAR_PARTS = frozenset({"HEAD", "BRAIN", "SKULL", "FACE", "SINUS", "ORBIT", "EAR", "IAC", "JAW", "TMJ", "NECK",
                             "HEADNECK", "CSPINE", "CERVICALSPINE", "LARYNX", "THYROID", "SHOULDER", "ARM", "ELBOW",
                             "FOREARM", "WRIST", "HAND", "FINGER", "KNEE", "LEG", "ANKLE", "FOOT", "TOE",
                             "UPPEREXTREMITY", "LOWEREXTREMITY", "EXTREMITY"})
SECONDARY_CAPTURE_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2", "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",  # multi-frame secondary captures
})
DOSE_REPORT_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.88.67"})  # X-Ray Radiation Dose SR

#: Reconstruction kernels by vendor: (vendor, pattern on the upper-cased first value of ConvolutionKernel, kind,
#: what it is). The first matching row decides; a kernel matching none is "unknown" (acceptable, ranked between
#: soft and sharp). ``soft`` = soft tissue / standard body kernels; ``sharp`` = bone, lung, edge and other
#: high-resolution kernels.
KERNEL_TABLE: tuple[tuple[str, str, str, str], ...] = (
    # Siemens: letter(s) + sharpness number + variant (B30f, B31s, I30f, Q30f, Br40, Bv36, Hr38; B70f, Br64, Bl57).
    # Body (B), iterative SAFIRE (I), ADMIRE (Q), head (H), dual-source (D, T) families; ≤ 45 soft, ≥ 46 sharp.
    ("Siemens", r"^[BIQHJDT][A-Z]?L\d{2}", "sharp", "lung kernel"),
    ("Siemens", r"^[BIQHJDT][A-Z]?(0\d|1\d|2\d|3\d|4[0-5])[A-Z]?(\b|$)", "soft", "soft-tissue kernel"),
    ("Siemens", r"^[BIQHJDT][A-Z]?(4[6-9]|[5-9]\d)[A-Z]?(\b|$)", "sharp", "sharp (bone/lung) kernel"),
    # GE: named kernels.
    ("GE", r"^(STANDARD|STND|SOFT|SMOOTH|ULTRA ?SMOOTH)\b", "soft", "soft-tissue kernel"),
    ("GE", r"^(HD ?)?LUNG\b", "sharp", "lung kernel"),
    ("GE", r"^(HD ?)?BONE ?(PLUS)?\b", "sharp", "bone kernel"),
    ("GE", r"^(EDGE|DETAIL|CHEST)\b", "sharp", "sharp kernel"),
    # Philips: letters; A smooth, B standard, C sharper soft tissue; D sharp, E/EB/EC bone, L/LA lung, Y* high-res,
    # U* ultra-high resolution.
    ("Philips", r"^[ABC]$", "soft", "soft-tissue kernel"),
    ("Philips", r"^(L|LA)$", "sharp", "lung kernel"),
    ("Philips", r"^(D|E|EB|EC|Y[B-Z]|U[A-Z])$", "sharp", "sharp (bone) kernel"),
    # Canon / Toshiba: FC01–FC29 body and head soft tissue (FC07, FC08, FC13, FC18 abdomen); FC30 and higher bone
    # and lung (FC30, FC35 bone; FC51–FC56 lung; FC8x high resolution). AIDR/AiCE named kernels too.
    ("Canon", r"^FC([01]\d|2\d)$", "soft", "soft-tissue kernel"),
    ("Canon", r"^FC5\d$", "sharp", "lung kernel"),
    ("Canon", r"^FC([3-46-9]\d)$", "sharp", "sharp (bone) kernel"),
    ("Canon", r"^BODY$", "soft", "soft-tissue kernel"),
    ("Canon", r"^(BODY ?SHARP|LUNG|BONE)$", "sharp", "sharp (bone/lung) kernel"),
    # Any vendor: words in the name.
    ("any", r"LUNG", "sharp", "lung kernel"),
    ("any", r"(BONE|SHARP|EDGE|DETAIL)", "sharp", "sharp (bone) kernel"),
    ("any", r"(SOFT|STANDARD|ABDOMEN|BODY)", "soft", "soft-tissue kernel"),
)
_KERNELS = tuple((v, re.compile(p), k, what) for v, p, k, what in KERNEL_TABLE)
_KERNEL_RANK = {"soft": 2, "unknown": 1, "sharp": 0}
_CONTRAST_WORDS = re.compile(r"(C\+|\bCE\b|CONTRAST|KONTRAST|\bKM\b|ARTERIAL|\bART\b|VENOUS|PORTAL|\bPV\b|DELAY|"
                             r"NEPHRO|ANGIO|\bCTA\b)")
_NON_CONTRAST_WORDS = re.compile(r"(NON[- ]?CONTRAST|WITHOUT CONTRAST|W/?O CONTRAST|\bNATIVE?\b|\bNC\b|\bPLAIN\b|"
                                 r"\bC-|NON[- ]?ENHANCED|UNENHANCED|NATIV)")
_NO_AGENT = frozenset({"", "NONE", "NO", "N/A", "NA", "0", "-", "NIL"})


def classify_kernel(kernel: str) -> tuple[str, str]:
    """``("soft" | "sharp" | "unknown", sentence part)`` for a ConvolutionKernel value, e.g. ``("soft",
    "soft-tissue kernel B30f (Siemens)")``."""
    name = kernel.split("\\")[0].strip()
    if not name:
        return "unknown", "kernel not recorded"
    upper = name.upper()
    for vendor, pattern, kind, what in _KERNELS:
        if pattern.search(upper):
            return kind, f"{what} {name}" + (f" ({vendor})" if vendor != "any" else "")
    return "unknown", f"kernel {name} (not in the kernel table)"


def contrast_status(series: SeriesInfo) -> tuple[bool, str]:
    """``(contrast-enhanced?, sentence part)`` from ContrastBolusAgent, else the series description."""
    agent = series.contrast_agent.strip()
    description = series.description.upper()
    if agent.upper() not in _NO_AGENT:
        return True, f"contrast agent {agent}"
    if _NON_CONTRAST_WORDS.search(description):
        return False, "non-contrast (description)"
    if _CONTRAST_WORDS.search(description):
        return True, "contrast-enhanced (description)"
    return False, "no contrast agent recorded"


def slice_normal_angle_deg(orientation: tuple[float, ...] | None) -> float | None:
    """Angle between the slice normal (row × column cosines) and the head–foot axis; None when unknown."""
    if orientation is None or len(orientation) != 6:
        return None
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    if norm < 1e-6:
        return None
    return math.degrees(math.acos(min(1.0, abs(n[2]) / norm)))


def coverage_mm(series: SeriesInfo) -> float | None:
    """Head–foot extent: number of images × slice spacing (SpacingBetweenSlices, else SliceThickness)."""
    spacing = series.spacing_between_slices or series.slice_thickness
    if series.n_instances is None or not spacing:
        return None
    return series.n_instances * spacing


def body_part(series: SeriesInfo) -> str:
    """BodyPartExamined normalised: upper case, without spaces, ``_`` or ``-`` ("" when not recorded)."""
    return re.sub(r"[\s_-]+", "", series.body_part.upper())


def _holds_lumbar(series: SeriesInfo) -> bool:
    return body_part(series) in LUMBAR_PARTS


def _is_derived(series: SeriesInfo) -> bool:
    return bool(series.image_type) and (series.image_type[0] == "DERIVED"
                                        or (len(series.image_type) > 1 and series.image_type[1] == "SECONDARY"))


def refusal(series: SeriesInfo, min_coverage_mm: float = MIN_COVERAGE_MM,
            axial_tolerance_deg: float = AXIAL_TOLERANCE_DEG) -> str:
    """Why ``series`` cannot be measured at all ("" when it can)."""
    description = series.description.upper()
    if series.modality and series.modality != "CT":
        return f"not a CT (modality {series.modality})"
    if series.sop_class_uid in DOSE_REPORT_CLASSES or "DOSE" in description or "DOSE" in series.image_type:
        return "a dose report"
    if series.sop_class_uid in SECONDARY_CAPTURE_CLASSES or "SCREEN SAVE" in description:
        return "a secondary capture (screenshots, not CT slices)"
    if "LOCALIZER" in series.image_type or re.search(r"\b(SCOUT|TOPOGRAM|SURVIEW|LOCALI[SZ]ER|SCANOGRAM)\b",
                                                     description):
        return "a localizer (scout/topogram)"
    angle = slice_normal_angle_deg(series.orientation)
    if angle is not None and angle > axial_tolerance_deg:
        plane = "sagittal" if series.orientation and abs(series.orientation[0]) < 0.5 and abs(
            series.orientation[3]) < 0.5 else "coronal or oblique"
        return f"not axial (slices {angle:.0f}° from axial, {plane})"
    if body_part(series) in NO_LUMBAR_PARTS:
        part = series.body_part.strip()
        return f"of the {part.lower()} (BodyPartExamined {part}), which holds no lumbar spine"
    if series.n_instances is not None and series.n_instances < 3:
        return f"only {series.n_instances} image(s)"
    extent = coverage_mm(series)
    if extent is not None and extent < min_coverage_mm:
        return (f"too short to hold L1–L4 ({series.n_instances} images × {extent / series.n_instances:g} mm = "
                f"{extent:.0f} mm; at least {min_coverage_mm:.0f} mm needed)")
    return ""


def preference_key(series: SeriesInfo) -> tuple:
    """Order of preference among acceptable series (larger is better); see the module docstring."""
    kernel, _ = classify_kernel(series.kernel)
    contrast, _ = contrast_status(series)
    thickness = round(series.slice_thickness, 2) if series.slice_thickness else math.inf
    return (not _is_derived(series), _holds_lumbar(series), _KERNEL_RANK[kernel], not contrast, -thickness,
            coverage_mm(series) or 0.0, series.series_number if series.series_number is not None else -1,
            series.series_uid)


def describe(series: SeriesInfo) -> str:
    """The facts the choice used, as one clause: ``axial, original, soft-tissue kernel B (Philips), no contrast
    agent recorded, 5 mm slices over 320 mm``."""
    angle = slice_normal_angle_deg(series.orientation)
    parts = ["axial" if angle is not None else "orientation not recorded",
             "derived" if _is_derived(series) else ("original" if series.image_type else "image type not recorded")]
    if series.body_part:
        parts.append(f"body part {series.body_part}")
    parts += [classify_kernel(series.kernel)[1], contrast_status(series)[1]]
    extent = coverage_mm(series)
    thickness = f"{series.slice_thickness:g} mm slices" if series.slice_thickness else "slice thickness not recorded"
    parts.append(thickness + (f" over {extent:.0f} mm" if extent is not None else ""))
    return ", ".join(parts)


def _why_not(series: SeriesInfo, best: SeriesInfo) -> str:
    """The first preference on which ``series`` loses to ``best``, as a clause."""
    if _is_derived(series) != _is_derived(best):
        return "derived/secondary images (a reformat) while an original series exists"
    if _holds_lumbar(series) != _holds_lumbar(best):
        mine = f"body part {series.body_part}" if series.body_part else "no body part recorded"
        return f"{mine}, while the chosen series is of the {best.body_part}, which holds the lumbar spine"
    kernel, kernel_text = classify_kernel(series.kernel)
    best_kernel, best_text = classify_kernel(best.kernel)
    if kernel != best_kernel:
        return f"{kernel_text}, while the chosen series has a {best_text}"
    contrast, contrast_text = contrast_status(series)
    if contrast != contrast_status(best)[0]:
        return f"{contrast_text}, while the chosen series has none"
    a, b = preference_key(series)[4], preference_key(best)[4]
    if a != b:
        mine = f"{series.slice_thickness:g} mm" if series.slice_thickness else "unknown"
        return f"thicker slices ({mine}) than the chosen series ({best.slice_thickness:g} mm)"
    if (coverage_mm(series) or 0) != (coverage_mm(best) or 0):
        return "shorter coverage than the chosen series"
    return "equal on every criterion; the chosen series has the later series number or larger UID"


@dataclass(frozen=True)
class SeriesChoice:
    """The series to measure (None when no series is acceptable), one sentence per series (in the order given),
    and one sentence summing the choice up."""

    chosen: SeriesInfo | None
    reasons: dict[str, str] = field(default_factory=dict)  # series UID -> sentence
    sentence: str = ""

    def reasons_list(self) -> list[str]:
        """The per-series sentences in order."""
        return list(self.reasons.values())


def choose_series(series_list: list[SeriesInfo], min_coverage_mm: float = MIN_COVERAGE_MM,
                  axial_tolerance_deg: float = AXIAL_TOLERANCE_DEG) -> SeriesChoice:
    """Pick the series of a study to measure (rules in the module docstring), saying for every series why it was
    chosen or passed over."""
    refused = {s.series_uid: refusal(s, min_coverage_mm, axial_tolerance_deg) for s in series_list}
    acceptable = [s for s in series_list if not refused[s.series_uid]]
    if not series_list:
        return SeriesChoice(None, {}, "no acceptable series: the study holds no series")
    if not acceptable:
        reasons = {s.series_uid: f"passed over {s.label()}: {refused[s.series_uid]}" for s in series_list}
        return SeriesChoice(None, reasons, "no acceptable series for a lumbar BMD measurement: "
                            + "; ".join(f"{s.label()} is {refused[s.series_uid]}" for s in series_list))
    best = max(acceptable, key=preference_key)
    reasons = {}
    for s in series_list:
        if s is best:
            reasons[s.series_uid] = f"chosen {s.label()}: {describe(s)}"
        elif refused[s.series_uid]:
            reasons[s.series_uid] = f"passed over {s.label()}: {refused[s.series_uid]}"
        else:
            reasons[s.series_uid] = f"passed over {s.label()}: {_why_not(s, best)}"
    caveats = []
    if classify_kernel(best.kernel)[0] == "sharp":
        caveats.append("no soft-tissue series in the study: a sharp kernel may bias the BMD")
    if contrast_status(best)[0]:
        caveats.append("no non-contrast series in the study: the BMD is measured on a contrast-enhanced series")
    sentence = reasons[best.series_uid] + ("; " + "; ".join(caveats) if caveats else "")
    reasons[best.series_uid] = sentence
    return SeriesChoice(best, reasons, sentence)
