"""CT volume: a HU array with its voxel→LPS geometry, reoriented to axial LPS.

Conventions (DESIGN.md): physical coordinates are LPS millimetres (ITK/DICOM). A :class:`CTVolume`
holds the HU array in numpy order ``(z, y, x)`` = ``(k, j, i)`` and the 4 × 4 affine that maps an
index ``(i, j, k, 1)`` to an LPS point. After :func:`reorient_to_lps` the index axes run along
+L (i), +P (j) and +S (k), so axial slice ``k`` is ``hu[k]``.
"""

from __future__ import annotations

import csv
import errno
import gzip
import logging
import math
import mmap
import os
import shutil
import stat
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType

import numpy as np
import SimpleITK as sitk

from LumbarBMDLib import durable
from LumbarBMDLib._compat import zip_strict
from LumbarBMDLib.errors import LumbarBMDError


@dataclass
class CTVolume:
    """A CT volume in Hounsfield units with its geometry.

    Attributes:
        hu: HU values, shape ``(nz, ny, nx)``, float32 or int16.
        spacing: voxel size ``(sx, sy, sz)`` in mm along index axes i, j, k.
        origin: LPS position (mm) of the centre of voxel ``(0, 0, 0)``.
        direction: 3 × 3 direction cosines; column ``c`` is the LPS direction of index axis ``c``.
        source: where the volume came from (path, DICOM series, "phantom", ...).
        metadata: free-form facts about the input (series UID, description, reorientation applied, ...).
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    source: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(nz, ny, nx)``."""
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """4 × 4 matrix mapping index ``(i, j, k, 1)`` to LPS ``(x, y, z, 1)`` in mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Map continuous indices ``(..., 3)`` in (i, j, k) order to LPS points ``(..., 3)`` in mm."""
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ (self.direction @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """Map LPS points ``(..., 3)`` in mm to continuous indices ``(..., 3)`` in (i, j, k) order."""
        lps = np.asarray(lps, dtype=float)
        inv = np.linalg.inv(self.direction @ np.diag(self.spacing))
        return (lps - np.asarray(self.origin)) @ inv.T

    def to_sitk(self, dtype: type | None = None) -> sitk.Image:
        """The volume as a SimpleITK image with the same geometry (optionally cast to ``dtype``)."""
        arr = self.hu if dtype is None else self.hu.astype(dtype)
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(self.direction.flatten()))
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image, source: str = "", metadata: dict | None = None) -> CTVolume:
        """Wrap a 3-D SimpleITK image (its pixel values are taken as HU as they are)."""
        if img.GetDimension() != 3:
            raise LumbarBMDError(f"expected a 3-D image, got {img.GetDimension()}-D ({source or 'image'})")
        return cls(
            hu=sitk.GetArrayFromImage(img),
            spacing=img.GetSpacing(),
            origin=img.GetOrigin(),
            direction=np.array(img.GetDirection()).reshape(3, 3),
            source=source,
            metadata=dict(metadata or {}),
        )


def reorient_to_lps(img: sitk.Image) -> sitk.Image:
    """Permute/flip the index axes so that they run along +L, +P, +S (axial LPS).

    Uses ``sitk.DICOMOrient``, which only permutes and flips axes (no interpolation), so voxel values
    and physical positions are unchanged. An oblique volume is oriented to the closest axes; its
    remaining obliquity stays in the direction matrix, so every index still maps to its true LPS point.
    """
    return sitk.DICOMOrient(img, "LPS")


# ---------------------------------------------------------------------------------------------------
# Reading: files (NIfTI, NRRD, MetaImage) and DICOM series, validated and reoriented to axial LPS.
# ---------------------------------------------------------------------------------------------------

log = logging.getLogger(__name__)

#: File name endings read as image files, and the format name recorded in ``metadata["format"]``.
FILE_FORMATS: dict[str, str] = {
    ".nii.gz": "NIfTI",
    ".nii": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
}
MIN_SLICES = 8  # fewest voxels along any axis for a volume
MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 10.0
AIR_HU = -1024.0  # value given to non-finite voxels
MAX_NONFINITE_FRACTION = 0.01
MAX_GAP_FACTOR = 1.5  # a slice gap larger than this × the median spacing means missing slices
MIN_SERIES_SLICES = 3  # DICOM series with fewer files are localizers/scouts or single images
ORTHOGONALITY_TOL = 1e-3
MAX_TILT_DEG = 0.5  # larger shear between slice normal and slice-to-slice step: gantry tilt
UNSIGNED_OFFSET = 1024.0
_INTERCEPT_KEYS = ("0028|1052", "rescaleintercept", "rescale_intercept", "intercept")
_SLOPE_KEYS = ("0028|1053", "rescaleslope", "rescale_slope", "slope")
_SAMPLE_VOXELS = 2_000_000  # intensity statistics use at most this many voxels
#: Most voxels a volume may declare: 2**30 voxels are 4 GiB as float32 HU (a 512 × 512 × 4096 CT, far more than a
#: whole-body CT at 0.5 mm), and reading needs about three times that at its peak. A header declaring more is damaged
#: or hostile; it is refused before any voxel is read. Override with :data:`MAX_VOXELS_ENV` or ``read_ct(max_voxels=)``.
MAX_VOXELS = 2**30
MAX_VOXELS_ENV = "LUMBARBMD_MAX_VOXELS"
try:  # zlib-ng inflates about twice as fast as the zlib CPython links, as fast as ITK's own (ITK 5.4 uses zlib-ng)
    from zlib_ng import zlib_ng as _inflate_lib
except ImportError:  # a plain install without it still reads every file, at about half the speed
    _inflate_lib = zlib  # type: ignore[assignment]
_INFLATE_ERRORS = (zlib.error, _inflate_lib.error)
_CHUNK_BYTES = 1 << 22  # compressed bytes inflated per step when reading a .nii.gz (4 MiB: few Python calls)
#: deflate expands at most 1032-fold (RFC 1951: a 258-byte match costs at least 2 bits), so a gzip file of n bytes
#: holds at most 1032 n bytes: a header declaring more is refused before its buffer is allocated.
_MAX_DEFLATE_RATIO = 1032
#: NIfTI header layouts: sizeof_hdr → offsets and types of (datatype, bitpix, dim[8], pixdim[8], vox_offset,
#: scl_slope, scl_inter), from nifti1.h and nifti2.h.
_NIFTI_LAYOUTS: dict[int, dict[str, tuple[int, str, int]]] = {
    348: {"datatype": (70, "i2", 1), "bitpix": (72, "i2", 1), "dim": (40, "i2", 8), "pixdim": (76, "f4", 8),
          "vox_offset": (108, "f4", 1), "scl_slope": (112, "f4", 1), "scl_inter": (116, "f4", 1)},
    540: {"datatype": (12, "i2", 1), "bitpix": (14, "i2", 1), "dim": (16, "i8", 8), "pixdim": (104, "f8", 8),
          "vox_offset": (168, "i8", 1), "scl_slope": (176, "f8", 1), "scl_inter": (184, "f8", 1)},
}
#: NIfTI datatype codes of single-value voxels (nifti1.h) → numpy type; other codes (complex, RGB) are left to ITK.
_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}


def read_ct(path: str | Path, max_voxels: int | None = None) -> CTVolume:
    """Read a CT from a NIfTI/NRRD/MetaImage file or a DICOM folder, in HU, reoriented to axial LPS.

    Only complete files are read: a file shorter than its header declares (cut during a copy), a DICOM slice with
    truncated pixel data, missing or zero voxel sizes, missing slice positions, a device or FIFO instead of a file,
    and a header declaring more than ``max_voxels`` voxels are refused (before any voxel is read) with a sentence.

    Args:
        path: an image file (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``), a folder
            holding DICOM files (searched recursively; the best CT series is chosen), or one DICOM file
            (its whole series is read).
        max_voxels: most voxels accepted; ``None``: the environment variable ``LUMBARBMD_MAX_VOXELS`` if set,
            else :data:`MAX_VOXELS` (2**30).

    Returns:
        A :class:`CTVolume` whose ``hu`` is float32 ``(nz, ny, nx)`` in HU with index axes along +L, +P,
        +S, and whose ``affine`` maps each index to its LPS point (mm) in the input's physical space
        (axes are only permuted/flipped, never interpolated). ``metadata`` records the format, the
        original geometry, the orientation applied, ``obliquity_deg`` (largest angle between an index axis and
        its closest LPS axis), warnings, and for DICOM the series used and why.

    Raises:
        LumbarBMDError: the path is missing, unreadable or not a regular file, is not a complete readable image, is
            not a 3-D single-component volume, is too large, has missing or implausible geometry, is empty or does
            not look like a CT.
    """
    p = Path(path).expanduser()
    limit = _voxel_limit(max_voxels)
    if _check_path(p, "file or folder") == "folder":
        img, meta = _read_dicom_folder(p, limit)
    elif _is_dicom_file(p):
        img, meta = _read_dicom_folder(p.parent, limit, only_file=p)
    else:
        img, meta = _read_image_file(p, limit)
    return _to_ct_volume(img, p, meta)


def _voxel_limit(max_voxels: int | None) -> int:
    """The voxel limit: ``max_voxels``, else the variable :data:`MAX_VOXELS_ENV`, else :data:`MAX_VOXELS`."""
    if max_voxels is not None:
        if int(max_voxels) < 1:
            raise LumbarBMDError(f"max_voxels must be a positive number of voxels, not {max_voxels}")
        return int(max_voxels)
    text = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not text:
        return MAX_VOXELS
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value < 1:
        raise LumbarBMDError(
            f"the environment variable {MAX_VOXELS_ENV}={text!r} is not a positive number of voxels (e.g. 2000000000)"
        )
    return value


