"""Training of the DenseNet-121 BMD regression (``lumbarbmd train-bmd DATA --out MODEL``).

Training data (DATA), documented in the README:

* one folder per case holding the CT (``ct.nii.gz``, or ``ct.nrrd`` / ``ct.mha``) and the L1–L4 labels:
  ``annotation_labels.nii.gz`` (the annotator's sagittal labels, as ``lumbarbmd annotate`` + the Slicer
  module export them; preferred, because inference localises the levels on a sagittal label image too) or
  ``vertebrae.nii.gz`` (3-D body labels, 1–4 = L1–L4, e.g. the phantom's truth);
* the QCT reference values: ``DATA/bmd_reference.csv`` with columns ``case,level,bmd_mg_cm3`` (case = the case
  folder's name, level = L1..L4); cases without rows there fall back to their ``truth.json``
  (``bmd_mg_cm3`` per level, as the phantom writes). Phantom cohorts therefore are training data as they are.

Samples: for every labelled level with a reference value, ``jitter`` patches are cut around the level's centre
moved by up to ±``jitter_mm`` in x, y and z (the segmentation's centre is never exact; this also multiplies
the data). Augmentation at each step: left–right and anterior–posterior flips of the axial patch and swapping
the z − 1 / z + 1 channels (a density does not change under them); no intensity augmentation, because the
absolute HU scale *is* the measurement. Loss MSE on the normalised BMD; Adam; validation by case (seeded
split); checkpoints every 20 epochs (the paper), ``best`` by validation RMSE, ``last`` every epoch with the
optimizer and RNG states for ``--resume``; CSV log; tqdm; CPU or CUDA.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from LumbarBMDLib.calibration import read_calibration
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.evaluation import read_reference_csv, read_truth_json
from LumbarBMDLib.localisation import LevelLocation, level_centres_in_image, locate_in_ct
from LumbarBMDLib.patches import trabecular_patch
from LumbarBMDLib.regression import BMD_CENTRE, BMD_SCALE, bmd_network
from LumbarBMDLib.seg_training import files_named, resolve_device, split_cases, train_log
from LumbarBMDLib.training_pair import REFERENCE_FILE
from LumbarBMDLib.volume import read_ct
from LumbarBMDLib.weights import (
    load_tensors,
    read_json_object,
    resume_checkpoint,
    save_checkpoint,
    save_tensors,
    sha256_of,
)

CT_FILES = ("ct.nii.gz", "ct.nrrd", "ct.mha", "ct.nii")
LABEL_FILES = ("annotation_labels.nii.gz", "vertebrae.nii.gz")


@dataclass
class BMDTrainingConfig:
    """Hyper-parameters of ``train-bmd`` (defaults: those of the shipped model)."""

    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 1e-3
    cosine: bool = True  # cosine-annealed learning rate over ``epochs`` (else constant)
    jitter: int = 8  # patches per level (jittered centres)
    jitter_mm: float = 2.5
    val_fraction: float = 0.2
    checkpoint_every: int = 20
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0


@dataclass
class PatchSet:
    """Patches with their reference: ``images`` float32 ``(N, 3, 32, 32)``, ``bmd`` float32 ``(N,)`` mg/cm³,
    ``case`` / ``level`` names per patch, and ``skipped`` (case, level, reason) for levels without a patch."""

    images: np.ndarray
    bmd: np.ndarray
    case: list[str]
    level: list[str]
    skipped: list[tuple[str, str, str]] = field(default_factory=list)


def read_reference(data_dir: Path) -> dict[str, dict[str, float]]:
    """``{case: {level: bmd}}`` from ``DATA/bmd_reference.csv`` (empty when absent).

    Every value is checked (:func:`~LumbarBMDLib.evaluation.reference_bmd`): a number within
    :data:`~LumbarBMDLib.evaluation.REFERENCE_BMD_RANGE` or missing (empty / NaN: that level has no reference and
    gives no patch); anything else is refused naming the line, case and level.
    """
    path = data_dir / REFERENCE_FILE
    if not path.is_file():
        return {}
    return {case: bmd for case, bmd in read_reference_csv(path).items() if bmd}  # an empty case: its truth.json


def find_bmd_cases(data_dir: str | Path) -> list[Path]:
    """Case folders under ``data_dir`` with a CT and a label file (sorted)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LumbarBMDError(f"training data folder not found: {data_dir}")
    folders = sorted({p.parent for name in CT_FILES for p in files_named(data_dir, name)
                      if any((p.parent / lab).is_file() for lab in LABEL_FILES)})
    if not folders:
        raise LumbarBMDError(
            f"no BMD training cases in {data_dir}: each case folder needs a CT ({' or '.join(CT_FILES[:2])}) and "
            f"L1–L4 labels ({' or '.join(LABEL_FILES)})"
        )
    return folders


