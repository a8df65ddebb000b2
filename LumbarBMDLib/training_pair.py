"""Writing an annotator's training pair into a dataset folder that ``train-seg`` and ``train-bmd`` read.

A dataset is a folder of case folders (README "Training data")::

    DATASET/
      bmd_reference.csv                  case,level,bmd_mg_cm3  (QCT reference values, read by train-bmd)
      <case>/annotation_image.nii.gz     float32 HU, the 20-slice mean sagittal image, 512 × 512 × 1, 0.8 mm
      <case>/annotation_labels.nii.gz    uint8, 0 background, 1–4 = L1–L4, on the same grid
      <case>/annotation.json             metadata: who/when/what (see :func:`pair_metadata`)
      <case>/ct.nii.gz                   int16 HU, the CT (only with QCT reference values: train-bmd cuts its
                                         trabecular patches from the CT)

Each case folder is written atomically (complete or absent); ``bmd_reference.csv`` is rewritten atomically with
this case's rows replaced. The Slicer module's "Export training pair" calls :func:`write_training_pair`.
"""

from __future__ import annotations

import csv
import datetime
import json
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LumbarBMDLib import __version__
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.sagittal import SAGITTAL_PIXEL_MM, SAGITTAL_SIZE
from LumbarBMDLib.volume import CTVolume, atomic_folder, write_csv, write_image, write_volume

LEVEL_NAMES = ("L1", "L2", "L3", "L4")
IMAGE_FILE = "annotation_image.nii.gz"
LABEL_FILE = "annotation_labels.nii.gz"
METADATA_FILE = "annotation.json"
CT_FILE = "ct.nii.gz"
REFERENCE_FILE = "bmd_reference.csv"
REFERENCE_COLUMNS = ["case", "level", "bmd_mg_cm3"]
#: Plausible range of a QCT trabecular BMD (mg/cm³): outside it the value is a typing error.
REFERENCE_RANGE = (1.0, 400.0)
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def check_case_id(case_id: str) -> str:
    """The case id as a safe folder name (letters, digits, ``_ . -``; not starting with a dot), else an error."""
    case_id = (case_id or "").strip()
    if not _CASE_ID.match(case_id):
        raise LumbarBMDError(
            f"case id {case_id!r} cannot be a folder name: use letters, digits, '_', '.' and '-' only "
            "(no spaces or slashes), starting with a letter or digit"
        )
    return case_id


def check_pair(image: sitk.Image, labels: sitk.Image) -> np.ndarray:
    """Check an annotation image and its label image; return the labels as uint8 ``(512, 512)``.

    Both must be one 512 × 512 sagittal slice with 0.8 mm pixels (what ``train-seg`` reads), on the same grid;
    labels 0–4, at least one level drawn.
    """
    size = image.GetSize()
    if size[:2] != (SAGITTAL_SIZE, SAGITTAL_SIZE) or (len(size) == 3 and size[2] != 1):
        raise LumbarBMDError(
            f"the annotation image is {' × '.join(map(str, size))} pixels, not one {SAGITTAL_SIZE} × {SAGITTAL_SIZE} "
            "sagittal slice: create it with 'Create annotation image' (or lumbarbmd annotate)"
        )
    if not np.allclose(image.GetSpacing()[:2], (SAGITTAL_PIXEL_MM, SAGITTAL_PIXEL_MM), atol=1e-3):
        raise LumbarBMDError(
            f"the annotation image's pixels are {image.GetSpacing()[:2]} mm, not {SAGITTAL_PIXEL_MM} mm"
        )
    same = (labels.GetSize() == size and np.allclose(labels.GetSpacing(), image.GetSpacing(), atol=1e-4)
            and np.allclose(labels.GetOrigin(), image.GetOrigin(), atol=1e-3)
            and np.allclose(labels.GetDirection(), image.GetDirection(), atol=1e-5))
    if not same:
        raise LumbarBMDError("the label image is not on the annotation image's grid (internal error: export both "
                             "from the same annotation)")
    values = sitk.GetArrayFromImage(labels).reshape(SAGITTAL_SIZE, SAGITTAL_SIZE)
    if values.min() < 0 or values.max() > 4:
        raise LumbarBMDError(f"label values must be 0–4 (background, L1–L4), found {np.unique(values).tolist()}")
    if not values.any():
        raise LumbarBMDError("no vertebra is drawn: paint L1–L4 on the annotation image before exporting")
    return values.astype(np.uint8)


