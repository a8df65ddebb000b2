"""The whole method on one CT: canal → sagittal candidates → R2U-Net → localisation → trabecular patches →
DenseNet-121 → BMD per level, the patient's mean and category (DESIGN.md "Data flow of one case").

:func:`measure` runs it on a loaded :class:`~LumbarBMDLib.volume.CTVolume`; :func:`measure_from_labels` re-enters
at the label image (after a radiologist edited the segments). :func:`results_json` gives the ``results.json``
object of the DESIGN.md contract.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from LumbarBMDLib import __version__
from LumbarBMDLib._compat import zip_strict
from LumbarBMDLib.annotation import Annotation, prepare
from LumbarBMDLib.calibration import ScannerCalibration
from LumbarBMDLib.internal_calibration.assess import AppliedCalibration, ScannerAssessment, assess_scanner
from LumbarBMDLib.localisation import LevelLocation, level_centres, locate_in_ct
from LumbarBMDLib.patches import TrabecularPatch, trabecular_patches
from LumbarBMDLib.regression import LevelBMD, RegressionModel, patient_bmd, predict_bmd
from LumbarBMDLib.sagittal import SagittalGeometry
from LumbarBMDLib.segmentation import SegmentationModel, segment
from LumbarBMDLib.segmentation_post import SegmentationResult
from LumbarBMDLib.spine.labelling import AnatomicalSegmentation, anatomical_labels, edited_levels
from LumbarBMDLib.spine.numbering import QCFlag
from LumbarBMDLib.volume import CTVolume


@dataclass
class CaseResult:
    """Everything measured on one case.

    Attributes:
        annotation: canal detection and the sagittal images.
        segmentation: the fused, post-processed L1–L4 segmentation (None when labels were given).
        labels: uint8 ``(512, 512)`` L1–L4 label image used for localisation, on ``label_geometry``.
        label_geometry: its single-slice sagittal grid.
        locations / patches / levels: per level L1..L4, in order.
        mean_bmd_mg_cm3 / category: the patient's value (mean of the measured levels); NaN / "" when none.
        hu_transform: the (a, b) applied to the HU before the patches (calibration onto the regression model's
            reference scale and contrast correction, :attr:`applied`).
        calibration: the phantom-scan calibration given (``--calibration``), if any.
        timings_s: seconds per stage.
        numbering_anchor: what fixes the level numbering: "T12", "sacrum" or "T12 and sacrum" seen on the CT, None
            when neither is (then no level is measured), "edited labels" when a person drew the labels.
        anatomical: the network's segmentation renumbered by the chain (None when labels were given).
        qc_flags: quality-control flags of the case (transitional anatomy, uncertain identification, …).
        scanner: reference tissues, contrast phase and internal calibration
            (:mod:`LumbarBMDLib.internal_calibration.assess`); None when not assessed.
        applied: the calibration and contrast correction that made :attr:`hu_transform` (None: not assessed, the
            phantom calibration or identity only).
    """

    annotation: Annotation
    segmentation: SegmentationResult | None
    labels: np.ndarray
    label_geometry: SagittalGeometry
    locations: list[LevelLocation]
    patches: list[TrabecularPatch]
    levels: list[LevelBMD]
    mean_bmd_mg_cm3: float
    category: str
    hu_transform: tuple[float, float] = (1.0, 0.0)
    calibration: ScannerCalibration | None = None
    timings_s: dict = field(default_factory=dict)
    numbering_anchor: str | None = "edited labels"
    anatomical: AnatomicalSegmentation | None = None
    qc_flags: list[QCFlag] = field(default_factory=list)
    scanner: ScannerAssessment | None = None
    applied: AppliedCalibration | None = None

    @property
    def spine(self):
        """The vertebral-body chain and its numbering (:class:`~LumbarBMDLib.spine.SpineIdentification`)."""
        return self.annotation.spine

    @property
    def status(self) -> str:
        """"ok" (four levels measured), "partial" (one to three) or "failed" (none)."""
        n = sum(lv.found for lv in self.levels)
        return "ok" if n == 4 else ("partial" if n else "failed")


def reference_scale(bmd_model: RegressionModel) -> ScannerCalibration | None:
    """The regression model's reference scale (its training scanner's K2HPO4 line), None when its card has none."""
    reference = bmd_model.card.get("reference_calibration")
    return ScannerCalibration.from_json(reference) if reference else None


def hu_transform_for(bmd_model: RegressionModel, calibration: ScannerCalibration | None,
                     scanner: ScannerAssessment | None = None) -> tuple[tuple[float, float], AppliedCalibration | None]:
    """``((a, b), applied)``: the map of this case's HU onto the regression model's reference scale.

    With the case's ``scanner`` assessment: its chosen calibration (phantom scan, internal or nominal) and contrast
    correction (:meth:`ScannerAssessment.applied`). Without it: the phantom-scan ``calibration`` alone, identity
    without one (or when the model has no reference scale)."""
    reference = reference_scale(bmd_model)
    if scanner is not None:
        applied = scanner.applied(reference)
        return applied.hu_transform, applied
    if calibration is None or reference is None:
        return (1.0, 0.0), None
    return calibration.to_reference(reference), None


def regress_locations(annotation: Annotation, locations: list[LevelLocation], bmd_model: RegressionModel,
                      hu_transform: tuple[float, float]) -> tuple[list[TrabecularPatch], list[LevelBMD], dict]:
    """Patches and regression of located levels (the part that re-runs after an edit); timings in seconds."""
    t = time.perf_counter()
    patches = trabecular_patches(annotation.volume, locations, hu_transform)
    t_patch = time.perf_counter()
    levels = predict_bmd(bmd_model, patches)
    return patches, levels, {"patches": t_patch - t, "regress": time.perf_counter() - t_patch}


#: Progress reported by :func:`measure`: (fraction of the work done before the stage, what the stage does).
#: The fractions are the stages' shares of the CPU time measured by ``benchmarks/bench_run.py``.
MEASURE_STAGES = {
    "canal": (0.0, "finding the spinal canal and reslicing sagittally"),
    "segment": (0.3, "segmenting L1–L4 (R2U-Net)"),
    "regress": (0.9, "cutting trabecular patches and regressing BMD (DenseNet-121)"),
}

#: ``progress(fraction, message)``: called before each stage; it may raise (e.g. to cancel) and the error propagates.
ProgressCallback = Callable[[float, str], None]


def _report(progress: ProgressCallback | None, stage: str) -> None:
    if progress is not None:
        progress(*MEASURE_STAGES[stage])


def measure(volume: CTVolume, seg_model: SegmentationModel, bmd_model: RegressionModel,
            calibration: ScannerCalibration | None = None, progress: ProgressCallback | None = None) -> CaseResult:
    """Run the whole method on one axial LPS CT (raises LumbarBMDError when no canal is found).

    The levels are identified on the CT (:func:`~LumbarBMDLib.spine.identify_spine`): when they cannot be numbered
    (no anchor in view, no lumbar vertebra in view, an anatomy that contradicts itself) no level is measured and each
    says why. The network's segments are renumbered by the chain body they lie on
    (:func:`~LumbarBMDLib.spine.labelling.anatomical_labels`). ``progress`` is called before each stage of
    :data:`MEASURE_STAGES` (a GUI shows it and cancels by raising from it).
    """
    t0 = time.perf_counter()
    _report(progress, "canal")
    annotation = prepare(volume)
    t1 = time.perf_counter()
    _report(progress, "segment")
    seg = segment(seg_model, annotation.images, annotation.canal.mean_centre_lps, lumbar_rows(annotation))
    t2 = time.perf_counter()
    _report(progress, "regress")
    anatomical = anatomical_labels(seg.probabilities, seg.geometry, annotation.spine, annotation.images.annotation_hu)
    locations = _locations(anatomical, annotation, annotation.volume)
    scanner = assess_scanner(annotation.volume, identified_body_centres(annotation.spine), calibration)
    transform, applied = hu_transform_for(bmd_model, calibration, scanner)
    patches, levels, times = regress_locations(annotation, locations, bmd_model, transform)
    mean, category = patient_bmd(levels)
    timings = {"canal": annotation.timings_s["canal"], "spine": annotation.timings_s["spine"],
               "sagittal": annotation.timings_s["sagittal"], "segment": t2 - t1, **times,
               "scanner": scanner.seconds, "total": time.perf_counter() - t0}
    return CaseResult(annotation, seg, anatomical.labels, anatomical.geometry, locations, patches, levels, mean,
                      category, transform, calibration, timings, annotation.spine.anchor, anatomical,
                      case_flags(annotation.spine, anatomical, annotation.volume.metadata) + scanner.qc_flags(),
                      scanner, applied)


def identified_body_centres(ident) -> np.ndarray | None:
    """``(m, 3)`` LPS centres (mm) of the chain bodies identified as L1–L4; None when none is identified."""
    if ident is None:
        return None
    centres = [ident.chain.bodies[lv.body].centre_lps for lv in ident.levels if lv.identified and lv.body is not None]
    return np.array(centres, dtype=float) if centres else None


#: The network runs on the rows of the identified L1–L4 and this margin above and below (its receptive field near
#: the bodies is then the same as on the whole image).
NETWORK_ROW_MARGIN_MM = 48.0


def lumbar_rows(annotation: Annotation) -> tuple[int, int] | None:
    """The sagittal image rows (first, last + 1) from the top of L1's zone to the bottom of L4's, ± the margin;
    None (every row) when no level is identified."""
    spine = annotation.spine
    if spine is None or not spine.numbered:
        return None
    bodies = [spine.chain.bodies[lv.body] for lv in spine.levels if lv.identified and lv.body is not None]
    if not bodies:
        return None
    geom = annotation.images.candidate_geometry
    frame = spine.chain.frame
    pts = [frame.points(frame.plane_at(s_), b.column_a_mm, 0.0) for b in bodies for s_ in (b.zone_top_s_mm,
                                                                                           b.zone_bottom_s_mm)]
    rows = geom.lps_to_pixel(np.array(pts))[:, 1]
    margin = NETWORK_ROW_MARGIN_MM / geom.pixel_mm
    return int(np.floor(rows.min() - margin)), int(np.ceil(rows.max() + margin)) + 1


def _locations(anatomical: AnatomicalSegmentation, annotation: Annotation, volume: CTVolume) -> list[LevelLocation]:
    """Per level, the centre of its anatomical segment in the CT; a level that is missing, or identified but only
    partly in view, is not measured and says why."""
    centres = level_centres(anatomical.labels, anatomical.geometry)
    ident = annotation.spine
    out = []
    for c, lv, idv in zip_strict(centres, anatomical.levels, ident.levels):
        if not lv.found:
            out.append(LevelLocation(c.level, False, lv.reason or c.reason, c.centre_lps, c.area_mm2))
        elif not idv.measurable:
            out.append(LevelLocation(c.level, False, idv.reason, c.centre_lps, c.area_mm2))
        else:
            out.append(c)
    return locate_in_ct(out, volume)


def case_flags(ident, anatomical: AnatomicalSegmentation | None, metadata: dict | None = None) -> list[QCFlag]:
    """The case's QC flags: the numbering's, plus classical outlines, corrected network numbering, dropped
    segments, and an oblique CT resampled onto an axial grid (``metadata`` of the volume measured)."""
    flags = list(ident.flags) if ident is not None else []
    meta = metadata or {}
    if meta.get("resampled_axial"):
        tilt = meta.get("obliquity_deg")
        flags.append(QCFlag("oblique_resampled", "the CT's slices are oblique" + (f" by {tilt:.0f}°" if tilt else "")
                            + "; it was resampled onto an axial grid (linear interpolation), which smooths the "
                            "trabecular bone and can shift BMD by a few mg/cm³: compare with an axial "
                            "reconstruction if one exists"))
    if anatomical is None:
        return flags
    for lv in anatomical.levels:
        if lv.found and lv.source == "classical outline":
            flags.append(QCFlag("classical_outline", f"{lv.level}: the network did not segment this vertebra; it was "
                                "outlined from the anatomy (check the outline)"))
        if lv.found and lv.network_level and lv.network_level != lv.level:
            flags.append(QCFlag("network_renumbered", f"{lv.level}: the network had labelled this vertebra "
                                f"{lv.network_level}; it is numbered by the anatomy"))
    for sentence in anatomical.dropped:
        flags.append(QCFlag("segment_dropped", sentence))
    return flags


def measure_from_labels(annotation: Annotation, labels: np.ndarray, geometry: SagittalGeometry,
                        bmd_model: RegressionModel, calibration: ScannerCalibration | None = None,
                        scanner: ScannerAssessment | None = None, assess: bool = True) -> CaseResult:
    """Re-run localisation, patches and regression on edited labels (the Slicer correction loop).

    ``scanner``: the case's scanner assessment from :func:`measure` (it does not depend on the labels), carried over;
    without one it is made here (a scene reloaded in Slicer keeps the labels, not the assessment), unless ``assess``
    is False (then only ``calibration`` maps the HU, identity without it: for comparisons).

    The person's labels are measured as drawn; they are checked against the vertebral chain: two levels drawn on one
    vertebra are not measured, and a level drawn on a vertebra that the anatomy numbers differently is flagged.
    """
    if scanner is None and assess:
        scanner = assess_scanner(annotation.volume, identified_body_centres(annotation.spine), calibration)
    elif scanner is not None:
        scanner = scanner.with_phantom(calibration)  # the calibration given now wins (or is withdrawn)
    transform, applied = hu_transform_for(bmd_model, calibration, scanner)
    labels = np.asarray(labels, np.uint8)
    centres = level_centres(labels, geometry)
    checked, flags = edited_levels(labels, geometry, annotation.spine, centres)
    locations = locate_in_ct(checked, annotation.volume)
    patches, levels, times = regress_locations(annotation, locations, bmd_model, transform)
    mean, category = patient_bmd(levels)
    flags += scanner.qc_flags() if scanner is not None else []
    return CaseResult(annotation, None, labels, geometry, locations, patches, levels, mean,
                      category, transform, calibration, times, qc_flags=flags, scanner=scanner, applied=applied)


def _calibration_json(result: CaseResult) -> dict | None:
    """results.json ``calibration``: what mapped the HU onto the model's reference scale (None: nothing did)."""
    if result.applied is not None:
        return {**result.applied.as_json(), "phantom_scan": None if result.calibration is None else {
            "slope": result.calibration.slope, "intercept": result.calibration.intercept}}
    if result.calibration is None:
        return None
    return {"source": "phantom", "slope": result.calibration.slope, "intercept": result.calibration.intercept,
            "hu_transform": [round(v, 5) for v in result.hu_transform]}


