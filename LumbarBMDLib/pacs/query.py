"""What to ask a PACS and what it answers, as plain data: :class:`StudyQuery`, :class:`StudyInfo`, :class:`SeriesInfo`.

The attribute conversion works on a ``pydicom`` :class:`~pydicom.dataset.Dataset`, which is what a DIMSE C-FIND
answers and what a DICOMweb (QIDO-RS / metadata) JSON object becomes with :func:`dataset_from_json`, so both
protocols give the same records.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field, fields, replace

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from LumbarBMDLib.errors import LumbarBMDError

_DATE = re.compile(r"^\d{8}$")
#: Study-level attributes asked for (besides the matching keys).
STUDY_RETURN_KEYS = ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime", "AccessionNumber",
                     "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries")
#: Series-level attributes asked for (a PACS may leave the image-level ones out: see ``IMAGE_LEVEL_KEYS``).
SERIES_RETURN_KEYS = ("SeriesInstanceUID", "Modality", "SeriesDescription", "SeriesNumber",
                      "NumberOfSeriesRelatedInstances", "BodyPartExamined")
#: Attributes that live in each image: when the series-level answer lacks them, one instance's metadata fills them.
IMAGE_LEVEL_KEYS = ("SliceThickness", "ConvolutionKernel", "ImageType", "ContrastBolusAgent", "BodyPartExamined",
                    "ImageOrientationPatient", "SOPClassUID", "SpacingBetweenSlices", "Manufacturer")


def check_date_range(text: str) -> str:
    """A DICOM date or date range: ``YYYYMMDD``, ``YYYYMMDD-YYYYMMDD``, ``YYYYMMDD-`` or ``-YYYYMMDD``; returned
    unchanged, or a sentence says what is wrong."""
    text = text.strip()
    if not text:
        return ""
    ends = text.split("-")
    good = (len(ends) == 1 and _DATE.match(ends[0])) or (
        len(ends) == 2 and any(ends) and all(not e or _DATE.match(e) for e in ends))
    if not good:
        raise LumbarBMDError(f"the study date '{text}' is not a date or a range: write YYYYMMDD, YYYYMMDD-YYYYMMDD, "
                             "YYYYMMDD- (from) or -YYYYMMDD (until), e.g. 20240101-20241231")
    if len(ends) == 2 and all(ends) and ends[0] > ends[1]:
        raise LumbarBMDError(f"the study date range '{text}' ends before it starts")
    return text


@dataclass(frozen=True)
class StudyQuery:
    """Which studies to look for. Empty fields match everything; at least one criterion besides the modality is
    required so that a typo never asks a PACS for all of its studies. ``patient_name`` may use ``*`` wildcards
    (``DOE^J*``). ``modality`` matches ModalitiesInStudy (CT by default)."""

    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    accession_number: str = ""
    study_instance_uid: str = ""
    modality: str = "CT"

    def __post_init__(self) -> None:
        object.__setattr__(self, "study_date", check_date_range(self.study_date))
        if not (self.patient_id or self.patient_name or self.study_date or self.accession_number
                or self.study_instance_uid):
            raise LumbarBMDError("a PACS query needs at least one of: patient id, patient name, study date (range), "
                                 "accession number, study instance UID")

    @classmethod
    def from_dict(cls, query: dict) -> StudyQuery:
        """From a dict with these field names, or the DICOM keywords (``PatientID``, ``PatientName``, ``StudyDate``,
        ``AccessionNumber``, ``StudyInstanceUID``, ``ModalitiesInStudy``); unknown keys are refused."""
        aliases = {"PatientID": "patient_id", "PatientName": "patient_name", "StudyDate": "study_date",
                   "AccessionNumber": "accession_number", "StudyInstanceUID": "study_instance_uid",
                   "ModalitiesInStudy": "modality", "Modality": "modality", "accession": "accession_number",
                   "study_uid": "study_instance_uid"}
        names = {f.name for f in fields(cls)}
        values = {}
        for key, value in query.items():
            name = aliases.get(key, key)
            if name not in names:
                raise LumbarBMDError(f"unknown PACS query field '{key}'; known: {', '.join(sorted(names))}")
            values[name] = "" if value is None else str(value)
        return cls(**values)

    def matching_keys(self) -> dict[str, str]:
        """The non-empty criteria as DICOM keywords (the same for QIDO-RS and C-FIND)."""
        keys = {"PatientID": self.patient_id, "PatientName": self.patient_name, "StudyDate": self.study_date,
                "AccessionNumber": self.accession_number, "StudyInstanceUID": self.study_instance_uid,
                "ModalitiesInStudy": self.modality}
        return {k: v for k, v in keys.items() if v}

    def as_dict(self) -> dict:
        """Plain data (for provenance)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


@dataclass(frozen=True)
class StudyInfo:
    """One study as the PACS describes it."""

    study_uid: str
    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    accession_number: str = ""
    description: str = ""
    modalities: tuple[str, ...] = ()


