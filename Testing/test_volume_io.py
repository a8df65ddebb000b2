"""Tests of CT reading and writing (LumbarBMDLib.volume): real files in tmp_path, no mocks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.volume import CTVolume, read_ct, write_volume

SHAPE = (16, 20, 24)  # (nz, ny, nx)
SPACING = (0.7, 0.8, 2.5)  # mm along i, j, k
ORIGIN = (12.5, -40.0, 100.0)
MARK = (17, 5, 11)  # (i, j, k) of the bright voxel
MARK_HU = 3000.0


def _rot_x(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


DIRECTIONS = {
    "lps": np.eye(3),
    "ras": np.diag([-1.0, -1.0, 1.0]),
    # i along -S, j along +L, k along -P (a coronal-like stack with flips)
    "permuted_flipped": np.array([[0.0, 1, 0], [0, 0, -1], [-1, 0, 0]]),
    "oblique_20deg": _rot_x(20) @ np.diag([-1.0, -1.0, 1.0]),
}


def phantom_hu(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> np.ndarray:
    """Small CT-like HU array (z, y, x): air, a fat-rimmed soft-tissue body, a bone block, one bright voxel."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    _, y, x = np.mgrid[0:nz, 0:ny, 0:nx]
    r = ((y - ny / 2) / (0.42 * ny)) ** 2 + ((x - nx / 2) / (0.42 * nx)) ** 2
    hu = np.full(shape, -1000.0)
    hu[r < 1.0] = -100.0  # fat
    hu[r < 0.6] = 40.0  # soft tissue
    hu[:, ny // 2 : ny // 2 + 4, nx // 2 - 3 : nx // 2 + 3] = 400.0  # bone
    hu += rng.normal(0, 10, shape)
    i, j, k = MARK
    hu[k, j, i] = MARK_HU
    return hu.astype(np.float32)


def make_image(hu: np.ndarray, direction: np.ndarray, spacing=SPACING, origin=ORIGIN) -> sitk.Image:
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(np.asarray(direction, dtype=float).flatten()))
    return img


def marked_lps(vol: CTVolume) -> np.ndarray:
    """LPS point of the brightest voxel of a read volume, through its affine."""
    k, j, i = np.unravel_index(np.argmax(vol.hu), vol.hu.shape)
    return (vol.affine @ np.array([i, j, k, 1.0]))[:3]


# --- file round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("direction_name", list(DIRECTIONS))
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_file_round_trip_keeps_lps_geometry(tmp_path: Path, ext: str, direction_name: str) -> None:
    hu = phantom_hu()
    img = make_image(hu, DIRECTIONS[direction_name])
    path = tmp_path / f"ct{ext}"
    sitk.WriteImage(img, str(path))

    vol = read_ct(path)

    expected = np.array(img.TransformIndexToPhysicalPoint(MARK))
    np.testing.assert_allclose(marked_lps(vol), expected, atol=1e-3)
    np.testing.assert_allclose(vol.index_to_lps(np.array(vol.lps_to_index(expected))), expected, atol=1e-6)
    assert vol.hu.dtype == np.float32
    assert sorted(vol.shape) == sorted(SHAPE)
    np.testing.assert_allclose(np.sort(vol.hu.ravel()), np.sort(hu.ravel()), atol=1e-3)
    np.testing.assert_allclose(sorted(vol.spacing), sorted(SPACING), rtol=1e-6)
    # reoriented: each index axis is closest to +L, +P, +S
    assert np.all(np.argmax(np.abs(vol.direction), axis=0) == [0, 1, 2])
    assert np.all(np.diag(vol.direction) > 0)
    meta = vol.metadata
    assert meta["format"] == {".nii.gz": "NIfTI", ".nrrd": "NRRD", ".mha": "MetaImage"}[ext]
    assert meta["orientation"] == "LPS"
    np.testing.assert_allclose(meta["original_direction"], DIRECTIONS[direction_name].flatten(), atol=1e-6)
    assert meta["reoriented"] == (meta["original_orientation"] != "LPS")
    assert meta["nonfinite_voxels"] == 0
    assert meta["warnings"] == []
    if direction_name == "oblique_20deg":
        assert meta["obliquity_deg"] == pytest.approx(20.0, abs=1e-3)
    else:
        assert meta["obliquity_deg"] == pytest.approx(0.0, abs=1e-6)


