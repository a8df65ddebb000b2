"""Models and training / evaluation inputs are not taken on trust (issue 13, "Reliability").

Every test writes real files (tiny real torch models, real CSV / JSON / NIfTI files) and asserts the exact sentence
of the :class:`LumbarBMDError` and, for training, that no checkpoint is left behind.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LumbarBMDLib.bmd_training import BMDTrainingConfig, read_reference, train_bmd
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.evaluation import REFERENCE_BMD_RANGE, collect_pairs, read_truth
from LumbarBMDLib.patches import TrabecularPatch
from LumbarBMDLib.r2unet import count_parameters, r2unet_from_width
from LumbarBMDLib.regression import RegressionModel, bmd_network, predict_bmd
from LumbarBMDLib.sagittal import SagittalGeometry, SagittalImages
from LumbarBMDLib.seg_training import SegTrainingConfig, find_pairs, load_pair, train_segmentation
from LumbarBMDLib.segmentation import SegmentationModel, candidate_probabilities
from LumbarBMDLib.weights import ALLOW_UNVERIFIED_ENV, save_tensors, sha256_of

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------
# helpers: real tiny models on disk
# ------------------------------------------------------------------------------------------------------------
def _seg_card(width: int, params: int) -> dict:
    return {"model": "test", "architecture": {"name": "R2UNet", "in_channels": 1, "out_channels": 5, "t": 2,
                                              "features": [width * 2**i for i in range(5)], "parameters": params}}


def _write_seg(folder: Path, tensors: dict[str, torch.Tensor] | None = None, card: dict | None = None,
               sha: bool = True) -> Path:
    """A width-4 R2U-Net (or ``tensors``) with its card; ``sha`` False leaves the card without sha256."""
    torch.manual_seed(0)
    net = r2unet_from_width(4)
    path = folder / "segmentation.safetensors"
    save_tensors(tensors if tensors is not None else dict(net.state_dict()), path)
    card = dict(card or _seg_card(4, count_parameters(net)))
    if sha:
        card["sha256"] = sha256_of(path)
    path.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def seg_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in r2unet_from_width(4).state_dict().items()}


@pytest.fixture(scope="module")
def bmd_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in bmd_network().state_dict().items()}


def _write_bmd(folder: Path, tensors: dict[str, torch.Tensor], sha: bool = True) -> Path:
    path = folder / "regression.safetensors"
    save_tensors(tensors, path)
    card = {"model": "test", "architecture": {"name": "DenseNet121", "in_channels": 3, "out_channels": 1}}
    if sha:
        card["sha256"] = sha256_of(path)
    path.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    return path


def _patches() -> list[TrabecularPatch]:
    rng = np.random.default_rng(0)
    return [TrabecularPatch(lv, True, "", rng.uniform(0.2, 0.3, (3, 32, 32)).astype(np.float32), np.zeros(3))
            for lv in ("L1", "L2")]


# ------------------------------------------------------------------------------------------------------------
# fault 1: a card without sha256 is refused unless explicitly allowed
# ------------------------------------------------------------------------------------------------------------
def test_card_without_sha256_is_refused_unless_allowed(tmp_path, bmd_tensors, monkeypatch):
    monkeypatch.delenv(ALLOW_UNVERIFIED_ENV, raising=False)
    # the hostile case: weights shifted (every BMD +30 mg/cm³ through the head's bias) and the sha256 removed
    shifted = {k: v.clone() for k, v in bmd_tensors.items()}
    shifted["class_layers.out.bias"] += 30.0 / 50.0  # BMD_SCALE = 50: +30 mg/cm³ on every level
    path = _write_bmd(tmp_path, shifted, sha=False)
    with pytest.raises(LumbarBMDError, match=r"has no sha256, so the regression weights regression.safetensors "
                                             r"cannot be verified: add the file's sha256 \([0-9a-f]{64}\)"):
        RegressionModel.load(path, device="cpu")
    card = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    path.with_suffix(".json").write_text(json.dumps({**card, "sha256": ""}), encoding="utf-8")  # empty: the same
    with pytest.raises(LumbarBMDError, match="--allow-unverified-model, or LUMBARBMD_ALLOW_UNVERIFIED_MODELS=1"):
        RegressionModel.load(path, device="cpu")
    path.with_suffix(".json").write_text(json.dumps({**card, "sha256": 12}), encoding="utf-8")
    with pytest.raises(LumbarBMDError, match="sha256 must be the 64 hexadecimal digits"):
        RegressionModel.load(path, device="cpu")
    path.with_suffix(".json").write_text(json.dumps({**card, "sha256": "0" * 64}), encoding="utf-8")
    with pytest.raises(LumbarBMDError, match="does not match its model card"):
        RegressionModel.load(path, device="cpu")
    # explicitly allowed: loaded, and the model says it is not verified
    path.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    model = RegressionModel.load(path, device="cpu", allow_unverified=True)
    assert model.verified is False and model.sha256 == sha256_of(path)
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "yes")  # only exactly "1" counts
    with pytest.raises(LumbarBMDError, match="has no sha256"):
        RegressionModel.load(path, device="cpu")
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    assert RegressionModel.load(path, device="cpu").verified is False
    monkeypatch.delenv(ALLOW_UNVERIFIED_ENV)
    # with its sha256 the same file is verified
    path.with_suffix(".json").write_text(json.dumps({**card, "sha256": sha256_of(path)}), encoding="utf-8")
    assert RegressionModel.load(path, device="cpu").verified is True


def test_unverified_segmentation_model_in_a_real_process(tmp_path):
    path = _write_seg(tmp_path, sha=False)
    code = ("import sys; from LumbarBMDLib.segmentation import SegmentationModel as M; "
            "print(M.load(sys.argv[1], device='cpu').verified)")

    def run(env_value: str | None) -> subprocess.CompletedProcess:
        import os

        env = {k: v for k, v in os.environ.items() if k != ALLOW_UNVERIFIED_ENV}
        if env_value is not None:
            env[ALLOW_UNVERIFIED_ENV] = env_value
        return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                              encoding="utf-8", cwd=ROOT, env=env, timeout=120)

    refused = run(None)
    assert refused.returncode == 1 and "has no sha256, so the segmentation weights" in refused.stderr
    allowed = run("1")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------------------
# fault 2: damaged weights, NaN weights, non-finite network output
# ------------------------------------------------------------------------------------------------------------
def test_truncated_and_foreign_weight_files_are_refused(tmp_path):
    good = _write_seg(tmp_path)
    truncated_dir = tmp_path / "truncated"
    truncated_dir.mkdir()
    data = good.read_bytes()
    truncated = truncated_dir / "segmentation.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    card = json.loads(good.with_suffix(".json").read_text(encoding="utf-8"))
    # the card carries the truncated file's own sha256: the integrity check passes, the parser must refuse
    truncated.with_suffix(".json").write_text(json.dumps({**card, "sha256": sha256_of(truncated)}), encoding="utf-8")
    with pytest.raises(LumbarBMDError, match=r"segmentation\.safetensors are not a readable safetensors file "
                                             r"\(Error while deserializing header: incomplete metadata, file not fully"
                                             r" covered\): the file is damaged, truncated or of another format"):
        SegmentationModel.load(truncated, device="cpu")
    # a pickle renamed .safetensors is never unpickled: unpickling it would create the marker file
    marker = tmp_path / "unpickled.txt"
    pickled_dir = tmp_path / "pickle"
    pickled_dir.mkdir()
    pickled = pickled_dir / "segmentation.safetensors"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    pickled.write_bytes(pickle.dumps(Payload()))
    pickled.with_suffix(".json").write_text(json.dumps({**card, "sha256": sha256_of(pickled)}), encoding="utf-8")
    with pytest.raises(LumbarBMDError, match=r"are not a readable safetensors file .*of another format"):
        SegmentationModel.load(pickled, device="cpu")
    assert not marker.exists()


def test_nan_weights_are_refused(tmp_path, seg_tensors, bmd_tensors):
    bad = {k: v.clone() for k, v in seg_tensors.items()}
    bad["head.weight"].fill_(float("nan"))
    path = _write_seg(tmp_path, bad)
    n = bad["head.weight"].numel()
    with pytest.raises(LumbarBMDError, match=rf"are damaged: tensor head.weight holds {n} NaN or infinite value\(s\)"):
        SegmentationModel.load(path, device="cpu")
    bad = {k: v.clone() for k, v in bmd_tensors.items()}
    bad["class_layers.out.weight"][0, :3] = float("inf")
    (tmp_path / "r").mkdir()
    with pytest.raises(LumbarBMDError, match=r"tensor class_layers.out.weight holds 3 NaN or infinite value\(s\)"):
        RegressionModel.load(_write_bmd(tmp_path / "r", bad), device="cpu")


def test_non_finite_network_output_is_refused(tmp_path, seg_tensors, bmd_tensors):
    # finite weights whose output is NaN: a negative running variance makes batch normalisation take sqrt(< 0)
    bad = {k: v.clone() for k, v in seg_tensors.items()}
    variances = [k for k in bad if ".running_var" in k]
    for k in variances:
        bad[k].fill_(-1.0)
    model = SegmentationModel.load(_write_seg(tmp_path, bad), device="cpu")
    geometry = SagittalGeometry((0.0, 0.0, 0.0), 2, 0.0)
    hu = np.zeros((2, 512, 512), np.float32)  # two candidates are enough to run the network
    images = SagittalImages(hu, geometry, hu[0], SagittalGeometry((0.0, 0.0, 0.0), 1, 0.0))
    with pytest.raises(LumbarBMDError, match=r"^the segmentation model gave non-finite output \(NaN or infinity\) "
                                             r"for this case: its weights are damaged or unsuited"):
        candidate_probabilities(model, images, None, rows=(240, 256))
    bad = {k: v.clone() for k, v in bmd_tensors.items()}
    for k in bad:
        if k.endswith("running_var"):
            bad[k].fill_(-1.0)
    (tmp_path / "r").mkdir()
    model = RegressionModel.load(_write_bmd(tmp_path / "r", bad), device="cpu")
    with pytest.raises(LumbarBMDError, match=r"^the regression model gave non-finite output \(NaN or infinity\) for "
                                             r"this case: its weights are damaged or unsuited; no BMD was measured$"):
        predict_bmd(model, _patches())
    # the intact weights give finite BMD
    (tmp_path / "ok").mkdir()
    good = RegressionModel.load(_write_bmd(tmp_path / "ok", bmd_tensors), device="cpu")
    assert all(np.isfinite(lv.bmd_mg_cm3) for lv in predict_bmd(good, _patches()))


# ------------------------------------------------------------------------------------------------------------
# fault 3: a card that is not JSON, not an object, or does not describe the network
# ------------------------------------------------------------------------------------------------------------
def test_card_that_is_not_a_json_object(tmp_path, seg_tensors):
    path = _write_seg(tmp_path)
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card_path.write_text('{"model": "test", "architecture": ', encoding="utf-8")
    with pytest.raises(LumbarBMDError, match=rf"^segmentation model card {card_path} is not valid JSON \(line 1, "
                                             r"column 35: Expecting value\): replace it with an intact copy$"):
        SegmentationModel.load(path, device="cpu")
    card_path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(LumbarBMDError, match=rf"^segmentation model card {card_path} must hold a JSON object "
                                             r"\(\{\.\.\.\}\), not a list$"):
        SegmentationModel.load(path, device="cpu")
    card_path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LumbarBMDError, match=rf"^segmentation model card {card_path} cannot be read"):
        SegmentationModel.load(path, device="cpu")
    card_path.write_text(json.dumps({k: v for k, v in card.items() if k != "architecture"}), encoding="utf-8")
    with pytest.raises(LumbarBMDError, match="has no architecture object: it is not a segmentation model card"):
        SegmentationModel.load(path, device="cpu")
    for key, value, sentence in (("features", [4, 8, "x", 32, 64], "architecture.features must be a list of "
                                                                    "positive integers, got \\[4, 8, 'x', 32, 64\\]"),
                                 ("t", 0, "architecture.t must be a positive integer, got 0"),
                                 ("in_channels", 3, "a segmentation model takes 1 input channel and gives 5 classes, "
                                                    "this one 3 and 5"),
                                 ("features", [4, 8], "does not describe an R2U-Net: features must be 5 positive")):
        card_path.write_text(json.dumps({**card, "architecture": {**card["architecture"], key: value}}),
                             encoding="utf-8")
        with pytest.raises(LumbarBMDError, match=sentence):
            SegmentationModel.load(path, device="cpu")
    # an absurd width is compared on the meta device (nothing allocated) and refused
    huge = {**card, "architecture": {**card["architecture"], "features": [4096 * 2**i for i in range(5)]}}
    card_path.write_text(json.dumps(huge), encoding="utf-8")
    with pytest.raises(LumbarBMDError, match=r"do not fit the architecture in its model card \(tensor "
                                             r"head.weight is \[5, 4, 1, 1\], the card's network needs "
                                             r"\[5, 4096, 1, 1\]\)"):
        SegmentationModel.load(path, device="cpu")
    # weights missing a tensor
    fewer = {k: v for k, v in seg_tensors.items() if k != "head.bias"}
    (tmp_path / "fewer").mkdir()
    with pytest.raises(LumbarBMDError, match=r"do not fit the architecture in its model card \(1 tensor\(s\) missing,"
                                             r" e.g. head.bias\)"):
        SegmentationModel.load(_write_seg(tmp_path / "fewer", fewer), device="cpu")


# ------------------------------------------------------------------------------------------------------------
# fault 4: evaluation references
# ------------------------------------------------------------------------------------------------------------
def _truth(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "truth.json").write_text(text, encoding="utf-8")
    return folder / "truth.json"


def test_malformed_truth_json_is_refused(tmp_path):
    path = _truth(tmp_path / "c1", "{not json")
    with pytest.raises(LumbarBMDError, match=rf"^reference file {path} is not valid JSON \(line 1, column 2"):
        read_truth(tmp_path)
    _truth(tmp_path / "c1", '"L1"')
    with pytest.raises(LumbarBMDError, match=r"must hold a JSON object .*, not a str$"):
        read_truth(tmp_path)
    _truth(tmp_path / "c1", '{"case": "c1"}')
    with pytest.raises(LumbarBMDError, match=rf"^reference file {path} has no 'bmd_mg_cm3' object"):
        read_truth(tmp_path)
    _truth(tmp_path / "c1", '{"case": "c1", "bmd_mg_cm3": [100, 110]}')
    with pytest.raises(LumbarBMDError, match="has no 'bmd_mg_cm3' object"):
        read_truth(tmp_path)
    _truth(tmp_path / "c1", '{"case": "c1", "bmd_mg_cm3": {"L1": "high"}}')
    with pytest.raises(LumbarBMDError, match=r"case c1, level L1: reference BMD 'high' is not a number$"):
        read_truth(tmp_path)
    _truth(tmp_path / "c1", '{"case": "c1", "bmd_mg_cm3": {"L7": 100}}')
    with pytest.raises(LumbarBMDError, match="level 'L7' is not one of L1–L4"):
        read_truth(tmp_path)
    _truth(tmp_path / "c1", '{"case": "c1", "bmd_mg_cm3": {"L1": 100}, "age": "old"}')
    with pytest.raises(LumbarBMDError, match="age must be a number or null, got 'old'"):
        read_truth(tmp_path)


@pytest.mark.parametrize("value", ["-1e9", "-150", "5000", "Infinity"])
def test_absurd_reference_values_are_refused(tmp_path, value):
    path = _truth(tmp_path / "c1", '{"case": "c1", "bmd_mg_cm3": {"L1": 100.0, "L2": ' + value + "}}")
    lo, hi = REFERENCE_BMD_RANGE
    with pytest.raises(LumbarBMDError, match=rf"^reference file {path}, case c1, level L2: reference BMD .* mg/cm³ "
                                             rf"is outside the plausible range {lo:g}–{hi:g} mg/cm³"):
        read_truth(tmp_path)
    csv_path = tmp_path / "ref.csv"
    csv_path.write_text(f"case,level,bmd_mg_cm3\nc1,L1,100\nc1,L2,{value}\n", encoding="utf-8")
    with pytest.raises(LumbarBMDError, match=rf"^{csv_path}, line 3 \(case c1, level L2\): reference BMD '{value}' "
                                             "mg/cm³ is outside the plausible range"):
        read_truth(csv_path)


def test_malformed_reference_csv_and_results_are_refused(tmp_path):
    csv_path = tmp_path / "ref.csv"
    csv_path.write_text("case,bmd\nc1,100\n", encoding="utf-8")
    with pytest.raises(LumbarBMDError, match="a reference CSV needs the columns case, level, bmd_mg_cm3"):
        read_truth(csv_path)
    csv_path.write_text("case,level,bmd_mg_cm3\nc1,L1,1O0\n", encoding="utf-8")
    with pytest.raises(LumbarBMDError, match=r"line 2 \(case c1, level L1\): reference BMD '1O0' is not a number"):
        read_truth(csv_path)
    csv_path.write_text("case,level,bmd_mg_cm3\nc1,L1,100\nc1,L1,120\n", encoding="utf-8")
    with pytest.raises(LumbarBMDError, match="line 3: case c1 level L1 has two different reference values"):
        read_truth(csv_path)
    csv_path.write_text("case,level,bmd_mg_cm3\nc1,L1,nan\nc1,L2,\n", encoding="utf-8")
    with pytest.raises(LumbarBMDError, match="holds no usable BMD value"):
        read_truth(csv_path)
    # missing values are just missing: the others stay
    csv_path.write_text("case,level,bmd_mg_cm3\nc1,L1,nan\nc1,L2,101.5\n", encoding="utf-8")
    truth = read_truth(csv_path)
    assert truth == {"c1": {"bmd": {"L2": 101.5}, "patient": {}}}
    results = tmp_path / "results" / "c1"
    results.mkdir(parents=True)
    (results / "results.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(LumbarBMDError, match=r"^results file .*results.json is not valid JSON"):
        collect_pairs(tmp_path / "results", truth)
    (results / "results.json").write_text(json.dumps(
        {"status": "ok", "vertebrae": [{"level": "L2", "found": True, "bmd_mg_cm3": None}]}), encoding="utf-8")
    with pytest.raises(LumbarBMDError, match="level L2 is marked found but its bmd_mg_cm3 None is not a finite"):
        collect_pairs(tmp_path / "results", truth)
    (results / "results.json").write_text(json.dumps(
        {"status": "ok", "vertebrae": [{"level": "L2", "found": True, "bmd_mg_cm3": 99.0}]}), encoding="utf-8")
    pairs, summary = collect_pairs(tmp_path / "results", truth)
    assert pairs.case == ["c1"] and list(pairs.reference) == [101.5] and summary["ok"] == 1


# ------------------------------------------------------------------------------------------------------------
# fault 4: training inputs (train-bmd, train-seg): refused before the model exists, no checkpoint left
# ------------------------------------------------------------------------------------------------------------
def _bmd_case(folder: Path, truth: str | None = None) -> Path:
    """A small CT (64 × 64 × 40, air around a water body with a 150 HU core) with four labelled levels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (40, 64, 64)
    ct = np.full(shape, -1000.0)
    ct[:, 8:56, 8:56] = 0.0
    ct[:, 18:46, 18:46] = 150.0 + rng.normal(0.0, 5.0, (shape[0], 28, 28))
    labels = np.zeros(shape, np.uint8)
    for i in range(4):
        labels[2 + 9 * i : 9 + 9 * i, 20:44, 20:44] = i + 1
    for arr, name in ((ct.astype(np.int16), "ct.nii.gz"), (labels, "vertebrae.nii.gz")):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(img, str(folder / name))
    if truth is not None:
        (folder / "truth.json").write_text(truth, encoding="utf-8")
    return folder


