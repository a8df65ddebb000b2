"""R2U-Net training: data format, a short run that really reduces the loss, checkpoints and exact resume."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.phantom import generate_cohort
from LumbarBMDLib.r2unet import r2unet_from_width
from LumbarBMDLib.seg_training import (
    SegTrainingConfig,
    find_pairs,
    load_pair,
    scan_range_cut,
    spine_crop,
    split_cases,
    train_segmentation,
)
from LumbarBMDLib.weights import load_tensors, sha256_of


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("segdata")
    generate_cohort(root, cases=3, seed=700, vendor="A", size="small", progress=False)
    return root


def test_pairs_and_split(data):
    folders = find_pairs(data)
    assert len(folders) == 3
    case = load_pair(folders[0])
    assert case.image.shape == (512, 512) and 0.0 <= case.image.min() and case.image.max() <= 1.0
    assert set(np.unique(case.labels)) == {0, 1, 2, 3, 4}
    train, val = split_cases(folders, 0.2, seed=0)
    assert len(val) == 1 and len(train) == 2 and not set(train) & set(val)
    assert split_cases(folders, 0.2, seed=0) == (train, val)  # seeded
    img, lab = spine_crop(case, 128, np.random.default_rng(0))
    assert img.shape == lab.shape == (128, 128) and (lab > 0).any()
    img, lab = spine_crop(case, 128, np.random.default_rng(0), rows_size=256)
    assert img.shape == lab.shape == (256, 128) and (lab > 0).any()


def test_scan_range_cut_blanks_only_outside_l1_l4(data):
    case = load_pair(find_pairs(data)[0])
    rows = np.flatnonzero(case.labels.any(axis=1))
    level_h = (rows[-1] - rows[0]) / 4
    assert np.array_equal(scan_range_cut(case.image, case.labels, np.random.default_rng(0), 0.0), case.image)
    cut_top = cut_bottom = 0
    for seed in range(40):
        out = scan_range_cut(case.image, case.labels, np.random.default_rng(seed), 0.5)
        blank = np.flatnonzero((out == 0).all(axis=1) & (case.image != 0).any(axis=1))
        assert np.array_equal(out[rows[0] : rows[-1] + 1], case.image[rows[0] : rows[-1] + 1])  # L1–L4 intact
        above, below = blank[blank < rows[0]], blank[blank > rows[-1]]
        if above.size:  # blanked from the top of the image down to a row 0.5–2 levels above L1
            cut_top += 1
            assert rows[0] - 2.0 * level_h - 1 <= above.max() + 1 <= rows[0] - 0.5 * level_h + 1
        if below.size:  # and from a row 1.6–3.2 levels below L4 to the bottom
            cut_bottom += 1
            assert rows[-1] + 1.6 * level_h - 1 <= below.min() <= rows[-1] + 3.2 * level_h + 1
    assert 8 <= cut_top <= 32 and 8 <= cut_bottom <= 32  # each cut with probability 0.5


def test_pairs_found_through_symlinked_case_folders(data, tmp_path):
    linked = tmp_path / "linked"
    linked.mkdir()
    for folder in find_pairs(data):
        (linked / folder.name).symlink_to(folder, target_is_directory=True)
    assert [f.name for f in find_pairs(linked)] == [f.name for f in find_pairs(data)]


def test_bad_training_folder(tmp_path):
    with pytest.raises(LumbarBMDError, match="not found"):
        find_pairs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LumbarBMDError, match="no training pairs"):
        find_pairs(tmp_path / "empty")


def _fixed_batch_loss(model, case) -> float:
    from monai.losses import DiceCELoss

    img, lab = spine_crop(case, 128, np.random.default_rng(123))
    x = torch.from_numpy(img)[None, None]
    y = torch.from_numpy(lab)[None, None]
    model.eval()
    with torch.no_grad():
        return float(DiceCELoss(to_onehot_y=True, softmax=True)(model(x), y))


def test_short_run_reduces_loss_and_resumes_exactly(data, tmp_path):
    cfg = SegTrainingConfig(
        width=4, epochs=6, batch_size=2, learning_rate=3e-3, crop=128, checkpoint_every=3, seed=1, device="cpu"
    )
    torch.manual_seed(cfg.seed)
    untrained = r2unet_from_width(cfg.width)
    card = train_segmentation(data, tmp_path / "run", cfg, progress=False)
    out = tmp_path / "run"
    for name in (
        "segmentation.safetensors",
        "segmentation.json",
        "checkpoint_best.safetensors",
        "checkpoint_last.safetensors",
        "checkpoint_epoch_003.safetensors",
        "checkpoint_epoch_006.safetensors",
        "train_log.csv",
    ):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "train_log.csv").open(encoding="utf-8")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    # the training loss falls, and the trained model fits a fixed training crop better than the initial one
    losses = [float(r["train_loss"]) for r in rows]
    assert min(losses[-2:]) < losses[0]
    trained = r2unet_from_width(cfg.width)
    last = load_tensors(out / "checkpoint_last.safetensors")[0]
    trained.load_state_dict({k[6:]: v for k, v in last.items() if k.startswith("model.")})
    case = load_pair(find_pairs(data)[0])
    assert _fixed_batch_loss(trained, case) < _fixed_batch_loss(untrained, case)
    # model card
    saved = json.loads((out / "segmentation.json").read_text(encoding="utf-8"))
    assert saved == card and saved["sha256"] == sha256_of(out / "segmentation.safetensors")
    assert saved["architecture"]["features"] == [4, 8, 16, 32, 64]
    assert saved["training"]["vendors"] == ["A"] and saved["training"]["cases_validation"] == 1

    # resume: 3 epochs, then resume to 6, gives the same weights as 6 epochs in one go
    cfg3 = SegTrainingConfig(**{**cfg.__dict__, "epochs": 3})
    train_segmentation(data, tmp_path / "resumed", cfg3, progress=False)
    train_segmentation(data, tmp_path / "resumed", cfg, resume=True, progress=False)
    a = load_tensors(out / "checkpoint_last.safetensors")[0]
    b = load_tensors(tmp_path / "resumed" / "checkpoint_last.safetensors")[0]
    for key in a:
        if key.startswith("model."):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    resumed_log = list(csv.DictReader((tmp_path / "resumed" / "train_log.csv").open(encoding="utf-8")))
    assert [int(r["epoch"]) for r in resumed_log] == list(range(1, 7))


def test_resume_without_checkpoint_is_an_error(data, tmp_path):
    with pytest.raises(LumbarBMDError, match="no checkpoint"):
        train_segmentation(
            data, tmp_path / "none", SegTrainingConfig(width=4, epochs=1, crop=64), resume=True, progress=False
        )


def test_fine_tuning_starts_from_the_given_model(data, tmp_path):
    cfg = SegTrainingConfig(width=4, epochs=1, batch_size=2, crop=128, crop_rows=128, crops_per_case=1, seed=2,
                            device="cpu")
    base = train_segmentation(data, tmp_path / "base", cfg, progress=False)
    init = tmp_path / "base" / "segmentation.safetensors"
    tuned = train_segmentation(data, tmp_path / "tuned", SegTrainingConfig(**{**cfg.__dict__, "init": str(init),
                                                                              "learning_rate": 0.0}), progress=False)
    assert tuned["training"]["initialised_from"]["sha256"] == base["sha256"]
    # with a zero learning rate fine-tuning changes no weight: training really started from the given model
    a = load_tensors(init)[0]
    b = load_tensors(tmp_path / "tuned" / "checkpoint_last.safetensors")[0]
    for key, value in a.items():
        if value.is_floating_point() and "running" not in key:
            torch.testing.assert_close(b[f"model.{key}"], value)
    with pytest.raises(LumbarBMDError, match="does not fit"):
        train_segmentation(data, tmp_path / "bad", SegTrainingConfig(**{**cfg.__dict__, "width": 8,
                                                                        "init": str(init)}), progress=False)