def test_ras_volume_is_flipped_without_interpolation(tmp_path: Path) -> None:
    hu = phantom_hu()
    path = tmp_path / "ras.nii.gz"
    sitk.WriteImage(make_image(hu, DIRECTIONS["ras"]), str(path))
    vol = read_ct(path)
    assert vol.metadata["original_orientation"] == "RAS"
    np.testing.assert_array_equal(vol.hu, hu[:, ::-1, ::-1])
    np.testing.assert_allclose(vol.direction, np.eye(3))


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nrrd", "ct.mha", "ct.mhd", "sub/dir/ct.nhdr"])
def test_write_volume_round_trip(tmp_path: Path, name: str) -> None:
    vol = read_ct(_write(tmp_path / "in.nii.gz", make_image(phantom_hu(), DIRECTIONS["oblique_20deg"])))
    out = write_volume(vol, tmp_path / name, dtype=np.int16)
    back = read_ct(out)
    np.testing.assert_array_equal(back.hu, np.rint(vol.hu))
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    leftovers = [p.name for p in out.parent.iterdir() if ".tmp" in p.name]
    assert leftovers == []
    if name.endswith((".mhd", ".nhdr")):  # detached data file moved next to its header
        assert len([p for p in out.parent.iterdir() if p.stem.startswith("ct")]) == 2


def test_write_volume_failure_leaves_nothing(tmp_path: Path) -> None:
    vol = CTVolume(hu=phantom_hu(), spacing=SPACING, origin=ORIGIN)
    with pytest.raises(LumbarBMDError, match=r"could not write"):
        write_volume(vol, tmp_path / "ct.unknownformat")
    assert list(tmp_path.iterdir()) == []


def test_write_volume_keeps_float_by_default(tmp_path: Path) -> None:
    vol = CTVolume(hu=phantom_hu(), spacing=SPACING, origin=ORIGIN)
    out = write_volume(vol, tmp_path / "ct.nrrd")
    assert sitk.ReadImage(str(out)).GetPixelID() == sitk.sitkFloat32


# --- DICOM ------------------------------------------------------------------------------------------

_UID_ROOT = "1.2.826.0.1.3680043.8.498.77"


def integer_hu() -> np.ndarray:
    """Integer HU of the phantom, ≥ -1024 so that unsigned storage with intercept -1024 can hold them."""
    return np.rint(phantom_hu()).clip(-1024, None)


def write_dicom_series(
    folder: Path,
    hu: np.ndarray,
    *,
    series: int,
    description: str,
    modality: str = "CT",
    direction: np.ndarray | None = None,
    spacing=SPACING,
    origin=ORIGIN,
    image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
) -> str:
    """Write ``hu`` (z, y, x) as one DICOM file per slice, as in SimpleITK's "DicomSeriesFromArray".

    CT is stored unsigned with RescaleSlope 1 / RescaleIntercept -1024 (stored = HU + 1024). Returns the
    series instance UID.
    """
    folder.mkdir(parents=True, exist_ok=True)
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    uid = f"{_UID_ROOT}.{series}"
    intercept = "-1024" if modality == "CT" else "0"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(hu.shape[0]):
        position = np.asarray(origin) + k * spacing[2] * d[:, 2]
        slice_img = sitk.GetImageFromArray(hu[k].astype(np.float32))
        slice_img.SetSpacing(spacing[:2])
        tags = {
            "0008|0008": image_type,
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{uid}.{k + 1}",
            "0008|0060": modality,
            "0008|103e": description,
            "0010|0010": "Phantom^Test",
            "0020|000d": f"{_UID_ROOT}.1000",
            "0020|000e": uid,
            "0020|0011": str(series),
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in np.concatenate([d[:, 0], d[:, 1]])),
            "0018|0050": f"{spacing[2]:g}",
            "0028|0100": "16",  # bits allocated
            "0028|0101": "16",  # bits stored
            "0028|0102": "15",  # high bit
            "0028|0103": "0",  # unsigned storage
            "0028|1052": intercept,
            "0028|1053": "1",
        }
        for key, value in tags.items():
            slice_img.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"s{series:02d}_{k:03d}.dcm"))
        writer.Execute(slice_img)
    return uid


