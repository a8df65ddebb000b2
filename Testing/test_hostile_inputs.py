"""Hostile inputs to ``read_ct`` (issue 13): each is a real file made here and must end in one clear sentence.

Cut files, damaged DICOM slices, missing geometry, headers declaring huge volumes, devices, FIFOs, unreadable files,
symbolic link loops, ambiguous series choices and oblique series. No mocks: every file is written in ``tmp_path``;
what could hang or needs another user runs in a subprocess with a timeout.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from test_volume_io import integer_hu, make_image, phantom_hu, write_dicom_series

from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.volume import MAX_VOXELS, MAX_VOXELS_ENV, CTVolume, read_ct, write_volume

REPO = Path(__file__).resolve().parents[1]
SHAPE = (40, 64, 64)  # (nz, ny, nx): small, fast
TRUNCATED = "is truncated or damaged: it holds less image data than its header declares"


def small_ct(path: Path, dtype: type = np.int16) -> Path:
    """A small CT-like volume written with ``write_volume`` (a two-member gzip stream for ``.nii.gz``)."""
    vol = CTVolume(hu=phantom_hu(SHAPE), spacing=(0.7, 0.8, 2.5), origin=(1.0, 2.0, 3.0))
    return write_volume(vol, path, dtype=dtype)


def run_python(code: str, timeout: float = 60, user: str | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this environment (as ``user`` through setpriv when given)."""
    cmd = [sys.executable, "-c", code]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    env = dict(os.environ, PYTHONPATH=str(REPO), HOME=tempfile.gettempdir())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir())


READ_AND_PRINT = (
    "import sys\nfrom LumbarBMDLib.errors import LumbarBMDError\nfrom LumbarBMDLib.volume import read_ct\n"
    "try:\n    read_ct(sys.argv[1] if len(sys.argv) > 1 else {path!r})\n"
    "except LumbarBMDError as err:\n    print('ERROR', err)\nelse:\n    print('READ')\n"
)


# --- 1. files cut short or damaged --------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["write_volume (2 gzip members)", "SimpleITK (1 gzip member)", "uncompressed"])
def test_nifti_cut_at_85_percent(tmp_path: Path, writer: str) -> None:
    if writer.startswith("write_volume"):
        path = small_ct(tmp_path / "ct.nii.gz")
    else:
        path = tmp_path / ("ct.nii" if writer == "uncompressed" else "ct.nii.gz")
        sitk.WriteImage(make_image(integer_hu().astype(np.int16), np.eye(3)), str(path), writer != "uncompressed")
    raw = path.read_bytes()
    path.write_bytes(raw[: int(0.85 * len(raw))])
    with pytest.raises(LumbarBMDError, match=TRUNCATED) as info:
        read_ct(path)
    assert "copy it again" in str(info.value)
    if writer == "uncompressed":
        assert f"({int(0.85 * len(raw)):,} of {len(raw):,} bytes)" in str(info.value)


def test_nifti_gz_without_its_trailer(tmp_path: Path) -> None:
    """All voxels present but the last 4 bytes (the gzip size field) cut: the stream is not whole."""
    path = small_ct(tmp_path / "ct.nii.gz")
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(LumbarBMDError, match=r"truncated or damaged: .*\(its compressed stream stops before the gzip"):
        read_ct(path)


