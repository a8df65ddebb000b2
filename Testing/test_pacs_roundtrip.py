"""Issue 16: the whole round trip against a real Orthanc (no mock of the server).

A phantom CT is written as a DICOM series and stored in Orthanc; ``lumbarbmd run --pacs … --patient-id …
--send-back`` queries it, chooses the series, retrieves it, measures it, writes the DICOM SEG and SR into the case
folder and stores them back in the study. The SEG and SR are then fetched from Orthanc (its REST API, not the code
under test) and checked against the case's results.json: same Patient and Study, the SEG on the CT's SOP instances,
the SR's BMD values equal to the file results. Files given directly (a DICOM folder, a NIfTI) write the DICOM
outputs, or say why not.
"""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import pydicom
import pytest
from orthanc_fixture import OrthancInstance, orthanc  # noqa: F401  (the fixture is used by name)

from LumbarBMDLib.cli import main
from LumbarBMDLib.dicom import SEG_FILE, SR_FILE
from LumbarBMDLib.dicom.ct_series import write_ct_series
from LumbarBMDLib.volume import write_volume

PATIENT_ID = "LBMD-ROUNDTRIP-1"


def _bmd_by_level(sr: hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR) -> dict[str, float]:
    """{"L1": value, …} from the SR's volumetric ROI measurement groups (TID 1411)."""
    out = {}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        level = str(group.tracking_identifier).split()[0]
        values = [m.value for m in group.get_measurements() if str(m.unit.value) == "mg/cm3"]
        assert len(values) == 1, (level, values)
        out[level] = float(values[0])
    return out