@pytest.mark.parametrize("direction_name", ["lps", "oblique_20deg"])
def test_dicom_series_rescaled_to_hu_with_geometry(tmp_path: Path, direction_name: str) -> None:
    hu = integer_hu()
    direction = DIRECTIONS[direction_name] if direction_name == "lps" else _rot_x(20)
    uid = write_dicom_series(tmp_path / "dcm", hu, series=3, description="Abdomen 1.0 B30f", direction=direction)

    raw = pydicom.dcmread(sorted((tmp_path / "dcm").iterdir())[0])
    assert raw.PixelRepresentation == 0 and float(raw.RescaleIntercept) == -1024 and float(raw.RescaleSlope) == 1
    assert raw.pixel_array.min() >= 0  # stored values need the intercept to become HU

    vol = read_ct(tmp_path / "dcm")

    np.testing.assert_allclose(np.sort(vol.hu.ravel()), np.sort(hu.ravel()), atol=1e-3)
    assert vol.hu.min() == pytest.approx(hu.min())
    original = make_image(hu, direction)
    np.testing.assert_allclose(marked_lps(vol), original.TransformIndexToPhysicalPoint(MARK), atol=1e-3)
    np.testing.assert_allclose(sorted(vol.spacing), sorted(SPACING), rtol=1e-5)
    meta = vol.metadata
    assert meta["format"] == "DICOM"
    assert meta["modality"] == "CT"
    assert meta["series_instance_uid"] == uid
    assert meta["series_description"] == "Abdomen 1.0 B30f"
    assert meta["n_slices"] == SHAPE[0]
    assert meta["dicom_other_series"] == []
    assert meta["dicom_choice"] == "used series 1 of 1: 'Abdomen 1.0 B30f' (CT, 16 slices)"


def test_dicom_folder_with_several_series_uses_longest_ct(tmp_path: Path) -> None:
    root = tmp_path / "study"
    hu = integer_hu()
    write_dicom_series(root / "a", hu[:10], series=1, description="Abdomen 5.0")
    used_uid = write_dicom_series(root / "b", hu, series=2, description="Abdomen 1.0 B30f")
    mr = np.clip(hu + 1000, 0, None)
    write_dicom_series(
        root / "c" / "deeper", np.concatenate([mr, mr[:4]]), series=3, description="T2 sag", modality="MR"
    )
    write_dicom_series(
        root, hu[:3], series=4, description="Topogram", image_type="ORIGINAL\\PRIMARY\\LOCALIZER", spacing=(1, 1, 1)
    )

    vol = read_ct(root)

    meta = vol.metadata
    assert meta["series_instance_uid"] == used_uid
    assert meta["dicom_series_used"]["uid"] == used_uid
    assert meta["dicom_series_used"]["n_slices"] == 16
    assert vol.shape == SHAPE
    others = {s["description"]: s for s in meta["dicom_other_series"]}
    assert set(others) == {"Abdomen 5.0", "T2 sag", "Topogram"}
    assert others["T2 sag"]["modality"] == "MR" and others["T2 sag"]["n_slices"] == 20
    assert others["T2 sag"]["skip_reason"] == "not CT"
    assert others["Topogram"]["skip_reason"] == "localizer"
    assert others["Abdomen 5.0"]["skip_reason"] == "fewer slices"
    assert meta["dicom_choice"].startswith("used series 2 of 4: 'Abdomen 1.0 B30f' (CT, 16 slices); skipped: ")
    assert "'T2 sag' (MR, 20 slices): not CT" in meta["dicom_choice"]


def test_one_dicom_file_reads_its_whole_series(tmp_path: Path) -> None:
    hu = integer_hu()
    write_dicom_series(tmp_path, hu[:10], series=1, description="short")
    uid = write_dicom_series(tmp_path, hu, series=2, description="long")
    one = tmp_path / "s02_005.dcm"
    vol = read_ct(one)
    assert vol.metadata["series_instance_uid"] == uid
    assert vol.shape == SHAPE
    first_short = read_ct(tmp_path / "s01_000.dcm")
    assert first_short.metadata["series_description"] == "short"
    assert first_short.shape == (10, *SHAPE[1:])


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(LumbarBMDError, match=r"no DICOM series found in folder"):
        read_ct(tmp_path)


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image\n", encoding="utf-8")
    sitk.WriteImage(make_image(phantom_hu(), np.eye(3)), str(tmp_path / "ct.nii.gz"))
    with pytest.raises(LumbarBMDError, match=r"no DICOM series found.*give the file's path"):
        read_ct(tmp_path)


