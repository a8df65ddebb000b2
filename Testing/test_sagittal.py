"""Tests of the sagittal reslice (LumbarBMDLib.sagittal): geometry, resampling, cropping, label images, files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from LumbarBMDLib.sagittal import (
    SagittalGeometry,
    crop_to_geometry,
    mean_sagittal_image,
    resample_to_sagittal,
    sagittal_geometry,
    sagittal_label_image,
)
from LumbarBMDLib.volume import CTVolume, write_image


def _rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


DIRECTIONS = {"axial": np.eye(3), "oblique_20deg": _rot_z(20.0)}


def smooth_volume(
    shape=(40, 70, 80), spacing=(0.7, 0.7, 1.0), origin=(-20.0, -30.0, 50.0), direction=None, seed=0
) -> CTVolume:
    """A CT-like volume (HU −200…600) with smooth structure, so interpolation differences stay small."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    hu = 200.0 + 300.0 * np.sin(i / 7.0) * np.cos(j / 9.0) + 100.0 * np.sin(k / 5.0) + rng.normal(0, 5, shape)
    return CTVolume(
        hu=hu.astype(np.float32),
        spacing=spacing,
        origin=origin,
        direction=np.eye(3) if direction is None else direction,
    )


# ---------------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_slices", [1, 10, 20])
def test_pixel_lps_round_trip(n_slices):
    rng = np.random.default_rng(n_slices)
    geom = SagittalGeometry(
        origin_lps=tuple(rng.uniform(-200, 200, 3)),
        n_slices=n_slices,
        sagittal_x_lps=float(rng.uniform(-50, 50)),
        size=512,
        pixel_mm=0.8,
        step_mm=0.8,
    )
    pixels = rng.uniform(-10, 520, (200, 3))
    np.testing.assert_allclose(geom.lps_to_pixel(geom.pixel_to_lps(pixels)), pixels, atol=1e-9)
    points = rng.uniform(-300, 300, (200, 3))
    np.testing.assert_allclose(geom.pixel_to_lps(geom.lps_to_pixel(points)), points, atol=1e-9)
    np.testing.assert_allclose(geom.pixel_to_lps([0.0, 0.0, 0.0]), geom.origin_lps, atol=1e-12)