def _checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors*")) if folder.is_dir() else []


def test_train_bmd_refuses_bad_references_before_training(tmp_path):
    cfg = BMDTrainingConfig(epochs=1, batch_size=4, jitter=1, device="cpu")
    data = tmp_path / "data"
    nan = '{"bmd_mg_cm3": {"L1": NaN, "L2": NaN, "L3": NaN, "L4": NaN}}'
    for name in ("a", "b"):
        _bmd_case(data / name, nan)
    with pytest.raises(LumbarBMDError, match=r"^no usable reference BMD values for any training case "
                                             r"\(bmd_reference.csv or truth.json\): every value is missing"):
        train_bmd(data, tmp_path / "out", cfg, progress=False)
    assert _checkpoints(tmp_path / "out") == []
    (data / "b" / "truth.json").write_text('{"bmd_mg_cm3": {"L1": 100, "L2": -150}}', encoding="utf-8")
    (data / "a" / "truth.json").write_text('{"bmd_mg_cm3": {"L1": 100, "L2": 110}}', encoding="utf-8")
    with pytest.raises(LumbarBMDError, match=r"truth.json, case b, level L2: reference BMD -150 mg/cm³ is outside "
                                             r"the plausible range 0–400 mg/cm³"):
        train_bmd(data, tmp_path / "out", cfg, progress=False)
    assert _checkpoints(tmp_path / "out") == []
    (data / "b" / "truth.json").write_text("{truncated", encoding="utf-8")
    with pytest.raises(LumbarBMDError, match=r"reference file .*b/truth.json is not valid JSON"):
        train_bmd(data, tmp_path / "out", cfg, progress=False)
    # the reference CSV takes precedence over truth.json, and is checked the same way
    (data / "b" / "truth.json").unlink()
    (data / "bmd_reference.csv").write_text("case,level,bmd_mg_cm3\na,L1,100\nb,L3,5000\n", encoding="utf-8")
    with pytest.raises(LumbarBMDError, match=r"bmd_reference.csv, line 3 \(case b, level L3\): reference BMD "
                                             r"'5000' mg/cm³ is outside the plausible range"):
        read_reference(data)
    with pytest.raises(LumbarBMDError, match="outside the plausible range"):
        train_bmd(data, tmp_path / "out", cfg, progress=False)
    (data / "bmd_reference.csv").write_text("case,level\na,L1\n", encoding="utf-8")
    with pytest.raises(LumbarBMDError, match=r"missing column\(s\) bmd_mg_cm3"):
        train_bmd(data, tmp_path / "out", cfg, progress=False)
    assert _checkpoints(tmp_path / "out") == []


