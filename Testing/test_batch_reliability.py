"""Issue 13: no result lost or overwritten, every failure a sentence, durable writes (real processes, real files)."""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LumbarBMDLib.batch import case_ids, failure_sentence, resolve_case_folder
from LumbarBMDLib.durable import (
    LOCK_FOLDER,
    atomic_folder,
    atomic_write_text,
    case_lock,
    check_writable_folder,
    clean_stale_temporaries,
)
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.volume import CTVolume, write_volume

READ_ONLY = Path("/sys/kernel")  # sysfs: a folder not even root can create files in


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "LumbarBMDLib", *args], capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout)


def no_spine_ct(path: Path, value: int = 40) -> Path:
    """A small water block: a valid CT that fails fast ("no spinal canal found"), distinct per ``value``."""
    block = np.full((40, 96, 96), -1000, np.int16)
    block[:, 16:80, 16:80] = value
    return write_volume(CTVolume(hu=block, spacing=(2.0, 2.0, 2.5), origin=(0, 0, 0)), path)


def summary_rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "summary.csv").open(encoding="utf-8")))


# ---------------------------------------------------------------------------------------------------------------
# case identity
# ---------------------------------------------------------------------------------------------------------------
def test_case_ids_come_from_the_folders_when_the_file_name_says_nothing(tmp_path):
    d = tmp_path / "DATA"
    assert case_ids([d / "A_000020" / "ct.nii.gz", d / "A_000021" / "ct.nii.gz"]) == ["A_000020", "A_000021"]
    assert case_ids([tmp_path / "a" / "ct.nii.gz"]) == ["a"]  # a generic name: the folder names the case
    assert case_ids([d / "p1.nii.gz", d / "p2.nrrd"]) == ["p1", "p2"]
    assert case_ids([d / "patient7.nii.gz"]) == ["patient7"]
    assert case_ids([d / "s1" / "CT", d / "s2" / "CT"]) == ["s1", "s2"]  # DICOM folders with one name
    assert case_ids([d / "a" / "ct.nii.gz", d / "b" / "scan1.nii.gz"]) == ["a", "b_scan1"]
    assert case_ids([tmp_path / "..hidden" / "ct.nii.gz"]) == ["hidden"]  # never a hidden folder or '..'


def test_another_patients_results_are_never_overwritten(tmp_path):
    a, b = no_spine_ct(tmp_path / "x1" / "p.nii.gz", 40), no_spine_ct(tmp_path / "x2" / "p.nii.gz", 41)
    out = tmp_path / "same"
    first = run_cli("run", str(a), "--out", str(out), "--device", "cpu", "--quiet")
    assert first.returncode == 1 and "p: failed: no spinal canal found" in first.stdout
    before = (out / "p" / "results.json").read_bytes()
    second = run_cli("run", str(b), "--out", str(out), "--device", "cpu", "--quiet")
    res_a = json.loads(before)
    assert res_a["case_id"] == "p" and res_a["input"] == str(a) and len(res_a["input_sha256"]) == 64
    assert (out / "p" / "results.json").read_bytes() == before  # patient a untouched
    moved = [p for p in out.iterdir() if p.name.startswith("p_")]
    assert len(moved) == 1
    res_b = json.loads((moved[0] / "results.json").read_text(encoding="utf-8"))
    assert res_b["input"] == str(b) and moved[0].name == f"p_{res_b['input_sha256'][:8]}"
    assert f"note: the case id p already holds another input ({a}); left untouched, this input is written as " \
           f"{moved[0].name}" in second.stdout
    rows = {r["case"]: r for r in summary_rows(out)}
    assert set(rows) == {"p", moved[0].name} and "already holds another input" in rows[moved[0].name]["note"]