def failure_message(levels: list[LevelBMD], refusal: str | None = None) -> str:
    """Why no level was measured: the numbering's refusal when there is one, else each distinct reason once."""
    if refusal:
        return refusal
    reasons: dict[str, list[str]] = {}
    for lv in levels:
        reasons.setdefault(lv.reason, []).append(lv.level)
    if len(reasons) == 1:
        return "no level could be measured: " + next(iter(reasons)).removeprefix("not found: ")
    return "no level could be measured: " + "; ".join(f"{', '.join(v)}: {k}" for k, v in reasons.items())


def _identification(result: CaseResult, level: str, seg) -> dict:
    """How a level was identified: by anatomy (anchor, count, confidence) and where its outline came from."""
    if result.segmentation is None:  # a person's labels
        return {"anchor": "edited labels", "count": None, "confidence": None, "source": "edited labels"}
    out = result.spine.level(level).as_json() if result.spine is not None else {}
    out["source"] = seg.source if seg is not None and seg.found else None
    out["network_level"] = seg.network_level if seg is not None and seg.found else None
    return out


def _r(v, nd=3):
    return None if v is None else [round(float(x), nd) for x in v]


def results_json(result: CaseResult, source: str, seg_model: SegmentationModel | None,
                 bmd_model: RegressionModel, timings: dict | None = None) -> dict:
    """The ``results.json`` object (DESIGN.md contract) of a measured case."""
    anat = {a.level: a for a in result.anatomical.levels} if result.anatomical else {}
    ident = result.spine
    vertebrae = []
    for loc, patch, lv in zip_strict(result.locations, result.patches, result.levels):
        seg = anat.get(lv.level)
        entry = {"level": lv.level, "found": bool(lv.found),
                 "bmd_mg_cm3": round(lv.bmd_mg_cm3, 1) if lv.found else None,
                 "category": lv.category or None,
                 "centre_lps": _r(loc.centre_lps),
                 "confidence": round(float(seg.confidence), 3) if seg is not None and seg.found and seg.confidence
                 else None,
                 "patch_centre_lps": _r(patch.centre_lps) if patch.found else None,
                 "patch_mean_hu": round(patch.mean_hu, 1) if patch.found else None,
                 "identification": _identification(result, lv.level, seg)}
        if not lv.found:
            entry["reason"] = lv.reason
        vertebrae.append(entry)
    canal = result.annotation.canal
    status = result.status
    refusal = ident.refusal if ident is not None and result.segmentation is not None else None
    return {
        "input": source,
        "status": status,
        "error": None if status != "failed" else failure_message(result.levels, refusal),
        "vertebrae": vertebrae,
        "mean_bmd_mg_cm3": round(result.mean_bmd_mg_cm3, 1) if np.isfinite(result.mean_bmd_mg_cm3) else None,
        "category": result.category or None,
        "level_numbering_anchor": result.numbering_anchor,
        "qc_flags": [f.as_json() for f in result.qc_flags],
        "spine": ident.as_json() if ident is not None else None,
        "canal": {"mean_centre_lps": _r(canal.mean_centre_lps),
                  "sagittal_x_lps": round(result.label_geometry.sagittal_x_lps, 3),
                  "slices_found": len(canal.slice_indices),
                  "slices_enclosed_by_bone": int(np.sum(canal.enclosed))},
        "calibration": _calibration_json(result),
        "scanner": None if result.scanner is None else result.scanner.as_json(),
        "timings_s": {k: round(v, 3) for k, v in {**result.timings_s, **(timings or {})}.items()},
        "models": {"segmentation": seg_model.sha256 if seg_model else None, "regression": bmd_model.sha256},
        "models_verified": {"segmentation": getattr(seg_model, "verified", True) if seg_model else None,
                            "regression": getattr(bmd_model, "verified", True)},
        "version": __version__,
    }