def test_nifti_gz_with_a_corrupt_byte(tmp_path: Path) -> None:
    path = small_ct(tmp_path / "ct.nii.gz")
    raw = bytearray(path.read_bytes())
    raw[2 * len(raw) // 3] ^= 0xFF  # in the voxel data, past the header
    path.write_bytes(bytes(raw))
    with pytest.raises(LumbarBMDError, match=r"ct\.nii\.gz is damaged: its gzip-compressed data are corrupt"):
        read_ct(path)


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_compressed_nrrd_and_metaimage_cut(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"ct{ext}"
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.SetUseCompression(True)
    writer.Execute(make_image(phantom_hu(SHAPE), np.eye(3)))
    raw = path.read_bytes()
    path.write_bytes(raw[: int(0.85 * len(raw))])
    with pytest.raises(LumbarBMDError, match=TRUNCATED):
        read_ct(path)


def test_whole_multi_member_nifti_reads_as_simpleitk_does(tmp_path: Path) -> None:
    """The voxels read by read_ct's own NIfTI path equal SimpleITK's, including scl_slope / scl_inter."""
    path = tmp_path / "ct.nii"
    stored = (integer_hu() + 1024).clip(0, None).astype(np.uint16)
    sitk.WriteImage(make_image(stored, np.eye(3)), str(path))
    raw = bytearray(path.read_bytes())
    raw[112:120] = np.array([0.5, -1024.0], dtype="<f4").tobytes()  # scl_slope, scl_inter
    gz = tmp_path / "ct.nii.gz"
    gz.write_bytes(gzip.compress(bytes(raw[:200]), mtime=0) + gzip.compress(bytes(raw[200:]), mtime=0))
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(gz)))
    np.testing.assert_allclose(read_ct(gz).hu, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(expected, stored * 0.5 - 1024.0)


@pytest.mark.parametrize("member_bytes", [37, 4095, 20 * 24 * 2, 3 * 20 * 24 * 2 + 5])
@pytest.mark.parametrize("serial_chunk", [None, 101])
def test_nifti_gz_in_any_pieces_reads_as_simpleitk_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, member_bytes: int, serial_chunk: int | None
) -> None:
    """Voxels are cast straight from the inflated stream into the reoriented array, a slice at a time: gzip members
    (read in parallel) or inflated pieces (read serially, ``serial_chunk`` compressed bytes a step) that end inside a
    slice, inside the header or exactly on a slice edge give SimpleITK's voxels, in every orientation tried."""
    import LumbarBMDLib.volume as volume

    if serial_chunk is not None:
        monkeypatch.setattr(volume, "_CHUNK_BYTES", serial_chunk)
    hu = phantom_hu((12, 20, 24)).astype(np.int16)
    flips = np.diag([-1.0, 1.0, -1.0])  # RAS-like rows and slices from head to foot
    swap = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0.0]])  # a permuted (sagittal-first) storage
    for direction in (np.eye(3), flips, swap):
        plain = tmp_path / "ct.nii"
        sitk.WriteImage(make_image(hu, direction, spacing=(0.7, 0.8, 2.5)), str(plain))
        raw = plain.read_bytes()
        raw = raw[:112] + np.array([0.5, -3.0], dtype="<f4").tobytes() + raw[120:]  # scl_slope, scl_inter
        gz = tmp_path / "ct.nii.gz"
        if serial_chunk is None:  # many members, each read in its own thread
            members = [gzip.compress(raw[i : i + member_bytes], mtime=0) for i in range(0, len(raw), member_bytes)]
        else:  # one member, inflated serially in small steps
            members = [gzip.compress(raw, mtime=0)]
        gz.write_bytes(b"".join(members))
        if serial_chunk is None:  # the members were found and read in parallel (not left to the serial pass)
            view = np.empty(hu.shape, np.float32)
            sink = volume._SliceSink(view, np.dtype("<i2"), 352, 1.0, 0.0)
            assert volume._inflate_members_in_parallel(gz.read_bytes(), len(raw), sink)
            sink.finish()
            np.testing.assert_array_equal(view, hu)
        expected = sitk.DICOMOrient(sitk.ReadImage(str(gz)), "LPS")
        np.testing.assert_allclose(expected_hu := sitk.GetArrayFromImage(expected), read_ct(gz).hu, rtol=0, atol=1e-4)
        np.testing.assert_allclose(np.sort(expected_hu.ravel()), np.sort(hu.ravel() * 0.5 - 3.0), atol=1e-4)


def test_reads_and_refuses_without_zlib_ng(tmp_path: Path) -> None:
    """zlib-ng only makes inflating faster: without it (blocked in a fresh interpreter) the same voxels are read with
    Python's zlib and a cut file gets the same sentence."""
    path = small_ct(tmp_path / "ct.nii.gz")
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(path.read_bytes()[: int(0.85 * path.stat().st_size)])
    code = (
        "import sys\nsys.modules['zlib_ng'] = None\nimport numpy as np\nimport LumbarBMDLib.volume as v\n"
        "assert v._inflate_lib.__name__ == 'zlib', v._inflate_lib\n"
        f"np.save({str(tmp_path / 'hu.npy')!r}, v.read_ct({str(path)!r}).hu)\n"
        "try:\n    v.read_ct(sys.argv[1])\nexcept v.LumbarBMDError as err:\n    print('ERROR', err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(cut)], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ERROR") and TRUNCATED in result.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "hu.npy"), read_ct(path).hu)


