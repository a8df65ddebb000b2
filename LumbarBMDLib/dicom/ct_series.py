"""Write a CT volume as a classic (not enhanced) CT Image Storage series: one DICOM file per slice.

Used by the tests (a phantom case as the DICOM series a scanner would send) and by the PACS tests. The files are
what ``read_ct`` reads back with the same geometry and HU:

* SOP Class CT Image Storage (1.2.840.10008.5.1.4.1.1.2), Explicit VR Little Endian;
* one file per slice along the volume's third index axis ``k`` (``CT000001.dcm`` … in ``k`` order);
* ImagePositionPatient = the LPS centre of voxel ``(0, 0, k)``; ImageOrientationPatient = the LPS directions of the
  index axes ``i`` (along a row) and ``j`` (down a column); PixelSpacing = (row spacing, column spacing) =
  ``(spacing[1], spacing[0])``; SliceThickness = SpacingBetweenSlices = ``spacing[2]``;
* pixel data int16 (PixelRepresentation 1), stored value = round((HU − intercept) / slope), RescaleType HU;
* KVP (0018,0060), ConvolutionKernel (0018,1210), ContrastBolusAgent (0018,0010) when given;
* Study / Series / SOP Instance and Frame of Reference UIDs generated (highdicom's UID root) unless given.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from LumbarBMDLib import __version__
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.volume import CTVolume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class SeriesUIDs:
    """The UIDs of a written series (all strings)."""

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]


def _as_volume(volume_or_image) -> CTVolume:
    """A CTVolume from a CTVolume or a 3-D SimpleITK image (its voxels taken as HU, its geometry kept)."""
    if isinstance(volume_or_image, CTVolume):
        return volume_or_image
    return CTVolume.from_sitk(volume_or_image, source="image")


def _new_uid() -> str:
    import highdicom as hd

    return str(hd.UID())


def _ds_text(value: float) -> str:
    """A decimal string of at most 16 characters (DICOM DS)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text if len(text) <= 16 else f"{value:.8g}"


def stored_values(hu: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """int16 stored values ``round((HU − intercept) / slope)``, clipped to the int16 range; shape kept."""
    raw = np.rint((np.asarray(hu, dtype=np.float64) - intercept) / slope)
    return np.clip(raw, -32768, 32767).astype(np.int16)


def write_ct_series(
    volume_or_sitk_image,
    folder: str | Path,
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str | None = None,
    series_description: str,
    kvp: float | None = None,
    convolution_kernel: str | None = None,
    contrast_agent: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    study_id: str = "1",
    accession_number: str = "",
    study_description: str = "CT abdomen",
    study_date: _dt.date | None = None,
    patient_birth_date: str = "",
    patient_sex: str = "",
    manufacturer: str = "LumbarBMD",
    rescale_slope: float = 1.0,
    rescale_intercept: float = 0.0,
    file_prefix: str = "CT",
) -> list[Path]:
    """Write ``volume_or_sitk_image`` as a classic CT Image Storage series into ``folder`` (created if needed).

    Args:
        volume_or_sitk_image: a :class:`~LumbarBMDLib.volume.CTVolume` (HU array ``(nz, ny, nx)``, any orientation,
            e.g. from ``read_ct('ct.nii.gz')``) or a 3-D SimpleITK image in HU.
        folder: where the files go (``<file_prefix>000001.dcm`` …, one per slice ``k``); existing files of those names
            are replaced.
        patient_id / patient_name: Patient ID (0010,0020) and Patient's Name (0010,0010, DICOM PN, e.g. ``"Doe^Jane"``).
        study_uid: Study Instance UID; a new one when None (then every call makes a new study).
        series_description: Series Description (0008,103E).
        kvp: tube voltage (kV) for KVP (0018,0060); absent (empty, Type 2) when None.
        convolution_kernel: ConvolutionKernel (0018,1210), e.g. ``"B30f"``.
        contrast_agent: ContrastBolusAgent (0018,0010), e.g. ``"Iohexol"``; the Contrast/Bolus module is written only
            when given.
        series_uid / frame_of_reference_uid: given UIDs, or new ones.
        series_number / study_id / accession_number / study_description / study_date / patient_birth_date /
            patient_sex / manufacturer: the corresponding attributes (study_date: today when None).
        rescale_slope / rescale_intercept: stored value = round((HU − intercept) / slope), int16.
        file_prefix: the file names' prefix.

    Returns:
        The written paths, in slice order ``k`` = 0 … nz − 1.

    Raises:
        LumbarBMDError: the volume is not 3-D, has fewer than 2 slices, or its index axes are not orthogonal (a
            classic series needs slices stacked along their normal).
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset

    vol = _as_volume(volume_or_sitk_image)
    if vol.hu.ndim != 3 or vol.shape[0] < 2:
        raise LumbarBMDError(f"a CT series needs a 3-D volume with at least 2 slices, got shape {vol.shape}")
    d = vol.direction
    if abs(float(d[:, 0] @ d[:, 1])) > 1e-4 or np.linalg.norm(np.cross(np.cross(d[:, 0], d[:, 1]), d[:, 2])) > 1e-4:
        raise LumbarBMDError("the volume's axes are not orthogonal: it cannot be written as a classic CT series")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or _new_uid()
    series_uid = series_uid or _new_uid()
    frame_uid = frame_of_reference_uid or _new_uid()
    when = study_date or _dt.date.today()
    date = when.strftime("%Y%m%d")
    time = "120000"
    nz, ny, nx = vol.shape
    sx, sy, sz = vol.spacing
    iop = [float(v) for v in (*d[:, 0], *d[:, 1])]
    normal = np.cross(d[:, 0], d[:, 1])
    paths = []
    for k in range(nz):
        ipp = vol.index_to_lps(np.array([0.0, 0.0, float(k)]))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        sop_uid = _new_uid()
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time
        ds.AccessionNumber = accession_number
        ds.Modality = "CT"
        ds.Manufacturer = manufacturer
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = patient_birth_date
        ds.PatientSex = patient_sex
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = _ds_text(sz)
        ds.SpacingBetweenSlices = _ds_text(sz)
        ds.KVP = _ds_text(float(kvp)) if kvp is not None else None
        if convolution_kernel:
            ds.ConvolutionKernel = convolution_kernel
        if contrast_agent:
            ds.ContrastBolusAgent = contrast_agent
        ds.PatientPosition = "FFS"
        ds.SoftwareVersions = f"LumbarBMD {__version__}"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = study_id
        ds.SeriesNumber = int(series_number)
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds_text(float(v)) for v in ipp]
        ds.ImageOrientationPatient = [_ds_text(v) for v in iop]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds_text(float(ipp @ normal))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.PixelSpacing = [_ds_text(sy), _ds_text(sx)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = _ds_text(rescale_intercept)
        ds.RescaleSlope = _ds_text(rescale_slope)
        ds.RescaleType = "HU"
        ds.PixelData = stored_values(vol.hu[k], rescale_slope, rescale_intercept).tobytes()
        path = folder / f"{file_prefix}{k + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def series_uids(paths: list[Path]) -> SeriesUIDs:
    """The UIDs of a series written by :func:`write_ct_series` (read back from its files' headers)."""
    import pydicom

    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    first = headers[0]
    return SeriesUIDs(str(first.StudyInstanceUID), str(first.SeriesInstanceUID), str(first.FrameOfReferenceUID),
                      tuple(str(h.SOPInstanceUID) for h in headers))