def _check_path(path: Path, role: str) -> str:
    """Raise unless ``path`` is an existing readable regular file or folder; return ``"file"`` or ``"folder"``.

    Runs before anything opens the path, so a FIFO (which would block) or a device such as ``/dev/zero`` (which
    never ends) is refused without being opened. ``role`` names the path in sentences ("file or folder",
    "the data file named by ct.nhdr").
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise LumbarBMDError(
                f"{role} {path} is a symbolic link to {os.readlink(path)}, which does not exist (a broken link)"
            ) from None
        if role == "file or folder":
            raise LumbarBMDError(f"file or folder not found: {path}") from None
        raise LumbarBMDError(f"{role} not found: {path}") from None
    except PermissionError:
        raise LumbarBMDError(
            f"permission denied: {role} {path} is in a folder this user may not open; ask for read access or copy it"
        ) from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise LumbarBMDError(
                f"{role} {path} is a symbolic link loop (the links point at each other and never reach a file)"
            ) from None
        raise LumbarBMDError(f"could not open {role} {path}: {err.strerror or err}") from None
    if stat.S_ISDIR(st.st_mode):
        kind = "folder"
        try:
            os.scandir(path).close()
        except PermissionError:
            raise LumbarBMDError(
                f"permission denied: this user may not list the folder {path}; ask for read access or copy it"
            ) from None
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
        try:
            os.close(os.open(path, os.O_RDONLY))
        except PermissionError:
            raise LumbarBMDError(
                f"permission denied: this user may not read {path}; ask for read access or copy the file"
            ) from None
        except OSError as err:
            raise LumbarBMDError(f"could not open {role} {path}: {err.strerror or err}") from None
    else:
        what = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device")
        raise LumbarBMDError(
            f"{role} {path} is {what}, not a regular file: LumbarBMD reads images only from files and folders"
        )
    return kind


def _check_voxel_count(size: tuple[int, ...], components: int, limit: int, path: Path | str) -> None:
    """Raise if the declared ``size`` (× ``components``) holds more voxels than ``limit``, before anything is read."""
    n = math.prod(int(s) for s in size) * max(int(components), 1)
    if n > limit:
        raise LumbarBMDError(
            f"{path} declares {n:,} voxels (size {_fmt_size(size)}), more than the limit of {limit:,} "
            f"(about {4 * limit / 2**30:.1f} GiB as float32): its header is damaged, or the volume is far larger than "
            f"a CT; if it is real, raise the limit with --max-voxels or the environment variable {MAX_VOXELS_ENV}"
        )


def _file_format(path: Path) -> str:
    """Format name from the file name ending (``"unknown"`` when not one of :data:`FILE_FORMATS`)."""
    name = path.name.lower()
    for ending, fmt in FILE_FORMATS.items():
        if name.endswith(ending):
            return fmt
    return "unknown"


def _is_dicom_file(path: Path) -> bool:
    """True if ``path`` is a file that GDCM reads as DICOM (checked from its header only)."""
    if _file_format(path) != "unknown":
        return False
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.SetImageIO("GDCMImageIO")
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    return True


#: Phrases of ITK/NRRD/MetaImage errors that mean the data stop before the size the header declares.
_TRUNCATION_PHRASES = ("data not read completely", "but received", "unexpected end", "premature end", "short read")


def _first_line(err: Exception) -> str:
    """The most informative line of a SimpleITK error (a line telling the data ended early, else its last non-empty
    line), without ITK's prefix."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if any(phrase in ln.lower() for phrase in _TRUNCATION_PHRASES):
            return ln.removeprefix("sitk::ERROR:").strip()
    return lines[-1].removeprefix("sitk::ERROR:").strip() if lines else type(err).__name__


def _not_readable(path: Path, err: Exception) -> LumbarBMDError:
    reason = _first_line(err)
    if any(phrase in reason.lower() for phrase in _TRUNCATION_PHRASES):
        return _truncated(path, f"({reason})")
    detail = "" if "Unable to determine ImageIO" in reason else f" ({reason})"
    return LumbarBMDError(
        f"could not read {path} as a medical image (NIfTI, NRRD, MetaImage or DICOM): the file is damaged "
        f"or is not an image{detail}"
    )


def _truncated(path: Path, detail: str) -> LumbarBMDError:
    return LumbarBMDError(
        f"{path} is truncated or damaged: it holds less image data than its header declares {detail}; it was "
        "probably cut during a copy or download: copy it again"
    )


def _read_image_file(path: Path, limit: int = MAX_VOXELS) -> tuple[sitk.Image | _Voxels, dict]:
    """Read one image file, checked against its header; header rescale keys are applied to unsigned stored values.

    The header is read first: dimension, components, voxel count (against ``limit``), voxel size and a detached data
    file are checked before any voxel is read. A NIfTI file's voxels are read here (see :func:`_read_nifti`), NRRD
    and MetaImage voxels by ITK, which refuses data shorter than declared.

    Returns the image (any pixel type, dimension checked later) and metadata
    (``format``, ``rescale`` when a header rescale was applied).
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise _not_readable(path, err) from None
    size = reader.GetSize()
    _check_dimension_and_components(reader.GetDimension(), size, reader.GetNumberOfComponents(), path)
    if 0 in size:
        raise LumbarBMDError(f"{path} is an empty image (0 voxels, size {_fmt_size(size)})")
    _check_voxel_count(size, reader.GetNumberOfComponents(), limit, path)
    fmt = _file_format(path)
    meta: dict = {"format": fmt if fmt != "unknown" else reader.GetImageIO() or "unknown"}
    if fmt == "NIfTI":
        img = _read_nifti(path, reader)
        if img is not None:
            return img, meta
    elif fmt in ("NRRD", "MetaImage"):
        _check_text_header(path, fmt, reader)
    _check_spacing(reader.GetSpacing()[:3], path)  # ITK refuses to load a zero spacing: check it first
    try:
        img = reader.Execute()
    except RuntimeError as err:
        raise _not_readable(path, err) from None
    if fmt == "NIfTI":  # ITK already applies NIfTI's scl_slope / scl_inter (only for voxel types ITK reads itself)
        return img, meta
    header = {k.lower(): reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    return _apply_header_rescale(img, header, path, meta), meta


def _nifti_header(path: Path) -> dict | None:
    """The fields of a NIfTI-1/2 header that describe its voxels (``endian``, ``datatype``, ``bitpix``, ``dim``,
    ``pixdim``, ``vox_offset``, ``scl_slope``, ``scl_inter``), read from the first 540 bytes; None if not NIfTI."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    for endian in "<>":
        if len(raw) >= 4 and (size := int(np.frombuffer(raw, endian + "i4", 1, 0)[0])) in _NIFTI_LAYOUTS:
            break
    else:
        return None
    if len(raw) < size:
        return None
    header: dict = {"endian": endian, "sizeof_hdr": size}
    for name, (offset, code, count) in _NIFTI_LAYOUTS[size].items():
        values = np.frombuffer(raw, endian + code, count, offset)
        header[name] = values.tolist() if count > 1 else values[0].item()
    return header


def _read_nifti(path: Path, reader: sitk.ImageFileReader) -> _Voxels | None:
    """Read a NIfTI file's voxels after checking them against its header; None for voxel types left to ITK.

    ITK reads the geometry (qform/sform) but neither notices a file cut short (the missing slices read as 0) nor keeps
    NaN/inf voxels (it sets them to 0, water). So the voxels are read here: the file (or its gzip stream, all members,
    CRC checked) must hold ``vox_offset + prod(dim) × bitpix / 8`` bytes; NaN/inf stay NaN/inf (reported and set to air
    later); ``scl_slope``/``scl_inter`` are applied as ITK and nifti1_io do (a zero or non-finite slope: no scaling).
    """
    h = _nifti_header(path)
    if h is None:
        return None
    ndim = int(h["dim"][0])
    pixdim = h["pixdim"][1:4]
    if not all(math.isfinite(v) and v != 0 for v in pixdim):
        raise LumbarBMDError(
            f"the voxel size of {path} is missing from its header (pixdim = {_fmt_mm(tuple(pixdim))} mm): LumbarBMD "
            "does not guess voxel sizes; export the CT again from its DICOM series"
        )
    dtype = _NIFTI_DTYPES.get(int(h["datatype"]))
    if dtype is None or not 3 <= ndim <= 7:
        return None
    count = math.prod(int(d) for d in h["dim"][1 : ndim + 1])
    offset = int(h["vox_offset"])
    stored = np.dtype(h["endian"] + dtype)
    expected = offset + count * stored.itemsize
    gzipped = path.name.lower().endswith(".gz")
    if gzipped:
        _check_deflate_ratio(path, expected)
    elif (have := path.stat().st_size) < expected:
        raise _truncated(path, f"({have:,} of {expected:,} bytes)")
    size = reader.GetSize()
    slope, inter = float(h["scl_slope"]), float(h["scl_inter"])
    if not (math.isfinite(slope) and slope != 0):  # NIfTI: a zero or non-finite slope means "no scaling"
        slope, inter = 1.0, 0.0
    inter = inter if math.isfinite(inter) else 0.0

    def read_into(view: np.ndarray) -> None:
        if gzipped:
            _inflate_into(path, expected, lambda: _SliceSink(view, stored, offset, slope, inter))
            return
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            sink = _SliceSink(view, stored, offset, slope, inter)
            with memoryview(mapped) as whole:
                sink.write(0, whole)
            sink.finish()

    dim = reader.GetDimension()
    direction = tuple(np.array(reader.GetDirection()).reshape(dim, dim)[:3, :3].flatten())
    return _Voxels((int(size[2]), int(size[1]), int(size[0])), read_into, reader.GetSpacing()[:3],
                   reader.GetOrigin()[:3], direction)