def test_train_bmd_refuses_a_diverged_training_and_leaves_no_checkpoint(tmp_path):
    data = tmp_path / "data"
    truth = '{"bmd_mg_cm3": {"L1": 100, "L2": 110, "L3": 120, "L4": 130}}'
    for name in ("a", "b"):
        _bmd_case(data / name, truth)
    # an infinite learning rate turns the weights into NaN at the first step: the epoch validates to NaN
    cfg = BMDTrainingConfig(epochs=1, batch_size=4, learning_rate=float("inf"), cosine=False, jitter=1,
                            val_fraction=0.5, device="cpu")
    with pytest.raises(LumbarBMDError, match=r"gave no finite validation error in any epoch \(the loss diverged\): "
                                             r"lower --lr and train again$"):
        train_bmd(data, tmp_path / "out", cfg, progress=False)
    assert _checkpoints(tmp_path / "out") == []


def _pair(folder: Path, labels: np.ndarray | None = None, image: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if image:
        img = sitk.GetImageFromArray(np.zeros((1, 512, 512), np.float32))
        img.SetSpacing((0.8, 0.8, 1.0))
        sitk.WriteImage(img, str(folder / "annotation_image.nii.gz"))
    if labels is not None:
        lab = sitk.GetImageFromArray(labels[None])
        lab.SetSpacing((0.8, 0.8, 1.0))
        sitk.WriteImage(lab, str(folder / "annotation_labels.nii.gz"))
    return folder


def test_train_seg_refuses_bad_cases_naming_the_folder(tmp_path):
    good = np.zeros((512, 512), np.uint8)
    for i in range(4):
        good[100 + 40 * i : 130 + 40 * i, 200:260] = i + 1
    data = tmp_path / "data"
    _pair(data / "good1", good)
    _pair(data / "good2", good)
    half = _pair(data / "half", None)
    with pytest.raises(LumbarBMDError, match=rf"^training case {half} has annotation_image.nii.gz but no "
                                             "annotation_labels.nii.gz: export the missing file"):
        find_pairs(data)
    bad = good.copy()
    bad[10, 10] = 7
    _pair(half, bad)
    with pytest.raises(LumbarBMDError, match=rf"^{half}: label values must be the integers 0–4 \(background, L1–L4\),"
                                             r" found \[0 1 2 3 4 7\]$"):
        load_pair(half)
    cfg = SegTrainingConfig(width=4, epochs=1, batch_size=2, crop=128, crop_rows=128, device="cpu")
    with pytest.raises(LumbarBMDError, match="label values must be the integers 0–4"):
        train_segmentation(data, tmp_path / "out", cfg, progress=False)
    assert _checkpoints(tmp_path / "out") == []
    _pair(half, good.astype(np.float32) + 0.5)
    with pytest.raises(LumbarBMDError, match="label values must be the integers 0–4"):
        load_pair(half)
    (half / "annotation_labels.nii.gz").write_bytes(b"not an image")
    with pytest.raises(LumbarBMDError, match=rf"^training case {half}: annotation_labels.nii.gz cannot be read"):
        load_pair(half)
    (half / "annotation_image.nii.gz").unlink()
    with pytest.raises(LumbarBMDError, match=r"has annotation_labels\.nii\.gz but no annotation_image\.nii\.gz"):
        find_pairs(data)
    with pytest.raises(LumbarBMDError, match=rf"^training case {half} has no annotation_image.nii.gz"):
        load_pair(half)
