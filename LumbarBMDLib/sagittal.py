"""Sagittal reslice through the spinal canal, with an exact pixel → LPS mapping (paper §3.1).

Spacing policy (so that 0.6 mm and 3 mm scans give comparable images): every sagittal image is
resampled (linear interpolation, SimpleITK) onto a fixed grid of :data:`SAGITTAL_PIXEL_MM` square
pixels, :data:`SAGITTAL_SIZE` × :data:`SAGITTAL_SIZE` (409.6 mm field of view), and consecutive
sagittal slices are :data:`SAGITTAL_STEP_MM` apart along the patient's left–right axis. The paper's
"20 consecutive sagittal slices" (annotation image) are therefore a 16 mm slab and the 10 segmentation
candidates span 8 mm, whatever the scanner's pixel size; these are close to the paper's native
0.7–0.8 mm pixels, so its parameters keep their meaning.

Orientation (DESIGN.md): rows run superior → inferior, columns anterior → posterior (anterior on the
left, as radiologists view a sagittal image). Slice index ``k`` runs toward the patient's right, which
makes the (column, row, slice) frame right-handed so any viewer (Slicer, ITK-SNAP) overlays it on the CT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from LumbarBMDLib.volume import CTVolume

SAGITTAL_PIXEL_MM = 0.8
SAGITTAL_STEP_MM = 0.8
SAGITTAL_SIZE = 512
ANNOTATION_SLICES = 20
CANDIDATE_SLICES = 10
WINDOW_HU = (-150.0, 850.0)  # WL 350 / WW 1000 (paper §3.2)
ANTERIOR_OF_CANAL_MM = 60.0  # the image centre lies this far in front of the canal (see sagittal_centre_yz)
NETWORK_WINDOW_COLUMNS = 256  # the R2U-Net runs on 512 rows × this many columns ...
NETWORK_WINDOW_ANTERIOR_MM = 15.0  # ... centred this far in front of the canal (the vertebral bodies' side)

#: LPS directions of the sagittal grid's index axes: column → posterior, row → inferior, slice → right.
COLUMN_DIRECTION = np.array([0.0, 1.0, 0.0])
ROW_DIRECTION = np.array([0.0, 0.0, -1.0])
SLICE_DIRECTION = np.array([-1.0, 0.0, 0.0])


@dataclass(frozen=True)
class SagittalGeometry:
    """A stack of ``n_slices`` parallel sagittal images and its exact pixel → LPS mapping.

    Attributes:
        origin_lps: LPS point (mm) of pixel (column 0, row 0) of slice 0.
        n_slices: number of sagittal slices in the stack.
        size: image size in pixels (square: rows = columns = ``size``).
        pixel_mm: in-plane pixel size (mm).
        step_mm: distance between consecutive slices (mm).
        sagittal_x_lps: LPS x (mm) of the slab's central plane (the canal's sagittal position).
    """

    origin_lps: tuple[float, float, float]
    n_slices: int
    sagittal_x_lps: float
    size: int = SAGITTAL_SIZE
    pixel_mm: float = SAGITTAL_PIXEL_MM
    step_mm: float = SAGITTAL_STEP_MM

    @property
    def direction(self) -> np.ndarray:
        """3 × 3 direction cosines, columns = LPS directions of (column, row, slice)."""
        return np.stack([COLUMN_DIRECTION, ROW_DIRECTION, SLICE_DIRECTION], axis=1)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Spacing (mm) along (column, row, slice)."""
        return (self.pixel_mm, self.pixel_mm, self.step_mm)

    @property
    def affine(self) -> np.ndarray:
        """4 × 4 matrix mapping (column, row, slice, 1) to LPS (x, y, z, 1) in mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin_lps
        return m

    def pixel_to_lps(self, col_row_slice: np.ndarray) -> np.ndarray:
        """Continuous (column, row, slice) coordinates ``(..., 3)`` → LPS points ``(..., 3)`` in mm."""
        p = np.asarray(col_row_slice, dtype=float)
        return p @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_pixel(self, lps: np.ndarray) -> np.ndarray:
        """LPS points ``(..., 3)`` in mm → continuous (column, row, slice) coordinates ``(..., 3)``."""
        q = np.asarray(lps, dtype=float) - self.affine[:3, 3]
        return q @ np.linalg.inv(self.affine[:3, :3]).T

    def central_plane(self) -> SagittalGeometry:
        """The single-slice geometry of the slab's central plane (where a mean image is displayed)."""
        centre = self.pixel_to_lps([0.0, 0.0, (self.n_slices - 1) / 2.0])
        return SagittalGeometry(
            origin_lps=tuple(float(v) for v in centre),
            n_slices=1,
            sagittal_x_lps=self.sagittal_x_lps,
            size=self.size,
            pixel_mm=self.pixel_mm,
            step_mm=self.step_mm,
        )

    def slab(self, n_slices: int) -> SagittalGeometry:
        """A stack of ``n_slices`` centred on this grid's central plane (same in-plane grid and step)."""
        centre = self.pixel_to_lps([0.0, 0.0, (self.n_slices - 1) / 2.0])
        origin = centre - SLICE_DIRECTION * self.step_mm * (n_slices - 1) / 2.0
        return SagittalGeometry(tuple(float(v) for v in origin), n_slices, self.sagittal_x_lps, self.size,
                                self.pixel_mm, self.step_mm)

    @classmethod
    def from_image(cls, img: sitk.Image) -> SagittalGeometry:
        """The grid of a sagittal image written by this package (e.g. ``sagittal_labels.nii.gz``)."""
        direction = np.array(img.GetDirection()).reshape(3, 3)
        expected = np.stack([COLUMN_DIRECTION, ROW_DIRECTION, SLICE_DIRECTION], axis=1)
        size = img.GetSize()
        if not np.allclose(direction, expected, atol=1e-4) or size[0] != size[1]:
            raise ValueError("not a LumbarBMD sagittal image (unexpected direction or non-square size)")
        n = size[2] if img.GetDimension() == 3 else 1
        spacing = img.GetSpacing()
        origin = tuple(float(v) for v in img.GetOrigin())
        centre_x = origin[0] + SLICE_DIRECTION[0] * spacing[2] * (n - 1) / 2.0 if len(spacing) > 2 else origin[0]
        return cls(origin, n, float(centre_x), int(size[0]), float(spacing[0]),
                   float(spacing[2]) if len(spacing) > 2 else SAGITTAL_STEP_MM)

    def reference_image(self) -> sitk.Image:
        """An empty SimpleITK image on this grid (size column × row × slice), for resampling."""
        ref = sitk.Image([self.size, self.size, self.n_slices], sitk.sitkFloat32)
        ref.SetSpacing(self.spacing)
        ref.SetOrigin(self.origin_lps)
        ref.SetDirection(tuple(self.direction.flatten()))
        return ref

    def to_sitk(self, stack: np.ndarray) -> sitk.Image:
        """Wrap an array ``(n_slices, rows, cols)`` (or ``(rows, cols)`` for one slice) as an image on this grid."""
        arr = np.asarray(stack)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.shape != (self.n_slices, self.size, self.size):
            raise ValueError(f"array shape {arr.shape} does not match the sagittal grid {self.n_slices, self.size}")
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin_lps)
        img.SetDirection(tuple(self.direction.flatten()))
        return img


