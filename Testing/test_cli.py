"""The `lumbarbmd` command line, run as a real subprocess (`python -m LumbarBMDLib`)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LumbarBMDLib.phantom.scanner import SCANNERS
from LumbarBMDLib.volume import read_ct


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "LumbarBMDLib", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=cwd,
        timeout=300,
    )


def test_version_and_help():
    out = run_cli("--version")
    assert out.returncode == 0 and "lumbarbmd 0." in out.stdout
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("demo", "phantom", "info"):
        assert command in out.stdout


def test_phantom_command_writes_cohort(tmp_path):
    out = run_cli(
        "phantom",
        str(tmp_path / "cohort"),
        "--cases",
        "2",
        "--seed",
        "40",
        "--vendor",
        "C",
        "--size",
        "small",
        "--variant",
        "contrast",
        "--quiet",
    )
    assert out.returncode == 0, out.stderr
    root = tmp_path / "cohort"
    rows = list(csv.DictReader((root / "cohort.csv").open()))
    assert [r["case"] for r in rows] == ["C_000040", "C_000041"]
    assert all(r["vendor"] == "C" and r["variants"] == "contrast" for r in rows)
    for row in rows:
        case = root / row["case"]
        assert sorted(p.name for p in case.iterdir()) == [
            "annotation_image.nii.gz",
            "annotation_labels.nii.gz",
            "ct.nii.gz",
            "truth.json",
            "vertebrae.nii.gz",
        ]
        truth = json.loads((case / "truth.json").read_text(encoding="utf-8"))
        assert truth["variants"]["contrast"] is True
        assert abs(float(row["mean_bmd_mg_cm3"]) - truth["mean_bmd_mg_cm3"]) < 1e-6
        ct = read_ct(case / "ct.nii.gz")
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "vertebrae.nii.gz")))
        assert ct.shape == labels.shape
        assert set(np.unique(labels)) >= {1, 2, 3, 4}
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_phantom_all_vendors_share_the_patient(tmp_path):
    out = run_cli(
        "phantom", str(tmp_path), "--cases", "1", "--seed", "7", "--vendor", "all", "--size", "small", "--quiet"
    )
    assert out.returncode == 0, out.stderr
    truths = [json.loads((tmp_path / f"{v}_000007" / "truth.json").read_text(encoding="utf-8")) for v in "ABC"]
    assert truths[0]["bmd_mg_cm3"] == truths[1]["bmd_mg_cm3"] == truths[2]["bmd_mg_cm3"]
    assert len(list(csv.DictReader((tmp_path / "cohort.csv").open()))) == 3


def test_demo_small(tmp_path):
    """The README's main job, small: phantom → whole pipeline with the shipped models → table and report."""
    out = run_cli("demo", "--size", "small", "--out", str(tmp_path / "demo"), "--device", "cpu")
    assert out.returncode == 0, out.stderr
    truth = json.loads((tmp_path / "demo" / "phantom" / "A_002026" / "truth.json").read_text(encoding="utf-8"))
    results = json.loads((tmp_path / "demo" / "A_002026" / "results.json").read_text(encoding="utf-8"))
    assert results["status"] == "ok"
    for v in results["vertebrae"]:
        line = next(x for x in out.stdout.splitlines() if x.startswith(v["level"] + " "))
        # the printed line holds the measured BMD, its category and the truth beside it
        assert f"{v['bmd_mg_cm3']:.1f}" in line and v["category"] in line
        assert f"{truth['bmd_mg_cm3'][v['level']]:.1f}" in line
        assert abs(v["bmd_mg_cm3"] - truth["bmd_mg_cm3"][v["level"]]) < 10
    report = tmp_path / "demo" / "A_002026" / "report.html"
    assert str(report.resolve()) in out.stdout and "data:image/png;base64," in report.read_text(encoding="utf-8")


def test_info_reads_real_ct(real_dir):
    out = run_cli("info", str(real_dir / "ct.nii.gz"))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["size_xyz"] == [122, 101, 112]
    assert info["spacing_mm"] == [3.0, 3.0, 3.0]
    assert info["orientation_in_file"] == "RAS"
    assert info["hu_range"][0] < -1000 < 1000 < info["hu_range"][1]