def test_only_localizer(tmp_path: Path) -> None:
    hu = integer_hu()
    write_dicom_series(tmp_path, hu[:12], series=1, description="Topogram", image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    write_dicom_series(tmp_path, hu[:1], series=2, description="Dose report")
    with pytest.raises(LumbarBMDError, match=r"only localizer/scout or single images"):
        read_ct(tmp_path)


def test_dicom_mr_only_is_rejected(tmp_path: Path) -> None:
    write_dicom_series(tmp_path, np.clip(integer_hu() + 1000, 0, None), series=1, description="T1", modality="MR")
    with pytest.raises(LumbarBMDError, match=r"no CT series in DICOM folder .*found MR"):
        read_ct(tmp_path)


def test_dicom_missing_slice(tmp_path: Path) -> None:
    write_dicom_series(tmp_path, integer_hu(), series=1, description="gappy")
    (tmp_path / "s01_007.dcm").unlink()
    with pytest.raises(LumbarBMDError, match=r"missing slices or non-uniform slice spacing: a gap of 5.00 mm"):
        read_ct(tmp_path)


def test_dicom_duplicate_slices(tmp_path: Path) -> None:
    hu = integer_hu()
    write_dicom_series(tmp_path, hu, series=1, description="dup")
    ds = pydicom.dcmread(tmp_path / "s01_003.dcm")
    ds.ImagePositionPatient = pydicom.dcmread(tmp_path / "s01_004.dcm").ImagePositionPatient
    ds.save_as(tmp_path / "s01_003.dcm")
    with pytest.raises(LumbarBMDError, match=r"several slices at the same position"):
        read_ct(tmp_path)


def test_dicom_gantry_tilt(tmp_path: Path) -> None:
    write_dicom_series(tmp_path, integer_hu(), series=1, description="tilted")
    for k, file in enumerate(sorted(tmp_path.iterdir())):
        ds = pydicom.dcmread(file)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + k * SPACING[2] * math.tan(math.radians(15)), z]
        ds.save_as(file)
    with pytest.raises(LumbarBMDError, match=r"sheared by 15\.0° \(gantry tilt\)"):
        read_ct(tmp_path)


def test_dicom_too_few_slices(tmp_path: Path) -> None:
    write_dicom_series(tmp_path, integer_hu()[:5], series=1, description="slab")
    with pytest.raises(LumbarBMDError, match=r"at least 8 slices"):
        read_ct(tmp_path)


# --- bad inputs ---------------------------------------------------------------------------------------