# --- 2. DICOM slice with truncated pixel data ---------------------------------------------------------------------


def test_dicom_slice_with_truncated_pixel_data(tmp_path: Path) -> None:
    """PixelData shortened inside a consistent file (GDCM reads it, as garbage): refused, naming the file."""
    write_dicom_series(tmp_path, integer_hu(), series=1, description="cut")
    cut = tmp_path / "s01_005.dcm"
    ds = pydicom.dcmread(cut)
    ds.PixelData = ds.PixelData[:-300]  # 20 × 24 pixels of 16 bits need 960 bytes
    ds.save_as(cut)
    with pytest.raises(LumbarBMDError) as info:
        read_ct(tmp_path)
    assert str(info.value) == (
        f"DICOM file {cut} of series 'cut' (CT, 16 slices) in {tmp_path} is truncated or damaged: it holds 660 bytes "
        "of pixel data where its header declares 960; the series was not read (copy it again from the scanner or PACS)"
    )


@pytest.mark.parametrize("tiles", [1, 2])
def test_gdcm_written_slice_with_short_pixel_data(tmp_path: Path, tiles: int) -> None:
    """The same in a file as GDCM writes it (implicit VR): the PixelData element's length and the file are shortened
    together, so GDCM still reads the slice (as garbage); refused, naming it. With 2 × 2 tiles the pixel data are
    larger than what pydicom reads at once (its value is deferred, as in every real CT)."""
    hu = np.tile(integer_hu(), (1, tiles, tiles))
    write_dicom_series(tmp_path, hu, series=1, description="cut")
    cut = tmp_path / "s01_007.dcm"
    raw = cut.read_bytes()
    at = raw.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData, implicit VR little endian: tag, 4-byte length
    length = int.from_bytes(raw[at + 4 : at + 8], "little")
    assert length == 960 * tiles**2 and at + 8 + length == len(raw)
    cut.write_bytes(raw[: at + 4] + (length - 300).to_bytes(4, "little") + raw[at + 8 : -300])
    assert sitk.ReadImage(str(cut)).GetSize() == (24 * tiles, 20 * tiles, 1)  # GDCM reads it: only the check refuses
    with pytest.raises(LumbarBMDError) as info:
        read_ct(tmp_path)
    assert str(info.value) == (
        f"DICOM file {cut} of series 'cut' (CT, 16 slices) in {tmp_path} is truncated or damaged: it holds "
        f"{length - 300:,} bytes of pixel data where its header declares {length:,}; the series was not read (copy it "
        "again from the scanner or PACS)"
    )