def check_reference(reference_bmd: dict[str, float], drawn: list[str]) -> dict[str, float]:
    """QCT reference values per level, checked: known levels, plausible values, and each level drawn."""
    out = {}
    for level, value in reference_bmd.items():
        if level not in LEVEL_NAMES:
            raise LumbarBMDError(f"reference value for {level!r}: the level must be one of L1–L4")
        value = float(value)
        if not (np.isfinite(value) and REFERENCE_RANGE[0] <= value <= REFERENCE_RANGE[1]):
            raise LumbarBMDError(
                f"{level}: QCT reference {value:g} mg/cm³ is outside {REFERENCE_RANGE[0]:g}–{REFERENCE_RANGE[1]:g} "
                "mg/cm³ (a typing error?)"
            )
        if level not in drawn:
            raise LumbarBMDError(f"{level} has a QCT reference value but is not drawn: draw it or clear the value")
        out[level] = round(value, 2)
    return dict(sorted(out.items()))


def pair_metadata(case_id: str, source: str, drawn: list[str], reference: dict[str, float], extra: dict) -> dict:
    """The ``annotation.json`` object: case, source CT, levels drawn, label values, reference, tool and time."""
    return {
        "case": case_id,
        "source": source,
        "levels_drawn": drawn,
        "label_values": {str(i): name for i, name in enumerate(LEVEL_NAMES, start=1)},
        "qct_reference_mg_cm3": reference,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lumbarbmd_version": __version__,
        **extra,
    }


def update_reference_csv(dataset: Path, case_id: str, reference: dict[str, float]) -> Path:
    """Replace ``case_id``'s rows of ``dataset/bmd_reference.csv`` (created when absent) with ``reference``.

    Other cases' rows are kept in their order. Written to a temporary file and renamed (never half-written).
    """
    path = dataset / REFERENCE_FILE
    rows: list[dict[str, str]] = []
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if set(reader.fieldnames or []) != set(REFERENCE_COLUMNS):
                raise LumbarBMDError(f"{path} is not a reference table (expected the columns case,level,bmd_mg_cm3)")
            rows = [r for r in reader if r["case"] != case_id]
    rows += [{"case": case_id, "level": level, "bmd_mg_cm3": f"{value:g}"} for level, value in reference.items()]
    write_csv(path, REFERENCE_COLUMNS, rows)
    return path


def write_training_pair(dataset: str | Path, case_id: str, image: sitk.Image, labels: sitk.Image, source: str = "",
                        reference_bmd: dict[str, float] | None = None, ct: CTVolume | None = None,
                        overwrite: bool = False, extra_metadata: dict | None = None) -> Path:
    """Write one training pair into ``dataset/case_id/`` (see the module docstring); return the case folder.

    Args:
        dataset: the dataset folder (created when absent).
        case_id: the case folder's name.
        image: the annotation image (float HU, one 512 × 512 sagittal slice, LPS geometry).
        labels: its label image (0–4) on the same grid.
        source: what the CT was (file, DICOM series, Slicer node), recorded in ``annotation.json``.
        reference_bmd: QCT reference BMD (mg/cm³) per level, or None/empty.
        ct: the CT; required with reference values (train-bmd cuts its patches from it), written as int16 HU.
        overwrite: replace an existing case folder of the same name (else that is an error).
        extra_metadata: more keys for ``annotation.json`` (e.g. the canal position).

    Raises:
        LumbarBMDError: a bad case id, a bad image or label image, implausible references, a reference without
            the CT, or an existing case without ``overwrite``. Nothing is written then.
    """
    dataset = Path(dataset)
    case_id = check_case_id(case_id)
    values = check_pair(image, labels)
    drawn = [name for i, name in enumerate(LEVEL_NAMES, start=1) if (values == i).any()]
    reference = check_reference(reference_bmd or {}, drawn)
    if reference and ct is None:
        raise LumbarBMDError("QCT reference values need the CT in the dataset (train-bmd cuts patches from it)")
    folder = dataset / case_id
    if folder.exists() and not overwrite:
        raise LumbarBMDError(f"{folder} already exists: choose another case id or allow overwriting")
    dataset.mkdir(parents=True, exist_ok=True)
    label_img = sitk.GetImageFromArray(values.reshape(sitk.GetArrayViewFromImage(labels).shape))
    label_img.CopyInformation(labels)
    with atomic_folder(folder) as tmp:
        write_image(sitk.Cast(image, sitk.sitkFloat32), tmp / IMAGE_FILE)
        write_image(label_img, tmp / LABEL_FILE)
        if ct is not None and reference:
            write_volume(ct, tmp / CT_FILE, np.int16)
        metadata = pair_metadata(case_id, source, drawn, reference, dict(extra_metadata or {}))
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    if reference or (dataset / REFERENCE_FILE).is_file():
        update_reference_csv(dataset, case_id, reference)
    return folder