class _SliceSink:
    """Casts a stream of stored voxel bytes into a float32 view, slice by slice, as HU (``× slope + intercept``).

    ``view`` is ``(k, j, i)`` in the file's storage order (a strided view of the reoriented LPS array, so that the
    stored voxels are read and cast once, without a full-size buffer of them). ``write(pos, chunk)`` takes the bytes
    at stream position ``pos`` (the header's ``offset`` bytes come first and are skipped), in any order and from
    several threads: whole slices are cast at once, the ends of a slice split between two chunks are gathered first.
    """

    def __init__(self, view: np.ndarray, stored: np.dtype, offset: int, slope: float, intercept: float) -> None:
        self.view, self.stored, self.offset = view, stored, offset
        self.slope, self.intercept = np.float32(slope), np.float32(intercept)
        self.slice_bytes = int(view.shape[1] * view.shape[2] * stored.itemsize)
        self.total = int(view.shape[0]) * self.slice_bytes
        self._split: dict[int, tuple[bytearray, list[int]]] = {}  # slice → (its bytes, [bytes gathered])
        self._lock = threading.Lock()

    def _cast(self, k0: int, k1: int, data: memoryview | bytes) -> None:
        src = np.frombuffer(data, self.stored).reshape(k1 - k0, *self.view.shape[1:])
        dst = self.view[k0:k1]
        if self.slope == 1 and self.intercept == 0:
            dst[...] = src
        else:
            np.multiply(src, self.slope, out=dst, casting="unsafe")
            dst += self.intercept

    def _gather(self, k: int, at: int, data: memoryview) -> None:
        with self._lock:
            buf, got = self._split.setdefault(k, (bytearray(self.slice_bytes), [0]))
            buf[at : at + len(data)] = data
            got[0] += len(data)
            if got[0] == self.slice_bytes:
                del self._split[k]
                self._cast(k, k + 1, buf)

    def write(self, pos: int, chunk: memoryview) -> None:
        """Cast the voxels in ``chunk`` (stream bytes ``pos`` … ``pos + len(chunk)``)."""
        a = pos - self.offset
        lo, hi = max(a, 0), min(a + len(chunk), self.total)
        if lo >= hi:
            return
        sb = self.slice_bytes
        k0, k1 = -(-lo // sb), hi // sb  # the whole slices in [lo, hi) are k0 … k1 - 1
        if lo < k0 * sb:  # the end of slice k0 - 1 (or a piece inside it)
            self._gather(k0 - 1, lo - (k0 - 1) * sb, chunk[lo - a : min(k0 * sb, hi) - a])
        if k0 < k1:
            self._cast(k0, k1, chunk[k0 * sb - a : k1 * sb - a])
        if k0 <= k1 and k1 * sb < hi:  # the start of slice k1
            self._gather(k1, 0, chunk[k1 * sb - a : hi - a])

    def finish(self) -> None:
        """Raise if a slice was left partly written (the stream held fewer bytes than the view needs)."""
        if self._split:
            raise RuntimeError(f"slices {sorted(self._split)} were not read whole")


@dataclass
class _Voxels:
    """Voxels that LumbarBMD reads itself (not SimpleITK), with the geometry ITK read from the header.

    ``shape`` is the stored ``(k, j, i)``; ``read_into(view)`` reads and checks the file and writes its voxels, in HU,
    into a float32 view of that shape (see :class:`_SliceSink`), so that :func:`_lps_float32` reads them once,
    straight into the reoriented array, after the geometry has been checked. Offers the few ``sitk.Image`` methods
    that :func:`_to_ct_volume` uses.
    """

    shape: tuple[int, int, int]
    read_into: Callable[[np.ndarray], None]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def GetDimension(self) -> int:
        return 3

    def GetSize(self) -> tuple[int, int, int]:
        return self.shape[::-1]

    def GetNumberOfComponentsPerPixel(self) -> int:
        return 1

    def GetSpacing(self) -> tuple[float, ...]:
        return self.spacing

    def GetOrigin(self) -> tuple[float, ...]:
        return self.origin

    def GetDirection(self) -> tuple[float, ...]:
        return self.direction

    def TransformIndexToPhysicalPoint(self, index: list[int]) -> tuple[float, ...]:
        d = np.array(self.direction).reshape(3, 3)
        return tuple(float(v) for v in np.array(self.origin) + d @ (np.array(self.spacing) * np.array(index)))


#: The header ``gzip.compress(..., mtime=0)`` writes (no name, no time, OS unknown), as in the members of the files
#: this project writes (``_gzip_parallel``): where a file holds several, they are inflated in parallel threads.
_PLAIN_MEMBER_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00"


def _inflate_members_in_parallel(data: bytes, expected: int, sink: _SliceSink) -> bool:
    """Inflate a gzip file's bytes member by member in threads (zlib and zlib-ng release the GIL) into ``sink``, when
    its members can be found by their plain headers and each one checks out (it ends exactly where the next begins,
    its CRC and size are right); False otherwise (the serial pass then reads it and names any damage)."""
    starts = [0]
    while (k := data.find(_PLAIN_MEMBER_HEADER, starts[-1] + 18)) > 0:
        starts.append(k)
    if len(starts) < 2 or not data.startswith(_PLAIN_MEMBER_HEADER):
        return False
    parts = [memoryview(data)[a:b] for a, b in zip_strict(starts, [*starts[1:], len(data)])]
    sizes = [int.from_bytes(bytes(p[-4:]), "little") for p in parts]  # ISIZE (members < 4 GiB)
    if sum(sizes) < expected:
        return False
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)

    def inflate(part: memoryview, offset: int, size: int) -> bool:
        d = _inflate_lib.decompressobj(zlib.MAX_WBITS | 16)
        try:
            piece = d.decompress(part)
        except _INFLATE_ERRORS:
            return False
        if not (d.eof and not d.unused_data and len(piece) == size):
            return False  # a header-like byte run inside the data, or damage: the serial pass decides
        sink.write(offset, memoryview(piece))
        return True

    with ThreadPoolExecutor(max_workers=min(len(parts), os.cpu_count() or 1)) as pool:
        return all(list(pool.map(inflate, parts, offsets, sizes)))


def _check_deflate_ratio(path: Path, expected: int) -> None:
    """Raise if the gzip file ``path`` is too small to inflate to the ``expected`` bytes its header declares."""
    stored = path.stat().st_size
    if expected > _MAX_DEFLATE_RATIO * stored + 1024:
        raise _truncated(path, f"(a {stored:,}-byte gzip file cannot hold the {expected:,} bytes declared)")


def _inflate_into(path: Path, expected: int, new_sink: Callable[[], _SliceSink]) -> None:
    """Inflate the gzip file ``path`` (all its members) into a sink, raising if the stream holds fewer than
    ``expected`` bytes, is damaged (bad CRC or deflate data) or is cut before its end. The whole stream is checked in
    one pass (members inflated in parallel where they can be found, see :func:`_inflate_members_in_parallel`). The
    caller has checked the declared size against the file's (:func:`_check_deflate_ratio`) before allocating."""
    data = path.read_bytes()  # read once: for the parallel pass and, if that cannot be used, the serial one
    sink = new_sink()
    if _inflate_members_in_parallel(data, expected, sink):
        sink.finish()
        return
    sink = new_sink()  # the serial pass writes every voxel again
    pos = 0
    in_member = False  # inside a gzip member whose end (its trailer) has not been reached yet
    inflater = _inflate_lib.decompressobj(zlib.MAX_WBITS | 16)  # gzip wrapper: each member's CRC32 and size are checked
    stream = memoryview(data)
    try:
        for start in range(0, len(data), _CHUNK_BYTES):
            chunk: bytes | memoryview = stream[start : start + _CHUNK_BYTES]
            while chunk and (in_member or bytes(chunk).strip(b"\0")):  # zero padding after the last member is allowed
                in_member = True
                piece = inflater.decompress(chunk)
                sink.write(pos, memoryview(piece))
                pos += len(piece)
                chunk = b""
                if inflater.eof:  # end of a member: the next one follows (files this project writes have several)
                    chunk, in_member = inflater.unused_data, False
                    inflater = _inflate_lib.decompressobj(zlib.MAX_WBITS | 16)
    except _INFLATE_ERRORS as err:
        raise LumbarBMDError(f"{path} is damaged: its gzip-compressed data are corrupt ({err}); copy it again") \
            from None
    if pos < expected:
        raise _truncated(path, f"({pos:,} of {expected:,} bytes once decompressed)")
    if in_member:
        raise _truncated(path, "(its compressed stream stops before the gzip trailer)")
    sink.finish()


_TEXT_HEADER_BYTES = 1 << 16  # NRRD / MetaImage text headers are a few hundred bytes; read at most this much


def _text_header(path: Path, fmt: str) -> dict[str, str]:
    """Fields (lower-case keys) of a NRRD (``key: value``) or MetaImage (``Key = Value``) text header; for MetaImage
    also ``"_header_bytes"``, where attached data begin."""
    with path.open("rb") as f:
        text = f.read(_TEXT_HEADER_BYTES).decode("latin-1")
    fields: dict[str, str] = {}
    if fmt == "MetaImage":
        end = text.lower().find("elementdatafile")
        end = text.find("\n", end) if end >= 0 else -1
        fields["_header_bytes"] = str(end + 1 if end >= 0 else len(text))
    for line in text.splitlines()[1 if fmt == "NRRD" else 0 :]:
        if fmt == "NRRD":
            if not line.strip():
                break  # the blank line ending a NRRD header (attached data follow)
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.lstrip("=").strip()
        elif "=" in line:
            key, _, value = line.partition("=")
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                break  # the last MetaImage field (attached data follow)
    return fields


