"""The DICOM Segmentation (SEG) of a measured case: L1–L4 vertebral bodies and their trabecular ROIs.

One BINARY ``hd.seg.Segmentation`` on the source series' frames (each SEG frame derives from one source CT image and
references its SOP Instance), in the source's Patient and Study, as a new series. Segments, numbered 1 … N in this
order, only for what exists on the case:

1. ``"L1 vertebral body"`` … ``"L4 vertebral body"``: every level with pixels in the label image; category Anatomical
   Structure, type the vertebra (:mod:`~LumbarBMDLib.dicom.codes`); the fused sagittal label extruded across the
   8 mm slab the network segmented (:mod:`~LumbarBMDLib.dicom.masks`). Algorithm type AUTOMATIC, family Artificial
   Intelligence, name ``LumbarBMD``, version ``LumbarBMDLib.__version__``, parameters the segmentation and regression
   models' sha256; MANUAL when the labels were a person's (``CaseResult.segmentation is None``).
2. ``"L1 trabecular ROI"`` …: every level with a trabecular patch; category Tissue, type Bone, anatomic region the
   vertebra; AUTOMATIC, family Image Processing.

Only the source frames that a segment can reach are passed to highdicom (their SOP Instances are the ones
referenced), and frames without any pixel of a segment are omitted (``omit_empty_frames``). BINARY frames are stored
uncompressed, 1 bit a pixel (highdicom allows only JPEG 2000 Lossless as compression for BINARY, which needs an extra
codec): measured 270 kB for the small phantom (192², 2.5 mm slices), 4.5 MB for a full one (512², 1 mm slices, 310
slices; each non-empty frame of a segment is 32 kB). Building it holds the masks of every reached frame and segment
(bool, ``frames × rows × columns × segments``: 287 MB for the full case) and highdicom's overlap check about as much
again (measured +0.67 GB peak, 3–4 s on this 2-core machine). Colours: the levels' colours of DESIGN.md; the ROIs in
white.
"""

from __future__ import annotations

from dataclasses import dataclass

from LumbarBMDLib import __version__
from LumbarBMDLib.dicom import codes
from LumbarBMDLib.dicom.masks import LevelMasks
from LumbarBMDLib.dicom.source import SourceSeries

LEVEL_RGB = {"L1": (230, 25, 75), "L2": (60, 180, 75), "L3": (0, 130, 200), "L4": (245, 130, 48)}
ROI_RGB = (255, 255, 255)
SEG_SERIES_NUMBER = 901
MANUFACTURER = "LumbarBMD"


@dataclass(frozen=True)
class SegmentInfo:
    """One segment of the SEG: its number, label, level, kind (``"body"`` / ``"roi"``) and tracking UID."""

    number: int
    label: str
    level: str
    kind: str
    tracking_uid: str


def body_label(level: str) -> str:
    return f"{level} vertebral body"


def roi_label(level: str) -> str:
    return f"{level} trabecular ROI"


def algorithm_identification(models: dict | None, family):
    """``hd.AlgorithmIdentificationSequence``: LumbarBMD, its version, the models' sha256 as parameters."""
    import highdicom as hd

    params = {f"{role}_model_sha256": str(sha) for role, sha in (models or {}).items() if sha}
    return hd.AlgorithmIdentificationSequence(name="LumbarBMD", family=family, version=__version__,
                                              source="LumbarBMD", parameters=params or None)


def segment_plan(masks: LevelMasks) -> list[SegmentInfo]:
    """The segments to write, numbered 1 … N in the order of ``masks.segments``: bodies (L1 … L4 present) then ROIs
    (levels with a patch)."""
    import highdicom as hd

    return [SegmentInfo(n, body_label(level) if kind == "body" else roi_label(level), level, kind, str(hd.UID()))
            for n, (level, kind) in enumerate(masks.segments, start=1)]


def _description(info: SegmentInfo, models: dict | None, manual_bodies: bool):
    import highdicom as hd

    if info.kind == "body":
        manual = manual_bodies
        kwargs = dict(segmented_property_category=codes.ANATOMICAL_STRUCTURE,
                      segmented_property_type=codes.VERTEBRA[info.level],
                      algorithm_type="MANUAL" if manual else "AUTOMATIC",
                      algorithm_identification=None if manual else algorithm_identification(
                          models, codes.ARTIFICIAL_INTELLIGENCE))
        rgb = LEVEL_RGB[info.level]
    else:
        kwargs = dict(segmented_property_category=codes.TISSUE, segmented_property_type=codes.BONE,
                      algorithm_type="AUTOMATIC",
                      algorithm_identification=algorithm_identification(models, codes.IMAGE_PROCESSING),
                      anatomic_regions=[codes.VERTEBRA[info.level]])
        rgb = ROI_RGB
    return hd.seg.SegmentDescription(segment_number=info.number, segment_label=info.label,
                                     tracking_uid=info.tracking_uid, tracking_id=info.label,
                                     display_color=hd.color.CIELabColor.from_rgb(*rgb), **kwargs)


def build_seg(source: SourceSeries, masks: LevelMasks, models: dict | None, manual_bodies: bool = False):
    """The SEG dataset (``hd.seg.Segmentation``) and its segment plan.

    Args:
        source: the source series (frames in the volume's order).
        masks: the masks on its frames (:func:`~LumbarBMDLib.dicom.masks.level_masks`).
        models: ``results["models"]`` (``{"segmentation": sha256, "regression": sha256}``).
        manual_bodies: the body labels were drawn by a person (algorithm type MANUAL).

    Returns:
        ``(segmentation, plan)``; segmentation is None when no segment has a pixel (nothing to write).
    """
    import highdicom as hd

    plan = segment_plan(masks)
    if not plan or masks.frames.size == 0:
        return None, plan
    frames = [int(k) for k in masks.frames]
    seg = hd.seg.Segmentation(
        source_images=[source.datasets[k] for k in frames],
        pixel_array=masks.array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(s, models, manual_bodies) for s in plan],
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="LumbarBMD",
        software_versions=__version__,
        device_serial_number="none",
        content_label="LUMBARBMD",
        content_description="L1-L4 vertebral bodies (8 mm sagittal slab), trabecular ROIs",
        series_description="LumbarBMD L1-L4 segmentation",
        omit_empty_frames=True,
    )
    return seg, plan
