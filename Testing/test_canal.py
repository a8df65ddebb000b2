"""Canal-centre detection (paper §3.1) on phantoms of every vendor and variant and on the real CT."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from LumbarBMDLib.canal import find_canal
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.volume import CTVolume, read_ct, reorient_to_lps, write_volume


def errors_against_truth(case, result, enclosed: bool | None = None) -> np.ndarray:
    """In-plane distance (mm) of each found centre to the phantom's canal truth on the same slice (only the
    bone-enclosed or only the tracked centres when ``enclosed`` is given)."""
    truth = dict(zip(case.truth["canal"]["slice_indices"], case.truth["canal"]["centres_lps"], strict=True))
    return np.array(
        [
            np.hypot(*(np.asarray(p[:2]) - truth[k][:2]))
            for k, p, e in zip(result.slice_indices, result.centres_lps, result.enclosed, strict=True)
            if k in truth and (enclosed is None or e == enclosed)
        ]
    )


def test_full_size_phantom_within_2_mm(full_normal_case):
    result = find_canal(full_normal_case.ct)
    err = errors_against_truth(full_normal_case, result)
    # every found slice is a slice where the canal exists (the tracking may go a few slices beyond the truth's last:
    # 3 of 188 on the 120 kVp vendor A, whose brighter bone keeps the sacral canal's ring a little longer)
    assert len(err) >= len(result.slice_indices) - 3
    ring, tracked = errors_against_truth(full_normal_case, result, True), errors_against_truth(full_normal_case,
                                                                                              result, False)
    # where bone closes the ring (the paper's rule), the centre is within 2 mm of the truth
    assert np.mean(ring <= 2.0) >= 0.99, np.sort(ring)[-5:]
    assert np.median(ring) < 1.0
    # where it does not (discs), the tracked dark contour's centre stays well inside the canal (16–19 mm deep); on
    # the 120 kVp vendor A (CSF 16 HU against discs of 77 HU, less contrast than before) 92 % within 4 mm, all < 6
    assert np.mean(tracked <= 4.0) >= 0.9 and np.median(tracked) < 2.0, np.sort(tracked)[-5:]
    assert tracked.max() < 6.0, np.sort(tracked)[-5:]
    n_truth = len(full_normal_case.truth["canal"]["slice_indices"])
    assert len(ring) >= 0.3 * n_truth  # the ring is closed at the pedicle levels (~40 % of slices)
    assert len(err) >= 0.6 * n_truth  # with the tracked slices, on most slices
    assert abs(result.sagittal_x_lps - full_normal_case.truth["canal"]["sagittal_x_lps"]) < 1.0
    # contract of canal.json
    js = result.as_json()
    assert js["slices_found"] == len(js["centres_lps"]) == len(result.slice_indices) == len(js["enclosed_by_bone"])
    assert js["sagittal_x_lps"] == pytest.approx(float(np.median(np.array(js["centres_lps"])[:, 0])), abs=1e-3)


@pytest.mark.parametrize(
    ("seed", "vendor", "variant"),
    [
        (20, "A", "none"),
        (21, "B", "contrast"),
        (22, "C", "low-dose"),
        (2, "A", "implant"),
        (23, "B", "fracture"),
        (24, "C", "calcification"),
        (25, "A", "six-lumbar"),
        (26, "B", "partial-L1"),
        (27, "C", "partial-L4"),
    ],
)
def test_small_phantoms_every_vendor_and_variant(seed, vendor, variant):
    case = generate_case(seed, vendor, "small", variant)
    result = find_canal(case.ct)
    err = errors_against_truth(case, result)
    # small phantoms have 2 mm pixels and 2.5 mm slices: about 98 % of the bone-enclosed centres lie within 2 mm
    # (benchmarks/bench_canal.py); the tracked ones (discs) within 4 mm
    assert np.median(err) < 1.5
    # (with pedicle screws the streaks pull the tracked contour off on a slice or two: 94 % on the 120 kVp vendor A)
    assert np.mean(err <= 4.0) >= (0.93 if variant == "implant" else 0.95), np.sort(err)[-5:]
    assert np.mean(errors_against_truth(case, result, True) <= 2.5) >= 0.9
    assert len(err) >= 12
    assert abs(result.sagittal_x_lps - case.truth["canal"]["sagittal_x_lps"]) < 1.5


def test_scoliosis_drift_is_reported():
    case = generate_case(8, "A", "small", "scoliosis")
    result = find_canal(case.ct)
    assert result.drift_mm > 4.0
    assert abs(result.drift_mm - case.truth["canal"]["drift_x_mm"]) < 2.5
    straight = find_canal(generate_case(8, "A", "small", "none").ct)
    assert straight.drift_mm < 3.0


def test_interpolated_centres_cover_every_slice_between(small_case):
    result = find_canal(small_case.ct)
    k = result.interpolated_slice_indices
    assert np.array_equal(k, np.arange(result.slice_indices.min(), result.slice_indices.max() + 1))
    found = dict(zip(result.slice_indices, result.centres_lps, strict=True))
    for kk, p in zip(k, result.interpolated_centres_lps, strict=True):
        if kk in found:
            np.testing.assert_allclose(p, found[kk], atol=1e-6)
    assert np.all(np.diff(result.interpolated_centres_lps[:, 2]) > 0)


# ---------------------------------------------------------------------------------------------------------
# the real CT (TotalSegmentator example, 3 mm)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(real_dir):
    ct = read_ct(real_dir / "ct.nii.gz")
    labels = sitk.GetArrayFromImage(reorient_to_lps(sitk.ReadImage(str(real_dir / "vertebrae_totalseg.nii.gz"))))
    return ct, labels, find_canal(ct)


def test_real_ct_centre_inside_the_vertebral_foramen(real):
    ct, labels, result = real
    lumbar = np.isin(labels, [28, 29, 30, 31])  # L4 … L1
    found = dict(zip(result.slice_indices, result.centres_lps, strict=True))
    every = dict(zip(result.interpolated_slice_indices, result.interpolated_centres_lps, strict=True))
    checked = 0
    for k in np.flatnonzero(lumbar.any(axis=(1, 2))):
        assert k in every, f"no canal centre on L1–L4 slice {k}"
        ring = lumbar[k]
        foramen = ndimage.binary_fill_holes(ring) & ~ring
        foramen = ndimage.binary_opening(foramen) if foramen.sum() > 8 else foramen
        if foramen.sum() * ct.spacing[0] * ct.spacing[1] < 45.0:  # the vertebra mask is open on this slice
            continue
        i, j, _ = np.rint(ct.lps_to_index(found.get(k, every[k]))).astype(int)
        assert foramen[j, i], f"slice {k}: canal centre outside the vertebral foramen"
        checked += 1
    assert checked >= 5
    # on every L1–L4 slice the centre lies within the vertebra's left–right extent (the midline)
    for k in np.flatnonzero(lumbar.any(axis=(1, 2))):
        _, ii = np.nonzero(lumbar[k])
        i, _, _ = ct.lps_to_index(every[k])
        assert ii.min() < i < ii.max()


def test_real_ct_sagittal_plane_through_the_spine(real):
    ct, labels, result = real
    kk, jj, ii = np.nonzero(np.isin(labels, [28, 29, 30, 31]))
    spine_x = ct.index_to_lps(np.c_[ii, jj, kk].mean(axis=0))[0]
    assert abs(result.sagittal_x_lps - spine_x) < 5.0
    assert result.drift_mm < 8.0


# ---------------------------------------------------------------------------------------------------------
# geometry robustness: oblique, anisotropic, off-centre
# ---------------------------------------------------------------------------------------------------------
def _resample(case, spacing, direction=None, shift_mm=(0.0, 0.0, 0.0)) -> sitk.Image:
    direction = np.eye(3) if direction is None else direction
    img = case.ct.to_sitk(np.float32)
    size = [round(n * s / t) for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing, strict=True)]
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()]))
    half = np.asarray(direction) @ (np.array(spacing) * (np.array(size) - 1) / 2)
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetDirection(tuple(np.asarray(direction, float).flatten()))
    ref.SetOrigin(tuple(centre - half + np.asarray(shift_mm)))
    return sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)


def _detect_from_file(img: sitk.Image, tmp_path, name: str):
    path = tmp_path / name
    sitk.WriteImage(img, str(path))
    return find_canal(read_ct(path))


def test_oblique_anisotropic_and_off_centre_give_the_same_plane(full_normal_case, tmp_path):
    reference = find_canal(full_normal_case.ct)
    a = np.deg2rad(12.0)
    oblique = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])  # rotated about z
    variants = {
        "oblique.nii.gz": _resample(full_normal_case, (0.9, 0.9, 1.0), oblique),
        "anisotropic.nrrd": _resample(full_normal_case, (0.7, 0.7, 3.0)),
        "offcentre.mha": _resample(full_normal_case, (0.9, 0.9, 2.0), shift_mm=(60.0, -45.0, 0.0)),
    }
    for name, img in variants.items():
        result = _detect_from_file(img, tmp_path, name)
        # centres are LPS points: on the slices both found, they agree whatever the sampling of the volume (within
        # the bone-enclosed tube; beyond it, in the wide flat sacral canal, tracked centres may differ more)
        ref_z = reference.interpolated_centres_lps[:, 2]
        ring_z = reference.centres_lps[reference.enclosed, 2]
        for p in result.centres_lps:
            if ring_z.min() <= p[2] <= ring_z.max():
                q = np.array([np.interp(p[2], ref_z, reference.interpolated_centres_lps[:, d]) for d in (0, 1)])
                assert np.hypot(*(p[:2] - q)) < 4.0, (name, p)
        assert abs(result.sagittal_x_lps - reference.sagittal_x_lps) < 2.0, name


# ---------------------------------------------------------------------------------------------------------
# no canal: a clear error, never a wrong plane
# ---------------------------------------------------------------------------------------------------------
def _volume(hu: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> CTVolume:
    return CTVolume(hu=hu.astype(np.int16), spacing=spacing, origin=(0.0, 0.0, 0.0))


def _grid(shape):
    z, y, x = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]].astype(np.float32)
    return z, y - shape[1] / 2, x - shape[2] / 2


def test_head_ct_has_no_canal():
    z, y, x = _grid((90, 200, 200))
    r = np.sqrt((x / 80) ** 2 + (y / 95) ** 2 + ((z - 45) / 80) ** 2)
    hu = np.where(r < 1.0, 35.0, -1000.0)
    hu = np.where((r >= 0.93) & (r < 1.0), 1200.0, hu)  # skull around the brain
    with pytest.raises(LumbarBMDError, match="no spinal canal found"):
        find_canal(_volume(hu))


def test_soft_tissue_only_volume_has_no_canal():
    _, y, x = _grid((80, 200, 200))
    hu = np.where((x / 90) ** 2 + (y / 70) ** 2 < 1.0, 40.0, -1000.0)
    hu[(x / 20) ** 2 + ((y + 30) / 12) ** 2 < 1.0] = -950.0  # bowel gas
    hu[(x / 6) ** 2 + ((y + 10) / 6) ** 2 < 1.0] = 300.0  # contrast-filled vessel
    with pytest.raises(LumbarBMDError, match="is this a CT of the abdomen or lumbar spine"):
        find_canal(_volume(hu))


def test_long_bones_without_canal_are_rejected():
    """Two femur-like tubes (cortex around marrow) are enclosed holes but far too short a 'canal'."""
    _, y, x = _grid((16, 200, 200))
    hu = np.where((x / 90) ** 2 + (y / 70) ** 2 < 1.0, 40.0, -1000.0)
    for cx in (-45.0, 45.0):
        r = np.hypot(x - cx, y)
        hu[r < 14] = 1200.0
        hu[r < 9] = -60.0  # fatty marrow
    with pytest.raises(LumbarBMDError, match="no spinal canal found"):
        find_canal(_volume(hu, spacing=(1.0, 1.0, 2.0)))


def test_volume_written_and_read_back_gives_the_same_result(small_case, tmp_path):
    path = write_volume(small_case.ct, tmp_path / "ct.nii.gz", np.int16)
    a, b = find_canal(small_case.ct), find_canal(read_ct(path))
    np.testing.assert_array_equal(a.slice_indices, b.slice_indices)
    np.testing.assert_allclose(a.centres_lps, b.centres_lps, atol=1e-4)
