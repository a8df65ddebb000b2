"""Training of the L1–L4 R2U-Net (``lumbarbmd train-seg DATA --out MODEL``).

Training data (DATA): any folder tree in which a case is a folder holding the annotator's pair

* ``annotation_image.nii.gz``: the 20-slice mean sagittal image (float HU, 512 × 512, one slice), and
* ``annotation_labels.nii.gz``: its label image (0 background, 1–4 = L1–L4), same grid.

That is what the Slicer module's "Export training pair" writes and what ``lumbarbmd phantom`` writes per case,
so phantom cohorts are training data as they are. Cases are split into training and validation by a seeded
shuffle of the case folders.

Training: window [−150, 850] HU → [0, 1] (as at inference); random 384 × 256 crops centred near the lumbar
spine (the network is fully convolutional; inference runs on a 512 × 256 window); augmentation with MONAI
(affine: ±10°, ±10 % scale, ±20 px shift; elastic; Gaussian noise — the 10 single-slice candidates seen at
inference are noisier than the 20-slice mean; blur; intensity scale/shift/gamma — other scanners'
calibration) and scan-range cuts (rows above T12/T11 or below S1–S3 blanked, see ``scan_range_cut``).
No flips: a left–right flip of a sagittal image swaps anterior and posterior and an up–down flip inverts
the cranio-caudal order, neither of which occurs. Loss: Dice + cross-entropy (MONAI ``DiceCELoss``); Adam.
Validation: mean Dice of L1–L4 on the full images. Checkpoints (safetensors): every 20 epochs (the paper),
``last`` after every epoch (with optimizer and RNG state, for ``--resume``) and ``best`` by validation
Dice; a CSV log; a model card (JSON) next to the best weights.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import SimpleITK as sitk
import torch

from LumbarBMDLib._compat import zip_strict
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.metrics import segmentation_metrics
from LumbarBMDLib.r2unet import count_parameters, r2unet_from_width
from LumbarBMDLib.sagittal import SAGITTAL_PIXEL_MM, SAGITTAL_SIZE, WINDOW_HU, network_window, window_to_unit
from LumbarBMDLib.training_pair import IMAGE_FILE, LABEL_FILE
from LumbarBMDLib.weights import (
    check_finite,
    load_tensors,
    read_json_object,
    resume_checkpoint,
    save_checkpoint,
    save_tensors,
    sha256_of,
)

LEVELS = ("L1", "L2", "L3", "L4")


@dataclass
class SegTrainingConfig:
    """Settings of a training run (stored in every checkpoint and in the model card)."""

    width: int = 16  # R2U-Net base width: features (w, 2w, 4w, 8w, 16w)
    epochs: int = 100
    batch_size: int = 4
    learning_rate: float = 3e-4
    crop: int = 256  # training crop width (columns, anterior–posterior); inference runs on a 512 × 256 window
    crop_rows: int = 384  # training crop height (rows): 307 mm, enough to see T12 or the sacrum, which tell L1 from L2
    crops_per_case: int = 4  # random crops drawn from each training case per epoch
    val_fraction: float = 0.2
    checkpoint_every: int = 20  # the paper saved a checkpoint every 20 epochs
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0  # 0: torch's default
    init: str = ""  # start from this model's weights (fine-tuning, e.g. on a site's own annotations)
    scan_cut_prob: float = 0.3  # probability of each scan-range cut (top: through T12/T11, bottom: through the sacrum)
    randomise_prob: float = 0.0  # probability of domain randomisation per crop (see ``domain_randomisation``)


@dataclass
class SegCase:
    """One training pair: ``image`` float32 ``(512, 512)`` in [0, 1], ``labels`` int64 ``(512, 512)``."""

    case_id: str
    image: np.ndarray
    labels: np.ndarray
    meta: dict = field(default_factory=dict)


def files_named(root: Path, name: str) -> list[Path]:
    """Every file called ``name`` under ``root``, following symbolic links to folders (a training set is often
    assembled from links to case folders)."""
    return [Path(d) / name for d, _, files in os.walk(root, followlinks=True) if name in files]


def find_pairs(data_dir: str | Path) -> list[Path]:
    """Case folders under ``data_dir`` that hold both files of a training pair (sorted)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LumbarBMDError(f"training data folder not found: {data_dir}")
    images = {p.parent for p in files_named(data_dir, IMAGE_FILE)}
    labels = {p.parent for p in files_named(data_dir, LABEL_FILE)}
    for folder in sorted(images ^ labels):  # half a pair is a case the user meant to train on: say so
        have, lack = (IMAGE_FILE, LABEL_FILE) if folder in images else (LABEL_FILE, IMAGE_FILE)
        raise LumbarBMDError(f"training case {folder} has {have} but no {lack}: export the missing file or move "
                             "the folder out of the training data")
    folders = sorted(images & labels)
    if not folders:
        raise LumbarBMDError(
            f"no training pairs in {data_dir}: each case folder needs {IMAGE_FILE} and {LABEL_FILE} "
            "(as written by 'lumbarbmd phantom' or the Slicer module's 'Export training pair')"
        )
    return folders