def case_reference(folder: Path, table: dict[str, dict[str, float]]) -> dict[str, float]:
    """Reference BMD per level of one case: the CSV's rows, else ``truth.json`` (checked, see
    :func:`~LumbarBMDLib.evaluation.read_truth_json`).

    A phantom case with intravenous contrast (``truth.json`` variants) gives no reference: its trabecular HU carry
    the enhancement (+10–15 HU) while its reference is the unenhanced QCT, which a patch cannot tell apart.
    """
    truth_path = folder / "truth.json"
    truth = read_json_object(truth_path, "reference file") if truth_path.is_file() else None
    if truth is not None:
        variants = truth.get("variants") or {}
        if not isinstance(variants, dict):
            raise LumbarBMDError(f"reference file {truth_path}: 'variants' must be an object")
        if variants.get("contrast"):
            return {}
    if folder.name in table:
        return table[folder.name]
    if truth is not None:
        return read_truth_json(truth_path)[1]["bmd"]
    return {}


def case_patches(folder: Path, reference: dict[str, float], jitter: int, jitter_mm: float,
                 rng: np.random.Generator, hu_transform: tuple[float, float] = (1.0, 0.0)) -> PatchSet:
    """Jittered patches of every level of one case that has a reference value (the first one unjittered);
    ``hu_transform`` maps the HU first (onto a model's reference scale, :func:`refit_bmd_head`)."""
    ct_path = next(folder / n for n in CT_FILES if (folder / n).is_file())
    label_path = next(folder / n for n in LABEL_FILES if (folder / n).is_file())
    volume = read_ct(ct_path)
    try:
        label_image = sitk.ReadImage(str(label_path))
    except RuntimeError:
        raise LumbarBMDError(f"training case {folder}: the label file {label_path.name} cannot be read (damaged or "
                             "not an image); replace it or move the case out of the training data") from None
    locations = locate_in_ct(level_centres_in_image(label_image), volume)
    images, bmd, levels, skipped = [], [], [], []
    for loc in locations:
        if loc.level not in reference:
            continue
        if not loc.found:
            skipped.append((folder.name, loc.level, loc.reason))
            continue
        for j in range(jitter):
            shift = np.zeros(3) if j == 0 else rng.uniform(-jitter_mm, jitter_mm, 3)
            moved = LevelLocation(loc.level, True, "", loc.centre_lps + shift, loc.area_mm2, loc.index)
            patch = trabecular_patch(volume, moved, hu_transform)
            if not patch.found:
                if j == 0:
                    skipped.append((folder.name, loc.level, patch.reason))
                    break
                continue
            images.append(patch.image)
            bmd.append(reference[loc.level])
            levels.append(loc.level)
    arr = np.stack(images) if images else np.zeros((0, 3, 32, 32), np.float32)
    return PatchSet(arr, np.asarray(bmd, np.float32), [folder.name] * len(images), levels, skipped)