#: Bytes per voxel of the single-component SimpleITK pixel types.
_PIXEL_BYTES = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
                sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8}


def _check_text_header(path: Path, fmt: str, reader: sitk.ImageFileReader) -> None:
    """Raise if a NRRD/MetaImage header gives no voxel size, names a data file that is missing, unreadable or not a
    regular file (e.g. ``/dev/zero``, which ITK would read without end), or (MetaImage) its data file holds fewer bytes
    than declared (ITK only prints that to the console and raises "No such file or directory")."""
    fields = _text_header(path, fmt)
    spacing_keys = ("spacings", "space directions") if fmt == "NRRD" else ("ElementSpacing", "ElementSize")
    if not any(k.lower() in fields for k in spacing_keys):
        raise LumbarBMDError(
            f"the voxel size of {path} is missing from its header (no {' or '.join(spacing_keys)} field): LumbarBMD "
            "does not guess voxel sizes; add it to the header or export the CT again"
        )
    data = fields.get("data file", fields.get("datafile", "")) if fmt == "NRRD" else fields.get("elementdatafile", "")
    if fmt == "MetaImage" and data.upper() == "LOCAL":
        _check_metaimage_size(path, fields, reader, int(fields["_header_bytes"]))
    if not data or data.upper() == "LOCAL" or data.upper().startswith("LIST") or "%" in data:
        return  # attached data (NRRD: ITK checks them against the declared size) or a list of files
    data_path = Path(data) if Path(data).is_absolute() else path.parent / data
    _check_path(data_path, f"the data file named by {path.name}")
    if fmt == "MetaImage":
        _check_metaimage_size(data_path, fields, reader, 0)


def _check_metaimage_size(data_path: Path, fields: dict[str, str], reader: sitk.ImageFileReader, skip: int) -> None:
    """Raise if the MetaImage data (from byte ``skip`` of ``data_path``) are shorter than the header declares:
    ``CompressedDataSize`` when compressed, else voxels × bytes per voxel."""
    have = data_path.stat().st_size - skip
    if fields.get("compresseddata", "false").lower() == "true":
        size = fields.get("compresseddatasize", "")
        need = int(float(size)) if _is_number(size) else 0
    else:
        need = math.prod(reader.GetSize()) * _PIXEL_BYTES.get(reader.GetPixelID(), 0)
    if have < need:
        raise _truncated(data_path, f"({have:,} of {need:,} bytes)")


def _header_float(header: dict[str, str], keys: tuple[str, ...]) -> float | None:
    """First of ``keys`` present in ``header`` (lower-case keys) parsed as a float, else None."""
    for key in keys:
        if key in header:
            try:
                return float(header[key].strip().split("\\")[0])
            except ValueError:
                return None
    return None


def _apply_header_rescale(img: sitk.Image, header: dict[str, str], path: Path, meta: dict) -> sitk.Image:
    """Apply a RescaleSlope/RescaleIntercept found in a NRRD/MetaImage header to non-negative stored values.

    Stored values that already contain negatives are taken as HU (the header key is then stale) and a
    warning is recorded instead.
    """
    intercept = _header_float(header, _INTERCEPT_KEYS)
    slope = _header_float(header, _SLOPE_KEYS)
    if intercept is None and slope is None:
        return img
    intercept = 0.0 if intercept is None else intercept
    slope = 1.0 if slope is None else slope
    if intercept == 0.0 and slope == 1.0:
        return img
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(img if img.GetNumberOfComponentsPerPixel() == 1 else sitk.VectorIndexSelectionCast(img, 0))
    if stats.GetMinimum() < 0:
        meta.setdefault("warnings", []).append(
            f"header of {path.name} gives rescale slope {slope:g} / intercept {intercept:g}, but the stored "
            "values already contain negative HU; they were taken as HU unchanged"
        )
        return img
    meta["rescale"] = {"slope": slope, "intercept": intercept, "source": "file header"}
    return sitk.Cast(img, sitk.sitkFloat32) * slope + intercept


def _check_dimension_and_components(dim: int, size: tuple[int, ...], components: int, path: Path | str) -> None:
    """Reject 2-D, 4-D (unless the 4th axis has length 1) and multi-component images."""
    if components > 1:
        raise LumbarBMDError(
            f"{path} has {components} values per voxel (a vector or colour image, e.g. RGB or a displacement "
            "field): a CT volume has one HU value per voxel"
        )
    if dim == 2:
        raise LumbarBMDError(
            f"{path} is a 2-D image (a single slice): LumbarBMD needs a 3-D CT volume of the abdomen or lumbar spine"
        )
    if dim > 3 and any(n > 1 for n in size[3:]):
        extra = " × ".join(str(n) for n in size[3:])
        raise LumbarBMDError(
            f"{path} is a {dim}-D image ({extra} volumes, e.g. a time series or several phases): give a single "
            "3-D CT volume"
        )
    if dim < 2:
        raise LumbarBMDError(f"{path} is a {dim}-D image: LumbarBMD needs a 3-D CT volume")


def _as_3d(img: sitk.Image | _Voxels) -> sitk.Image | _Voxels:
    """Drop trailing length-1 axes of a 4-D (or higher) image."""
    if img.GetDimension() <= 3:
        return img
    size = list(img.GetSize())
    return sitk.Extract(img, [*size[:3], *[0] * (len(size) - 3)], [0] * len(size))


def _check_geometry(img: sitk.Image | _Voxels, path: Path | str) -> None:
    """Reject empty or thin volumes, implausible spacing and non-orthogonal direction cosines."""
    size = img.GetSize()
    if 0 in size:
        raise LumbarBMDError(f"{path} is an empty image (0 voxels, size {_fmt_size(size)})")
    if min(size) < MIN_SLICES:
        raise LumbarBMDError(
            f"{path} has only {min(size)} slice(s) along one axis (size {_fmt_size(size)} voxels): LumbarBMD "
            f"needs a 3-D CT volume with at least {MIN_SLICES} slices in each direction, not a single slice "
            "or a thin slab"
        )
    _check_spacing(img.GetSpacing()[:3], path)
    d = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    err = np.abs(d.T @ d - np.eye(3)).max() if np.all(np.isfinite(d)) else np.inf
    if err > ORTHOGONALITY_TOL:
        raise LumbarBMDError(
            f"the direction cosines of {path} are not orthogonal (the voxel grid is sheared or the header is "
            "damaged, e.g. a gantry-tilted scan): reformat it to an orthogonal grid first"
        )


