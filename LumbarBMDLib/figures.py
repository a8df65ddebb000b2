"""Figures for people: previews of cases and the phantom-versus-real comparison (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from LumbarBMDLib.volume import CTVolume

#: Level colours (DESIGN.md), RGB 0–255.
LEVEL_COLOURS = {1: (230, 25, 75), 2: (60, 180, 75), 3: (0, 130, 200), 4: (245, 130, 48)}
#: Category colours (DESIGN.md), RGB 0–255.
CATEGORY_COLOURS = {"osteoporosis": (214, 39, 40), "osteopenia": (255, 187, 0), "normal": (44, 160, 44)}
WINDOW_HU = (-150.0, 850.0)  # WL 350 / WW 1000, the paper's window


def overlay_levels(ax, labels: np.ndarray, alpha: float = 0.45) -> None:
    """Draw L1–L4 (values 1–4) in the level colours of DESIGN.md over an image on a matplotlib axis."""
    rgba = np.zeros((*labels.shape, 4))
    for value, rgb in LEVEL_COLOURS.items():
        rgba[labels == value] = (*(c / 255.0 for c in rgb), alpha)
    ax.imshow(rgba, interpolation="nearest")


def case_preview(
    sagittal: np.ndarray,
    sagittal_labels: np.ndarray | None,
    ct: CTVolume,
    axial_index: int,
    out_png: str | Path,
    title: str = "",
) -> Path:
    """A two-panel PNG: the sagittal image with the L1–L4 overlay, and one axial slice.

    Args:
        sagittal: ``(rows, cols)`` HU, rows superior→inferior, columns anterior→posterior.
        sagittal_labels: ``(rows, cols)`` values 0–4, or None.
        ct: the CT (axial LPS); ``axial_index`` selects the axial slice shown.
        out_png: where to write the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    axes[0].imshow(sagittal, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], interpolation="bilinear")
    if sagittal_labels is not None:
        overlay_levels(axes[0], sagittal_labels)
    axes[0].set_title("sagittal (anterior left), L1–L4")
    k = int(np.clip(axial_index, 0, ct.shape[0] - 1))
    # axial LPS: rows run anterior→posterior, columns right→left; show in radiological convention
    axes[1].imshow(ct.hu[k], cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], interpolation="bilinear",
                   aspect=ct.spacing[1] / ct.spacing[0])
    axes[1].set_title(f"axial slice {k}")
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