def test_info_percentiles_on_a_sample_match_the_exact_ones(small_case, real_dir):
    from LumbarBMDLib.cli import hu_percentiles

    for hu in (small_case.ct.hu, read_ct(real_dir / "ct.nii.gz").hu):
        exact = np.percentile(hu, [1, 50, 99])
        assert hu_percentiles(hu, (1, 50, 99), sample=hu.size) == [round(float(v), 1) for v in exact]
        # a 20-fold subsample, as on a full CT: each value is the q-th percentile of all voxels to within 0.2
        # percentile points (a few HU in the sparse tail between soft tissue and bone)
        for q, v in zip((1, 50, 99), hu_percentiles(hu, (1, 50, 99), sample=hu.size // 20)):
            assert np.mean(hu < v) <= q / 100 + 0.002 and np.mean(hu <= v) >= q / 100 - 0.002, (q, v)


def test_errors_are_one_line_and_exit_1(tmp_path):
    out = run_cli("info", str(tmp_path / "missing.nii.gz"))
    assert out.returncode == 1
    assert out.stderr.strip().startswith("lumbarbmd: error: file or folder not found")
    assert "Traceback" not in out.stderr
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("not an image", encoding="utf-8")
    out = run_cli("info", str(bad))
    assert out.returncode == 1 and "Traceback" not in out.stderr and "not an image" in out.stderr


def test_bad_command_line_exit_2(tmp_path):
    assert run_cli("phantom", str(tmp_path), "--vendor", "D").returncode == 2
    assert run_cli("phantom", str(tmp_path), "--cases", "0").returncode == 2
    assert run_cli("nonsense").returncode == 2


def test_calibrate_command_on_a_calibration_phantom_scan(tmp_path):
    out = run_cli("phantom", str(tmp_path / "c"), "--cases", "1", "--seed", "5", "--vendor", "B", "--size", "small",
                  "--calibration-scan", "--quiet")
    assert out.returncode == 0, out.stderr
    scan = tmp_path / "c" / "calibration_B.nii.gz"
    assert scan.is_file()
    out = run_cli("calibrate", str(scan), "--out", str(tmp_path / "scanner_B.json"))
    assert out.returncode == 0, out.stderr
    cal = json.loads((tmp_path / "scanner_B.json").read_text(encoding="utf-8"))
    b = SCANNERS["B"]
    assert abs(cal["slope"] - b.bone_slope) < 0.01 and abs(cal["intercept"] - b.bone_intercept) < 1.5
    assert len(cal["rods"]) == 5
    out = run_cli("calibrate", str(tmp_path / "c" / "B_000005" / "ct.nii.gz"), "--out", str(tmp_path / "x.json"))
    assert out.returncode == 1 and out.stderr.startswith("lumbarbmd: error:") and not (tmp_path / "x.json").exists()


def test_train_bmd_and_evaluate_commands(tmp_path):
    data = tmp_path / "data"
    assert run_cli("phantom", str(data), "--cases", "3", "--seed", "60", "--size", "small", "--quiet").returncode == 0
    out = run_cli("train-bmd", str(data), "--out", str(tmp_path / "model"), "--epochs", "1", "--jitter", "2",
                  "--device", "cpu", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "validation RMSE" in out.stdout and (tmp_path / "model" / "regression.safetensors").is_file()
    card = json.loads((tmp_path / "model" / "regression.json").read_text(encoding="utf-8"))
    assert card["architecture"]["parameters"] == 6_954_881 and card["training"]["epochs"] == 1
    # evaluate: results.json files as `run` writes them, against the cohort's truth.json
    results = tmp_path / "results"
    offsets = [2.0, -1.0, 3.0]
    for case, off in zip(sorted(p for p in data.iterdir() if p.is_dir()), offsets, strict=True):
        truth = json.loads((case / "truth.json").read_text(encoding="utf-8"))
        vertebrae = [{"level": lv, "found": True, "bmd_mg_cm3": v + off} for lv, v in truth["bmd_mg_cm3"].items()]
        vertebrae[3] = {"level": "L4", "found": False, "reason": "no patch: metal (implant) in or next to the body"}
        (results / case.name).mkdir(parents=True)
        (results / case.name / "results.json").write_text(json.dumps({"status": "partial", "vertebrae": vertebrae}),
                                                          encoding="utf-8")
    out = run_cli("evaluate", str(results), str(data), "--out", str(tmp_path / "ev"))
    assert out.returncode == 0, out.stderr
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text(encoding="utf-8"))
    assert ev["all_levels"]["pearson"]["n"] == 9
    assert abs(ev["all_levels"]["bland_altman"]["bias"] - np.mean(offsets)) < 1e-6
    assert ev["cases"]["partial"] == 3 and sum(ev["cases"]["missing_levels"].values()) == 3
    assert all((tmp_path / "ev" / f).is_file() for f in ("bland_altman.png", "scatter.png", "confusion_matrix.png"))
    out = run_cli("evaluate", str(tmp_path / "nothing"), str(data), "--out", str(tmp_path / "ev2"))
    assert out.returncode == 1 and "no results.json" in out.stderr
