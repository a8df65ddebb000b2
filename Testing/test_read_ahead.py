"""The first case of a batch is read on a background thread while torch, MONAI and the models load
(:func:`LumbarBMDLib.batch.read_ahead`): the same results as a case read in turn, a bad first input still its own
failed case with its sentence, a finished first case not read for nothing (shipped models, small phantom CTs)."""

from __future__ import annotations

import json

import pytest

from LumbarBMDLib.batch import ReadAhead, read_ahead, run_batch, run_case
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.regression import RegressionModel
from LumbarBMDLib.segmentation import SegmentationModel
from LumbarBMDLib.volume import write_volume


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("read-ahead")
    write_volume(generate_case(2031, "A", "small").ct, root / "first.nii.gz")
    write_volume(generate_case(2032, "B", "small").ct, root / "second.nii.gz")
    (root / "damaged.nii.gz").write_bytes(b"\x1f\x8b" + b"not a gzip stream" * 10)
    return root


@pytest.fixture(scope="module")
def models():
    return SegmentationModel.load(device="cpu"), RegressionModel.load(device="cpu")


def vertebrae(results: dict) -> list[tuple]:
    return [(v["level"], v["found"], v.get("bmd_mg_cm3")) for v in results["vertebrae"]]


def test_a_case_read_ahead_gives_the_results_of_a_case_read_in_turn(inputs, models, tmp_path):
    out = tmp_path / "batch"
    outcomes = run_batch([inputs / "first.nii.gz", inputs / "second.nii.gz"], out, device="cpu", progress=False)
    assert [o.results["status"] for o in outcomes] == ["ok", "ok"]
    in_turn = run_case(inputs / "first.nii.gz", tmp_path / "in-turn", *models, None)
    ahead = json.loads((out / "first" / "results.json").read_text(encoding="utf-8"))
    assert vertebrae(ahead) == vertebrae(in_turn) and ahead["mean_bmd_mg_cm3"] == in_turn["mean_bmd_mg_cm3"]
    timings = ahead["timings_s"]
    assert 0 < timings["load"] < timings["total"]  # the read counts in the pipeline's time, wherever it ran
    assert timings["total"] >= timings["load"] + timings["canal"] + timings["segment"] - 0.01


def test_a_bad_first_input_read_ahead_is_its_own_failed_case_and_the_batch_goes_on(inputs, tmp_path):
    out = tmp_path / "batch"
    outcomes = run_batch([inputs / "damaged.nii.gz", inputs / "missing.nii.gz", inputs / "second.nii.gz"], out,
                         device="cpu", progress=False)
    damaged, missing, second = (o.results for o in outcomes)
    assert damaged["status"] == "failed" and "damaged.nii.gz" in damaged["error"], damaged["error"]
    assert "not" in damaged["error"] and "read" in damaged["error"]  # a sentence, not a traceback
    assert missing["status"] == "failed" and "not found" in missing["error"]
    assert second["status"] == "ok"
    assert sorted(p.name for p in (out / "damaged").iterdir()) == ["results.json"]


def test_a_finished_first_case_is_not_read_ahead_and_another_inputs_volume_is_never_used(inputs, models, tmp_path):
    out = tmp_path / "batch"
    run_batch([inputs / "first.nii.gz"], out, device="cpu", progress=False)
    assert read_ahead(inputs / "first.nii.gz", out, "first", force=False) is None  # done: resume skips it
    forced = read_ahead(inputs / "first.nii.gz", out, "first", force=True)
    assert isinstance(forced, ReadAhead)
    volume, seconds = forced.result()
    assert volume.hu.ndim == 3 and seconds > 0
    # a read-ahead of another input handed to a case is ignored: the case reads its own input
    second = run_case(inputs / "second.nii.gz", tmp_path / "second", *models, None, ahead=forced)
    alone = run_case(inputs / "second.nii.gz", tmp_path / "second-alone", *models, None)
    assert vertebrae(second) == vertebrae(alone) and second["input"] == str(inputs / "second.nii.gz")
    failed = ReadAhead(inputs / "missing.nii.gz")
    with pytest.raises(Exception, match="not found"):
        failed.result()