def _simpleitk_series(folder: Path) -> sitk.Image:
    """The series in ``folder`` as SimpleITK reads it (GDCM, float32), reoriented to LPS: the reference."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    reader.SetOutputPixelType(sitk.sitkFloat32)
    return sitk.DICOMOrient(reader.Execute(), "LPS")


def assert_reads_as_simpleitk(folder: Path, voxels: bool = True) -> CTVolume:
    """``read_ct(folder)`` has SimpleITK's voxels (when ``voxels``), spacing, origin and direction; returns it."""
    ref = _simpleitk_series(folder)
    vol = read_ct(folder)
    if voxels:
        np.testing.assert_array_equal(vol.hu, sitk.GetArrayFromImage(ref))
    np.testing.assert_allclose(vol.spacing, ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(vol.origin, ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(vol.direction.flatten(), ref.GetDirection(), atol=1e-6)
    return vol


def _hu_by_pydicom(folder: Path) -> np.ndarray:
    """The series' HU as pydicom decodes them (pixel_array, bits above BitsStored handled, then the modality LUT),
    slices sorted along +S, float32: the reference for LumbarBMD's direct read of plain pixel data."""
    from pydicom.pixels import apply_modality_lut

    datasets = sorted((pydicom.dcmread(f) for f in folder.glob("*.dcm")),
                      key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack([apply_modality_lut(d.pixel_array, d) for d in datasets]).astype(np.float32)


@pytest.mark.parametrize("variant", ["12 bits stored, high bits set", "signed 12 bits stored", "a slope per slice",
                                     "explicit VR, 8 bits"])
def test_plain_dicom_pixels_read_directly_as_pydicom_decodes_them(tmp_path: Path, variant: str) -> None:
    """Uncompressed grey-scale slices are read by LumbarBMD straight from the file (not by GDCM): the values equal
    pydicom's decoding in each awkward encoding, and the geometry equals SimpleITK's."""
    from pydicom.uid import ExplicitVRLittleEndian

    import LumbarBMDLib.volume as volume

    hu = integer_hu()
    write_dicom_series(tmp_path, hu, series=1, description="plain")
    rng = np.random.default_rng(1)
    for k, file in enumerate(sorted(tmp_path.glob("*.dcm"))):
        ds = pydicom.dcmread(file)
        stored = ds.pixel_array.astype(np.int64)  # HU + 1024, unsigned 16 bits
        if variant == "12 bits stored, high bits set":  # e.g. overlay bits left in the unused high bits
            ds.BitsStored, ds.HighBit = 12, 11
            stored = (stored.clip(0, 4095) | (rng.integers(0, 16, stored.shape) << 12)).astype(np.uint16)
        elif variant == "signed 12 bits stored":  # two's complement in 12 bits, high bits zero
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleIntercept = 12, 11, 1, 0
            stored = ((stored - 1024).clip(-2048, 2047) & 0xFFF).astype(np.uint16)
        elif variant == "a slope per slice":
            ds.RescaleSlope, ds.RescaleIntercept = f"{0.5 + 0.1 * k:.2f}", "-1000.5"
            stored = stored.astype(np.uint16)
        else:  # 8 bits (stored = (HU + 1024) / 16), explicit VR little endian
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.RescaleSlope = 8, 8, 7, 16
            stored = (stored // 16).clip(0, 255).astype(np.uint8)
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = stored.tobytes()
        ds.save_as(file, enforce_file_format=True)
    header = volume._slice_header(str(sorted(tmp_path.glob("*.dcm"))[0]), pydicom)
    assert header.raw_pixels is not None  # LumbarBMD's direct read, not GDCM's
    vol = assert_reads_as_simpleitk(tmp_path, voxels=False)  # GDCM does not mask the unused high bits
    np.testing.assert_allclose(vol.hu, _hu_by_pydicom(tmp_path), rtol=0, atol=1e-4)
    if variant == "12 bits stored, high bits set":  # the masked values, not the 16-bit words
        assert float(vol.hu.max()) <= 4095 - 1024


def test_compressed_and_oblique_dicom_are_read_as_simpleitk_does(tmp_path: Path) -> None:
    """What LumbarBMD does not read directly (a compressed series) is left to GDCM; an oblique plain series read
    directly has SimpleITK's voxels and geometry."""
    import LumbarBMDLib.volume as volume

    hu = integer_hu()
    oblique = tmp_path / "oblique"
    c, s = math.cos(0.35), math.sin(0.35)
    write_dicom_series(oblique, hu, series=1, description="oblique",
                       direction=np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]))
    compressed = tmp_path / "compressed"
    compressed.mkdir()
    for file in sorted(oblique.glob("*.dcm")):
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetUseCompression(True)
        image = sitk.ReadImage(str(file), outputPixelType=sitk.sitkUInt16)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(file))
        reader.ReadImageInformation()
        for key in reader.GetMetaDataKeys():
            image.SetMetaData(key, reader.GetMetaData(key))
        writer.SetFileName(str(compressed / file.name))
        writer.Execute(image)
    assert volume._slice_header(str(next(compressed.glob("*.dcm"))), pydicom).raw_pixels is None
    assert volume._slice_header(str(next(oblique.glob("*.dcm"))), pydicom).raw_pixels is not None
    for folder in (oblique, compressed):
        assert_reads_as_simpleitk(folder)


def test_dicom_file_cut_short_is_named(tmp_path: Path) -> None:
    """A file cut at its end is left out of the series by GDCM: the gap sentence names it."""
    write_dicom_series(tmp_path, integer_hu(), series=1, description="cut")
    cut = tmp_path / "s01_005.dcm"
    cut.write_bytes(cut.read_bytes()[:-300])
    with pytest.raises(LumbarBMDError) as info:
        read_ct(tmp_path)
    assert str(info.value).endswith(
        "a gap of 5.00 mm after slice 5 where the spacing is 2.50 mm; 1 damaged or cut DICOM file(s) in the folder "
        f"could not be read, e.g. {cut}: copy them again"
    )


def test_dicom_damaged_extra_file_is_reported(tmp_path: Path) -> None:
    """A cut first slice leaves no gap: the series is read without it and a warning names the file."""
    write_dicom_series(tmp_path, integer_hu(), series=1, description="cut")
    cut = tmp_path / "s01_000.dcm"
    cut.write_bytes(cut.read_bytes()[:-300])
    vol = read_ct(tmp_path)
    assert vol.shape == (15, 20, 24)
    assert vol.metadata["dicom_unreadable_files"] == [str(cut)]
    assert vol.metadata["warnings"] == [
        f"1 file(s) in {tmp_path} are marked as DICOM but could not be read (damaged or cut short), e.g. {cut}; they "
        "were left out"
    ]


# --- 3. missing, zero or non-finite geometry ------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "shown"), [(0.0, "0"), (math.nan, "nan"), (math.inf, "inf")])
@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_nifti_pixdim_zero_or_not_a_number(tmp_path: Path, value: float, shown: str, ext: str) -> None:
    path = tmp_path / "ct.nii"
    sitk.WriteImage(make_image(phantom_hu(SHAPE), np.eye(3), spacing=(0.75, 0.5, 2.5)), str(path))
    raw = bytearray(path.read_bytes())
    raw[88:92] = np.array([value], dtype="<f4").tobytes()  # pixdim[3]
    path.unlink()
    path = tmp_path / f"ct{ext}"
    path.write_bytes(gzip.compress(bytes(raw)) if ext == ".nii.gz" else bytes(raw))
    with pytest.raises(LumbarBMDError) as info:
        read_ct(path)
    assert str(info.value) == (
        f"the voxel size of {path} is missing from its header (pixdim = (0.75, 0.5, {shown}) mm): LumbarBMD does not "
        "guess voxel sizes; export the CT again from its DICOM series"
    )


@pytest.mark.parametrize(("ext", "fields"), [(".mha", "ElementSpacing or ElementSize"),
                                             (".nrrd", "spacings or space directions")])
def test_nrrd_and_metaimage_without_voxel_size(tmp_path: Path, ext: str, fields: str) -> None:
    data = integer_hu().astype("<i2").tobytes()
    path = tmp_path / f"ct{ext}"
    if ext == ".mha":
        header = "ObjectType = Image\nNDims = 3\nDimSize = 24 20 16\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    else:
        header = "NRRD0004\ntype: short\ndimension: 3\nsizes: 24 20 16\nendian: little\nencoding: raw\n\n"
    path.write_bytes(header.encode() + data)
    with pytest.raises(LumbarBMDError, match=rf"voxel size of .* is missing from its header \(no {fields} field\)"):
        read_ct(path)


def test_dicom_series_without_image_position(tmp_path: Path) -> None:
    write_dicom_series(tmp_path, integer_hu(), series=1, description="no position")
    for name in ("s01_004.dcm", "s01_009.dcm"):
        ds = pydicom.dcmread(tmp_path / name)
        del ds.ImagePositionPatient
        ds.save_as(tmp_path / name)
    with pytest.raises(LumbarBMDError) as info:
        read_ct(tmp_path)
    message = str(info.value)
    assert message.startswith(
        f"DICOM series 'no position' (CT, 16 slices) in {tmp_path} has no slice position (ImagePositionPatient / "
        "ImageOrientationPatient) in 2 file(s), e.g. s01_0"
    )
    assert message.endswith("LumbarBMD does not guess them; export the series again with its geometry")


def test_dicom_series_without_pixel_spacing(tmp_path: Path) -> None:
    write_dicom_series(tmp_path, integer_hu(), series=1, description="no spacing")
    for file in tmp_path.iterdir():
        ds = pydicom.dcmread(file)
        del ds.PixelSpacing
        ds.save_as(file)
    with pytest.raises(LumbarBMDError, match=r"records no valid pixel size \(PixelSpacing = missing\): LumbarBMD does"):
        read_ct(tmp_path)


# --- 4. headers declaring huge volumes, data files that are devices -------------------------------------------------


def _nifti_claiming(path: Path, dims: tuple[int, int, int]) -> Path:
    """A ~1 KB ``.nii.gz`` whose header declares ``dims`` voxels (its real data: a 64 × 64 × 40 volume)."""
    raw_path = path.with_name("small.nii")
    sitk.WriteImage(make_image(phantom_hu(SHAPE)[:8, :8, :8], np.eye(3)), str(raw_path))
    raw = bytearray(raw_path.read_bytes())
    raw[42:48] = np.array(dims, dtype="<i2").tobytes()  # dim[1..3]
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def test_small_nifti_claiming_a_billion_voxels_fails_at_once(tmp_path: Path) -> None:
    """1000³ voxels (under the voxel limit): refused from the file size, in a process that stays small."""
    path = _nifti_claiming(tmp_path / "huge.nii.gz", (1000, 1000, 1000))
    assert path.stat().st_size < 4096
    code = READ_AND_PRINT.format(path=str(path)) + (
        # VmHWM: this process's own peak (ru_maxrss would report the forking pytest's RSS, inherited across exec)
        "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1]\n"
        "print('MAXRSS_MB', int(hwm) // 1024)\n"
    )
    result = run_python(code, timeout=60)
    assert "ERROR" in result.stdout, result.stderr
    assert TRUNCATED in result.stdout
    assert "cannot hold the 4,000,000,352 bytes declared" in result.stdout
    rss = int(result.stdout.split("MAXRSS_MB")[1])
    assert rss < 600, f"reading a 1 KB file used {rss} MB"


def test_nifti_claiming_more_than_the_voxel_limit(tmp_path: Path) -> None:
    path = _nifti_claiming(tmp_path / "huge.nii.gz", (30000, 30000, 30000))
    with pytest.raises(LumbarBMDError) as info:
        read_ct(path)
    assert str(info.value) == (
        f"{path} declares 27,000,000,000,000 voxels (size 30000 × 30000 × 30000), more than the limit of "
        f"{MAX_VOXELS:,} (about 4.0 GiB as float32): its header is damaged, or the volume is far larger than a CT; if "
        f"it is real, raise the limit with --max-voxels or the environment variable {MAX_VOXELS_ENV}"
    )


def test_voxel_limit_from_keyword_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = small_ct(tmp_path / "ct.nii.gz")
    n = math.prod(SHAPE)
    assert read_ct(path, max_voxels=n).shape == SHAPE
    with pytest.raises(LumbarBMDError, match=rf"declares {n:,} voxels \(size 64 × 64 × 40\), more than the limit of "
                                             rf"{n - 1:,}"):
        read_ct(path, max_voxels=n - 1)
    monkeypatch.setenv(MAX_VOXELS_ENV, "1000")
    with pytest.raises(LumbarBMDError, match=r"more than the limit of 1,000 "):
        read_ct(path)
    assert read_ct(path, max_voxels=n).shape == SHAPE  # the keyword wins over the environment
    monkeypatch.setenv(MAX_VOXELS_ENV, "lots")
    with pytest.raises(LumbarBMDError, match=r"LUMBARBMD_MAX_VOXELS='lots' is not a positive number of voxels"):
        read_ct(path)


def test_dicom_series_over_the_voxel_limit(tmp_path: Path) -> None:
    write_dicom_series(tmp_path, integer_hu(), series=1, description="big")
    with pytest.raises(LumbarBMDError, match=r"DICOM series 'big' \(CT, 16 slices\) in .* declares 7,680 voxels "
                                             r"\(size 24 × 20 × 16\), more than the limit of 7,000"):
        read_ct(tmp_path, max_voxels=7000)


@pytest.mark.parametrize("ext", [".nhdr", ".mhd"])
@pytest.mark.parametrize("sizes", ["64 64 40", "5000 5000 5000"])
def test_detached_header_pointing_at_dev_zero(tmp_path: Path, ext: str, sizes: str) -> None:
    path = tmp_path / f"ct{ext}"
    if ext == ".nhdr":
        path.write_text(f"NRRD0004\ntype: short\ndimension: 3\nsizes: {sizes}\nspacings: 1 1 1\nencoding: raw\n"
                        "endian: little\ndata file: /dev/zero\n", encoding="ascii")
    else:
        path.write_text(f"ObjectType = Image\nNDims = 3\nDimSize = {sizes}\nElementSpacing = 1 1 1\n"
                        "ElementType = MET_SHORT\nElementDataFile = /dev/zero\n", encoding="ascii")
    assert path.stat().st_size < 200
    with pytest.raises(LumbarBMDError) as info:
        read_ct(path)
    if sizes == "64 64 40":
        assert str(info.value) == (
            f"the data file named by ct{ext} /dev/zero is a device, not a regular file: LumbarBMD reads images only "
            "from files and folders"
        )
    else:
        assert "declares 125,000,000,000 voxels (size 5000 × 5000 × 5000), more than the limit" in str(info.value)


def test_detached_header_pointing_at_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "ct.raw")
    path = tmp_path / "ct.mhd"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 64 64 40\nElementSpacing = 1 1 1\n"
                    "ElementType = MET_SHORT\nElementDataFile = ct.raw\n", encoding="ascii")
    result = run_python(READ_AND_PRINT.format(path=str(path)), timeout=30)
    assert result.stdout.strip() == (
        f"ERROR the data file named by ct.mhd {tmp_path / 'ct.raw'} is a FIFO (named pipe), not a regular file: "
        "LumbarBMD reads images only from files and folders"
    ), result.stderr