def _check_spacing(spacing: tuple[float, ...], path: Path | str) -> None:
    """Reject a voxel spacing (mm) that is not between :data:`MIN_SPACING_MM` and :data:`MAX_SPACING_MM`."""
    if not all(np.isfinite(s) and MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        raise LumbarBMDError(
            f"voxel spacing {_fmt_mm(spacing)} mm of {path} is implausible for a CT (each must be between "
            f"{MIN_SPACING_MM:g} and {MAX_SPACING_MM:g} mm): the file's header is probably wrong"
        )


def _fmt_size(size: tuple[int, ...]) -> str:
    return " × ".join(str(n) for n in size)


def _fmt_mm(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def validated_ct(img: sitk.Image, source: str, metadata: dict | None = None) -> CTVolume:
    """Validate an image already in memory exactly as :func:`read_ct` validates a file, in HU, axial LPS.

    For volumes that do not come from a file, e.g. a Slicer volume node. ``source`` names the image in error
    messages ("the volume 'CT'"). Raises LumbarBMDError with the same sentences as :func:`read_ct` (2-D or 4-D,
    thin slab, implausible spacing, sheared grid, empty, NaN-filled, MR-like intensities).
    """
    return _to_ct_volume(img, source, dict(metadata or {}))


def _to_ct_volume(img: sitk.Image | _Voxels, path: Path | str, meta: dict) -> CTVolume:
    """Validate ``img``, convert it to float32 HU, reorient to axial LPS and wrap it in a CTVolume."""
    _check_dimension_and_components(img.GetDimension(), img.GetSize(), img.GetNumberOfComponentsPerPixel(), path)
    img = _as_3d(img)
    _check_geometry(img, path)
    original_direction = img.GetDirection()
    meta.setdefault("warnings", [])
    meta.update(
        path=str(path),
        original_size=list(img.GetSize()),
        original_spacing=list(img.GetSpacing()),
        original_origin=list(img.GetOrigin()),
        original_direction=list(original_direction),
        original_orientation=_orientation_code(original_direction),
        orientation="LPS",
    )
    hu, spacing, origin, direction = _lps_float32(img)
    meta["reoriented"] = meta["original_orientation"] != "LPS"
    meta["obliquity_deg"] = _obliquity_deg(direction)
    _check_values(hu, path, meta)
    if meta.get("modality") != "CT":
        _check_ct_intensities(hu, path)
    return CTVolume(
        hu=hu,
        spacing=spacing,
        origin=origin,
        direction=np.array(direction).reshape(3, 3),
        source=str(path),
        metadata=meta,
    )


def _lps_float32(img: sitk.Image | _Voxels) -> tuple[np.ndarray, tuple, tuple, tuple]:
    """The voxels of the 3-D ``img`` as float32 ``(z, y, x)`` reoriented to LPS, with spacing, origin and direction.

    The same as :func:`reorient_to_lps` (``sitk.DICOMOrient``) followed by a cast, in one pass: ITK's
    ``DICOMOrientImageFilter`` decides the axis permutation and flips (run on a 2 × 2 × 2 image of the same
    direction); numpy applies them as a view of the stored voxels and copies that view once into float32. This
    avoids two full-size copies (the reoriented image in its stored type and the SimpleITK → numpy copy).
    """
    orienter = sitk.DICOMOrientImageFilter()
    orienter.SetDesiredCoordinateOrientation("LPS")
    proxy = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    proxy.SetDirection(img.GetDirection())
    direction = orienter.Execute(proxy).GetDirection()
    order = [int(a) for a in orienter.GetPermuteOrder()]  # output index axis a is input axis order[a]
    flips = [bool(f) for f in orienter.GetFlipAxes()]  # per output axis
    transpose = [2 - order[2 - n] for n in range(3)]  # numpy axes are (k, j, i)
    flip = tuple(slice(None, None, -1) if flips[2 - n] else slice(None) for n in range(3))
    if isinstance(img, _Voxels):  # read by LumbarBMD: cast straight into the reoriented array
        hu = np.empty(tuple(img.shape[t] for t in transpose), np.float32)
        img.read_into(hu[flip].transpose(np.argsort(transpose)))
    else:
        voxels = sitk.GetArrayViewFromImage(img)
        # the one full-size copy: reoriented and cast together, reading the stored (often 2-byte) values once
        hu = np.ascontiguousarray(voxels.transpose(transpose)[flip], dtype=np.float32)
        if np.may_share_memory(hu, voxels):  # stored as float32 LPS already: never a view of ITK's (freed) buffer
            hu = hu.copy()
    size, spacing = img.GetSize(), img.GetSpacing()
    corner = [0, 0, 0]
    for a in range(3):
        if flips[a]:
            corner[order[a]] = size[order[a]] - 1
    origin = img.TransformIndexToPhysicalPoint(corner)
    return hu, tuple(spacing[order[a]] for a in range(3)), origin, direction


#: Volumes whose index axes are more oblique than this are resampled onto an axial LPS grid before the analysis
#: (:func:`axial_grid`): slice-wise steps (canal rings, axial planes through the sacrum) assume axial slices.
OBLIQUE_RESAMPLE_DEG = 3.0


def axial_grid(volume: CTVolume) -> CTVolume:
    """The volume on an axial LPS grid when its index axes are oblique by more than ``OBLIQUE_RESAMPLE_DEG``.

    The new grid has the identity direction, covers the oblique volume's bounding box, keeps the in-plane pixel size
    and the slice spacing, and is filled by linear interpolation (−1024 HU, air, outside the scan). Every LPS point
    keeps its HU, so every result (an LPS point) is valid in the input's own space. A volume that is axial already is
    returned as it is.
    """
    if _obliquity_deg(tuple(volume.direction.flatten())) <= OBLIQUE_RESAMPLE_DEG:
        return volume
    nz, ny, nx = volume.shape
    corners = volume.index_to_lps(np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)],
                                           dtype=float))
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    pixel = float(min(volume.spacing[0], volume.spacing[1]))
    spacing = (pixel, pixel, float(volume.spacing[2]))
    size = [int(np.ceil((h - low) / s)) + 1 for h, low, s in zip_strict(hi, lo, spacing)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetOrigin(tuple(float(v) for v in lo))
    out = sitk.Resample(volume.to_sitk(np.float32), ref, sitk.Transform(), sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    meta = dict(volume.metadata, resampled_axial=True)
    return CTVolume.from_sitk(out, source=volume.source, metadata=meta)


#: A slice whose median absolute difference from the mean of its two neighbours (inside the patient) exceeds this,
#: and ``DAMAGED_SLICE_RATIO`` × the volume's typical difference, is damaged (a dropped slice of air, a slice of
#: noise): anatomy changes far less from one slice to the next (typically 10–80 HU at 0.6–5 mm slices).
DAMAGED_SLICE_HU = 250.0
DAMAGED_SLICE_RATIO = 6.0


def damaged_slices(volume: CTVolume) -> np.ndarray:
    """Indices ``k`` of axial slices that do not continue their neighbours (see ``DAMAGED_SLICE_HU``)."""
    hu = volume.hu
    nz, ny, nx = hu.shape
    if nz < 3:
        return np.zeros(0, int)
    sub = hu[:, ny // 4 : 3 * ny // 4 : 2, nx // 4 : 3 * nx // 4 : 2].astype(np.float32)  # the patient's middle
    diff = np.empty(nz, np.float32)
    diff[1:-1] = np.median(np.abs(sub[1:-1] - 0.5 * (sub[:-2] + sub[2:])).reshape(nz - 2, -1), axis=1)
    diff[0] = np.median(np.abs(sub[0] - sub[1]))
    diff[-1] = np.median(np.abs(sub[-1] - sub[-2]))
    typical = float(np.median(diff))
    bad = (diff > DAMAGED_SLICE_HU) & (diff > DAMAGED_SLICE_RATIO * max(typical, 1.0))
    # a good slice between two damaged ones also differs from the mean of its neighbours: keep only local maxima
    k = np.flatnonzero(bad)
    return np.array([i for i in k if diff[i] >= diff[max(i - 1, 0)] and diff[i] >= diff[min(i + 1, nz - 1)]], int)


def repair_damaged_slices(volume: CTVolume) -> CTVolume:
    """The volume with its damaged slices (:func:`damaged_slices`) replaced by the mean of the nearest good slices
    above and below, so that they do not mislead the analysis; ``metadata["damaged_slices_z_mm"]`` lists their LPS z
    (a measurement touching one is refused downstream) and a warning says so. Unchanged when none is damaged."""
    bad = damaged_slices(volume)
    if len(bad) == 0 or len(bad) > volume.shape[0] // 4:
        return volume
    hu = volume.hu.copy()
    good = np.setdiff1d(np.arange(volume.shape[0]), bad)
    for k in bad:
        below, above = good[good < k], good[good > k]
        sources = [hu[below[-1]]] if len(below) else []
        sources += [hu[above[0]]] if len(above) else []
        hu[k] = np.mean(sources, axis=0).astype(hu.dtype)
    z = volume.index_to_lps(np.c_[np.zeros(len(bad)), np.zeros(len(bad)), bad.astype(float)])[:, 2]
    meta = dict(volume.metadata)
    meta["damaged_slices_z_mm"] = [round(float(v), 2) for v in z]
    meta["warnings"] = [*meta.get("warnings", []), f"{len(bad)} damaged slice(s) (at z = "
                        f"{', '.join(f'{v:.1f}' for v in z)} mm) were replaced by their neighbours' mean"]
    log.warning(meta["warnings"][-1])
    return replace(volume, hu=hu, metadata=meta)


def _orientation_code(direction: tuple[float, ...]) -> str:
    """ITK/DICOM three-letter code of the closest axes, e.g. ``"LPS"`` (identity) or ``"RAS"``."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(direction)


def _obliquity_deg(direction: tuple[float, ...]) -> float:
    """Largest angle (degrees) between an index axis and the LPS axis it is closest to."""
    d = np.abs(np.array(direction, dtype=float).reshape(3, 3))
    return float(np.degrees(np.arccos(np.clip(d.max(axis=0), -1.0, 1.0))).max())


def _check_values(hu: np.ndarray, path: Path | str, meta: dict) -> None:
    """Reject a constant volume or many NaN/inf voxels; replace a few NaN/inf voxels with air, in place.

    Args:
        hu: float32 HU array ``(nz, ny, nx)``, modified in place.
    """
    lo, hi = float(hu.min()), float(hu.max())  # NaN propagates through min/max: no voxel-sized mask when all finite
    finite = np.isfinite(hu) if not (math.isfinite(lo) and math.isfinite(hi)) else None
    n_bad = 0 if finite is None else int(hu.size - np.count_nonzero(finite))
    meta["nonfinite_voxels"] = n_bad
    if n_bad > MAX_NONFINITE_FRACTION * hu.size:
        raise LumbarBMDError(
            f"{path} has {n_bad} voxels ({100 * n_bad / hu.size:.1f} %) that are not numbers (NaN or infinite): "
            "the image is damaged or is not a CT"
        )
    if n_bad:
        values = hu[finite]
        lo, hi = (float(values.min()), float(values.max())) if values.size else (math.nan, math.nan)
    if not lo < hi:  # constant, or nothing finite (NaN)
        value = f" ({lo:g} everywhere)" if math.isfinite(lo) else ""
        raise LumbarBMDError(f"{path} is an empty image: all voxels have the same value{value}")
    if n_bad:
        hu[~finite] = AIR_HU
        name = path.name if isinstance(path, Path) else path
        msg = f"{n_bad} voxels of {name} were not numbers (NaN or infinite) and were set to {AIR_HU:g} HU (air)"
        meta["warnings"].append(msg)
        log.warning(msg)


def _looks_like_ct(v: np.ndarray) -> bool:
    """Tolerant test that finite values ``v`` are CT HU: some air (or at least fat) and few values > 4000.

    Air: ≥ 0.1 % of voxels ≤ -900 HU or the 1st percentile below -500 HU. A CT cropped tightly to the body
    with hardly any air still has fat: ≥ 0.5 % of voxels in [-200, -30] HU. Values below -1100 HU are
    allowed (outside the reconstruction circle, scanners store -2048 or -3024).
    """
    has_air = np.mean(v <= -900) >= 0.001 or np.percentile(v, 1) < -500
    has_fat = np.mean((v >= -200) & (v <= -30)) >= 0.005
    return bool((has_air or has_fat) and np.mean(v > 4000) < 0.05)


def _check_ct_intensities(hu: np.ndarray, path: Path | str) -> None:
    """Raise unless the HU array ``(nz, ny, nx)`` looks like CT (see :func:`_looks_like_ct`)."""
    step = max(1, hu.size // _SAMPLE_VOXELS)
    v = hu.ravel()[::step].astype(np.float64)
    if _looks_like_ct(v):
        return
    msg = (
        f"intensities of {path} do not look like CT Hounsfield units (no air around -1000 HU): "
        "is this an MR or a PET image?"
    )
    if v.min() >= 0 and v.max() >= UNSIGNED_OFFSET + 100 and _looks_like_ct(v - UNSIGNED_OFFSET):
        msg += (
            " If it is a CT stored as unsigned values with air near 0 (HU + 1024), convert it to HU or record "
            "the offset in the file header (RescaleIntercept = -1024, as in DICOM)."
        )
    raise LumbarBMDError(msg)


# --- DICOM -------------------------------------------------------------------------------------------


@dataclass
class _Series:
    """One DICOM series found in a folder (tags from its first file)."""

    uid: str
    files: list[str]
    description: str = ""
    modality: str = ""
    image_type: str = ""
    series_number: int | None = None
    frames: int = 1
    slice_thickness: float | None = None
    rows: int = 0
    columns: int = 0
    pixel_spacing: str = ""
    kvp: float | None = None  # KVP (0018,0060), the tube voltage (kV): the internal calibration's energy prior
    skip_reason: str = ""

    @property
    def n_slices(self) -> int:
        """Number of image slices: files, or frames of a single multi-frame file."""
        return self.frames if len(self.files) == 1 else len(self.files)

    def summary(self) -> dict:
        """Plain-data description for ``metadata``."""
        return {
            "uid": self.uid,
            "description": self.description,
            "modality": self.modality,
            "n_slices": self.n_slices,
            "series_number": self.series_number,
            "image_type": self.image_type,
            "folder": str(Path(self.files[0]).parent),
            "skip_reason": self.skip_reason,
        }

    def label(self) -> str:
        """Human-readable ``'description' (CT, 312 slices)``."""
        n = self.n_slices
        return f"'{self.description or self.uid}' ({self.modality or 'no modality'}, {n} slice{'s' * (n != 1)})"


def _dicom_header(file: str) -> sitk.ImageFileReader:
    """A reader holding the header (tags, no pixels) of one DICOM file."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(file)
    reader.LoadPrivateTagsOn()
    reader.ReadImageInformation()
    return reader


def _tag(reader: sitk.ImageFileReader, key: str) -> str:
    """Tag value stripped of padding, ``""`` when absent."""
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _find_series(folder: Path, recursive: bool = True) -> list[_Series]:
    """All DICOM series in ``folder`` (and its subfolders), tags read cheaply from each series' first file.

    Returned in the order of their SeriesNumber (then description).
    """
    files_by_uid: dict[str, list[str]] = {}
    show_warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns about every folder without DICOM
    try:
        subfolders = sorted(p for p in folder.rglob("*") if p.is_dir()) if recursive else []
        for sub in [folder, *subfolders]:
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(sub)):
                files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(sub), uid)
                files_by_uid.setdefault(uid, []).extend(files)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(show_warnings)
    series = []
    for uid, files in files_by_uid.items():
        s = _Series(uid=uid, files=files)
        try:
            r = _dicom_header(files[0])
        except RuntimeError:
            s.skip_reason = "unreadable"
            series.append(s)
            continue
        s.description = _tag(r, "0008|103e")
        s.modality = _tag(r, "0008|0060").upper()
        s.image_type = _tag(r, "0008|0008").upper()
        number = _tag(r, "0020|0011")
        s.series_number = int(float(number)) if _is_number(number) else None
        frames = _tag(r, "0028|0008")
        s.frames = int(float(frames)) if _is_number(frames) else 1
        thickness = _tag(r, "0018|0050")
        s.slice_thickness = float(thickness) if _is_number(thickness) and float(thickness) > 0 else None
        rows, columns = _tag(r, "0028|0010"), _tag(r, "0028|0011")
        s.rows = int(float(rows)) if _is_number(rows) else 0
        s.columns = int(float(columns)) if _is_number(columns) else 0
        s.pixel_spacing = _tag(r, "0028|0030")
        kvp = _tag(r, "0018|0060")
        s.kvp = float(kvp) if _is_number(kvp) and 40 <= float(kvp) <= 160 else None
        series.append(s)
    series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.description, s.uid))
    return series


