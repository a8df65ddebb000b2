"""`lumbarbmd run` on a mixed batch of good and bad inputs (a real subprocess, the shipped models), and `demo`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from test_volume_io import write_dicom_series

from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.volume import CTVolume, write_volume

FAILING = {
    "missing": "not found",
    "text": "not",  # not a readable image
    "flat": "2-D",
    "timeseries": "4-D",
    "mr": "MR",
    "nospine": "no spinal canal",
    "spacing": "spacing",
    "empty_dicom": "no DICOM",
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "LumbarBMDLib", *args], capture_output=True, text=True,
                          encoding="utf-8", timeout=600)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    inputs = root / "inputs"
    inputs.mkdir()
    good = generate_case(2027, "A", "small")
    write_volume(good.ct, inputs / "good.nii.gz")
    # only L1–L2 in view: the CT cut 6 mm below L2 and 6 mm above L1
    t = good.truth["levels"]
    z_lo = t["L2"]["centre_lps"][2] - t["L2"]["body_mm"]["height"] / 2 - 6
    z_hi = t["L1"]["centre_lps"][2] + t["L1"]["body_mm"]["height"] / 2 + 6
    k0, k1 = (round(float(good.ct.lps_to_index([0, 0, z])[2])) for z in (z_lo, z_hi))
    cut = CTVolume(hu=good.ct.hu[k0 : k1 + 1], spacing=good.ct.spacing,
                   origin=tuple(good.ct.index_to_lps([0, 0, k0])))
    write_volume(cut, inputs / "l1l2.nii.gz")
    implant = generate_case(2028, "B", "small", "implant")
    write_volume(implant.ct, inputs / "implant.nii.gz")
    hu = good.ct.hu.astype(np.float32)
    hu.ravel()[np.random.default_rng(0).choice(hu.size, hu.size // 300, replace=False)] = np.nan
    write_volume(CTVolume(hu=hu, spacing=good.ct.spacing, origin=good.ct.origin), inputs / "nan.nii.gz")
    write_dicom_series(inputs / "dicom_multi" / "a", good.ct.hu, series=2, description="Abdomen 2.5",
                       spacing=good.ct.spacing, origin=good.ct.origin)
    write_dicom_series(inputs / "dicom_multi" / "b", good.ct.hu[:12], series=3, description="Abdomen 5.0",
                       spacing=good.ct.spacing, origin=good.ct.origin)
    # bad inputs
    (inputs / "text.nii.gz").write_text("this is not an image", encoding="utf-8")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((64, 64), np.int16)), str(inputs / "flat.nii.gz"))
    volume = sitk.GetImageFromArray(good.ct.hu[:20])
    sitk.WriteImage(sitk.JoinSeries([volume] * 3), str(inputs / "timeseries.nii.gz"))
    mr = np.clip(good.ct.hu.astype(np.float32) + 1024, 0, None) * 0.8
    write_volume(CTVolume(hu=mr, spacing=good.ct.spacing, origin=good.ct.origin), inputs / "mr.nii.gz")
    block = np.full((40, 128, 128), -1000, np.int16)
    block[:, 16:112, 16:112] = 40
    write_volume(CTVolume(hu=block, spacing=(2.0, 2.0, 2.5), origin=(0, 0, 0)), inputs / "nospine.nii.gz")
    write_volume(CTVolume(hu=good.ct.hu[:4], spacing=(2.0, 2.0, 80.0), origin=(0, 0, 0)), inputs / "spacing.nii.gz")
    (inputs / "empty_dicom").mkdir()
    names = ["good.nii.gz", "missing.nii.gz", "text.nii.gz", "l1l2.nii.gz", "flat.nii.gz", "implant.nii.gz",
             "timeseries.nii.gz", "mr.nii.gz", "nan.nii.gz", "nospine.nii.gz", "spacing.nii.gz", "empty_dicom",
             "dicom_multi"]
    out = root / "out"
    proc = run_cli("run", *[str(inputs / n) for n in names], "--out", str(out), "--device", "cpu", "--quiet")
    return {"root": root, "inputs": inputs, "names": names, "out": out, "proc": proc, "good": good,
            "implant": implant}


def results(batch, case: str) -> dict:
    return json.loads((batch["out"] / case / "results.json").read_text(encoding="utf-8"))


def test_batch_exit_status_and_summary(batch):
    proc = batch["proc"]
    assert proc.returncode == 1, proc.stderr  # some cases failed
    assert "13 case(s): " in proc.stdout and f"{len(FAILING) + 1} failed" in proc.stdout  # + the L1–L2 scan
    rows = list(csv.DictReader((batch["out"] / "summary.csv").open(encoding="utf-8")))
    assert [r["case"] for r in rows] == sorted(n.removesuffix(".nii.gz") for n in batch["names"])
    assert all(len(r["input_sha256"]) == 64 for r in rows if r["case"] != "missing")
    # nothing half-written: only complete case folders, the summary and the per-case locks
    leftovers = [p.name for p in batch["out"].iterdir() if p.name.startswith(".")]
    assert leftovers == [".lumbarbmd-locks"]


def test_good_case_files_and_schema(batch):
    res = results(batch, "good")
    assert res["status"] == "ok" and res["error"] is None
    assert set(res) >= {"input", "status", "error", "vertebrae", "mean_bmd_mg_cm3", "category", "canal", "timings_s",
                        "models", "version"}
    assert set(res["timings_s"]) >= {"load", "canal", "segment", "regress", "total"}
    assert set(res["canal"]) >= {"mean_centre_lps", "sagittal_x_lps", "slices_found"}
    truth = batch["good"].truth["bmd_mg_cm3"]
    for v in res["vertebrae"]:
        assert v["found"] and abs(v["bmd_mg_cm3"] - truth[v["level"]]) < 10, v
        assert len(v["centre_lps"]) == 3 and 0 < v["confidence"] <= 1
    folder = batch["out"] / "good"
    assert sorted(p.name for p in folder.iterdir()) == ["report.html", "results.csv", "results.json",
                                                        "sagittal.nii.gz", "sagittal_labels.nii.gz"]
    labels = sitk.ReadImage(str(folder / "sagittal_labels.nii.gz"))
    assert set(np.unique(sitk.GetArrayFromImage(labels))) == {0, 1, 2, 3, 4}
    # the labels overlay the CT: L3's label centre maps into the L3 body of the 3-D truth
    arr = sitk.GetArrayFromImage(labels)[0]
    rows, cols = np.nonzero(arr == 3)
    lps = labels.TransformContinuousIndexToPhysicalPoint((float(cols.mean()), float(rows.mean()), 0.0))
    i, j, k = np.rint(batch["good"].ct.lps_to_index(np.array(lps))).astype(int)
    assert batch["good"].labels[k, j, i] == 3
    html = (folder / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and res["category"] in html
    assert "not for clinical use" in html and res["models"]["regression"][:16] in html
    assert len(list(csv.DictReader((folder / "results.csv").open(encoding="utf-8")))) == 4


def test_partial_view_is_never_numbered_by_guess_and_metal_is_partial(batch):
    # only L1–L2 in view: neither the sacrum nor T12 anchors the numbering, so no level is attributed (the
    # network alone numbered three levels here, one of them L3, which is not in the scan); the 12th ribs that pass
    # beside L1 enter at the scan's top edge, where they leave the spine is not seen, so they anchor nothing
    l1l2 = results(batch, "l1l2")
    assert l1l2["status"] == "failed" and l1l2["level_numbering_anchor"] is None
    assert "cannot be numbered" in l1l2["error"] and "neither the sacrum nor a rib-bearing" in l1l2["error"]
    assert not any(v["found"] for v in l1l2["vertebrae"])
    assert l1l2["spine"]["numbered"] is False and len(l1l2["spine"]["chain"]) == 2
    good = results(batch, "good")
    assert good["level_numbering_anchor"] == "T12 and sacrum" and good["spine"]["lumbar_count"] == 5
    implant = results(batch, "implant")
    implanted = set(batch["implant"].truth["variants"]["implant_levels"])
    for v in implant["vertebrae"]:
        if v["level"] in implanted:
            assert not v["found"] and "metal" in v["reason"]
    assert implant["status"] == "partial"


def test_nan_and_dicom_folder_with_several_series_are_measured(batch):
    assert results(batch, "nan")["status"] == "ok"
    dicom = results(batch, "dicom_multi")
    assert dicom["status"] == "ok"
    good = results(batch, "good")
    for a, b in zip(dicom["vertebrae"], good["vertebrae"], strict=True):
        assert abs(a["bmd_mg_cm3"] - b["bmd_mg_cm3"]) < 1.0  # the same CT through DICOM


@pytest.mark.parametrize(("case", "words"), sorted(FAILING.items()))
def test_bad_inputs_fail_with_a_clear_message(batch, case, words):
    res = results(batch, case)
    assert res["status"] == "failed" and words.lower() in res["error"].lower(), res["error"]
    assert sorted(p.name for p in (batch["out"] / case).iterdir()) == ["results.json"]
    assert f"{case}: failed: " in batch["proc"].stdout


def test_resume_skips_finished_cases_and_force_reruns(batch):
    inputs = batch["inputs"]
    before = (batch["out"] / "good" / "results.json").stat().st_mtime_ns
    proc = run_cli("run", str(inputs / "good.nii.gz"), str(inputs / "missing.nii.gz"), "--out", str(batch["out"]),
                   "--device", "cpu", "--quiet")
    assert proc.returncode == 1 and "[already done]" in proc.stdout and "1 already done" in proc.stdout
    assert (batch["out"] / "good" / "results.json").stat().st_mtime_ns == before
    proc = run_cli("run", str(inputs / "good.nii.gz"), "--out", str(batch["out"]), "--device", "cpu", "--force",
                   "--quiet")
    assert proc.returncode == 0 and "[already done]" not in proc.stdout
    assert (batch["out"] / "good" / "results.json").stat().st_mtime_ns != before