# --- 5. FIFO, unreadable files, symbolic links ----------------------------------------------------------------------


def test_fifo_named_nii_gz_fails_immediately(tmp_path: Path) -> None:
    fifo = tmp_path / "ct.nii.gz"
    os.mkfifo(fifo)
    result = run_python(READ_AND_PRINT.format(path=str(fifo)), timeout=30)  # a regression hangs: the timeout fails it
    assert result.stdout.strip() == (
        f"ERROR file or folder {fifo} is a FIFO (named pipe), not a regular file: LumbarBMD reads images only from "
        "files and folders"
    ), result.stderr


def _readable_by_nobody_tmp() -> Path:
    """A fresh folder under the system temp folder that other users may enter (pytest's tmp_path is private)."""
    folder = Path(tempfile.mkdtemp(prefix="lumbarbmd-perm-"))
    folder.chmod(0o755)
    return folder


@pytest.mark.parametrize("what", ["file", "folder"])
def test_permission_denied(tmp_path: Path, what: str) -> None:
    """As root, permissions do not apply: read_ct then runs as the user 'nobody' (setpriv) in a subprocess."""
    root = _readable_by_nobody_tmp()
    try:
        if what == "file":
            target = small_ct(root / "ct.nii.gz")
            target.chmod(0)
            expected = f"ERROR permission denied: this user may not read {target}; ask for read access or copy the file"
        else:
            write_dicom_series(root / "dicom", integer_hu(), series=1, description="locked")
            target = root / "dicom"
            target.chmod(0o300)  # no read permission: the folder cannot be listed
            expected = (f"ERROR permission denied: this user may not list the folder {target}; ask for read access or "
                        "copy it")
        user = "65534" if os.geteuid() == 0 else None
        assert user is None or shutil.which("setpriv"), "running as root needs setpriv to drop privileges"
        result = run_python(READ_AND_PRINT.format(path=str(target)), timeout=60, user=user)
        assert result.stdout.strip() == expected, result.stderr
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(stat.S_IRWXU)
        shutil.rmtree(root)