def sagittal_centre_yz(volume: CTVolume, canal_centres_lps: np.ndarray) -> tuple[float, float]:
    """Where the sagittal image is centred (LPS y, z in mm): the paper's centre crop, made scanner-independent.

    * y (anterior–posterior): 60 mm in front of the mean canal centre, so the 409.6 mm field of view spans
      from 265 mm in front of the canal (any abdomen) to 145 mm behind it (back muscles and skin), whatever
      the patient's position on the table.
    * z (superior–inferior): the volume's centre when the scan is shorter than the field of view (nothing
      is cropped); for longer scans (chest–abdomen–pelvis) 190 mm above the lowest canal centre, which keeps
      the sacrum and the lumbar spine in view.

    Args:
        volume: the CT.
        canal_centres_lps: ``(n, 3)`` canal centres (LPS mm) on the slices where the canal was found.
    """
    pts = np.asarray(canal_centres_lps, dtype=float)
    y = float(pts[:, 1].mean()) - ANTERIOR_OF_CANAL_MM
    nz, ny, nx = volume.shape
    corners = volume.index_to_lps(np.array([[0, 0, 0], [nx - 1, ny - 1, nz - 1]], dtype=float))
    z_lo, z_hi = float(corners[:, 2].min()), float(corners[:, 2].max())
    fov = SAGITTAL_SIZE * SAGITTAL_PIXEL_MM
    z = 0.5 * (z_lo + z_hi) if z_hi - z_lo <= fov else float(pts[:, 2].min()) + 190.0
    return y, z