def _unread_dicom_files(folder: Path, recursive: bool, series: list[_Series]) -> list[str]:
    """Files under ``folder`` that carry the DICOM mark ("DICM" after the 128-byte preamble) but that GDCM put in no
    series: damaged or cut files (GDCM leaves out a file that is even one byte short)."""
    grouped = {os.path.realpath(f) for s in series for f in s.files}
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    unread = []
    for p in sorted(candidates):
        if not p.is_file() or os.path.realpath(p) in grouped:  # is_file follows links; FIFOs and devices are not files
            continue
        try:
            with p.open("rb") as f:
                marked = f.read(132)[128:] == b"DICM"
        except OSError:
            continue
        if marked:
            unread.append(str(p))
    return unread


def _is_number(text: str) -> bool:
    """True if ``text`` is a finite decimal number (a DICOM DS/IS value)."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _is_derived(s: _Series) -> bool:
    return "DERIVED" in s.image_type.split("\\")


def _choice_key(s: _Series) -> tuple:
    """Order of preference among usable CT series: ORIGINAL before DERIVED, most slices, thinnest slices, latest
    series number, then the series UID (so that the choice never depends on the order of files on disk)."""
    thickness = s.slice_thickness if s.slice_thickness is not None else math.inf
    return (not _is_derived(s), s.n_slices, -thickness, s.series_number if s.series_number is not None else -1, s.uid)


def _skip_reason(s: _Series, best: _Series) -> str:
    """Why the usable series ``s`` was not chosen over ``best``: the first criterion of :func:`_choice_key` that
    differs."""
    if _is_derived(s) and not _is_derived(best):
        return "derived (reformatted) series"
    if s.n_slices != best.n_slices:
        return "fewer slices"
    same = f"same number of slices ({s.n_slices}) as the series used"
    if s.slice_thickness != best.slice_thickness:
        mine = f"{s.slice_thickness:g} mm" if s.slice_thickness is not None else "not recorded"
        return f"{same}, which has thinner slices ({best.slice_thickness:g} mm; this one: {mine})"
    if s.series_number != best.series_number:
        return f"{same} and the same slice thickness; the series used has the later series number " \
               f"({best.series_number} vs {s.series_number})"
    return f"{same}, the same slice thickness and series number; the series used has the larger series UID"


def _choose_series(series: list[_Series], folder: Path) -> _Series:
    """Pick the CT series to read: not a localizer, ≥ 3 slices, then by :func:`_choice_key` (ORIGINAL before DERIVED,
    most slices, thinnest slices, latest series number).

    Sets ``skip_reason`` on every other series (the true reason, see :func:`_skip_reason`). Raises when no usable CT
    series exists.
    """
    for s in series:
        if s.skip_reason:
            continue
        if "LOCALIZER" in s.image_type.split("\\"):
            s.skip_reason = "localizer"
        elif s.n_slices < MIN_SERIES_SLICES:
            s.skip_reason = f"fewer than {MIN_SERIES_SLICES} slices (localizer or single image)"
        elif s.modality and s.modality != "CT":
            s.skip_reason = "not CT"
    usable = [s for s in series if not s.skip_reason]
    if not usable:
        raise LumbarBMDError(_no_ct_message(series, folder))
    best = max(usable, key=_choice_key)
    for s in usable:
        if s is not best:
            s.skip_reason = _skip_reason(s, best)
    return best


def _no_ct_message(series: list[_Series], folder: Path) -> str:
    """Explain why none of the DICOM series in ``folder`` is a usable CT."""
    found = "; ".join(f"{s.label()}: {s.skip_reason}" for s in series)
    others = {s.modality for s in series if s.skip_reason == "not CT"}
    if others:
        kinds = ", ".join(sorted(others))
        return (
            f"no CT series in DICOM folder {folder}: found {kinds} ({found}); LumbarBMD needs a CT of the "
            "abdomen or lumbar spine"
        )
    return f"no usable CT series in DICOM folder {folder}: only localizer/scout or single images ({found})"


def _choice_sentence(series: list[_Series], used: _Series) -> str:
    """``"used series 3 of 4: 'Abdomen 1.0 B30f' (CT, 312 slices); skipped: ..."``."""
    index = series.index(used) + 1
    sentence = f"used series {index} of {len(series)}: {used.label()}"
    skipped = [f"{s.label()}: {s.skip_reason}" for s in series if s is not used]
    if skipped:
        sentence += "; skipped: " + ", ".join(skipped)
    return sentence


def _read_dicom_folder(
    folder: Path, limit: int = MAX_VOXELS, only_file: Path | None = None
) -> tuple[sitk.Image, dict]:
    """Read the best CT series under ``folder`` (or the series of ``only_file``) in HU.

    Before any pixel is read: the series' voxel count is checked against ``limit``, its pixel spacing and every
    slice's position must be recorded, and every file must hold the pixel data its Rows × Columns × BitsAllocated ×
    frames declare. SimpleITK's GDCM reader applies each slice's RescaleSlope/RescaleIntercept, so values are HU.
    Returns the image and metadata (``format``, ``modality``, the series used, the others, the choice).
    """
    series = _find_series(folder, recursive=only_file is None)
    if only_file is not None:
        target = only_file.resolve()
        series = [s for s in series if any(Path(f).resolve() == target for f in s.files)]
    if not series:
        raise LumbarBMDError(
            f"no DICOM series found in folder {folder} (it is empty or holds no DICOM images; to read a NIfTI, "
            "NRRD or MetaImage file, give the file's path)"
        )
    unread = _unread_dicom_files(folder, only_file is None, series) if only_file is None else []
    used = _choose_series(series, folder)
    _check_voxel_count((used.columns, used.rows, used.n_slices), 1, limit, f"DICOM series {used.label()} in {folder}")
    _check_pixel_spacing(used, folder)
    headers = _slice_headers(used, folder)
    choice = _choice_sentence(series, used)
    log.info("DICOM %s: %s", folder, choice)
    meta: dict = {
        "format": "DICOM",
        "modality": used.modality,
        "series_instance_uid": used.uid,
        "series_description": used.description,
        "kvp": used.kvp,
        "n_slices": used.n_slices,
        "dicom_series_used": used.summary(),
        "dicom_other_series": [s.summary() for s in series if s is not used],
        "dicom_choice": choice,
        "dicom_unreadable_files": unread,
        "warnings": [],
    }
    if unread:
        meta["warnings"].append(
            f"{len(unread)} file(s) in {folder} are marked as DICOM but could not be read (damaged or cut short), e.g. "
            f"{unread[0]}; they were left out"
        )
        log.warning(meta["warnings"][-1])
    if len(used.files) == 1:
        meta["warnings"].append("multi-frame DICOM file: slice positions were not checked for gaps")
        return _execute(sitk.ImageFileReader(), used.files, folder), meta
    files = _sorted_checked_slices(used, headers, folder, unread)
    by_file = dict(zip_strict(used.files, headers))
    voxels = _plain_series(used, files, [by_file[f] for f in files])
    if voxels is not None:
        return voxels, meta
    rescales = {h.rescale for h in headers}
    # One integer rescale for every slice: GDCM's own output type holds the HU exactly, and the one cast to float32
    # (while reorienting) is cheaper than GDCM's. Otherwise float32 from GDCM, so that no slice's rescale is rounded
    # to the type chosen from the first slice.
    native = len(rescales) == 1 and (r := rescales.pop()) is not None and r[0] == 1 and float(r[1]).is_integer()
    return _execute(sitk.ImageSeriesReader(), files, folder, native), meta


def _plain_series(series: _Series, files: list[str], headers: list[_SliceHeader]) -> _Voxels | None:
    """The sorted slice files of an uncompressed grey-scale series as :class:`_Voxels`, or None (GDCM reads it).

    The pixel data of every file are read straight from where the header pass found them and cast, with that
    slice's RescaleSlope/RescaleIntercept (in double precision, as GDCM does), into the reoriented float32 array:
    no second parse of each file and no intermediate image. Bits above BitsStored are masked (sign-extended when
    signed), as pydicom and GDCM do. The geometry is ITK's for a series: origin at the first slice, in-plane spacing
    from PixelSpacing (row spacing first), slice spacing the first-to-last distance over the slice count − 1, and the
    slice normal as the third axis.
    """
    layouts = {h.raw_pixels[1:] if h.raw_pixels else None for h in headers}
    if len(layouts) != 1 or None in layouts or any(h.rescale is None or h.position is None for h in headers):
        return None
    dtype, rows, columns, stored = layouts.pop()  # type: ignore[misc]
    if (rows, columns) != (series.rows, series.columns) or any(
        h.small_value is None and h.raw_pixels[0] < 0 for h in headers  # type: ignore[index]
    ):
        return None
    row_spacing, column_spacing = (float(v) for v in series.pixel_spacing.split("\\"))
    orientation = np.array(headers[0].orientation, dtype=float)
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    first, last = np.array(headers[0].position), np.array(headers[-1].position)
    step = float(np.linalg.norm(last - first)) / (len(files) - 1)
    direction = tuple(float(v) for v in np.column_stack([row, col, normal]).flatten())
    count = rows * columns
    item = np.dtype(dtype)

    def read_into(view: np.ndarray) -> None:
        shift = item.itemsize * 8 - stored
        for k, (file, h) in enumerate(zip_strict(files, headers)):
            if h.small_value is not None:
                values = np.frombuffer(h.small_value, item, count)
            else:
                with open(file, "rb") as f:
                    f.seek(h.raw_pixels[0])  # type: ignore[index]
                    data = f.read(count * item.itemsize)
                if len(data) < count * item.itemsize:  # changed since the header pass
                    raise _truncated(Path(file), f"({len(data):,} of {count * item.itemsize:,} bytes of pixel data)")
                values = np.frombuffer(data, item, count)
            values = values.reshape(rows, columns)
            if shift:  # unused high bits: masked, or the sign of bit BitsStored − 1 extended
                values = (values << shift) >> shift if item.kind == "i" else values & ((1 << stored) - 1)
            slope, intercept = h.rescale  # type: ignore[misc]
            if slope == 1 and float(intercept).is_integer():
                np.add(values, np.float32(intercept), out=view[k], casting="unsafe")
            else:
                view[k] = values * slope + intercept

    return _Voxels((len(files), rows, columns), read_into, (column_spacing, row_spacing, step),
                   tuple(float(v) for v in first), direction)


def _execute(
    reader: sitk.ImageFileReader | sitk.ImageSeriesReader, files: list[str], folder: Path, native: bool = False
) -> sitk.Image:
    """Read pixels in HU from one file or a sorted list of slice files: float32, or GDCM's own type if ``native``."""
    if isinstance(reader, sitk.ImageSeriesReader):
        reader.SetFileNames(files)
    else:
        reader.SetFileName(files[0])
    reader.SetImageIO("GDCMImageIO")
    if not native:
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise LumbarBMDError(
            f"could not read the DICOM series in {folder}: a file is damaged or uses an unsupported encoding "
            f"({_first_line(err)})"
        ) from None


