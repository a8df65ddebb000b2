"""The DICOM SR of a measured case: a Comprehensive 3D SR holding a TID 1500 Measurement Report of the BMDs.

Content tree (``hd.sr.MeasurementReport``, title Imaging Measurement Report, procedure Computed tomography):

* observation context: observer = device ``LumbarBMD`` (a UID fixed per LumbarBMD version, manufacturer
  LumbarBMD, model ``LumbarBMD <version>``);
* per measured level, one **volumetric ROI measurement group** (TID 1411): tracking identifier
  ``"L1 trabecular ROI"`` with the SEG segment's tracking UID; the ROI = the SEG's trabecular-ROI segment
  (``ReferencedSegment``, with the source images it was derived from); finding site = the vertebra (SCT); finding type
  Bone; measurements: the BMD (mg/cm3, the value of results.json, which is rounded to 0.1 mg/cm³), with the algorithm
  (LumbarBMD, version, the models' sha256 as parameters), the segmentation confidence and the level identification
  confidence (results.json, no units) when there are; qualitative evaluation: the category (Osteoporosis /
  Osteopenia / Normal, SCT);
* one **measurement group** (TID 1501) for the patient: tracking identifier ``"patient mean L1-L4"``, finding site
  Lumbar spine, the mean BMD (derivation Mean) and its category;
* a **Qualitative Evaluations** container (TID 1500's last rows) of TEXT items: the calibration used (source phantom /
  internal / nominal and its sentence), the contrast phase (phase, confidence, evidence), one item per QC flag
  (``code: message``), one per level not measured (``L3: <reason>``: no number is reported for it), and the
  algorithm (name, version, model sha256s).

Codes: :mod:`~LumbarBMDLib.dicom.codes`. The SR is in the source's Patient and Study, a new series; its evidence is the
source series and the SEG.
"""

from __future__ import annotations

from LumbarBMDLib import __version__
from LumbarBMDLib.dicom import codes
from LumbarBMDLib.dicom.seg import SegmentInfo
from LumbarBMDLib.dicom.source import SourceSeries

SR_SERIES_NUMBER = 902
MEAN_TRACKING_ID = "patient mean L1-L4"


def device_uid() -> str:
    """The observer device's UID: the same for every report of one LumbarBMD version."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["LumbarBMD device", __version__]))


def _algorithm(models: dict | None):
    import highdicom as hd

    params = [f"{role} model sha256 {sha}" for role, sha in (models or {}).items() if sha]
    return hd.sr.AlgorithmIdentification(name="LumbarBMD", version=__version__, parameters=params or None)


def _observation_context():
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcodes

    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=device_uid(), name="LumbarBMD",
                                                       manufacturer_name="LumbarBMD",
                                                       model_name=f"LumbarBMD {__version__}")
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=dcodes.cid270.Device, observer_identifying_attributes=device))


def _category(name: str | None):
    import highdicom as hd

    if not name or name not in codes.CATEGORY_VALUE:
        return []
    return [hd.sr.QualitativeEvaluation(codes.BMD_CATEGORY, codes.CATEGORY_VALUE[name])]


def level_group(entry: dict, info: SegmentInfo, seg, models: dict | None):
    """The TID 1411 group of one measured level (``entry``: its results.json ``vertebrae`` item)."""
    import highdicom as hd

    site = [hd.sr.FindingSite(codes.VERTEBRA[entry["level"]])]
    measurements = [hd.sr.Measurement(name=codes.BMD, value=float(entry["bmd_mg_cm3"]), unit=codes.MG_PER_CM3,
                                      algorithm_id=_algorithm(models))]
    if entry.get("confidence") is not None:
        measurements.append(hd.sr.Measurement(name=codes.SEGMENTATION_CONFIDENCE, value=float(entry["confidence"]),
                                              unit=codes.NO_UNITS, algorithm_id=_algorithm(models)))
    identification = (entry.get("identification") or {}).get("confidence")
    if identification is not None:
        measurements.append(hd.sr.Measurement(name=codes.IDENTIFICATION_CONFIDENCE, value=float(identification),
                                              unit=codes.NO_UNITS, algorithm_id=_algorithm(models)))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=info.tracking_uid, identifier=info.label),
        referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=info.number),
        finding_type=codes.BONE, finding_sites=site, measurements=measurements,
        qualitative_evaluations=_category(entry.get("category")))


def mean_group(results: dict, models: dict | None):
    """The TID 1501 group of the patient's mean BMD and category; None when no level was measured."""
    import highdicom as hd

    mean = results.get("mean_bmd_mg_cm3")
    if mean is None:
        return None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=MEAN_TRACKING_ID),
        finding_sites=[hd.sr.FindingSite(codes.LUMBAR_SPINE)],
        measurements=[hd.sr.Measurement(name=codes.BMD, value=float(mean), unit=codes.MG_PER_CM3,
                                        derivation=codes.MEAN, algorithm_id=_algorithm(models))],
        qualitative_evaluations=_category(results.get("category")))