def test_direction_frame_is_right_handed_and_radiological():
    geom = SagittalGeometry(origin_lps=(10.0, -200.0, 300.0), n_slices=4, sagittal_x_lps=8.8, pixel_mm=0.8, step_mm=0.6)
    d = geom.direction
    assert np.linalg.det(d) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-12)
    np.testing.assert_array_equal(d[:, 0], [0.0, 1.0, 0.0])  # columns → posterior
    np.testing.assert_array_equal(d[:, 1], [0.0, 0.0, -1.0])  # rows → inferior
    np.testing.assert_array_equal(d[:, 2], [-1.0, 0.0, 0.0])  # slices → right (−L)
    p0 = geom.pixel_to_lps([3.0, 5.0, 1.0])
    np.testing.assert_allclose(geom.pixel_to_lps([4.0, 5.0, 1.0]) - p0, [0.0, 0.8, 0.0], atol=1e-12)
    np.testing.assert_allclose(geom.pixel_to_lps([3.0, 6.0, 1.0]) - p0, [0.0, 0.0, -0.8], atol=1e-12)
    np.testing.assert_allclose(geom.pixel_to_lps([3.0, 5.0, 2.0]) - p0, [-0.6, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(geom.affine[:3, :3], d @ np.diag(geom.spacing), atol=1e-12)


@pytest.mark.parametrize("n_slices", [10, 20])
def test_sagittal_geometry_centres_slab_on_sagittal_x(n_slices):
    vol = smooth_volume()
    x = 3.3
    geom = sagittal_geometry(vol, x, n_slices)
    assert geom.n_slices == n_slices and geom.sagittal_x_lps == x
    first, last = geom.pixel_to_lps([0, 0, 0]), geom.pixel_to_lps([0, 0, n_slices - 1])
    assert (first[0] + last[0]) / 2.0 == pytest.approx(x, abs=1e-9)
    assert first[0] - last[0] == pytest.approx((n_slices - 1) * geom.step_mm, abs=1e-9)
    plane = geom.central_plane()
    assert plane.n_slices == 1
    assert plane.origin_lps[0] == pytest.approx(x, abs=1e-9)
    np.testing.assert_allclose(plane.origin_lps[1:], first[1:], atol=1e-9)
    # the image centre lies on the volume's physical centre in y and z
    nz, ny, nx = vol.shape
    centre = vol.index_to_lps([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2])
    mid = geom.pixel_to_lps([(geom.size - 1) / 2, (geom.size - 1) / 2, (n_slices - 1) / 2])
    np.testing.assert_allclose(mid, [x, centre[1], centre[2]], atol=1e-9)


# ---------------------------------------------------------------------------------------------------
# resampling
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_bright_voxel_lands_on_predicted_pixel(direction):
    shape = (30, 50, 60)
    hu = np.full(shape, -1000.0, np.float32)
    ijk = (37, 21, 13)  # i, j, k
    hu[ijk[2], ijk[1], ijk[0]] = 3000.0
    vol = CTVolume(hu=hu, spacing=(0.7, 0.7, 1.0), origin=(-12.0, 4.0, -30.0), direction=DIRECTIONS[direction])
    lps = vol.index_to_lps(np.array(ijk, float))
    geom = sagittal_geometry(vol, float(lps[0]), 5, size=160)
    stack = resample_to_sagittal(vol.to_sitk(np.float32), geom)
    assert stack.shape == (5, 160, 160) and stack.dtype == np.float32
    k, r, c = np.unravel_index(np.argmax(stack), stack.shape)
    assert stack[k, r, c] > 0.0  # the mark is sampled, not only its interpolation tail
    predicted = geom.lps_to_pixel(lps)  # (column, row, slice)
    assert np.all(np.abs(np.array([c, r, k]) - predicted) <= 1.0), ((c, r, k), predicted)
    # far from the mark the background is kept, outside the volume the default value is used
    assert stack[0, 0, 0] == pytest.approx(-1024.0)
    assert np.isclose(stack, -1000.0).sum() > 1000


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_crop_to_geometry_keeps_positions_and_images(direction):
    vol = smooth_volume(direction=DIRECTIONS[direction])
    centre = vol.index_to_lps([40.0, 35.0, 20.0])
    geom = sagittal_geometry(vol, float(centre[0]), 10, centre_yz_lps=(float(centre[1]), float(centre[2])), size=32)
    crop = crop_to_geometry(vol, geom)
    assert all(c < v for c, v in zip(crop.shape, vol.shape, strict=True))
    np.testing.assert_allclose(crop.direction, vol.direction)
    assert crop.spacing == vol.spacing
    start = vol.lps_to_index(crop.index_to_lps([0.0, 0.0, 0.0]))
    np.testing.assert_allclose(start, np.rint(start), atol=1e-9)  # the crop starts on a voxel of the volume
    i0, j0, k0 = np.rint(start).astype(int)
    np.testing.assert_allclose(crop.index_to_lps([0, 0, 0]), vol.index_to_lps([i0, j0, k0]), atol=1e-9)
    nz, ny, nx = crop.shape
    np.testing.assert_array_equal(crop.hu, vol.hu[k0 : k0 + nz, j0 : j0 + ny, i0 : i0 + nx])
    # every sample of the grid lies inside the crop
    s, n = geom.size, geom.n_slices
    corners = np.array([[c, r, k] for c in (0, s - 1) for r in (0, s - 1) for k in (0, n - 1)], float)
    inside = crop.lps_to_index(geom.pixel_to_lps(corners))
    assert np.all(inside >= 0.0) and np.all(inside <= np.array(crop.shape[::-1]) - 1)

    full = resample_to_sagittal(vol.to_sitk(np.float32), geom).mean(axis=0)
    np.testing.assert_allclose(mean_sagittal_image(crop, geom), full, atol=1e-4)
    np.testing.assert_allclose(mean_sagittal_image(vol, geom), full, atol=1e-4)
    assert full.std() > 10.0  # the image has content, so the comparison means something


def test_sagittal_label_image_draws_where_box_covers_half_the_slab():
    """Grid and volume share 1 mm voxels, so each sagittal sample is one label voxel exactly."""
    n = 10
    shape = (60, 50, 40)  # z, y, x
    labels = np.zeros(shape, np.uint8)
    # label 2 spans z 20..39; its left–right extent covers 10, 5 or 4 of the slab's 10 planes depending on y
    x0 = 10  # slab planes at x indices 10 … 19
    labels[20:40, 10:20, x0 : x0 + 10] = 2  # all 10 planes
    labels[20:40, 20:30, x0 : x0 + 5] = 2  # exactly half
    labels[20:40, 30:40, x0 + 6 : x0 + 10] = 2  # 4 planes: less than half
    labels[5:10, 10:20, x0 : x0 + 10] = 7  # a value not asked for
    vol = CTVolume(hu=labels, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    slab_x = x0 + (n - 1) / 2.0
    size = 65  # odd: pixel centres fall on voxel centres
    geom = sagittal_geometry(vol, slab_x, n, centre_yz_lps=(25.0, 30.0), size=size, pixel_mm=1.0, step_mm=1.0)
    np.testing.assert_array_equal(geom.origin_lps, [x0 + n - 1, -7.0, 62.0])
    out = sagittal_label_image(vol, geom, levels=(1, 2, 3, 4))
    assert out.shape == (size, size) and out.dtype == np.uint8

    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    lps = geom.pixel_to_lps(np.stack([cols, rows, np.zeros_like(rows)], axis=-1).astype(float))
    y, z = lps[..., 1], lps[..., 2]
    in_z = (z >= 20) & (z <= 39)
    expected = np.where(in_z & (((y >= 10) & (y <= 19)) | ((y >= 20) & (y <= 29))), 2, 0)
    np.testing.assert_array_equal(out, expected)
    assert (out == 2).sum() == 20 * 20


# ---------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_slices", [1, 3])
def test_sagittal_image_file_keeps_geometry_and_values(tmp_path, n_slices):
    geom = sagittal_geometry(smooth_volume(), 2.5, 20)
    if n_slices == 1:
        geom = geom.central_plane()
    else:
        geom = SagittalGeometry(origin_lps=geom.origin_lps, n_slices=n_slices, sagittal_x_lps=2.5, size=64)
    values = np.random.default_rng(1).normal(0, 300, (n_slices, geom.size, geom.size)).astype(np.float32)
    path = write_image(geom.to_sitk(values if n_slices > 1 else values[0]), tmp_path / "sagittal.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["sagittal.nii.gz"]
    img = sitk.ReadImage(str(path))
    np.testing.assert_allclose(img.GetOrigin(), geom.origin_lps, atol=1e-3)
    np.testing.assert_allclose(np.array(img.GetDirection()), geom.direction.flatten(), atol=1e-6)
    np.testing.assert_allclose(img.GetSpacing(), geom.spacing, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), values)
    # a pixel's physical point is the geometry's LPS point
    index = (5, 7, n_slices - 1)
    np.testing.assert_allclose(img.TransformIndexToPhysicalPoint(index), geom.pixel_to_lps(index), atol=1e-3)


def test_to_sitk_rejects_wrong_shape():
    geom = SagittalGeometry(origin_lps=(0.0, 0.0, 0.0), n_slices=2, sagittal_x_lps=0.0, size=16)
    with pytest.raises(ValueError, match="does not match"):
        geom.to_sitk(np.zeros((3, 16, 16), np.float32))
