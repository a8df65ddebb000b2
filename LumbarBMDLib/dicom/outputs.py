"""``seg.dcm`` and ``sr.dcm`` of one measured case (:func:`write_dicom_outputs`).

* ``seg.dcm``: the DICOM Segmentation (:mod:`~LumbarBMDLib.dicom.seg`): L1–L4 vertebral bodies and their trabecular
  ROIs on the source CT's frames;
* ``sr.dcm``: the Comprehensive 3D SR, TID 1500 Measurement Report (:mod:`~LumbarBMDLib.dicom.sr`): BMD per level,
  categories, the patient's mean, calibration, contrast phase, QC flags, algorithm.

Both are in the source's Patient and Study, each a new series (numbers 901 and 902), and reference the source's SOP
Instances. They can only be made for a case read from a DICOM series (a NIfTI / NRRD input has no images to
reference) that measured at least one level; otherwise :class:`~LumbarBMDLib.errors.LumbarBMDError` says why and
nothing is written. Both datasets are built in memory and checked before either file is written; each file is
written under a temporary name in ``out_folder`` and renamed, and a failure removes what this call wrote, so the
function is safe to call on a case's temporary folder (``durable.atomic_folder``) and never touches anything else.
"""

from __future__ import annotations

from pathlib import Path

from LumbarBMDLib.dicom import SEG_FILE, SR_FILE
from LumbarBMDLib.dicom.files import save_dicom_file
from LumbarBMDLib.errors import LumbarBMDError


def _require_measured(result, results: dict) -> None:
    if result is None or results.get("status") == "failed":
        why = results.get("error") or "nothing was measured"
        raise LumbarBMDError(f"no DICOM SEG or SR for a failed case ({why}): there is no measurement to report")


def _require_highdicom() -> None:
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise LumbarBMDError("DICOM SEG and SR need the highdicom package, which is not installed: install LumbarBMD's "
                             "archive extra (pip install 'lumbarbmd[archive]')") from None


def build_dicom_outputs(source_folder: Path, result, results: dict):
    """``(seg, sr)`` datasets of a case (not written); raises LumbarBMDError as :func:`write_dicom_outputs`."""
    _require_measured(result, results)
    _require_highdicom()
    from LumbarBMDLib.dicom.masks import level_masks
    from LumbarBMDLib.dicom.seg import build_seg
    from LumbarBMDLib.dicom.source import read_source_series
    from LumbarBMDLib.dicom.sr import build_sr

    source = read_source_series(source_folder, result.annotation.volume)
    patches = {p.level: p.centre_lps for p in result.patches if p.found and p.centre_lps is not None}
    masks = level_masks(source, result.labels, result.label_geometry, patches,
                        result.annotation.images.candidate_geometry)
    seg, plan = build_seg(source, masks, results.get("models"), manual_bodies=result.segmentation is None)
    if seg is None:
        raise LumbarBMDError("no DICOM SEG or SR: the case has no segmented level on the CT's slices")
    return seg, build_sr(source, seg, plan, results)


def write_dicom_outputs(out_folder: Path, source_folder: Path, result, results: dict) -> list[Path]:
    """Write ``out_folder/seg.dcm`` and ``out_folder/sr.dcm`` for one measured case.

    Args:
        out_folder: the case folder (or its temporary folder while it is filled); created if missing.
        source_folder: the DICOM folder the case was read from (``lumbarbmd run``'s input).
        result: the case's :class:`~LumbarBMDLib.pipeline.CaseResult` (None for a failed case).
        results: its results.json object (:func:`~LumbarBMDLib.pipeline.results_json`); the SR's numbers are taken
            from it.

    Returns:
        ``[seg.dcm, sr.dcm]`` paths.

    Raises:
        LumbarBMDError: a failed case; an input that is not a DICOM series (NIfTI, NRRD, MetaImage); a folder whose
            series no longer matches the measured CT (a slice removed, another series); highdicom not installed;
            nothing written then.
    """
    seg, sr = build_dicom_outputs(Path(source_folder), result, results)
    out_folder = Path(out_folder)
    out_folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for dataset, name in ((seg, SEG_FILE), (sr, SR_FILE)):
            save_dicom_file(dataset, out_folder / name)
            written.append(out_folder / name)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