def test_file_inside_a_folder_that_cannot_be_entered(tmp_path: Path) -> None:
    root = _readable_by_nobody_tmp()
    try:
        target = small_ct(root / "locked" / "ct.nii.gz")
        (root / "locked").chmod(0o600)  # no execute permission: nothing inside can be reached
        user = "65534" if os.geteuid() == 0 else None
        result = run_python(READ_AND_PRINT.format(path=str(target)), timeout=60, user=user)
        assert result.stdout.strip() == (
            f"ERROR permission denied: file or folder {target} is in a folder this user may not open; ask for read "
            "access or copy it"
        ), result.stderr
    finally:
        (root / "locked").chmod(stat.S_IRWXU)
        shutil.rmtree(root)


def test_symbolic_link_loop(tmp_path: Path) -> None:
    (tmp_path / "a.nii.gz").symlink_to(tmp_path / "b.nii.gz")
    (tmp_path / "b.nii.gz").symlink_to(tmp_path / "a.nii.gz")
    with pytest.raises(LumbarBMDError) as info:
        read_ct(tmp_path / "a.nii.gz")
    assert str(info.value) == (
        f"file or folder {tmp_path / 'a.nii.gz'} is a symbolic link loop (the links point at each other and never "
        "reach a file)"
    )


def test_broken_symbolic_link(tmp_path: Path) -> None:
    (tmp_path / "ct.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(LumbarBMDError) as info:
        read_ct(tmp_path / "ct.nii.gz")
    assert str(info.value) == (
        f"file or folder {tmp_path / 'ct.nii.gz'} is a symbolic link to {tmp_path / 'gone.nii.gz'}, which does not "
        "exist (a broken link)"
    )


# --- 6. choosing between equal-size series --------------------------------------------------------------------------


def test_equal_series_choice_says_the_true_reason(tmp_path: Path) -> None:
    hu = integer_hu()
    write_dicom_series(tmp_path / "a", hu, series=1, description="first")
    used = write_dicom_series(tmp_path / "b", hu, series=2, description="second")
    vol = read_ct(tmp_path)
    assert vol.metadata["series_instance_uid"] == used
    (other,) = vol.metadata["dicom_other_series"]
    assert other["skip_reason"] == (
        "same number of slices (16) as the series used and the same slice thickness; the series used has the later "
        "series number (2 vs 1)"
    )
    assert "fewer slices" not in vol.metadata["dicom_choice"]


def test_equal_slice_count_prefers_thinner_slices(tmp_path: Path) -> None:
    hu = integer_hu()
    used = write_dicom_series(tmp_path / "a", hu, series=1, description="thin", spacing=(0.7, 0.8, 1.25))
    write_dicom_series(tmp_path / "b", hu, series=2, description="thick")
    vol = read_ct(tmp_path)
    assert vol.metadata["series_instance_uid"] == used
    assert vol.metadata["dicom_other_series"][0]["skip_reason"] == (
        "same number of slices (16) as the series used, which has thinner slices (1.25 mm; this one: 2.5 mm)"
    )


# --- 8. obliquity recorded for the pipeline --------------------------------------------------------------------------


def test_in_plane_oblique_dicom_records_its_obliquity(tmp_path: Path) -> None:
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    write_dicom_series(tmp_path, integer_hu(), series=1, description="oblique",
                       direction=np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]))
    vol = read_ct(tmp_path)
    assert vol.metadata["obliquity_deg"] == pytest.approx(20.0, abs=1e-3)