def load_pair(folder: Path) -> SegCase:
    """Read one pair and check it: a 512 × 512 sagittal grid of finite HU, integer labels 0–4 on the same grid;
    anything else is a sentence naming the folder."""
    pair = []
    for name in (IMAGE_FILE, LABEL_FILE):
        if not (folder / name).is_file():
            raise LumbarBMDError(f"training case {folder} has no {name}: export it or move the folder out of the "
                                 "training data")
        try:
            pair.append(sitk.ReadImage(str(folder / name)))
        except RuntimeError:
            raise LumbarBMDError(f"training case {folder}: {name} cannot be read (damaged or not an image); export "
                                 "it again or move the folder out of the training data") from None
    img, lab = pair
    image = sitk.GetArrayFromImage(img).astype(np.float32)
    labels = sitk.GetArrayFromImage(lab)
    if image.ndim == 3:
        image, labels = image[0], labels[0]
    expected = (SAGITTAL_SIZE, SAGITTAL_SIZE)
    if image.shape != expected or labels.shape != expected:
        raise LumbarBMDError(f"{folder}: training images must be {expected[0]} × {expected[1]}, got {image.shape} "
                             f"and labels {labels.shape}")
    if not np.allclose(img.GetSpacing()[:2], (SAGITTAL_PIXEL_MM, SAGITTAL_PIXEL_MM), atol=1e-3):
        raise LumbarBMDError(f"{folder}: pixel spacing {img.GetSpacing()[:2]} is not the {SAGITTAL_PIXEL_MM} mm grid")
    if not np.allclose(lab.GetSpacing()[:2], img.GetSpacing()[:2], atol=1e-3):
        raise LumbarBMDError(f"{folder}: the labels' pixel spacing {lab.GetSpacing()[:2]} differs from the image's")
    if not np.isfinite(image).all():
        raise LumbarBMDError(f"{folder}: {IMAGE_FILE} holds NaN or infinite pixels; export it again")
    if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)) or labels.min() < 0 \
            or labels.max() > 4:
        found = np.unique(labels)
        raise LumbarBMDError(f"{folder}: label values must be the integers 0–4 (background, L1–L4), found "
                             f"{found[:8]}{' …' if found.size > 8 else ''}")
    meta = {}
    truth = folder / "truth.json"
    if truth.is_file():
        t = read_json_object(truth, "case description")
        meta = {"vendor": t.get("vendor"), "variants": t.get("variants")}
    return SegCase(folder.name, window_to_unit(image), labels.astype(np.int64), meta)