@dataclass(frozen=True)
class SeriesInfo:
    """One series with what :func:`~LumbarBMDLib.pacs.selection.choose_series` needs to judge it.

    ``None`` / empty means not recorded. ``orientation`` is ImageOrientationPatient of one instance (6 direction
    cosines). ``image_type`` holds the values of ImageType (``("ORIGINAL", "PRIMARY", "AXIAL")``).
    """

    study_uid: str
    series_uid: str
    modality: str = ""
    description: str = ""
    series_number: int | None = None
    n_instances: int | None = None
    slice_thickness: float | None = None
    spacing_between_slices: float | None = None
    kernel: str = ""
    image_type: tuple[str, ...] = ()
    contrast_agent: str = ""
    body_part: str = ""
    orientation: tuple[float, ...] | None = None
    sop_class_uid: str = ""
    manufacturer: str = ""
    details_from_instance: bool = False  # the image-level attributes were read from one instance
    extra: dict = field(default_factory=dict, compare=False)

    def label(self) -> str:
        """``series 3 'Abdomen 1.0 B30f' (CT, 312 images)``."""
        number = f"series {self.series_number} " if self.series_number is not None else "series "
        n = "? images" if self.n_instances is None else f"{self.n_instances} image{'s' * (self.n_instances != 1)}"
        return f"{number}'{self.description or self.series_uid}' ({self.modality or 'no modality'}, {n})"

    def needs_instance_details(self) -> bool:
        """True when the image-level attributes the choice needs are missing (the series-level answer lacked them)."""
        return not self.details_from_instance and (self.orientation is None or not self.image_type
                                                   or self.slice_thickness is None or self.n_instances is None)

    def as_dict(self) -> dict:
        """Plain data (for provenance and JSON)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["image_type"] = list(self.image_type)
        out["orientation"] = list(self.orientation) if self.orientation is not None else None
        return out


def dataset_from_json(obj: dict) -> Dataset:
    """A DICOM JSON object (QIDO-RS / WADO-RS metadata) as a pydicom Dataset (bulk data left out)."""
    return Dataset.from_json(obj, bulk_data_uri_handler=lambda *_: b"")


def text(ds: Dataset, keyword: str) -> str:
    """A single-valued attribute as stripped text ("" when absent or empty); a person name as its DICOM string."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """A multi-valued attribute's values as stripped upper-case text (ImageType, ModalitiesInStudy)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    items = value if isinstance(value, (list, tuple, MultiValue)) else str(value).split("\\")
    return tuple(str(v).strip().upper() for v in items if str(v).strip())


def number(ds: Dataset, keyword: str) -> float | None:
    """A numeric attribute (DS/IS) as a finite float, None when absent or not a number."""
    raw = text(ds, keyword).split("\\")[0]
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def study_from_dataset(ds: Dataset) -> StudyInfo:
    """A study-level answer (C-FIND identifier or QIDO-RS object) as :class:`StudyInfo`."""
    return StudyInfo(study_uid=text(ds, "StudyInstanceUID"), patient_id=text(ds, "PatientID"),
                     patient_name=text(ds, "PatientName"), study_date=text(ds, "StudyDate"),
                     accession_number=text(ds, "AccessionNumber"), description=text(ds, "StudyDescription"),
                     modalities=values(ds, "ModalitiesInStudy"))


def series_from_dataset(ds: Dataset, study_uid: str) -> SeriesInfo:
    """A series-level answer (C-FIND identifier or QIDO-RS object) as :class:`SeriesInfo`; image-level attributes
    are taken where the PACS included them."""
    n = number(ds, "NumberOfSeriesRelatedInstances")
    series_number = number(ds, "SeriesNumber")
    info = SeriesInfo(study_uid=text(ds, "StudyInstanceUID") or study_uid, series_uid=text(ds, "SeriesInstanceUID"),
                      modality=text(ds, "Modality").upper(), description=text(ds, "SeriesDescription"),
                      series_number=int(series_number) if series_number is not None else None,
                      n_instances=int(n) if n is not None else None)
    return with_instance_details(info, ds, from_instance=False)


def with_instance_details(info: SeriesInfo, ds: Dataset, from_instance: bool = True,
                          n_instances: int | None = None) -> SeriesInfo:
    """``info`` completed with the image-level attributes found in ``ds`` (one instance's metadata) and, when the
    series answer lacked it, the number of instances counted; attributes already known are kept."""
    thickness = number(ds, "SliceThickness")
    spacing = number(ds, "SpacingBetweenSlices")
    orientation = None
    raw = ds.get("ImageOrientationPatient")
    if raw is not None and raw != "":
        try:
            cosines = tuple(float(v) for v in (raw if not isinstance(raw, str) else raw.split("\\")))
        except (TypeError, ValueError):
            cosines = ()
        if len(cosines) == 6 and all(math.isfinite(c) for c in cosines):
            orientation = cosines
    return replace(
        info,
        n_instances=info.n_instances if info.n_instances is not None else n_instances,
        slice_thickness=info.slice_thickness if info.slice_thickness is not None else (
            thickness if thickness and thickness > 0 else None),
        spacing_between_slices=info.spacing_between_slices if info.spacing_between_slices is not None else (
            abs(spacing) if spacing else None),
        kernel=info.kernel or text(ds, "ConvolutionKernel"),
        image_type=info.image_type or values(ds, "ImageType"),
        contrast_agent=info.contrast_agent or text(ds, "ContrastBolusAgent"),
        body_part=info.body_part or text(ds, "BodyPartExamined").upper(),
        orientation=info.orientation if info.orientation is not None else orientation,
        sop_class_uid=info.sop_class_uid or text(ds, "SOPClassUID"),
        manufacturer=info.manufacturer or text(ds, "Manufacturer"),
        details_from_instance=info.details_from_instance or from_instance,
    )


def is_uid(text: str) -> bool:
    """True for a conformant DICOM UID: digits and dots, at most 64 characters, no empty component."""
    return 0 < len(text) <= 64 and all(part.isdigit() for part in text.split("."))


def folder_name(uid: str) -> str:
    """The file or folder name of a study, series or instance: its UID, or, for a non-conformant UID (letters,
    ``/``, ``..`` from a careless archive), ``uid-`` + the first 32 hex digits of its sha256 — never a path outside
    the folder it is made in."""
    if not uid:
        raise LumbarBMDError("the PACS gave a study, series or image without an Instance UID")
    return uid if is_uid(uid) else "uid-" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:32]