def _check_pixel_spacing(series: _Series, folder: Path) -> None:
    """Raise if the series' PixelSpacing (0028,0030) is missing, zero or not a number (GDCM would assume 1 mm)."""
    parts = series.pixel_spacing.split("\\")
    if len(parts) == 2 and all(_is_number(v) and float(v) > 0 for v in parts):
        return
    raise LumbarBMDError(
        f"DICOM series {series.label()} in {folder} records no valid pixel size (PixelSpacing = "
        f"{series.pixel_spacing or 'missing'}): LumbarBMD does not guess voxel sizes; export the series again"
    )


#: DICOM PixelData stored with an undefined length is encapsulated (compressed); its size is checked by the decoder.
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass
class _SliceHeader:
    """What LumbarBMD checks in each DICOM file before any pixel is read (one pydicom pass over the series)."""

    pixel_bytes: tuple[int, int] | None  # (bytes of PixelData present, bytes its header needs); None: not checkable
    position: tuple[float, ...] | None  # ImagePositionPatient (mm); None when absent or not numbers
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 direction cosines)
    rescale: tuple[float, float] | None  # (RescaleSlope, RescaleIntercept); None when not numbers
    #: Where uncompressed little-endian grey-scale pixel data lie: (byte offset in the file, numpy dtype, rows,
    #: columns, bits stored); None for anything else (compressed, colour, multi-frame, big endian: GDCM reads those).
    raw_pixels: tuple[int, str, int, int, int] | None = None
    small_value: bytes | None = None  # pixel data pydicom read already (a value too small to be deferred)


