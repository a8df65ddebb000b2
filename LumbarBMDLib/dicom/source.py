"""The source series of a measured case: its DICOM headers, in the CT volume's slice order, checked against it.

A DICOM SEG and SR must reference the very images that were measured. :func:`read_source_series` reads the headers of
the series that ``read_ct`` used (``volume.metadata["series_instance_uid"]``) from the same folder (searched
recursively, as ``read_ct`` does, so a folder of several series is fine), orders them as the volume's axial slices
``k`` (ascending along the volume's third axis, i.e. inferior → superior for an axial LPS volume) and checks that
they still describe the volume that was measured: same number of slices, Rows × Columns, PixelSpacing, orientation,
and every ImagePositionPatient on the volume's slice grid (no slice missing or added since, no gantry tilt). Any
disagreement is a :class:`~LumbarBMDLib.errors.LumbarBMDError` with a sentence that says which.

What highdicom needs of the source images: ``hd.seg.Segmentation`` copies the patient, study, Frame of Reference and
image-plane attributes (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness, Rows, Columns)
and references each source's SOP Class / Instance UIDs; the SR's evidence needs the same UIDs. All lie before the
pixel data: highdicom 0.28 builds the SEG from headers read with ``stop_before_pixels=True`` (measured; it never
reads the source's pixel data, the SEG has its own), so no pixel data are read here. The header of every file under
the folder is read once (about 1 ms a file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.volume import MAX_TILT_DEG, CTVolume

#: Positions (mm) and direction cosines may differ by this much from the volume (DS rounding: 16 characters).
POSITION_TOLERANCE_MM = 0.01
DIRECTION_TOLERANCE = 1e-4
#: A slice's position may be off the volume's slice grid by this fraction of the slice spacing.
SLICE_TOLERANCE = 0.02


@dataclass
class SourceSeries:
    """The headers of the series a case was measured on.

    Attributes:
        folder: the folder searched.
        files: the series' files, in the volume's slice order ``k`` = 0 … nz − 1.
        datasets: their pydicom headers (no pixel data), same order.
        frame_lps: float ``(nz, 3, 3)``: per slice, rows = ImagePositionPatient (LPS mm), the row direction
            (LPS direction of increasing column index) and the column direction (of increasing row index).
        pixel_spacing: ``(row spacing, column spacing)`` in mm (PixelSpacing), same for every slice.
        slice_spacing_mm: distance between consecutive slices (mm).
    """

    folder: Path
    files: list[Path]
    datasets: list
    frame_lps: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing_mm: float

    @property
    def study_instance_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``."""
        ds = self.datasets[0]
        return len(self.datasets), int(ds.Rows), int(ds.Columns)

    def pixel_lps(self, k: int, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> np.ndarray:
        """LPS points (mm) of pixel centres of slice ``k``: ``(len(rows), len(cols), 3)`` (all pixels by default)."""
        n_rows, n_cols = self.shape[1:]
        rows = np.arange(n_rows) if rows is None else np.asarray(rows)
        cols = np.arange(n_cols) if cols is None else np.asarray(cols)
        ipp, row_dir, col_dir = self.frame_lps[k]
        dr, dc = self.pixel_spacing
        return (ipp[None, None, :] + (cols * dc)[None, :, None] * row_dir[None, None, :]
                + (rows * dr)[:, None, None] * col_dir[None, None, :])


def _is_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _floats(ds, keyword: str, count: int) -> np.ndarray | None:
    value = ds.get(keyword)
    try:
        out = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return out if out.size == count else None


def series_headers(folder: Path, recursive: bool = True) -> dict[str, list[tuple[Path, object]]]:
    """``{SeriesInstanceUID: [(file, header), …]}`` of every DICOM file under ``folder`` (recursive unless told; sorted
    names; files without the DICOM mark are skipped)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list[tuple[Path, object]]] = {}
    for path in sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.is_file()):
        if not _is_dicom(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError):  # damaged: read_ct named it already
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        groups.setdefault(uid, []).append((path, ds))
    return groups


def _not_dicom_sentence(folder: Path, volume: CTVolume) -> str:
    fmt = volume.metadata.get("format")
    if folder.is_file() or (folder.exists() and not folder.is_dir()):
        what = f"{folder} is a file ({fmt or 'an image file'}), not a DICOM folder"
    elif not folder.exists():
        what = f"{folder} does not exist"
    else:
        what = f"the CT {volume.source or folder} was read from {fmt or 'an image file'}, not from a DICOM series"
    return (f"DICOM SEG and SR need the source DICOM series: {what}, so there are no DICOM images to reference; "
            "run LumbarBMD on the CT's DICOM folder to get SEG and SR")


def read_source_series(folder: str | Path, volume: CTVolume) -> SourceSeries:
    """The headers of the DICOM series ``volume`` was read from, in its slice order, checked against its geometry.

    Args:
        folder: the DICOM folder the case was read from (the input of ``lumbarbmd run``), or one DICOM file of the
            series (then its folder, not its subfolders, is searched, as ``read_ct`` does).
        volume: the CT as read by ``read_ct(folder)`` (or the analysed volume of the case, which keeps the read's
            ``metadata``: ``series_instance_uid`` and the series' ``original_*`` geometry).

    Raises:
        LumbarBMDError: the folder is not a folder (a NIfTI file, …), the volume was not read from DICOM, the series is
            not in the folder, it is multi-frame, or its slices no longer match the volume (count, size, spacing,
            orientation, positions).
    """
    folder = Path(folder)
    meta = volume.metadata or {}
    recursive = True
    if folder.is_file() and _is_dicom(folder) and meta.get("format") == "DICOM":  # one file of the series given
        folder, recursive = folder.parent, False
    if not folder.is_dir() or meta.get("format") != "DICOM":
        raise LumbarBMDError(_not_dicom_sentence(folder, volume))
    uid = meta.get("series_instance_uid")
    if not uid:
        raise LumbarBMDError(f"the CT read from {folder} records no Series Instance UID, so its DICOM images cannot "
                             "be referenced by a SEG or SR")
    groups = series_headers(folder, recursive)
    if uid not in groups:
        found = ", ".join(f"{u} ({len(v)} files)" for u, v in groups.items()) or "none"
        raise LumbarBMDError(f"the DICOM series that was measured ({uid}) is no longer in {folder} (series found: "
                             f"{found}); the SEG and SR must reference the measured images, so none were written")
    files, datasets = zip(*groups[uid])
    label = f"DICOM series '{datasets[0].get('SeriesDescription', '') or uid}' in {folder}"
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise LumbarBMDError(f"{label} is a multi-frame (enhanced) image: LumbarBMD writes SEG and SR only for "
                             "classic single-frame CT series")
    return _checked(folder, list(files), list(datasets), volume, label)


def _checked(folder: Path, files: list[Path], datasets: list, volume: CTVolume, label: str) -> SourceSeries:
    """Order the slices as the volume and check every geometric attribute (see the module docstring)."""
    meta = volume.metadata
    size = [int(v) for v in meta.get("original_size") or volume.shape[::-1]]
    spacing = [float(v) for v in meta.get("original_spacing") or volume.spacing]
    direction = np.array(meta.get("original_direction") or volume.direction.flatten(), dtype=float).reshape(3, 3)
    origin = np.array(meta.get("original_origin") or volume.origin, dtype=float)
    n = len(datasets)
    if n != size[2]:
        change = "removed" if n < size[2] else "added"
        raise LumbarBMDError(f"{label} now has {n} slices where the CT measured had {size[2]}: slices were {change} "
                             "since it was measured (or a slice is missing), so the SEG frames would not match the "
                             "images; measure the folder again")
    rows = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if rows != {(size[1], size[0])}:
        raise LumbarBMDError(f"{label} has images of {sorted(rows)} rows × columns where the CT measured had "
                             f"{size[1]} × {size[0]}: it is not the series that was measured")
    geo = [(_floats(ds, "ImagePositionPatient", 3), _floats(ds, "ImageOrientationPatient", 6),
            _floats(ds, "PixelSpacing", 2)) for ds in datasets]
    if any(g is None for triple in geo for g in triple):
        raise LumbarBMDError(f"{label} has slices without ImagePositionPatient, ImageOrientationPatient or "
                             "PixelSpacing: its images cannot be referenced by a SEG")
    positions = np.array([g[0] for g in geo])
    orientations = np.array([g[1] for g in geo])
    spacings = np.array([g[2] for g in geo])
    if np.abs(orientations - np.concatenate([direction[:, 0], direction[:, 1]])).max() > DIRECTION_TOLERANCE:
        raise LumbarBMDError(f"{label} has slices whose orientation (ImageOrientationPatient) differs from the CT "
                             "measured: it is not the series that was measured")
    if np.abs(spacings - [spacing[1], spacing[0]]).max() > POSITION_TOLERANCE_MM:
        raise LumbarBMDError(f"{label} has a pixel size (PixelSpacing) different from the CT measured")
    normal = direction[:, 2]
    along = (positions - origin) @ normal / spacing[2]  # slice index in the series as read
    expected_offsets = positions - origin - np.outer(along * spacing[2], normal)
    # read_ct accepts a shear up to MAX_TILT_DEG (and reads the slices as an orthogonal grid): so does this check
    allowed = POSITION_TOLERANCE_MM + np.tan(np.radians(MAX_TILT_DEG)) * np.abs(along) * spacing[2]
    if np.any(np.linalg.norm(expected_offsets, axis=1) > allowed):
        raise LumbarBMDError(f"{label} has slices shifted within their plane (gantry tilt or slices of another "
                             "acquisition): they do not lie on the grid of the CT measured")
    index = np.rint(along).astype(int)
    if (np.abs(along - index).max() > SLICE_TOLERANCE or index.min() != 0 or index.max() != n - 1
            or len(set(index.tolist())) != n):
        raise LumbarBMDError(f"{label} has slice positions that do not match the CT measured (a slice missing, "
                             "duplicated or moved since it was measured, or an irregular slice spacing that the CT "
                             "was read across): the SEG frames would not match the images")
    # the volume's slice order: ascending along its third axis (for an axial LPS volume, inferior → superior)
    order = np.argsort(positions @ volume.direction[:, 2], kind="stable")
    if not meta.get("resampled_axial"):
        k = volume.lps_to_index(positions[order])[:, 2]
        if np.abs(k - np.arange(n)).max() > SLICE_TOLERANCE * max(1.0, n / 1000):
            raise LumbarBMDError(f"{label} does not lie on the slices of the CT measured: it is not the series "
                                 "that was measured")
    frame = np.stack([positions[order], np.tile(direction[:, 0], (n, 1)), np.tile(direction[:, 1], (n, 1))], axis=1)
    return SourceSeries(folder, [files[i] for i in order], [datasets[i] for i in order], frame,
                        (float(spacing[1]), float(spacing[0])), float(spacing[2]))