def calibration_text(results: dict) -> str:
    """``"internal: Calibration: internal (reference tissues), HU = …"``; ``"none"`` when nothing calibrated."""
    cal = results.get("calibration")
    if not cal:
        return "none: no calibration (nominal HU)"
    return f"{cal.get('source', 'unknown')}: {cal.get('sentence') or ''}".strip().rstrip(":")


def contrast_phase_text(results: dict) -> str:
    """``"unenhanced (confidence 0.9): <evidence>"``; ``"not assessed"`` without a scanner assessment."""
    phase = ((results.get("scanner") or {}).get("contrast_phase")) or {}
    if not phase:
        return "not assessed"
    text = str(phase.get("phase"))
    if phase.get("confidence") is not None:
        text += f" (confidence {phase['confidence']})"
    if phase.get("evidence"):
        text += f": {phase['evidence']}"
    return text


def algorithm_text(results: dict) -> str:
    models = results.get("models") or {}
    shas = "; ".join(f"{role} model sha256 {sha}" for role, sha in models.items() if sha)
    return f"LumbarBMD {results.get('version', __version__)}" + (f"; {shas}" if shas else "")


def text_items(results: dict) -> list[tuple[object, str]]:
    """``[(concept, text), …]`` of the Qualitative Evaluations container (see the module docstring)."""
    items = [(codes.CALIBRATION, calibration_text(results)), (codes.CONTRAST_PHASE, contrast_phase_text(results))]
    for flag in results.get("qc_flags") or []:
        items.append((codes.QC_FLAG, f"{flag.get('code')}: {flag.get('message')}"))
    for v in results.get("vertebrae") or []:
        if not v.get("found"):
            items.append((codes.LEVEL_NOT_MEASURED, f"{v['level']}: {v.get('reason') or 'not measured'}"))
    items.append((codes.ALGORITHM, algorithm_text(results)))
    return items


def _qualitative_container(results: dict):
    import highdicom as hd

    container = hd.sr.ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=name, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for name, text in text_items(results)])
    return container


def build_sr(source: SourceSeries, seg, plan: list[SegmentInfo], results: dict):
    """The Comprehensive 3D SR (TID 1500) of a case.

    Args:
        source: the source series (evidence; Patient and Study come from it).
        seg: the case's SEG (``hd.seg.Segmentation``; None when it has no segment: then no level was measured).
        plan: the SEG's segments (:func:`~LumbarBMDLib.dicom.seg.segment_plan`).
        results: the case's results.json object (every number in the SR is taken from it).
    """
    import highdicom as hd

    models = results.get("models") or {}
    rois = {s.level: s for s in plan if s.kind == "roi"}
    groups = []
    for entry in results.get("vertebrae") or []:
        if entry.get("found") and entry.get("bmd_mg_cm3") is not None and entry["level"] in rois and seg is not None:
            groups.append(level_group(entry, rois[entry["level"]], seg, models))
    mean = mean_group(results, models)
    if mean is not None:
        groups.append(mean)
    report = hd.sr.MeasurementReport(observation_context=_observation_context(),
                                     procedure_reported=codes.COMPUTED_TOMOGRAPHY,
                                     imaging_measurements=groups or None)
    report[0].ContentSequence.append(_qualitative_container(results))
    evidence = [*source.datasets] + ([seg] if seg is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="LumbarBMD", is_complete=True,
        series_description="LumbarBMD L1-L4 BMD report")
    sr.CodingSchemeIdentificationSequence = [_local_scheme()]
    return sr


def _local_scheme():
    """The Coding Scheme Identification item that declares the local codes (``99LUMBARBMD``)."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = codes.LOCAL_SCHEME
    item.CodingSchemeName = "LumbarBMD local codes"
    item.CodingSchemeResponsibleOrganization = "LumbarBMD"
    return item