def test_a_damaged_results_json_or_a_file_in_place_of_a_case_is_left_untouched(tmp_path):
    src = no_spine_ct(tmp_path / "in" / "q.nii.gz")
    out = tmp_path / "out"
    (out / "q").mkdir(parents=True)
    (out / "q" / "results.json").write_text('{"status": "ok", "vert', encoding="utf-8")  # cut mid-write
    case_id, previous, note = resolve_case_folder(out, "q", str(src), "ab" * 32)
    assert case_id == "q_abababab" and previous is None
    assert note == (f"the case folder {out / 'q'} cannot be checked (its results.json is damaged); left untouched, "
                    "this input is written as q_abababab")
    (out / "r").write_text("a file where a case folder should be", encoding="utf-8")
    case_id, _, note = resolve_case_folder(out, "r", "x", "cd" * 32)
    assert case_id == "r_cdcdcdcd" and f"{out / 'r'} is a file, not a case folder" in note
    (out / "s").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    case_id, _, note = resolve_case_folder(out, "s", "x", "ef" * 32)
    assert case_id == "s_efefefef" and "is a symbolic link" in note
    # the whole command, with the damaged folder: a sentence, the batch goes on, the damaged file is kept
    proc = run_cli("run", str(src), "--out", str(out), "--device", "cpu", "--quiet")
    assert "Traceback" not in proc.stderr and "its results.json is damaged" in proc.stdout
    assert (out / "q" / "results.json").read_text(encoding="utf-8") == '{"status": "ok", "vert'
    rows = {r["case"]: r for r in summary_rows(out)}
    assert rows["q"]["status"] == "unknown" and "damaged" in rows["q"]["error"]


# ---------------------------------------------------------------------------------------------------------------
# one error path: the output is checked before the work
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["run", "IN"], ["annotate", "IN"], ["segment", "IN"], ["phantom"]])
def test_out_that_is_a_file_is_a_sentence_before_any_work(tmp_path, command):
    src = no_spine_ct(tmp_path / "ct.nii.gz")
    target = tmp_path / "taken.txt"
    target.write_text("keep me", encoding="utf-8")
    args = [str(src) if a == "IN" else a for a in command]
    proc = run_cli(*args[:1], *([str(target)] if command == ["phantom"] else args[1:]),
                   *([] if command == ["phantom"] else ["--out", str(target)]))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"lumbarbmd: error: the output folder {target} exists and is not a folder; " \
                                  "choose a folder"
    assert target.read_text(encoding="utf-8") == "keep me"


def test_read_only_out_is_refused_before_the_case_is_computed(tmp_path):
    src = no_spine_ct(tmp_path / "ct.nii.gz")
    t0 = time.perf_counter()
    proc = run_cli("run", str(src), "--out", str(READ_ONLY / "lumbarbmd-out"), "--device", "cpu", "--quiet")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"lumbarbmd: error: cannot write to the output folder {READ_ONLY / 'lumbarbmd-out'}")
    with pytest.raises(LumbarBMDError, match=f"cannot write to the output folder {READ_ONLY}: Permission denied"):
        check_writable_folder(READ_ONLY)
    assert time.perf_counter() - t0 < 120


def test_allocation_failure_of_itk_is_a_sentence():
    with pytest.raises(RuntimeError) as err:  # a real ITK allocation failure (≈ 4 PB)
        sitk.Image([100_000, 100_000, 100_000], sitk.sitkFloat32)
    assert failure_sentence(err.value, Path("x")).startswith("out of memory while processing this CT")
    assert failure_sentence(PermissionError(13, "Permission denied", "/x/y"), Path("x")) == \
        "could not read or write /x/y: Permission denied"
    assert failure_sentence(ValueError("a bug"), Path("x")) is None  # a programming error stays visible


# ---------------------------------------------------------------------------------------------------------------
# durable writes: two writers, kill -9, umask
# ---------------------------------------------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, os
    from pathlib import Path
    from LumbarBMDLib.durable import atomic_folder, case_lock
    out, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    errors = 0
    for i in range(n):
        try:
            with case_lock(out, "case"), atomic_folder(out / "case") as tmp:
                (tmp / "a.txt").write_text(f"{tag}{i}")
                (tmp / "b.txt").write_text(f"{tag}{i}")
        except Exception as err:
            errors += 1
            print(repr(err), file=sys.stderr)
    print(errors)