def _write(path: Path, img: sitk.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(LumbarBMDError, match=r"file or folder not found: .*nothing.nii.gz"):
        read_ct(tmp_path / "nothing.nii.gz")


def test_text_file_named_nifti(tmp_path: Path) -> None:
    path = tmp_path / "ct.nii.gz"
    path.write_text("patient list\n1, 2, 3\n", encoding="utf-8")
    with pytest.raises(LumbarBMDError, match=r"could not read .*ct\.nii\.gz as a medical image"):
        read_ct(path)


@pytest.mark.parametrize("name", ["ct.nrrd", "ct.mha", "ct.bin", "ct"])
def test_random_binary(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(LumbarBMDError, match=r"could not read .* as a medical image"):
        read_ct(path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "ct.nrrd"
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.SetUseCompression(False)
    writer.Execute(make_image(phantom_hu(), np.eye(3)))
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(LumbarBMDError, match=r"could not read .*ct\.nrrd as a medical image.*damaged"):
        read_ct(path)


def test_2d_image(tmp_path: Path) -> None:
    path = _write(tmp_path / "slice.nii.gz", sitk.GetImageFromArray(phantom_hu()[5]))
    with pytest.raises(LumbarBMDError, match=r"is a 2-D image \(a single slice\)"):
        read_ct(path)


def test_thin_slab(tmp_path: Path) -> None:
    path = _write(tmp_path / "slab.nrrd", make_image(phantom_hu()[:3], np.eye(3)))
    with pytest.raises(LumbarBMDError, match=r"only 3 slice\(s\) along one axis.*needs a 3-D CT volume"):
        read_ct(path)


def test_4d_time_series(tmp_path: Path) -> None:
    hu = phantom_hu()
    img = sitk.JoinSeries([sitk.GetImageFromArray(hu)] * 3)
    path = _write(tmp_path / "series.nii.gz", img)
    with pytest.raises(LumbarBMDError, match=r"is a 4-D image \(3 volumes"):
        read_ct(path)


def test_4d_with_single_volume_is_accepted(tmp_path: Path) -> None:
    img = sitk.JoinSeries([make_image(phantom_hu(), np.eye(3))])
    path = _write(tmp_path / "one.nii.gz", img)
    assert read_ct(path).shape == SHAPE


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".nii.gz"])
def test_vector_image(tmp_path: Path, ext: str) -> None:
    arr = np.stack([phantom_hu()] * 3, axis=-1)
    path = _write(tmp_path / f"rgb{ext}", sitk.GetImageFromArray(arr, isVector=True))
    with pytest.raises(LumbarBMDError, match=r"has 3 values per voxel"):
        read_ct(path)


def test_mr_like_intensities(tmp_path: Path) -> None:
    mr = np.random.default_rng(2).uniform(0, 2000, SHAPE).astype(np.float32)
    path = _write(tmp_path / "mr.nii.gz", make_image(mr, np.eye(3)))
    with pytest.raises(LumbarBMDError, match=r"do not look like CT Hounsfield units .*is this an MR or a PET image"):
        read_ct(path)


def test_pet_like_intensities(tmp_path: Path) -> None:
    pet = np.random.default_rng(3).gamma(1.0, 2.0, SHAPE).astype(np.float32)  # SUV-like, >= 0
    path = _write(tmp_path / "pet.nrrd", make_image(pet, np.eye(3)))
    with pytest.raises(LumbarBMDError, match=r"is this an MR or a PET image") as info:
        read_ct(path)
    assert "1024" not in str(info.value)  # no hint about an unsigned CT offset for values 0..20


def test_unsigned_offset_ct_without_header_gets_hint(tmp_path: Path) -> None:
    stored = (integer_hu() + 1024).clip(0, None).astype(np.uint16)
    path = _write(tmp_path / "offset.nrrd", make_image(stored, np.eye(3)))
    with pytest.raises(LumbarBMDError, match=r"air near 0 \(HU \+ 1024\).*RescaleIntercept = -1024"):
        read_ct(path)


@pytest.mark.parametrize(
    ("ext", "key"), [(".nrrd", "RescaleIntercept"), (".mha", "RescaleIntercept"), (".nrrd", "0028|1052")]
)
def test_unsigned_offset_ct_with_header_intercept(tmp_path: Path, ext: str, key: str) -> None:
    hu = integer_hu()
    img = make_image((hu + 1024).clip(0, None).astype(np.uint16), np.eye(3))
    img.SetMetaData(key, "-1024")
    vol = read_ct(_write(tmp_path / f"offset{ext}", img))
    np.testing.assert_allclose(vol.hu, hu.clip(-1024, None))
    assert vol.metadata["rescale"] == {"slope": 1.0, "intercept": -1024.0, "source": "file header"}


def test_stale_header_intercept_on_hu_values_is_ignored(tmp_path: Path) -> None:
    hu = integer_hu()
    img = make_image(hu.astype(np.int16), np.eye(3))
    img.SetMetaData("RescaleIntercept", "-1024")
    vol = read_ct(_write(tmp_path / "hu.nrrd", img))
    np.testing.assert_allclose(vol.hu, hu)
    assert "rescale" not in vol.metadata
    assert any("taken as HU unchanged" in w for w in vol.metadata["warnings"])


def test_nifti_scl_inter_is_applied(tmp_path: Path) -> None:
    """NIfTI's own scl_slope/scl_inter (written by e.g. dcm2niix) are applied by ITK itself."""
    hu = integer_hu()
    path = _write(tmp_path / "ct.nii", make_image((hu + 1024).clip(0, None).astype(np.uint16), np.eye(3)))
    raw = bytearray(path.read_bytes())
    raw[112:120] = np.array([1.0, -1024.0], dtype="<f4").tobytes()
    path.write_bytes(bytes(raw))
    np.testing.assert_allclose(read_ct(path).hu, hu.clip(-1024, None))


def test_ct_cropped_to_body_without_air_is_accepted(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    hu = rng.normal(40, 15, SHAPE)  # soft tissue
    hu[:, :, :3] = rng.normal(-100, 15, (SHAPE[0], SHAPE[1], 3))  # a strip of fat
    hu[:, 8:12, 10:14] = 350  # bone
    vol = read_ct(_write(tmp_path / "crop.nii.gz", make_image(hu.astype(np.float32), np.eye(3))))
    assert vol.hu.min() > -300


def test_ct_with_padding_outside_field_of_view_is_accepted(tmp_path: Path) -> None:
    hu = phantom_hu()
    hu[:, :4, :] = -3024
    assert read_ct(_write(tmp_path / "pad.mha", make_image(hu, np.eye(3)))).hu.min() == -3024


def test_constant_image(tmp_path: Path) -> None:
    path = _write(tmp_path / "flat.nii.gz", make_image(np.full(SHAPE, -1000, np.float32), np.eye(3)))
    with pytest.raises(LumbarBMDError, match=r"empty image: all voxels have the same value \(-1000 everywhere\)"):
        read_ct(path)


def test_zero_voxel_image(tmp_path: Path) -> None:
    path = tmp_path / "empty.mha"
    path.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 0 20 24\nElementType = MET_SHORT\nElementDataFile = LOCAL\n",
        encoding="utf-8",
    )
    with pytest.raises(LumbarBMDError, match=r"empty image \(0 voxels"):
        read_ct(path)


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".nii", ".mha"])
def test_few_nonfinite_voxels_become_air(tmp_path: Path, ext: str) -> None:
    hu = phantom_hu()
    hu[0, 0, :5] = np.nan
    hu[1, 0, :2] = np.inf
    hu[2, 0, :1] = -np.inf
    vol = read_ct(_write(tmp_path / f"nan{ext}", make_image(hu, DIRECTIONS["ras"])))
    assert np.isfinite(vol.hu).all()
    assert vol.metadata["nonfinite_voxels"] == 8
    assert np.count_nonzero(vol.hu == -1024) == 8
    assert len(vol.metadata["warnings"]) == 1 and "8 voxels" in vol.metadata["warnings"][0]