def network_window(canal_column: float | None = None, size: int = SAGITTAL_SIZE) -> tuple[int, int]:
    """Columns ``(c0, c1)`` of the segmentation window: ``NETWORK_WINDOW_COLUMNS`` wide, centred
    ``NETWORK_WINDOW_ANTERIOR_MM`` in front of the canal column. Without a canal column the centring policy's
    own canal column is used (the image centre lies ``ANTERIOR_OF_CANAL_MM`` in front of the mean canal), which
    is where the canal is on every image this module makes — training pairs included."""
    if canal_column is None:
        canal_column = (size - 1) / 2.0 + ANTERIOR_OF_CANAL_MM / SAGITTAL_PIXEL_MM
    if NETWORK_WINDOW_COLUMNS >= size:
        return 0, size
    centre = canal_column - NETWORK_WINDOW_ANTERIOR_MM / SAGITTAL_PIXEL_MM
    c0 = int(np.clip(round(float(centre) - NETWORK_WINDOW_COLUMNS / 2), 0, size - NETWORK_WINDOW_COLUMNS))
    return c0, c0 + NETWORK_WINDOW_COLUMNS


def window_to_unit(hu: np.ndarray) -> np.ndarray:
    """Network input (paper §3.2): window WL 350 / WW 1000, i.e. [-150, 850] HU, mapped linearly to [0, 1].

    The min–max normalisation is taken over the window, not over each image, so a given HU gives the same
    value in every scan; pixels outside the scan (−1024) become 0, which is the paper's zero padding.
    """
    lo, hi = WINDOW_HU
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


@dataclass
class SagittalImages:
    """The images the segmentation network and the annotators work on.

    Attributes:
        candidates_hu: float32 ``(10, 512, 512)`` HU, the 10 consecutive sagittal slices containing the
            canal's mean centre (segmentation candidates).
        candidate_geometry: their grid (slice k of the stack ↔ ``candidate_geometry`` slice k).
        annotation_hu: float32 ``(512, 512)`` HU, the mean of the 20 consecutive slices (annotation image).
        annotation_geometry: single-slice grid of the annotation image (the slab's central plane).
    """

    candidates_hu: np.ndarray
    candidate_geometry: SagittalGeometry
    annotation_hu: np.ndarray
    annotation_geometry: SagittalGeometry

    def network_input(self) -> np.ndarray:
        """float32 ``(10, 1, 512, 512)`` in [0, 1]: the windowed candidates, one batch for the R2U-Net."""
        return window_to_unit(self.candidates_hu)[:, None]


def sagittal_images(volume: CTVolume, sagittal_x_lps: float, centre_yz_lps: tuple[float, float]) -> SagittalImages:
    """Candidates (10 slices) and annotation image (mean of 20) through the plane x = ``sagittal_x_lps``."""
    cand_geom = sagittal_geometry(volume, sagittal_x_lps, CANDIDATE_SLICES, centre_yz_lps)
    ann_geom = sagittal_geometry(volume, sagittal_x_lps, ANNOTATION_SLICES, centre_yz_lps)
    crop = crop_to_geometry(volume, ann_geom)  # the 16 mm slab contains the 8 mm candidate slab
    img = crop.to_sitk(np.float32)
    candidates = resample_to_sagittal(img, cand_geom)
    annotation = resample_to_sagittal(img, ann_geom).mean(axis=0)
    return SagittalImages(candidates, cand_geom, annotation, ann_geom.central_plane())