#: Transfer syntaxes whose pixel data are stored as plain little-endian integers (Implicit / Explicit VR Little Endian).
_PLAIN_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def _raw_pixel_layout(ds: object, elem: object, need: int) -> tuple[int, str, int, int, int] | None:
    """(offset, dtype, rows, columns, bits stored) of plain grey-scale pixel data that can be read directly, or None."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    bits, stored = int(ds.BitsAllocated), int(ds.get("BitsStored", ds.BitsAllocated) or ds.BitsAllocated)
    if (syntax not in _PLAIN_LITTLE_ENDIAN or int(ds.get("SamplesPerPixel", 1) or 1) != 1
            or str(ds.get("PhotometricInterpretation", "")).strip() != "MONOCHROME2"
            or int(ds.get("NumberOfFrames", 1) or 1) != 1 or bits not in (8, 16, 32) or not 0 < stored <= bits
            or int(getattr(elem, "length", need) or need) != need):
        return None
    dtype = ("<i" if int(ds.get("PixelRepresentation", 0) or 0) == 1 else "<u") + str(bits // 8)
    tell = getattr(elem, "value_tell", None)  # where a deferred value starts; None once pydicom has read it
    offset = -1 if tell is None else int(tell)
    return offset, dtype, int(ds.Rows), int(ds.Columns), stored


def _numbers(text: str, count: int) -> tuple[float, ...] | None:
    """``count`` backslash-separated decimal numbers from a DICOM DS value, or None."""
    parts = text.split("\\")
    return tuple(float(x) for x in parts) if len(parts) == count and all(_is_number(x) for x in parts) else None


def _element_text(ds: object, tag: int) -> str:
    """A text element's value as stored (an undecoded ``bytes`` value decoded as ASCII), ``""`` when absent."""
    elem = ds.get_item(tag)  # type: ignore[attr-defined]
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \0")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _slice_header(file: str, pydicom: ModuleType) -> _SliceHeader:
    """The :class:`_SliceHeader` of one DICOM file, its header read by pydicom (the pixel value deferred).

    PixelData needed: Rows × Columns × SamplesPerPixel × ⌈BitsAllocated / 8⌉ × NumberOfFrames; present: the
    element's length, capped by what the file holds after the element starts. Encapsulated (compressed) pixel data
    are checked by their decoder. A file pydicom cannot parse is left to GDCM, which read its header: its geometry is
    then read with GDCM.
    """
    size = os.path.getsize(file)
    try:
        ds = pydicom.dcmread(file, defer_size=1024, force=True)
        position = _numbers(_element_text(ds, 0x00200032), 3)
        orientation = _numbers(_element_text(ds, 0x00200037), 6)
        slope, intercept = _element_text(ds, 0x00281053) or "1", _element_text(ds, 0x00281052) or "0"
        rescale = (float(slope), float(intercept)) if _is_number(slope) and _is_number(intercept) else None
        elem = ds.get_item(0x7FE00010, keep_deferred=True)  # a deferred value stays unread
        if elem is None:
            return _SliceHeader((0, 1) if "Rows" in ds else None, position, orientation, rescale)  # no pixel data
        need = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
                * -(-int(ds.BitsAllocated) // 8) * int(ds.get("NumberOfFrames", 1) or 1))
        if getattr(elem, "is_undefined_length", False) or getattr(elem, "length", 0) == _UNDEFINED_LENGTH:
            return _SliceHeader(None, position, orientation, rescale)  # encapsulated (compressed): its decoder checks
        layout = _raw_pixel_layout(ds, elem, need)
        if isinstance(getattr(elem, "value", None), (bytes, bytearray)):  # small: read already
            return _SliceHeader((len(elem.value), need), position, orientation, rescale, layout, bytes(elem.value))
        # deferred: the element's length, capped by what the file holds after the element starts
        pixel_bytes = (min(int(elem.length), max(size - int(elem.value_tell), 0)), need)
        return _SliceHeader(pixel_bytes, position, orientation, rescale, layout)
    except (OSError, ValueError, TypeError, AttributeError, EOFError, KeyError):
        # pydicom cannot parse it: GDCM, which read its header, decides; the file's size bounds its pixel data
        r = _dicom_header(file)
        keys, defaults = ("0028|0010", "0028|0011", "0028|0002", "0028|0100", "0028|0008"), (0, 0, 1, 16, 1)
        rows, cols, spp, bits, frames = (
            int(float(v)) if _is_number(v := _tag(r, k)) else d for k, d in zip_strict(keys, defaults)
        )
        return _SliceHeader((size, rows * cols * spp * -(-bits // 8) * frames), _numbers(_tag(r, "0020|0032"), 3),
                            _numbers(_tag(r, "0020|0037"), 6), None)


def _slice_headers(series: _Series, folder: Path) -> list[_SliceHeader]:
    """Each file's :class:`_SliceHeader`; raise, naming the file, if one holds less pixel data than its header
    declares (a cut file would otherwise be read as garbage, e.g. HU up to 64511)."""
    import pydicom

    headers = []
    for file in series.files:
        h = _slice_header(file, pydicom)
        if h.pixel_bytes is not None and h.pixel_bytes[0] < h.pixel_bytes[1]:
            raise LumbarBMDError(
                f"DICOM file {file} of series {series.label()} in {folder} is truncated or damaged: it holds "
                f"{h.pixel_bytes[0]:,} bytes of pixel data where its header declares {h.pixel_bytes[1]:,}; the series "
                "was not read (copy it again from the scanner or PACS)"
            )
        headers.append(h)
    return headers


def _slice_geometry(headers: list[_SliceHeader]) -> tuple[np.ndarray, np.ndarray]:
    """ImagePositionPatient ``(n, 3)`` and ImageOrientationPatient ``(n, 6)`` of each file (NaN if absent)."""
    positions = np.array([h.position or (np.nan,) * 3 for h in headers], dtype=float).reshape(-1, 3)
    orientations = np.array([h.orientation or (np.nan,) * 6 for h in headers], dtype=float).reshape(-1, 6)
    return positions, orientations


def _sorted_checked_slices(
    series: _Series, headers: list[_SliceHeader], folder: Path, unread: list[str] | None = None
) -> list[str]:
    """Slice files sorted along the slice normal; raise on mixed orientations, duplicates or gaps."""
    positions, orientations = _slice_geometry(headers)
    name = series.label()
    missing = np.isnan(positions).any(axis=1) | np.isnan(orientations).any(axis=1)
    if missing.any():
        raise LumbarBMDError(
            f"DICOM series {name} in {folder} has no slice position (ImagePositionPatient / ImageOrientationPatient) "
            f"in {int(missing.sum())} file(s), e.g. {Path(series.files[int(np.argmax(missing))]).name}: the order and "
            "spacing of its slices are unknown and LumbarBMD does not guess them; export the series again with its "
            "geometry"
        )
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        raise LumbarBMDError(
            f"the slices of DICOM series {name} in {folder} have different orientations: it is not one volume"
        )
    row, col = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, col)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    median = float(np.median(steps))
    if median <= 1e-3 or steps.min() <= 1e-3:
        raise LumbarBMDError(
            f"DICOM series {name} in {folder} has several slices at the same position (duplicated slices or "
            "several acquisitions in one series)"
        )
    if steps.max() > MAX_GAP_FACTOR * median:
        at = int(np.argmax(steps))
        raise LumbarBMDError(
            f"DICOM series {name} in {folder} has missing slices or non-uniform slice spacing: a gap of "
            f"{steps[at]:.2f} mm after slice {at + 1} where the spacing is {median:.2f} mm"
            + (f"; {len(unread)} damaged or cut DICOM file(s) in the folder could not be read, e.g. {unread[0]}: "
               "copy them again" if unread else "")
        )
    _check_no_tilt(positions[order], normal, name, folder)
    return [series.files[i] for i in order]


def _check_no_tilt(positions: np.ndarray, normal: np.ndarray, name: str, folder: Path) -> None:
    """Raise if the sorted slice positions ``(n, 3)`` (mm) do not advance along the slice normal.

    A gantry-tilted series has slices shifted within their plane from one to the next, so its voxel grid
    is sheared; reading it as an orthogonal grid would misplace every slice.
    """
    step = positions[-1] - positions[0]
    cos = abs(float(step @ normal)) / max(float(np.linalg.norm(step)), 1e-9)
    angle = float(np.degrees(np.arccos(min(1.0, cos))))
    if angle > MAX_TILT_DEG:
        raise LumbarBMDError(
            f"DICOM series {name} in {folder} is sheared by {angle:.1f}° (gantry tilt): its slices are not "
            "stacked along their normal; reformat it to an orthogonal volume (e.g. in the scanner console or "
            "Slicer's 'Acquisition transform') first"
        )


# --- Writing -----------------------------------------------------------------------------------------


def write_volume(volume: CTVolume, path: str | Path, dtype: type | np.dtype | None = None) -> Path:
    """Write ``volume`` (HU array ``(nz, ny, nx)`` with its geometry) to an image file, atomically.

    The file (and a detached data file for ``.mhd``/``.nhdr``) is written in a temporary folder next to
    ``path`` and moved into place with ``os.replace``, so a failure leaves no half-written file.

    Args:
        volume: the volume to write.
        path: destination; the format follows the ending (``.nii.gz``, ``.nrrd``, ``.mha``, ...).
        dtype: pixel type to store (e.g. ``np.int16``); integers are rounded and clipped to its range.
            ``None`` keeps the array's type.

    Returns:
        The path written.
    """
    return write_image(replace(volume, hu=_convert(volume.hu, dtype)).to_sitk(), path)


def write_image(img: sitk.Image, path: str | Path) -> Path:
    """Write a SimpleITK image atomically (temporary folder + ``os.replace``), compressed where the format allows.

    ``.nii.gz`` is written uncompressed by ITK and gzip-compressed (level 1) by two threads as a
    two-member gzip stream, which every gzip/zlib reader (ITK, nibabel, gunzip) reads as one file; it is
    about three times faster than ITK's single-threaded compression for a 512 × 512 × 300 CT.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        if path.name.lower().endswith(".nii.gz"):
            raw = tmp_dir / path.name[: -len(".gz")]
            sitk.WriteImage(img, str(raw), False)
            _gzip_parallel(raw, tmp_dir / path.name)
            raw.unlink()
        else:
            writer = sitk.ImageFileWriter()
            writer.SetFileName(str(tmp_dir / path.name))
            writer.SetUseCompression(True)
            writer.Execute(img)
        written = sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name)  # header last
        for file in written:
            os.replace(file, path.parent / file.name)
    except (RuntimeError, OSError) as err:
        raise LumbarBMDError(f"could not write {path}: {_first_line(err)}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def write_csv(path: str | Path, fieldnames: list[str], rows: Iterable[dict]) -> Path:
    """Write a CSV table (header + ``rows`` as dicts) atomically: a temporary sibling file renamed into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


atomic_folder = durable.atomic_folder  # (kept here for the writers that import it from volume)


def _gzip_parallel(src: Path, dst: Path, parts: int = 2, level: int = 1) -> None:
    """gzip ``src`` into ``dst`` as ``parts`` concatenated members compressed in parallel threads."""
    data = src.read_bytes()
    step = -(-len(data) // parts)
    chunks = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
    with ThreadPoolExecutor(max_workers=parts) as pool:
        members = list(pool.map(lambda c: gzip.compress(c, compresslevel=level, mtime=0), chunks))
    with dst.open("wb") as f:
        for m in members:
            f.write(m)


def _convert(hu: np.ndarray, dtype: type | np.dtype | None) -> np.ndarray:
    """``hu`` cast to ``dtype``; for integer types rounded and clipped to the type's range."""
    if dtype is None:
        return hu
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer) and not np.issubdtype(hu.dtype, np.integer):
        info = np.iinfo(dt)
        return np.clip(np.rint(hu), info.min, info.max).astype(dt)
    return hu.astype(dt)