def test_many_nonfinite_voxels(tmp_path: Path) -> None:
    hu = phantom_hu()
    hu[:2] = np.nan
    path = _write(tmp_path / "nan.nii.gz", make_image(hu, np.eye(3)))
    with pytest.raises(LumbarBMDError, match=r"not numbers \(NaN or infinite\)"):
        read_ct(path)


@pytest.mark.parametrize("spacing", [(0.05, 0.8, 2.5), (0.7, 0.8, 12.0)])
def test_absurd_spacing(tmp_path: Path, spacing: tuple[float, float, float]) -> None:
    path = _write(tmp_path / "sp.nrrd", make_image(phantom_hu(), np.eye(3), spacing=spacing))
    with pytest.raises(LumbarBMDError, match=r"voxel spacing .* mm of .* is implausible"):
        read_ct(path)


@pytest.mark.parametrize("spacing_text", ["0.7 0.8 0", "0.7 -0.8 2.5"])
def test_zero_or_negative_spacing(tmp_path: Path, spacing_text: str) -> None:
    path = tmp_path / "sp.mha"
    header = f"ObjectType = Image\nNDims = 3\nDimSize = 24 20 16\nElementSpacing = {spacing_text}\n"
    path.write_bytes(
        (header + "ElementType = MET_SHORT\nElementDataFile = LOCAL\n").encode() + integer_hu().astype("<i2").tobytes()
    )
    with pytest.raises(LumbarBMDError, match=r"voxel spacing .* is implausible"):
        read_ct(path)


def test_non_orthogonal_direction(tmp_path: Path) -> None:
    sheared = np.array([[1.0, 0.3, 0], [0, 1, 0], [0, 0, 1]])
    path = _write(tmp_path / "shear.mha", make_image(phantom_hu(), sheared))
    with pytest.raises(LumbarBMDError, match=r"direction cosines of .* are not orthogonal"):
        read_ct(path)


# --- the real CT ----------------------------------------------------------------------------------------


@pytest.mark.real
def test_real_ct(tmp_path: Path, real_dir: Path) -> None:
    path = real_dir / "ct.nii.gz"
    original = sitk.ReadImage(str(path))
    vol = read_ct(path)
    assert vol.shape == (112, 101, 122)
    np.testing.assert_allclose(vol.spacing, (3.0, 3.0, 3.0))
    assert vol.metadata["original_orientation"] == "RAS"
    lps = vol.index_to_lps(np.zeros(3))
    idx = original.TransformPhysicalPointToIndex(tuple(lps))
    assert idx == (121, 100, 0)  # RAS: i and j flipped
    np.testing.assert_allclose(lps, original.TransformIndexToPhysicalPoint(idx), atol=1e-4)
    assert vol.hu[0, 0, 0] == sitk.GetArrayViewFromImage(original)[idx[2], idx[1], idx[0]]
    np.testing.assert_allclose(vol.affine[:3, 3], original.TransformIndexToPhysicalPoint(idx), atol=1e-4)