def sagittal_geometry(
    volume: CTVolume,
    sagittal_x_lps: float,
    n_slices: int,
    centre_yz_lps: tuple[float, float] | None = None,
    size: int = SAGITTAL_SIZE,
    pixel_mm: float = SAGITTAL_PIXEL_MM,
    step_mm: float = SAGITTAL_STEP_MM,
) -> SagittalGeometry:
    """The grid of ``n_slices`` consecutive sagittal slices centred on the plane x = ``sagittal_x_lps``.

    The image is centred (the paper's centre crop / zero pad) on the volume's physical centre in the
    anterior–posterior (y) and superior–inferior (z) directions unless ``centre_yz_lps`` is given.
    For an even ``n_slices`` the central plane lies half-way between the two middle slices.
    """
    if centre_yz_lps is None:
        nz, ny, nx = volume.shape
        centre = volume.index_to_lps([(nx - 1) / 2.0, (ny - 1) / 2.0, (nz - 1) / 2.0])
        centre_yz_lps = (float(centre[1]), float(centre[2]))
    half_extent = (size - 1) / 2.0 * pixel_mm
    half_slab = (n_slices - 1) / 2.0 * step_mm
    centre_lps = np.array([sagittal_x_lps, centre_yz_lps[0], centre_yz_lps[1]])
    origin = centre_lps - half_extent * COLUMN_DIRECTION - half_extent * ROW_DIRECTION - half_slab * SLICE_DIRECTION
    return SagittalGeometry(
        origin_lps=tuple(float(v) for v in origin),
        n_slices=int(n_slices),
        sagittal_x_lps=float(sagittal_x_lps),
        size=int(size),
        pixel_mm=float(pixel_mm),
        step_mm=float(step_mm),
    )


def resample_to_sagittal(
    image: sitk.Image, geometry: SagittalGeometry, nearest: bool = False, default_value: float = -1024.0
) -> np.ndarray:
    """Resample a 3-D image onto the sagittal grid.

    Returns:
        float32 array ``(n_slices, rows, cols)``; values outside the input are ``default_value``
        (air for CT, so the paper's zero padding after windowing is what lies outside the scan).
    """
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(
        image, geometry.reference_image(), sitk.Transform(), interpolator, float(default_value), sitk.sitkFloat32
    )
    return sitk.GetArrayFromImage(out)


def crop_to_geometry(volume: CTVolume, geometry: SagittalGeometry, margin: int = 2) -> CTVolume:
    """The part of ``volume`` that the sagittal grid samples (its index bounding box + ``margin`` voxels).

    Resampling a 16 mm slab needs only a few percent of a CT; cropping first avoids converting the
    whole volume. Works for any orientation (the box is taken in the volume's own index space).
    """
    n, s = geometry.n_slices, geometry.size
    corners = np.array([[c, r, k] for c in (0, s - 1) for r in (0, s - 1) for k in (0, n - 1)], dtype=float)
    ijk = volume.lps_to_index(geometry.pixel_to_lps(corners))
    shape_xyz = np.array(volume.shape[::-1])
    lo = np.clip(np.floor(ijk.min(axis=0)).astype(int) - margin, 0, shape_xyz - 1)
    hi = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + margin + 1, lo + 1, shape_xyz)
    hu = volume.hu[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
    origin = volume.index_to_lps(lo.astype(float))
    return CTVolume(hu=hu, spacing=volume.spacing, origin=tuple(origin), direction=volume.direction,
                    source=volume.source, metadata=volume.metadata)


def mean_sagittal_image(volume: CTVolume, geometry: SagittalGeometry) -> np.ndarray:
    """Mean of the slab's sagittal slices in HU, shape ``(rows, cols)`` float32 (the annotation image)."""
    crop = crop_to_geometry(volume, geometry)
    return resample_to_sagittal(crop.to_sitk(np.float32), geometry).mean(axis=0)


def sagittal_label_image(
    labels: CTVolume, geometry: SagittalGeometry, levels: tuple[int, ...] = (1, 2, 3, 4)
) -> np.ndarray:
    """What an annotator draws on the slab's mean image: each level where it covers most of the slab.

    Args:
        labels: a label volume on a CT grid (its ``hu`` array holds the label values).
        geometry: the slab.
        levels: the label values to draw.

    For every label value in ``levels`` the fraction of the slab occupied by it is computed (linear
    interpolation of its binary mask, averaged over the slab's slices); a pixel takes the level with the
    largest fraction when that fraction is at least one half.

    Returns:
        uint8 array ``(rows, cols)`` with values 0 (background) or the level's label value.
    """
    crop = crop_to_geometry(labels, geometry)
    fractions = []
    for level in levels:
        mask = CTVolume(hu=(crop.hu == level).astype(np.float32), spacing=crop.spacing, origin=crop.origin,
                        direction=crop.direction)
        fractions.append(resample_to_sagittal(mask.to_sitk(), geometry, default_value=0.0).mean(axis=0))
    stack = np.stack(fractions)
    best = np.argmax(stack, axis=0)
    out = np.asarray(levels, dtype=np.uint8)[best]
    out[np.max(stack, axis=0) < 0.5] = 0
    return out
