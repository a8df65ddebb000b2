"""The `lumbarbmd` command line, run as a real subprocess (`python -m LumbarBMDLib`)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

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
    out = run_cli("demo", "--size", "small", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr
    case = tmp_path / "demo" / "A_002026"
    truth = json.loads((case / "truth.json").read_text(encoding="utf-8"))
    for level in ("L1", "L2", "L3", "L4"):
        line = next(x for x in out.stdout.splitlines() if x.startswith(level + " "))
        assert f"{truth['bmd_mg_cm3'][level]:.1f}" in line and truth["levels"][level]["category"] in line
    assert f"mean {truth['mean_bmd_mg_cm3']:>11.1f}" in out.stdout.replace("mean  ", "mean ")
    assert (case / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(case / "preview.png") in out.stdout


def test_info_reads_real_ct(real_dir):
    out = run_cli("info", str(real_dir / "ct.nii.gz"))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["size_xyz"] == [122, 101, 112]
    assert info["spacing_mm"] == [3.0, 3.0, 3.0]
    assert info["orientation_in_file"] == "RAS"
    assert info["hu_range"][0] < -1000 < 1000 < info["hu_range"][1]


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
