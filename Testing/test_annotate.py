"""Sagittal candidates and annotation image from a detected canal; `lumbarbmd annotate` on files and DICOM."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from test_volume_io import write_dicom_series

from LumbarBMDLib.annotation import ANNOTATION_FILES, prepare, sagittal_plane
from LumbarBMDLib.phantom import write_case
from LumbarBMDLib.sagittal import (
    ANNOTATION_SLICES,
    CANDIDATE_SLICES,
    sagittal_centre_yz,
    window_to_unit,
)
from LumbarBMDLib.volume import CTVolume, read_ct


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "LumbarBMDLib", *args], capture_output=True, text=True, encoding="utf-8", timeout=300
    )


def test_window_to_unit_maps_the_papers_window():
    hu = np.array([-1024.0, -150.0, 350.0, 850.0, 2000.0])
    np.testing.assert_allclose(window_to_unit(hu), [0.0, 0.0, 0.5, 1.0, 1.0])
    assert window_to_unit(hu).dtype == np.float32


@pytest.fixture(scope="module")
def prepared(small_case_module):
    return prepare(small_case_module.ct)


@pytest.fixture(scope="module")
def small_case_module():
    from LumbarBMDLib.phantom import generate_case

    return generate_case(31, "B", "small")


def test_candidates_and_annotation_image(prepared):
    images, canal = prepared.images, prepared.canal
    assert images.candidates_hu.shape == (CANDIDATE_SLICES, 512, 512)
    assert images.annotation_hu.shape == (512, 512)
    x = images.network_input()
    assert x.shape == (CANDIDATE_SLICES, 1, 512, 512) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.all(x[:, 0, :, :5] == 0.0) or np.all(x[:, 0, :5, :] == 0.0)  # outside the scan: zero padding
    # the 10 candidates contain the canal's sagittal position: it lies between their first and last plane
    xs = images.candidate_geometry.pixel_to_lps(np.array([[0, 0, 0], [0, 0, CANDIDATE_SLICES - 1]], float))[:, 0]
    plane_x, _ = sagittal_plane(prepared.volume, canal, prepared.spine)
    assert min(xs) <= plane_x <= max(xs)
    assert images.annotation_geometry.origin_lps[0] == pytest.approx(plane_x)
    # the plane is the canal's median x over the identified L1–L4
    lo, hi = prepared.spine.lumbar_z_range()
    lumbar = canal.centres_lps[(canal.centres_lps[:, 2] >= lo) & (canal.centres_lps[:, 2] <= hi)]
    assert plane_x == pytest.approx(float(np.median(lumbar[:, 0])))
    # the annotation image is the mean of the 20-slice slab, which contains the 10 candidates
    assert images.candidate_geometry.n_slices == CANDIDATE_SLICES and ANNOTATION_SLICES == 20
    # the canal (dark) lies between the bodies and the spinous processes on the image: its centres project
    # onto pixels darker than the bone in front of them
    px = np.rint(images.annotation_geometry.lps_to_pixel(canal.centres_lps)).astype(int)
    inside = (px[:, 0] >= 0) & (px[:, 0] < 512) & (px[:, 1] >= 0) & (px[:, 1] < 512)
    assert inside.all()
    assert np.median(images.annotation_hu[px[:, 1], px[:, 0]]) < 100.0


def test_pixel_to_lps_round_trip_through_the_ct(prepared):
    geom, vol = prepared.images.annotation_geometry, prepared.volume
    rng = np.random.default_rng(0)
    pix = np.c_[rng.uniform(0, 511, (50, 2)), np.zeros(50)]
    lps = geom.pixel_to_lps(pix)
    back = geom.lps_to_pixel(vol.index_to_lps(vol.lps_to_index(lps)))
    np.testing.assert_allclose(back, pix, atol=1e-6)


def test_image_centre_policy(prepared):
    vol, canal = prepared.volume, prepared.canal
    y, z = sagittal_centre_yz(vol, canal.centres_lps)
    assert y == pytest.approx(canal.centres_lps[:, 1].mean() - 60.0)
    centre = prepared.images.annotation_geometry.pixel_to_lps([255.5, 255.5, 0])
    # with L1–L4 identified the image is centred on them, as far as the scan (shorter than the image) allows
    lo, hi = prepared.spine.lumbar_z_range()
    z_scan = vol.index_to_lps(np.array([[0, 0, 0], [0, 0, vol.shape[0] - 1]], float))[:, 2]
    half = 256 * 0.8
    expected = np.clip(0.5 * (lo + hi), z_scan.max() - half, z_scan.min() + half)
    assert centre[1] == pytest.approx(y) and centre[2] == pytest.approx(expected)
    assert z_scan.max() - half - 1e-6 <= centre[2] <= z_scan.min() + half + 1e-6  # the whole scan stays in view
    # without a numbering the policy's own centre is used
    assert sagittal_plane(vol, canal, None) == (pytest.approx(canal.sagittal_x_lps), (pytest.approx(y),
                                                                                        pytest.approx(z)))
    # a long scan (chest–abdomen–pelvis) is centred 190 mm above the lowest canal centre
    long = CTVolume(hu=np.zeros((200, 8, 8), np.int16), spacing=(1, 1, 3.0), origin=(0, 0, -300.0))
    pts = np.array([[0.0, 0.0, -250.0], [0.0, 0.0, 100.0]])
    assert sagittal_centre_yz(long, pts)[1] == pytest.approx(-250.0 + 190.0)


def test_annotate_command_on_a_file(small_case_module, tmp_path):
    case_dir = write_case(small_case_module, tmp_path / "in")
    out = run_cli("annotate", str(case_dir / "ct.nii.gz"), "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert "canal found on" in out.stdout
    folder = tmp_path / "out"
    assert sorted(p.name for p in folder.iterdir()) == sorted(ANNOTATION_FILES)
    canal = json.loads((folder / "canal.json").read_text(encoding="utf-8"))
    for key in ("centres_lps", "mean_centre_lps", "sagittal_x_lps", "slices_found"):
        assert key in canal
    assert canal["slices_found"] == len(canal["centres_lps"]) >= 10
    truth_x = small_case_module.truth["canal"]["sagittal_x_lps"]
    assert abs(canal["sagittal_x_lps"] - truth_x) < 1.5
    # the annotation image file carries the geometry written in canal.json and overlays the CT
    img = sitk.ReadImage(str(folder / "annotation_image.nii.gz"))
    assert img.GetSize() == (512, 512, 1)
    affine = np.array(canal["sagittal"]["annotation_affine_lps"])
    np.testing.assert_allclose(img.GetOrigin(), affine[:3, 3], atol=1e-4)
    np.testing.assert_allclose(
        np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing()), affine[:3, :3], atol=1e-6
    )
    assert img.GetOrigin()[0] == pytest.approx(canal["sagittal_x_lps"], abs=1e-3)
    cands = sitk.ReadImage(str(folder / "candidates.nii.gz"))
    assert cands.GetSize() == (512, 512, CANDIDATE_SLICES)
    # a point of the CT resampled onto the annotation grid has the CT's value (the overlay is exact)
    ct = read_ct(case_dir / "ct.nii.gz")
    mean_img = sitk.GetArrayFromImage(img)[0]
    k = int(canal["slice_indices"][len(canal["slice_indices"]) // 2])
    body = small_case_module.truth["levels"]["L3"]["centre_lps"]
    px = np.rint(np.linalg.solve(affine[:3, :3], np.asarray(body) - affine[:3, 3])).astype(int)
    assert mean_img[px[1], px[0]] > 50.0  # the L3 body is bone-bright on the annotation image
    assert ct.shape[0] > k


def test_annotate_command_on_a_dicom_folder(small_case_module, tmp_path):
    ct = small_case_module.ct
    write_dicom_series(
        tmp_path / "dicom",
        ct.hu.astype(np.int16),
        series=3,
        description="Abdomen 2.5",
        spacing=ct.spacing,
        origin=ct.origin,
    )
    write_dicom_series(
        tmp_path / "dicom" / "scout",
        ct.hu[:3].astype(np.int16),
        series=1,
        description="Topogram",
        spacing=ct.spacing,
        origin=ct.origin,
        image_type="ORIGINAL\\PRIMARY\\LOCALIZER",
    )
    out = run_cli("annotate", str(tmp_path / "dicom"), "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert "Abdomen 2.5" in out.stdout  # which series was used is said
    canal = json.loads((tmp_path / "out" / "canal.json").read_text(encoding="utf-8"))
    expected = prepare(ct).images.annotation_geometry
    assert canal["sagittal_x_lps"] == pytest.approx(expected.sagittal_x_lps, abs=1e-3)
    assert [b["name"] for b in canal["spine"]["chain"]][:3] == ["T11", "T12", "L1"]  # annotators see the levels


def test_annotate_without_spine_fails_cleanly(tmp_path):
    _, y, x = np.mgrid[0:60, 0:160, 0:160].astype(np.float32)
    hu = np.where(((x - 80) / 70) ** 2 + ((y - 80) / 55) ** 2 < 1.0, 40.0, -1000.0).astype(np.int16)
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(img, str(tmp_path / "nospine.nii.gz"))
    out = run_cli("annotate", str(tmp_path / "nospine.nii.gz"), "--out", str(tmp_path / "out"))
    assert out.returncode == 1
    assert "no spinal canal found" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written