def build_patch_set(folders: list[Path], table: dict[str, dict[str, float]], config: BMDTrainingConfig,
                    rng: np.random.Generator, jitter: int | None = None, progress: bool = False,
                    role: str = "training", hu_transform: tuple[float, float] = (1.0, 0.0)) -> PatchSet:
    """:func:`case_patches` over ``folders``, concatenated (``role``: "training" or "validation", for the sentence
    when no case has a usable reference)."""
    from tqdm import tqdm

    sets = []
    for folder in tqdm(folders, desc="patches", unit="case", disable=not progress, leave=False):
        ref = case_reference(folder, table)
        if ref:
            sets.append(case_patches(folder, ref, config.jitter if jitter is None else jitter, config.jitter_mm, rng,
                                     hu_transform))
    if not sets:
        raise LumbarBMDError(f"no usable reference BMD values for any {role} case (bmd_reference.csv or "
                             "truth.json): every value is missing, so there is nothing to train on")
    return PatchSet(np.concatenate([s.images for s in sets]), np.concatenate([s.bmd for s in sets]),
                    [c for s in sets for c in s.case], [lv for s in sets for lv in s.level],
                    [k for s in sets for k in s.skipped])


def check_patch_sets(train: PatchSet, val: PatchSet, data_dir: Path) -> None:
    """Refuse, before training, patch sets that cannot train or validate a model: fewer than two training patches
    (BatchNorm needs two) or no validation patch, saying why levels gave no patch."""
    def reasons(p: PatchSet) -> str:
        why = sorted({r for _, _, r in p.skipped})
        return f" (levels skipped: {'; '.join(why[:3])})" if why else ""

    if len(train.bmd) < 2:
        raise LumbarBMDError(f"only {len(train.bmd)} training patch(es) could be cut from {data_dir}: training needs "
                             f"at least two levels with a reference value and a patch{reasons(train)}")
    if len(val.bmd) == 0:
        raise LumbarBMDError(f"no validation patch could be cut from the validation cases of {data_dir}: give them "
                             f"reference values or lower --val-fraction{reasons(val)}")