def _instances_of_modality(server: OrthancInstance, study_uid: str, modality: str) -> list[pydicom.Dataset]:
    """The study's instances of one modality, read from Orthanc's REST API (independent of LumbarBMDLib.pacs)."""
    found = server.rest("/tools/find", json.dumps({"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
                        .encode())
    assert isinstance(found, list) and len(found) == 1, found
    out = []
    for series_id in server.rest(f"/studies/{found[0]}")["Series"]:
        series = server.rest(f"/series/{series_id}")
        if series["MainDicomTags"].get("Modality") != modality:
            continue
        for instance_id in series["Instances"]:
            with urllib.request.urlopen(f"{server.http_url}/instances/{instance_id}/file", timeout=60) as answer:
                out.append(pydicom.dcmread(io.BytesIO(answer.read())))
    return out


@pytest.fixture(scope="module")
def stored_study(small_case, orthanc, tmp_path_factory):  # noqa: F811
    """The small phantom written as a DICOM series (with its kVp) and stored in Orthanc."""
    folder = tmp_path_factory.mktemp("roundtrip") / "ct"
    paths = write_ct_series(small_case.ct, folder, patient_id=PATIENT_ID, patient_name="ROUNDTRIP^PHANTOM",
                            series_description="Abdomen 2.5mm B30f", kvp=120, convolution_kernel="B30f",
                            rescale_intercept=-1024.0)
    orthanc.upload(paths)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return SimpleNamespace(folder=folder, paths=paths, study_uid=headers[0].StudyInstanceUID,
                           series_uid=headers[0].SeriesInstanceUID,
                           sop_uids={h.SOPInstanceUID for h in headers})


@pytest.fixture(scope="module")
def dicomweb_run(stored_study, orthanc, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("roundtrip_out")
    rc = main(["run", "--pacs", orthanc.dicomweb_url, "--patient-id", PATIENT_ID, "--out", str(out),
               "--send-back", "--device", "cpu", "--quiet"])
    folders = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return SimpleNamespace(rc=rc, out=out, folders=folders)


def test_the_pacs_study_is_measured_and_its_provenance_recorded(dicomweb_run, stored_study):
    assert dicomweb_run.rc == 0
    assert len(dicomweb_run.folders) == 1, dicomweb_run.folders
    case = dicomweb_run.folders[0]
    results = json.loads((case / "results.json").read_text())
    assert results["status"] == "ok", results.get("error")
    assert all(v["found"] for v in results["vertebrae"])
    pacs = results["pacs"]
    assert pacs["study_instance_uid"] == stored_study.study_uid
    assert pacs["series_instance_uid"] == stored_study.series_uid
    assert pacs["retrieved_with"] == "WADO-RS" and pacs["n_files"] == len(stored_study.paths)
    assert "Abdomen 2.5mm B30f" in pacs["series_choice"]
    assert results["dicom_outputs"]["files"] == [SEG_FILE, SR_FILE]
    assert (case / SEG_FILE).is_file() and (case / SR_FILE).is_file()
    assert results["dicom_outputs"]["sent_to"] == pacs["server"]
    assert len(results["dicom_outputs"]["sent_sop_instance_uids"]) == 2
    summary = (dicomweb_run.out / "summary.csv").read_text()
    assert case.name in summary and ",ok," in summary


def test_seg_and_sr_are_back_in_orthanc_in_the_source_study(dicomweb_run, stored_study, orthanc):  # noqa: F811
    results = json.loads((dicomweb_run.folders[0] / "results.json").read_text())
    segs = _instances_of_modality(orthanc, stored_study.study_uid, "SEG")
    srs = _instances_of_modality(orthanc, stored_study.study_uid, "SR")
    assert len(segs) == 1 and len(srs) == 1
    seg = hd.seg.Segmentation.from_dataset(segs[0])
    sr = hd.sr.Comprehensive3DSR.from_dataset(srs[0])
    for ds in (seg, sr):
        assert ds.StudyInstanceUID == stored_study.study_uid
        assert ds.PatientID == PATIENT_ID
        assert ds.SeriesInstanceUID != stored_study.series_uid
    assert set(results["dicom_outputs"]["sent_sop_instance_uids"]) == {seg.SOPInstanceUID, sr.SOPInstanceUID}
    # the SEG lies on the CT's own frames
    referenced = {item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced and referenced <= stored_study.sop_uids
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels[:4] == [f"L{i} vertebral body" for i in range(1, 5)]
    # the SR's numbers are the file results'
    expected = {v["level"]: v["bmd_mg_cm3"] for v in results["vertebrae"] if v["found"]}
    got = _bmd_by_level(sr)
    assert set(got) == set(expected)
    for level, value in expected.items():
        assert got[level] == pytest.approx(value, abs=0.051), level
    # and the copy in Orthanc is the file in the case folder
    assert seg.SOPInstanceUID == pydicom.dcmread(dicomweb_run.folders[0] / SEG_FILE).SOPInstanceUID


def test_a_second_run_fetches_nothing_and_skips_the_measured_study(dicomweb_run, orthanc):  # noqa: F811
    rc = main(["run", "--pacs", orthanc.dicomweb_url, "--patient-id", PATIENT_ID, "--out", str(dicomweb_run.out),
               "--device", "cpu", "--quiet"])
    assert rc == 0
    folders = [p for p in dicomweb_run.out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert folders == dicomweb_run.folders  # no second folder for the same study


def test_the_study_over_dimse_c_get(stored_study, orthanc, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    spec = f"dimse://{orthanc.aet}@{orthanc.host}:{orthanc.dicom_port}?aet={orthanc.store_aet}"
    rc = main(["run", "--pacs", spec, "--study-uid", stored_study.study_uid, "--out", str(out), "--dicom",
               "--device", "cpu", "--quiet"])
    assert rc == 0
    (case,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    results = json.loads((case / "results.json").read_text())
    assert results["status"] == "ok" and results["pacs"]["retrieved_with"] == "C-GET"
    assert results["dicom_outputs"]["files"] == [SEG_FILE, SR_FILE]
    assert "sent_to" not in results["dicom_outputs"]  # --dicom alone writes, does not send


def test_no_matching_study_is_one_sentence(orthanc, tmp_path, capsys):  # noqa: F811
    rc = main(["run", "--pacs", orthanc.dicomweb_url, "--patient-id", "NOBODY-HERE", "--out", str(tmp_path / "o"),
               "--device", "cpu", "--quiet"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "NOBODY-HERE" in err and "Traceback" not in err


def test_query_options_need_a_pacs(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["run", "--patient-id", "X", "--out", str(tmp_path / "o")])
    assert stop.value.code == 2
    assert "--pacs" in capsys.readouterr().err


def test_files_write_dicom_outputs_or_say_why_not(stored_study, small_case, tmp_path):
    nifti = tmp_path / "ct.nii.gz"
    write_volume(small_case.ct, nifti)
    out = tmp_path / "out"
    rc = main(["run", str(stored_study.folder), str(nifti), "--out", str(out), "--dicom", "--device", "cpu",
               "--quiet"])
    assert rc == 0
    by_input = {}
    for folder in out.iterdir():
        if folder.is_dir() and not folder.name.startswith("."):
            r = json.loads((folder / "results.json").read_text())
            by_input[Path(r["input"]).name] = (folder, r)
    dicom_folder, dicom_results = by_input["ct"]
    assert dicom_results["status"] == "ok"
    assert (dicom_folder / SEG_FILE).is_file() and (dicom_folder / SR_FILE).is_file()
    nifti_folder, nifti_results = by_input["ct.nii.gz"]
    assert nifti_results["status"] == "ok"  # the measurement stands; only the DICOM outputs are missing
    assert not (nifti_folder / SEG_FILE).exists()
    assert "need the source DICOM series" in nifti_results["dicom_outputs"]["error"]
