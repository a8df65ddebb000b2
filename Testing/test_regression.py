"""DenseNet-121 regression: network shape, categories, prediction of missing levels, a short training run that
really reduces the loss, exact resume, the training-data format and the scanner calibration."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from LumbarBMDLib.bmd_training import (
    BMDTrainingConfig,
    build_patch_set,
    evaluate_rmse,
    find_bmd_cases,
    read_reference,
    train_bmd,
)
from LumbarBMDLib.calibration import ScannerCalibration, fit_calibration, read_calibration, write_calibration
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.patches import TrabecularPatch
from LumbarBMDLib.phantom import generate_cohort
from LumbarBMDLib.phantom.calibration_scan import calibration_scan
from LumbarBMDLib.phantom.scanner import SCANNERS
from LumbarBMDLib.regression import (
    RegressionModel,
    bmd_category,
    bmd_network,
    patient_bmd,
    predict_bmd,
)
from LumbarBMDLib.weights import load_tensors, sha256_of


def test_densenet121_parameter_count_and_shape():
    net = bmd_network()
    assert sum(p.numel() for p in net.parameters()) == 6_954_881
    net.eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 1)


@pytest.mark.parametrize(("bmd", "category"), [(79.99, "osteoporosis"), (80.0, "osteopenia"), (120.0, "osteopenia"),
                                               (120.01, "normal"), (0.0, "osteoporosis")])
def test_categories(bmd, category):
    assert bmd_category(bmd) == category


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bmddata")
    generate_cohort(root, cases=4, seed=800, vendor="A", size="small", progress=False)
    return root


def test_training_data_format(data, tmp_path):
    assert len(find_bmd_cases(data)) == 4
    patches = build_patch_set(find_bmd_cases(data)[:1], {}, BMDTrainingConfig(jitter=3), np.random.default_rng(0))
    assert patches.images.shape[1:] == (3, 32, 32) and len(patches.bmd) == len(patches.level) <= 12
    truth = json.loads((find_bmd_cases(data)[0] / "truth.json").read_text(encoding="utf-8"))
    expected = np.array(list(truth["bmd_mg_cm3"].values()), np.float32)
    assert all(np.isclose(expected, v).any() for v in patches.bmd)
    (tmp_path / "bmd_reference.csv").write_text("case,level,bmd_mg_cm3\nA_1,L1,95.5\nA_1,L2,x\n", encoding="utf-8")
    with pytest.raises(LumbarBMDError, match="not a number"):
        read_reference(tmp_path)
    (tmp_path / "bmd_reference.csv").write_text("case,level,bmd_mg_cm3\nA_1,L1,95.5\n", encoding="utf-8")
    assert read_reference(tmp_path) == {"A_1": {"L1": 95.5}}
    with pytest.raises(LumbarBMDError, match="no BMD training cases"):
        find_bmd_cases(tmp_path)


def test_short_training_reduces_loss_and_resumes_exactly(data, tmp_path):
    cfg = BMDTrainingConfig(epochs=4, batch_size=16, learning_rate=1e-3, cosine=False, jitter=4, val_fraction=0.25,
                            checkpoint_every=2, seed=3, device="cpu")
    card = train_bmd(data, tmp_path / "full", cfg, progress=False)
    with (tmp_path / "full" / "train_log.csv").open(encoding="utf-8") as f:
        log = list(csv.DictReader(f))
    assert len(log) == 4
    losses = [float(row["train_loss"]) for row in log]
    assert min(losses[1:]) < 0.3 * losses[0], losses  # the MSE really falls
    # the trained weights predict the training patches better than the initial ones
    patches = build_patch_set(find_bmd_cases(data), {}, cfg, np.random.default_rng(0), jitter=1)
    torch.manual_seed(cfg.seed)
    before, _ = evaluate_rmse(bmd_network(), patches, torch.device("cpu"))
    model = RegressionModel.load(tmp_path / "full" / "regression.safetensors", device="cpu")
    after, _ = evaluate_rmse(model.network, patches, torch.device("cpu"))
    assert after < before, (before, after)
    assert card["sha256"] == sha256_of(tmp_path / "full" / "regression.safetensors")
    assert card["architecture"]["parameters"] == 6_954_881
    assert (tmp_path / "full" / "checkpoint_epoch_002.safetensors").is_file()
    # interrupted after 2 epochs, resumed to 4: the same weights as the uninterrupted run
    train_bmd(data, tmp_path / "resumed", BMDTrainingConfig(**{**cfg.__dict__, "epochs": 2}), progress=False)
    train_bmd(data, tmp_path / "resumed", cfg, resume=True, progress=False)
    a, _ = load_tensors(tmp_path / "full" / "checkpoint_last.safetensors")
    b, _ = load_tensors(tmp_path / "resumed" / "checkpoint_last.safetensors")
    for key in a:
        if key.startswith("model."):
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_prediction_keeps_missing_levels(data, tmp_path):
    cfg = BMDTrainingConfig(epochs=1, batch_size=16, jitter=1, seed=0, device="cpu")
    train_bmd(data, tmp_path, cfg, progress=False)
    model = RegressionModel.load(tmp_path / "regression.safetensors", device="cpu")
    rng = np.random.default_rng(0)
    patches = [TrabecularPatch("L1", True, "", rng.uniform(0.2, 0.3, (3, 32, 32)).astype(np.float32), np.zeros(3)),
               TrabecularPatch("L2", False, "no patch: metal (implant) in or next to the vertebral body"),
               TrabecularPatch("L3", True, "", rng.uniform(0.2, 0.3, (3, 32, 32)).astype(np.float32), np.zeros(3)),
               TrabecularPatch("L4", False, "not found: no pixels of this level in the label image")]
    levels = predict_bmd(model, patches)
    assert [lv.found for lv in levels] == [True, False, True, False]
    assert levels[1].reason.startswith("no patch: metal") and np.isnan(levels[1].bmd_mg_cm3)
    mean, category = patient_bmd(levels)
    assert mean == pytest.approx((levels[0].bmd_mg_cm3 + levels[2].bmd_mg_cm3) / 2)
    assert category == bmd_category(mean)
    assert np.isnan(patient_bmd(levels[1:2])[0])
    # deterministic: same input, same weights, same numbers
    assert [lv.bmd_mg_cm3 for lv in predict_bmd(model, patches) if lv.found] == \
        [lv.bmd_mg_cm3 for lv in levels if lv.found]
    (tmp_path / "regression.json").write_text(json.dumps({**model.card, "sha256": "0" * 64}), encoding="utf-8")
    with pytest.raises(LumbarBMDError, match="does not match its model card"):
        RegressionModel.load(tmp_path / "regression.safetensors")


@pytest.mark.parametrize("vendor", ["A", "B", "C"])
def test_calibration_phantom_recovers_each_scanner(vendor, tmp_path):
    cal = fit_calibration(calibration_scan(vendor))
    assert cal.slope == pytest.approx(SCANNERS[vendor].bone_slope, rel=0.01)
    assert cal.intercept == pytest.approx(SCANNERS[vendor].bone_intercept, abs=1.5)
    reference = ScannerCalibration(SCANNERS["A"].bone_slope, SCANNERS["A"].bone_intercept)
    a, b = cal.to_reference(reference)
    hu_here = SCANNERS[vendor].mineral_to_hu(100.0)
    assert a * hu_here + b == pytest.approx(SCANNERS["A"].mineral_to_hu(100.0), abs=2.0)
    path = write_calibration(cal, tmp_path / "scanner.json")
    assert read_calibration(path).slope == pytest.approx(cal.slope)


def test_calibration_errors(small_case, tmp_path):
    with pytest.raises(LumbarBMDError, match="not found"):
        read_calibration(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"slope": 12, "intercept": 0}', encoding="utf-8")
    with pytest.raises(LumbarBMDError, match="implausible"):
        read_calibration(tmp_path / "bad.json")
    with pytest.raises(LumbarBMDError):  # a patient CT is not the calibration phantom
        fit_calibration(small_case.ct)


def test_head_refit_changes_only_the_output_layer_and_fits_the_new_cohort(data, tmp_path):
    """refit_bmd_head on a vendor-B cohort mapped through B's phantom-scan calibration: the backbone's tensors are
    the shipped model's bit for bit, the output layer is new, the model loads and is verified, the card records the
    initial head's validation error next to the new one, the calibration and the HU map; on its own training
    patches the re-fitted head is at least as close as the shipped head (ridge at the smallest penalty contains it)."""
    from LumbarBMDLib.bmd_training import penultimate_features, refit_bmd_head, ridge_head

    root = tmp_path / "b"
    generate_cohort(root, cases=4, seed=810, vendor="B", size="small", progress=False)
    cal_path = write_calibration(fit_calibration(calibration_scan("B")), tmp_path / "b.json")
    card = refit_bmd_head(root, tmp_path / "m", calibration=cal_path,
                          config=BMDTrainingConfig(jitter=3, device="cpu"), progress=False)
    base = RegressionModel.load(device="cpu")
    new = RegressionModel.load(tmp_path / "m" / "regression.safetensors", device="cpu")
    assert new.verified and new.card["reference_calibration"] == base.card["reference_calibration"]
    a, b = card["training"]["hu_transform"]
    ref = ScannerCalibration.from_json(base.card["reference_calibration"])
    assert a == pytest.approx(ref.slope / SCANNERS["B"].bone_slope, rel=0.01)
    old_sd, new_sd = base.network.state_dict(), new.network.state_dict()
    changed = {k for k in old_sd if not torch.equal(old_sd[k], new_sd[k])}
    assert changed == {"class_layers.out.weight", "class_layers.out.bias"}
    m = card["metrics"]
    assert np.isfinite(m["validation_rmse_mg_cm3"]) and np.isfinite(m["initial_head_validation_rmse_mg_cm3"])
    assert len(m["ridge_trials"]) >= 3 and card["training"]["initial_model_sha256"] == base.sha256
    # the least-squares property on the training patches, in float64 features
    cases = find_bmd_cases(root)
    patches = build_patch_set(cases, {}, BMDTrainingConfig(jitter=2), np.random.default_rng(3), hu_transform=(a, b))
    f = penultimate_features(base.network, patches.images, torch.device("cpu"))
    y = (patches.bmd - 110.0) / 50.0
    w, c = ridge_head(f, y, 1e-9 * len(y))
    out = base.network.class_layers.out
    w0, c0 = out.weight.detach().double().numpy()[0], float(out.bias.detach())
    assert np.mean((f @ w + c - y) ** 2) <= np.mean((f @ w0 + c0 - y) ** 2) + 1e-9