def augment_batch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random left–right / anterior–posterior flips and z-channel swap per patch ``(N, 3, 32, 32)``."""
    out = x.copy()
    for i in range(len(out)):
        if rng.random() < 0.5:
            out[i] = out[i, :, :, ::-1]
        if rng.random() < 0.5:
            out[i] = out[i, :, ::-1, :]
        if rng.random() < 0.5:
            out[i] = out[i, ::-1]
    return out


@torch.inference_mode()
def evaluate_rmse(model: torch.nn.Module, data: PatchSet, device: torch.device) -> tuple[float, float]:
    """(RMSE, mean error) in mg/cm³ of the unjittered prediction of ``data``."""
    model.eval()
    preds = []
    for b in range(0, len(data.bmd), 256):
        x = torch.from_numpy(np.ascontiguousarray(data.images[b : b + 256])).to(device)
        preds.append(model(x)[:, 0].cpu().numpy() * BMD_SCALE + BMD_CENTRE)
    err = np.concatenate(preds) - data.bmd if preds else np.zeros(0)
    return (float(np.sqrt(np.mean(err**2))), float(np.mean(err))) if err.size else (float("nan"), float("nan"))


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """Cosine-annealed learning rate of ``epoch`` (1-based): ``base`` at epoch 1, → 0 at the end."""
    return 0.5 * base * (1.0 + np.cos(np.pi * (epoch - 1) / max(epochs, 1)))


def _checkpoint(path: Path, model, optimizer, epoch: int, best: float, config: BMDTrainingConfig,
                rng: np.random.Generator) -> None:
    save_checkpoint(path, model, optimizer, rng, {"epoch": epoch, "best_val_rmse": best, "config": asdict(config)})


def train_bmd(data_dir: str | Path, out_dir: str | Path, config: BMDTrainingConfig | None = None,
              resume: bool = False, progress: bool = True, reference_calibration: str | Path | None = None) -> dict:
    """Train the DenseNet-121 on the cases under ``data_dir``; write checkpoints, log and the model to ``out_dir``.

    ``reference_calibration``: the training scanner's calibration JSON (``lumbarbmd calibrate``), stored in the
    model card; inference maps other calibrated scanners onto it (:mod:`LumbarBMDLib.calibration`).

    Returns the model card of the best model (``out_dir/regression.safetensors`` + ``.json``).
    """
    from monai.utils import set_determinism
    from tqdm import tqdm

    config = config or BMDTrainingConfig()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    set_determinism(seed=config.seed)
    rng = np.random.default_rng(config.seed)

    reference_cal = read_calibration(reference_calibration).as_json() if reference_calibration else None
    folders = find_bmd_cases(data_dir)
    table = read_reference(data_dir)
    train_dirs, val_dirs = split_cases(folders, config.val_fraction, config.seed)
    patch_rng = np.random.default_rng(config.seed + 1)  # patches do not depend on the resume state
    train = build_patch_set(train_dirs, table, config, patch_rng, progress=progress)
    val = build_patch_set(val_dirs, table, config, patch_rng, jitter=1, role="validation") if val_dirs else train
    check_patch_sets(train, val, data_dir)  # before the model exists: bad input leaves no checkpoint behind
    targets = (train.bmd - BMD_CENTRE) / BMD_SCALE

    model = bmd_network().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_fn = torch.nn.MSELoss()
    start_epoch, best = 1, float("inf")
    last = out_dir / "checkpoint_last.safetensors"
    if resume:
        meta = resume_checkpoint(last, model, optimizer, rng)
        start_epoch, best = int(meta["epoch"]) + 1, float(meta["best_val_rmse"])

    header = ["epoch", "train_loss", "val_rmse_mg_cm3", "val_bias_mg_cm3", "lr", "seconds"]
    with train_log(out_dir / "train_log.csv", resume, header) as (log, writer):
        for epoch in range(start_epoch, config.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            lr = cosine_lr(config.learning_rate, epoch, config.epochs) if config.cosine else config.learning_rate
            for group in optimizer.param_groups:
                group["lr"] = lr
            order = rng.permutation(len(targets))
            losses = []
            for b in tqdm(range(0, len(order), config.batch_size), desc=f"epoch {epoch}/{config.epochs}",
                          unit="batch", disable=not progress, leave=False):
                idx = order[b : b + config.batch_size]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                x = torch.from_numpy(np.ascontiguousarray(augment_batch(train.images[idx], rng))).to(device)
                y = torch.from_numpy(targets[idx]).to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x)[:, 0], y)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            rmse, bias = evaluate_rmse(model, val, device)
            writer.writerow([epoch, f"{np.mean(losses):.5f}", f"{rmse:.3f}", f"{bias:.3f}", f"{lr:.2e}",
                             f"{time.perf_counter() - t0:.1f}"])
            log.flush()
            if rmse < best:
                best = rmse
                save_tensors(dict(model.state_dict()), out_dir / "checkpoint_best.safetensors",
                             {"epoch": epoch, "val_rmse": rmse, "val_bias": bias})
            if epoch % config.checkpoint_every == 0:
                _checkpoint(out_dir / f"checkpoint_epoch_{epoch:03d}.safetensors", model, optimizer, epoch, best,
                            config, rng)
            _checkpoint(last, model, optimizer, epoch, best, config, rng)
            if progress:
                print(f"epoch {epoch}: loss {np.mean(losses):.4f}, "
                      f"validation RMSE {rmse:.2f} mg/cm³ (bias {bias:+.2f})")

    if not np.isfinite(best):  # no epoch gave a finite validation RMSE: the loss diverged, nothing worth keeping
        for name in ("checkpoint_last.safetensors", *(f"checkpoint_epoch_{e:03d}.safetensors"
                                                      for e in range(start_epoch, config.epochs + 1))):
            (out_dir / name).unlink(missing_ok=True)
        raise LumbarBMDError(f"training on {data_dir} gave no finite validation error in any epoch (the loss "
                             "diverged): lower --lr and train again")
    best_tensors, best_meta = load_tensors(out_dir / "checkpoint_best.safetensors")
    model.load_state_dict(best_tensors)
    vendors = sorted({str(read_json_object(f / "truth.json", "reference file").get("vendor") or "")
                      for f in train_dirs if (f / "truth.json").is_file()} - {""})
    card = {
        "model": "DenseNet-121 trabecular-patch BMD regression",
        "architecture": {"name": "DenseNet121", "library": "MONAI", "spatial_dims": 2, "in_channels": 3,
                         "out_channels": 1, "parameters": sum(p.numel() for p in model.parameters())},
        "weights_storage": "float16 (computed in float32)",
        "input": {"patch": "3 x 32 x 32, 0.5 mm pixels (16 mm), channels z-1 mm, z, z+1 mm",
                  "window_hu": [-150.0, 850.0], "normalisation": "window to [0, 255], then / 255"},
        "output": {"bmd_mg_cm3": f"output * {BMD_SCALE} + {BMD_CENTRE}"},
        "training": {"data": str(data_dir.resolve()), "cases_train": len(train_dirs), "cases_validation": len(val_dirs),
                     "patches_train": len(train.bmd), "levels_skipped": len(train.skipped), "vendors": vendors,
                     "epochs": config.epochs, "best_epoch": int(best_meta["epoch"]), "config": asdict(config),
                     "device": str(device)},
        "reference_calibration": reference_cal,
        "metrics": {"validation_rmse_mg_cm3": float(best_meta["val_rmse"]),
                    "validation_bias_mg_cm3": float(best_meta["val_bias"])},
    }
    return write_model(model, card, out_dir)


def write_model(model: torch.nn.Module, card: dict, out_dir: Path) -> dict:
    """``out_dir/regression.safetensors`` (float16) and its model card ``.json`` with the weights' sha256 (the card
    last, via a temporary file: a card never names weights that are not there). Returns the card."""
    path = out_dir / "regression.safetensors"
    # float16 storage halves the file (28 → 14 MB); loading casts back to float32 (< 0.01 mg/cm³ change, measured)
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_tensors(half, path, {"architecture": card["architecture"], "storage": "float16"})
    card["sha256"] = sha256_of(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=1), encoding="utf-8")
    tmp.replace(path.with_suffix(".json"))
    return card


# ---------------------------------------------------------------------------------------------------------------
# Re-fitting the regression head to another scanner's cohort (the backbone kept)

#: Ridge penalties tried for the head (× the number of training patches), the one with the lowest validation RMSE
#: is kept; the unregularised end reproduces least squares, the strong end keeps the head near zero.
RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@torch.no_grad()
def penultimate_features(network: torch.nn.Module, images: np.ndarray, device: torch.device,
                         batch: int = 256) -> np.ndarray:
    """The DenseNet-121's pooled features in front of its output layer: ``(N, 1024)`` float64 for ``images``
    ``(N, 3, 32, 32)`` (the network in eval mode)."""
    network.eval()
    head = network.class_layers[:-1]  # ReLU, global average pooling, flatten (MONAI DenseNet)
    out = [head(network.features(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).to(device)))
           .double().cpu().numpy() for i in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros((0, 1024))


def ridge_head(features: np.ndarray, targets: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """``(weights (1024,), bias)`` minimising Σ (f·w + b − y)² + α |w|² (the bias not penalised)."""
    mean_f, mean_y = features.mean(axis=0), float(targets.mean())
    fc = features - mean_f
    w = np.linalg.solve(fc.T @ fc + alpha * np.eye(fc.shape[1]), fc.T @ (targets - mean_y))
    return w, mean_y - float(mean_f @ w)


def refit_bmd_head(data_dir: str | Path, out_dir: str | Path, init: str | Path | None = None,
                   calibration: str | Path | None = None, config: BMDTrainingConfig | None = None,
                   progress: bool = True) -> dict:
    """Re-fit only the output layer of a trained BMD model to the cases under ``data_dir`` (ridge regression on the
    frozen DenseNet features); write ``out_dir/regression.safetensors`` + ``.json``.

    Why: when the training scanner's images change in ways a calibration does not carry (the texture, noise and
    marrow-fat contrast scale with the HU map), the backbone's features still hold the trabecular information and a
    linear head re-fitted on the new images removes the systematic part, at a fraction of a training run's cost.

    Args:
        data_dir: case folders as for :func:`train_bmd` (contrast cases give no reference).
        out_dir: where the model goes.
        init: the model whose backbone is kept (default: the shipped model). Its reference scale is kept.
        calibration: the phantom-scan calibration (``lumbarbmd calibrate``) of the scanner of ``data_dir``; its HU
            are mapped onto ``init``'s reference scale before the patches, as at inference. None: identity.
        config: ``jitter``, ``jitter_mm``, ``val_fraction``, ``seed``, ``device`` are used.

    Returns the model card; it records the validation RMSE and bias of ``init``'s own head next to the new one's.
    """
    from LumbarBMDLib.regression import RegressionModel

    config = config or BMDTrainingConfig()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    base = RegressionModel.load(init, device=config.device)
    reference = base.card.get("reference_calibration")
    cal = read_calibration(calibration) if calibration else None
    if cal is not None and not reference:
        raise LumbarBMDError(f"the model {init or 'shipped'} has no reference calibration to map {calibration} onto")
    transform = cal.to_reference(type(cal).from_json(reference)) if cal is not None else (1.0, 0.0)
    folders = find_bmd_cases(data_dir)
    table = read_reference(data_dir)
    train_dirs, val_dirs = split_cases(folders, config.val_fraction, config.seed)
    rng = np.random.default_rng(config.seed + 1)
    train = build_patch_set(train_dirs, table, config, rng, progress=progress, hu_transform=transform)
    val = build_patch_set(val_dirs, table, config, rng, jitter=1, role="validation", hu_transform=transform) \
        if val_dirs else train
    check_patch_sets(train, val, data_dir)
    f_train = penultimate_features(base.network, train.images, base.device)
    f_val = penultimate_features(base.network, val.images, base.device)
    y = (train.bmd.astype(np.float64) - BMD_CENTRE) / BMD_SCALE
    out_layer = base.network.class_layers[-1]

    def val_error(w: np.ndarray, b: float) -> tuple[float, float]:
        err = (f_val @ w + b) * BMD_SCALE + BMD_CENTRE - val.bmd
        return float(np.sqrt(np.mean(err ** 2))), float(np.mean(err))

    w0 = out_layer.weight.detach().double().cpu().numpy()[0]
    b0 = float(out_layer.bias.detach().double().cpu().numpy()[0])
    before = val_error(w0, b0)
    trials = []
    for alpha in RIDGE_GRID:
        w, b = ridge_head(f_train, y, alpha * len(y))
        trials.append((val_error(w, b), alpha, w, b))
    (rmse, bias), alpha, w, b = min(trials, key=lambda t: t[0][0])
    with torch.no_grad():
        out_layer.weight.copy_(torch.from_numpy(w[None, :]).to(out_layer.weight))
        out_layer.bias.copy_(torch.tensor([b]).to(out_layer.bias))
    vendors = sorted({str(read_json_object(f / "truth.json", "reference file").get("vendor") or "")
                      for f in train_dirs if (f / "truth.json").is_file()} - {""})
    card = {k: v for k, v in base.card.items() if k not in ("sha256", "metrics", "training")}
    card["training"] = {
        "method": "output layer re-fitted by ridge regression on the frozen DenseNet-121 features "
                  "(LumbarBMDLib.bmd_training.refit_bmd_head); backbone from the initial model",
        "initial_model_sha256": base.sha256, "initial_training": base.card.get("training"),
        "data": str(data_dir.resolve()), "cases_train": len(train_dirs), "cases_validation": len(val_dirs),
        "patches_train": len(train.bmd), "levels_skipped": len(train.skipped), "vendors": vendors,
        "hu_transform": [round(transform[0], 6), round(transform[1], 4)],
        "calibration": None if cal is None else cal.as_json(), "ridge_alpha_per_patch": alpha,
        "config": asdict(config)}
    card["metrics"] = {"validation_rmse_mg_cm3": rmse, "validation_bias_mg_cm3": bias,
                       "initial_head_validation_rmse_mg_cm3": before[0],
                       "initial_head_validation_bias_mg_cm3": before[1],
                       "ridge_trials": [{"alpha_per_patch": a, "rmse": e[0], "bias": e[1]} for e, a, _, _ in trials]}
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_model(base.network, card, out_dir)
