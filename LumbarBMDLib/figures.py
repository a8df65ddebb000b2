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


def draw_chain(axes, spine) -> None:
    """The vertebral-body chain found on the CT and its anchors, on two matplotlib axes.

    Left: the CT straightened along the canal (mid-sagittal slab, anterior on the left, superior at the top), with
    the discs found (yellow, at their tilt) and each body's name (L1–L4 in their colours). Right: the band beside
    the spine (maximum over its depth) with the ribs' origins (red triangles) and the sacral segments (cyan).

    Args:
        axes: two matplotlib axes.
        spine: a :class:`~LumbarBMDLib.spine.SpineIdentification`.
    """
    ax0, ax1 = axes
    chain, anchors = spine.chain, spine.anchors
    col = chain.column
    m = col.values[:, :, 0]
    s, a = col.s_mm, col.a_mm
    ax0.imshow(m[:, ::-1], cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect="auto",
               extent=(a[-1], a[0], s[-1], s[0]))
    depth = np.array([-12.0, 12.0])
    for disc in chain.discs:
        ac = float(np.interp(disc.s_mm, s, chain.column_a_mm))
        ax0.plot(ac + depth, disc.s_mm + depth * np.tan(np.deg2rad(disc.tilt_deg)), color=(1.0, 0.85, 0.0), lw=1.2)
    level_rgb = {f"L{k}": np.array(rgb) / 255.0 for k, rgb in LEVEL_COLOURS.items()}
    for i, body in enumerate(chain.bodies):
        name = spine.names[i] or "?"
        colour = level_rgb.get(name, (1.0, 1.0, 1.0))
        ax0.text(body.column_a_mm + 32.0, body.centre_s_mm, name, color=colour, fontsize=9, fontweight="bold",
                 va="center", ha="center")
        if anchors.rib_sides[i]:
            ax0.text(body.column_a_mm - 30.0, body.centre_s_mm, "ribs", color=(1.0, 0.4, 0.4), fontsize=7,
                     va="center", ha="center")
    ax0.set_xlim(a[-1], a[0])
    ax0.set_title("chain in front of the canal", fontsize=9)
    ax0.set_xlabel("mm in front of the canal (anterior left)", fontsize=7)
    band = anchors.rib_band
    mip = np.max(np.nan_to_num(band.values, nan=-1000.0), axis=1)
    ax1.imshow(mip, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect="auto",
               extent=(band.u_mm[0], band.u_mm[-1], band.s_mm[-1], band.s_mm[0]))
    for i, body in enumerate(chain.bodies):
        colour = (0.3, 0.9, 1.0) if i in anchors.sacrum.sacral_bodies else (1.0, 0.85, 0.0)
        ax1.axhline(body.zone_top_s_mm, color=colour, lw=0.5, alpha=0.6)
        ax1.text(band.u_mm[-1] - 4.0, body.centre_s_mm, spine.names[i] or "?", color=colour, fontsize=7,
                 va="center", ha="right")
    for rib in anchors.ribs:
        if rib.body is not None and rib.side in anchors.rib_sides[rib.body]:
            u = 32.0 if rib.side == "left" else -32.0
            ax1.plot([u], [rib.medial_s_mm], marker="<" if rib.side == "left" else ">", color=(1.0, 0.2, 0.2), ms=7)
    title = f"anchors: {spine.anchor}" if spine.numbered else "not numbered"
    ax1.set_title(title, fontsize=9)
    ax1.set_xlabel("mm to the patient's left", fontsize=7)
    for ax in axes:
        ax.tick_params(labelsize=6)