# --- 7. the one-pass reorientation used for speed equals sitk.DICOMOrient -------------------------------------------


@pytest.mark.parametrize("oblique", [False, True])
def test_reorientation_equals_dicom_orient_for_all_48_axis_orders(tmp_path: Path, oblique: bool) -> None:
    import itertools

    from LumbarBMDLib.volume import _lps_float32

    arr = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    c, s = math.cos(0.3), math.sin(0.3)
    tilt = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) if oblique else np.eye(3)
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product([1, -1], repeat=3):
            d = np.zeros((3, 3))
            for col, (row, sign) in enumerate(zip(perm, signs, strict=True)):
                d[row, col] = sign
            img = make_image(arr, tilt @ d, spacing=(0.5, 0.7, 1.3), origin=(3.0, -4.0, 5.0))
            ref = sitk.DICOMOrient(img, "LPS")
            hu, spacing, origin, direction = _lps_float32(img)
            np.testing.assert_array_equal(hu, sitk.GetArrayFromImage(ref))
            np.testing.assert_allclose(spacing, ref.GetSpacing())
            np.testing.assert_allclose(origin, ref.GetOrigin(), atol=1e-9)
            np.testing.assert_allclose(direction, ref.GetDirection(), atol=1e-12)
            path = tmp_path / "ct.nii"  # the same through read_ct's own NIfTI path (float32 voxels)
            sitk.WriteImage(make_image(phantom_hu((12, 20, 24)), tilt @ d), str(path))
            vol = read_ct(path)
            ref_vol = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
            np.testing.assert_array_equal(vol.hu, sitk.GetArrayFromImage(ref_vol))
            np.testing.assert_allclose(vol.origin, ref_vol.GetOrigin(), atol=1e-4)


# --- 8. a real scanner's series through the direct pixel read ----------------------------------------------------


def test_real_philips_series_read_directly_as_simpleitk_reads_it() -> None:
    """The real chest CT (Philips, Implicit VR, 12 bits stored in 16) goes through LumbarBMD's direct read of plain
    pixel data: voxels, spacing, origin and direction equal SimpleITK's; its tube voltage is recorded (kVp 120)."""
    import LumbarBMDLib.volume as volume

    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "chest-ct-negative"
    first = sorted(folder.glob("*.dcm"))[0]
    assert volume._slice_header(str(first), pydicom).raw_pixels == (3070, "<u2", 512, 512, 12)
    assert assert_reads_as_simpleitk(folder).metadata["kvp"] == 120.0