""")


@pytest.mark.parametrize("locked", [True, False], ids=["with-case-lock", "exchange-only"])
def test_two_writers_never_leave_a_case_absent_or_half_written(tmp_path, locked):
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(WRITER if locked else WRITER.replace('case_lock(out, "case"), ', ""), encoding="utf-8")
    with atomic_folder(out / "case") as tmp:
        (tmp / "a.txt").write_text("start")
        (tmp / "b.txt").write_text("start")
    seen = {"absent": 0, "torn": 0, "reads": 0}
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                a, b = ((out / "case" / n).read_text() for n in ("a.txt", "b.txt"))
            except FileNotFoundError:
                seen["absent"] += 1
                continue
            seen["reads"] += 1
            seen["torn"] += a != b and not (a.startswith(("x", "y")) and b.startswith(("x", "y")))

    thread = threading.Thread(target=reader)
    thread.start()
    procs = [subprocess.Popen([sys.executable, str(script), str(out), tag, "300"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for tag in ("x", "y")]
    outputs = [p.communicate(timeout=300) for p in procs]
    stop.set()
    thread.join()
    assert [o[0].strip() for o in outputs] == ["0", "0"], [o[1][-500:] for o in outputs]
    assert seen["reads"] > 0 and seen["absent"] == 0
    final = [(out / "case" / n).read_text() for n in ("a.txt", "b.txt")]
    assert final[0] == final[1] and final[0] in ("x299", "y299")
    assert sorted(p.name for p in out.iterdir()) == ([".lumbarbmd-locks", "case"] if locked else ["case"])


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from LumbarBMDLib.durable import atomic_folder, case_lock
    out = Path(sys.argv[1])
    with case_lock(out, "case"), atomic_folder(out / "case") as tmp:
        (tmp / "results.json").write_text('{"half": ')
        print(tmp, flush=True)
        time.sleep(600)
""")


def test_kill_9_during_a_write_leaves_the_old_case_and_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out / "case") as tmp:
        (tmp / "results.json").write_text('{"status": "ok"}')
    script = tmp_path / "killed.py"
    script.write_text(KILLED_WRITER, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True)
    temporary = Path(proc.stdout.readline().strip())
    assert temporary.is_dir() and temporary.parent == out and temporary.name.startswith(".case.tmp-")
    assert clean_stale_temporaries(out) == []  # a live writer (holding its lock) keeps its folder
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert temporary.is_dir()  # left behind by the killed process …
    assert (out / "case" / "results.json").read_text() == '{"status": "ok"}'  # … which never touched the case
    assert clean_stale_temporaries(out) == [temporary] and not temporary.exists()


def test_a_killed_batch_keeps_its_summary_and_the_next_run_leaves_nothing_behind(tmp_path):
    inputs = [no_spine_ct(tmp_path / "in" / f"c{i}.nii.gz", 30 + i) for i in range(40)]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "LumbarBMDLib", "run", *map(str, inputs), "--out", str(out),
                             "--device", "cpu", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "summary.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)
    rows = summary_rows(out)
    assert 1 <= len(rows) < 40  # the summary was written after the first case, not at the end
    assert all((out / r["case"] / "results.json").is_file() for r in rows)
    done = run_cli("run", *map(str, inputs[:2]), "--out", str(out), "--device", "cpu", "--quiet")
    assert "Traceback" not in done.stderr
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [LOCK_FOLDER]  # no temporary left


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_folder(tmp_path / "case") as tmp:
            (tmp / "results.json").write_text("{}")
        table = atomic_write_text(tmp_path / "summary.csv", "case\n")
        with case_lock(tmp_path, "case"):
            pass
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "case") == 0o750 and mode(tmp_path / "case" / "results.json") == 0o640
    assert mode(table) == 0o640


# ---------------------------------------------------------------------------------------------------------------
# what results say about how they were made
# ---------------------------------------------------------------------------------------------------------------
def test_evaluate_matches_results_to_truth_by_case_id(tmp_path):
    from LumbarBMDLib.evaluation import collect_pairs

    res = {"case_id": "A_000020", "input": "DATA/A_000020/ct.nii.gz", "status": "ok",
           "vertebrae": [{"level": "L1", "found": True, "bmd_mg_cm3": 101.0}]}
    (tmp_path / "renamed_by_hand").mkdir()
    (tmp_path / "renamed_by_hand" / "results.json").write_text(json.dumps(res), encoding="utf-8")
    pairs, summary = collect_pairs(tmp_path, {"A_000020": {"bmd": {"L1": 100.0}, "patient": {}}})
    assert pairs.case == ["A_000020"] and summary["unmatched"] == []


def test_unverified_models_and_resampled_oblique_scans_are_flagged():
    from LumbarBMDLib.pipeline import case_flags
    from LumbarBMDLib.report import qc_flags

    flags = qc_flags({"vertebrae": [], "calibration": {}, "models_verified": {"segmentation": True,
                                                                            "regression": False}})
    assert any(f.startswith("the regression model was not verified") for f in flags)
    assert not any("segmentation model was not verified" in f for f in flags)
    oblique = case_flags(None, None, {"resampled_axial": True, "obliquity_deg": 20.2})
    assert [f.code for f in oblique] == ["oblique_resampled"] and "oblique by 20°" in oblique[0].message
    assert case_flags(None, None, {}) == []