def split_cases(folders: list[Path], val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Seeded shuffle of case folders into (training, validation); at least one validation case when ≥ 2."""
    order = np.random.default_rng(seed).permutation(len(folders))
    n_val = round(val_fraction * len(folders))
    if len(folders) >= 2:
        n_val = min(max(n_val, 1), len(folders) - 1)
    val = [folders[i] for i in sorted(order[:n_val])]
    train = [folders[i] for i in sorted(order[n_val:])]
    return train, val


def augmentation(seed: int):
    """MONAI dictionary transforms on {"image": (1, H, W), "label": (1, H, W)} (see the module docstring)."""
    from monai.transforms import (
        Compose,
        Rand2DElasticd,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ("image", "label")
    t = Compose([
        RandAffined(keys, prob=0.7, rotate_range=np.deg2rad(10.0), scale_range=(0.1, 0.1), translate_range=(20, 20),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        Rand2DElasticd(keys, spacing=(48, 48), magnitude_range=(0.5, 2.0), prob=0.25, mode=("bilinear", "nearest"),
                       padding_mode="zeros"),
        RandGaussianNoised("image", prob=0.5, std=0.03),
        RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.4, 1.2), sigma_y=(0.4, 1.2)),
        RandScaleIntensityd("image", factors=0.1, prob=0.3),
        RandShiftIntensityd("image", offsets=0.04, prob=0.3),
        RandAdjustContrastd("image", gamma=(0.8, 1.25), prob=0.2),
    ])
    t.set_random_state(seed=seed)
    return t


def scan_range_cut(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
    """Simulate another scan range: blank the rows above a random cut through T12/T11 and/or below a random cut
    through the sacrum (S1–S3), as outside-the-scan pixels (0 after windowing) look.

    Phantom scans always span T11 to S3; real scans start and stop anywhere around them (the real example stops
    inside S1). Without this the network could learn to count levels from where the scan ends instead of from
    the anatomy. Cuts never reach L1–L4. ``image`` ``(H, W)`` in [0, 1], ``labels`` ``(H, W)``; returns a copy.
    """
    out = image.copy()
    rows = np.flatnonzero(labels.any(axis=1))
    if rows.size == 0 or prob <= 0:
        return out
    top, bottom = int(rows[0]), int(rows[-1])
    level_h = (bottom - top) / max(len(np.unique(labels[labels > 0])), 1)  # one vertebra + disc, in rows
    if rng.random() < prob:  # top of the scan between the upper end plate of T11 and mid-T12
        cut = round(top - rng.uniform(0.5, 2.0) * level_h)
        out[: max(cut, 0)] = 0.0
    if rng.random() < prob:  # bottom of the scan between the top of S1 and S3
        cut = round(bottom + rng.uniform(1.6, 3.2) * level_h)
        out[max(cut, 0):] = 0.0
    return out


def _hu(value_hu: float) -> float:
    """A HU value on the network's [0, 1] scale (window [−150, 850] HU)."""
    lo, hi = WINDOW_HU
    return (value_hu - lo) / (hi - lo)


def domain_randomisation(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
    """What real CTs show and the phantom does not, added to a training image (``(H, W)`` in [0, 1], a copy).

    With probability ``prob`` each: contrast-filled structures in front of the spine (a heart or liver vessels:
    1–3 ellipses of 150–450 HU, 8–60 mm, some textured), bowel gas (2–5 dark ellipses), enhancing soft tissue
    (+10–60 HU on pixels between fat and bone), another reconstruction kernel (unsharp masking) and a smooth
    multiplicative field (±8 %). The vertebrae (labelled pixels) are never covered: the network must learn that
    bright things in front of the spine are not vertebral bodies, whatever their HU.
    """
    from scipy import ndimage

    out = image.copy()
    if prob <= 0:
        return out
    h, w = out.shape
    rows, cols = np.nonzero(labels)
    if rows.size == 0:
        return out
    front = cols.min()  # columns run anterior → posterior: in front of the bodies is at smaller columns
    yy, xx = np.mgrid[0:h, 0:w]
    px = SAGITTAL_PIXEL_MM
    spine = ndimage.binary_dilation(labels > 0, iterations=3)

    def ellipse(cy, cx, ry, rx, angle):
        c, s_ = np.cos(angle), np.sin(angle)
        dy, dx = yy - cy, xx - cx
        return ((c * dy + s_ * dx) / ry) ** 2 + ((-s_ * dy + c * dx) / rx) ** 2 <= 1.0

    if rng.random() < prob:  # contrast-filled vessels / heart chambers in front of the spine
        for _ in range(int(rng.integers(1, 4))):
            r = rng.uniform(4.0, 30.0) / px
            cy = rng.uniform(rows.min() - 80, rows.max() + 80)
            cx = front - rng.uniform(r, r + 120)  # the aorta touches the bodies; the heart lies further forward
            blob = ellipse(cy, cx, r * rng.uniform(0.6, 1.6), r, rng.uniform(0, np.pi)) & ~spine
            value = _hu(rng.uniform(150.0, 450.0)) + rng.normal(0.0, 0.02, blob.sum())
            out[blob] = np.clip(value, 0.0, 1.0)
    if rng.random() < prob:  # bowel gas
        for _ in range(int(rng.integers(2, 6))):
            r = rng.uniform(3.0, 15.0) / px
            cy, cx = rng.uniform(rows.min(), h), front - rng.uniform(r + 10, r + 200)
            blob = ellipse(cy, cx, r, r * rng.uniform(0.5, 2.0), rng.uniform(0, np.pi)) & ~spine
            out[blob] = 0.0
    if rng.random() < prob:  # enhancing soft tissue (organs, muscle after contrast)
        soft = (out > _hu(-50.0)) & (out < _hu(150.0)) & ~spine
        out[soft] = np.clip(out[soft] + _hu(rng.uniform(10.0, 60.0)) - _hu(0.0), 0.0, 1.0)
    if rng.random() < prob:  # a sharper kernel
        blurred = ndimage.gaussian_filter(out, rng.uniform(0.8, 1.6))
        out = np.clip(out + rng.uniform(0.3, 1.0) * (out - blurred), 0.0, 1.0)
    if rng.random() < prob:  # a smooth multiplicative field (beam hardening, patient size)
        field_ = ndimage.zoom(rng.normal(0.0, 1.0, (4, 4)), (h / 4, w / 4), order=3)[:h, :w]
        out = np.clip(out * (1.0 + 0.08 * field_ / max(np.abs(field_).max(), 1e-6)), 0.0, 1.0)
    return out.astype(np.float32)


def spine_crop(case: SegCase, size: int, rng: np.random.Generator, rows_size: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """A ``rows_size`` × ``size`` crop (rows × columns; square when ``rows_size`` is None) centred near the
    labelled vertebrae with a random jitter of a quarter of the crop, kept inside the image."""
    n = case.image.shape[0]
    rs = min(rows_size or size, n)
    rows, cols = np.nonzero(case.labels)
    cr, cc = (rows.mean(), cols.mean()) if rows.size else (n / 2, n / 2)
    cr += rng.uniform(-rs / 4, rs / 4)
    cc += rng.uniform(-size / 4, size / 4)
    r0 = int(np.clip(round(cr - rs / 2), 0, n - rs))
    c0 = int(np.clip(round(cc - size / 2), 0, n - size))
    return case.image[r0 : r0 + rs, c0 : c0 + size], case.labels[r0 : r0 + rs, c0 : c0 + size]


@contextmanager
def train_log(path: Path, resume: bool, header: list[str]) -> Iterator[tuple[TextIO, Any]]:
    """The CSV training log: appended to when resuming with an existing log, else started with ``header``.
    Yields the open file (to flush after each epoch) and its ``csv.writer``."""
    new = not (resume and path.is_file())
    with path.open("w" if new else "a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        yield f, writer


def resolve_device(device: str) -> torch.device:
    """'auto' → CUDA when torch sees it, else CPU; 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LumbarBMDError("--device cuda was asked for but torch sees no CUDA GPU (is a CUDA build installed?)")
    if device not in ("cpu", "cuda"):
        raise LumbarBMDError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


@torch.inference_mode()
def validate(model: torch.nn.Module, cases: list[SegCase], device: torch.device) -> np.ndarray:
    """Mean DSC per level (4,) over ``cases``, predicting on the inference window (512 × 256 around the spine)
    and scoring on the whole 512 × 512 image (background outside the window)."""
    model.eval()
    c0, c1 = network_window()
    scores = []
    for case in cases:
        x = torch.from_numpy(np.ascontiguousarray(case.image[:, c0:c1]))[None, None].to(device)
        pred = np.zeros_like(case.labels)
        pred[:, c0:c1] = model(x).argmax(1)[0].cpu().numpy()
        metrics = segmentation_metrics(pred, case.labels)
        scores.append([metrics[level]["dsc"] for level in LEVELS])
    return np.mean(scores, axis=0) if scores else np.zeros(4)


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, cases: list[SegCase], device: torch.device,
                          batch_size: int = 4) -> None:
    """Re-estimate every BatchNorm's running statistics (per step for the recurrent blocks) as the exact
    average over ``cases`` cut like inference input (full height × the network window, no augmentation).

    Running statistics gathered during training follow augmented crops and drift with the weights; the
    re-estimated ones match what the model sees at inference (standard BN recalibration).
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    c0, c1 = network_window()
    for b in range(0, len(cases), batch_size):
        x = np.stack([c.image[:, c0:c1] for c in cases[b : b + batch_size]])[:, None]
        model(torch.from_numpy(np.ascontiguousarray(x)).to(device))
    for m, momentum in zip_strict(bns, momenta):
        m.momentum = momentum
    model.eval()


def _checkpoint(path: Path, model, optimizer, epoch: int, best: float, config: SegTrainingConfig,
                rng: np.random.Generator) -> None:
    save_checkpoint(path, model, optimizer, rng, {"epoch": epoch, "best_val_dice": best, "config": asdict(config)})


def save_model(model: torch.nn.Module, path: Path, card: dict) -> dict:
    """Write inference weights (``path``) and the model card (``path`` with .json); returns the card."""
    save_tensors(dict(model.state_dict()), path, {"architecture": card["architecture"]})
    card = {**card, "weights_file": path.name, "sha256": sha256_of(path)}
    path.with_suffix(".json").write_text(json.dumps(card, indent=1), encoding="utf-8")
    return card


def train_segmentation(data_dir: str | Path, out_dir: str | Path, config: SegTrainingConfig | None = None,
                       resume: bool = False, progress: bool = True) -> dict:
    """Train the R2U-Net on the pairs under ``data_dir``; write checkpoints, log and the model to ``out_dir``.

    Returns the model card of the best model (``out_dir/segmentation.safetensors`` + ``.json``).
    """
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism
    from tqdm import tqdm

    config = config or SegTrainingConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    set_determinism(seed=config.seed)
    rng = np.random.default_rng(config.seed)

    folders = find_pairs(data_dir)
    train_dirs, val_dirs = split_cases(folders, config.val_fraction, config.seed)
    train_cases = [load_pair(f) for f in train_dirs]
    val_cases = [load_pair(f) for f in val_dirs]

    model = r2unet_from_width(config.width).to(device)
    if config.init and not resume:
        tensors, _ = load_tensors(config.init)
        check_finite(tensors, config.init)
        try:
            model.load_state_dict(tensors)
        except RuntimeError as err:
            raise LumbarBMDError(f"--init {config.init} does not fit a width-{config.width} R2U-Net: {err}") from None
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    transforms = augmentation(config.seed)

    start_epoch, best = 1, -1.0
    last = out_dir / "checkpoint_last.safetensors"
    if resume:
        meta = resume_checkpoint(last, model, optimizer, rng)
        start_epoch, best = int(meta["epoch"]) + 1, float(meta["best_val_dice"])

    header = ["epoch", "train_loss", *(f"val_dsc_{lv}" for lv in LEVELS), "val_dsc_mean", "seconds"]
    with train_log(out_dir / "train_log.csv", resume, header) as (log, writer):
        for epoch in range(start_epoch, config.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            transforms.set_random_state(seed=config.seed * 100_003 + epoch)  # exact resume: per-epoch seeding
            order = rng.permutation(np.repeat(np.arange(len(train_cases)), config.crops_per_case))
            losses = []
            batches = range(0, len(order), config.batch_size)
            for b in tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", unit="batch", disable=not progress,
                          leave=False):
                xs, ys = [], []
                for i in order[b : b + config.batch_size]:
                    case = train_cases[i]
                    image = scan_range_cut(case.image, case.labels, rng, config.scan_cut_prob)
                    image = domain_randomisation(image, case.labels, rng, config.randomise_prob)
                    cut = SegCase(case.case_id, image, case.labels)
                    img, lab = spine_crop(cut, config.crop, rng, config.crop_rows)
                    d = transforms({"image": img[None].copy(), "label": lab[None].astype(np.float32)})
                    xs.append(torch.as_tensor(np.asarray(d["image"]), dtype=torch.float32))
                    ys.append(torch.as_tensor(np.asarray(d["label"])).round().long())
                x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            val = validate(model, val_cases, device)
            mean_val = float(val.mean())
            writer.writerow([epoch, f"{np.mean(losses):.5f}", *(f"{v:.4f}" for v in val), f"{mean_val:.4f}",
                             f"{time.perf_counter() - t0:.1f}"])
            log.flush()
            if mean_val > best:
                best = mean_val
                save_tensors(dict(model.state_dict()), out_dir / "checkpoint_best.safetensors",
                             {"epoch": epoch, "val_dice": val.tolist()})
            if epoch % config.checkpoint_every == 0:
                _checkpoint(out_dir / f"checkpoint_epoch_{epoch:03d}.safetensors", model, optimizer, epoch, best,
                            config, rng)
            _checkpoint(last, model, optimizer, epoch, best, config, rng)
            if progress:
                print(f"epoch {epoch}: loss {np.mean(losses):.4f}, val DSC " +
                      " ".join(f"{lv} {v:.3f}" for lv, v in zip_strict(LEVELS, val)))

    best_tensors, best_meta = load_tensors(out_dir / "checkpoint_best.safetensors")
    model.load_state_dict(best_tensors)
    recalibrate_batchnorm(model, train_cases, device)
    recalibrated = validate(model, val_cases, device)
    vendors = sorted({c.meta.get("vendor") for c in train_cases if c.meta.get("vendor")})
    card = {
        "model": "R2U-Net L1-L4 sagittal segmentation",
        "architecture": {"name": "R2UNet", "in_channels": 1, "out_channels": 5, "t": 2,
                         "features": [config.width * 2**i for i in range(5)], "parameters": count_parameters(model)},
        "input": {"sagittal_pixel_mm": SAGITTAL_PIXEL_MM, "size": SAGITTAL_SIZE, "window_hu": list(WINDOW_HU),
                  "normalisation": "linear over the window to [0, 1]"},
        "labels": {"0": "background", "1": "L1", "2": "L2", "3": "L3", "4": "L4"},
        "training": {"data": str(Path(data_dir).resolve()), "cases_train": len(train_cases),
                     "cases_validation": len(val_cases), "vendors": vendors, "epochs": config.epochs,
                     "best_epoch": int(best_meta["epoch"]), "config": asdict(config), "device": str(device),
                     **({"initialised_from": {"path": config.init, "sha256": sha256_of(config.init)}}
                        if config.init else {})},
        "metrics": {
            "validation_dsc_before_bn_recalibration": dict(zip_strict(LEVELS, map(float, best_meta["val_dice"]))),
            "validation_dsc": dict(zip_strict(LEVELS, map(float, recalibrated))),
        },
    }
    return save_model(model, out_dir / "segmentation.safetensors", card)
