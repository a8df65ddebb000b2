"""The per-case HTML report: one self-contained file (images embedded as PNG data URIs) for the radiologist.

Contents: the patient's mean BMD and category, prominently; the BMD table per level with colour-coded categories;
QC flags (missing levels, low segmentation confidence, metal, no scanner calibration, contrast warning), the
scanner calibration applied and the contrast phase; the
sagittal image with the coloured L1–L4 overlay; the axial slice of each measured level with its trabecular patch
outlined; the models' versions (sha256) and the disclaimer that the default models were trained on synthetic data.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from LumbarBMDLib._compat import zip_strict
from LumbarBMDLib.figures import CATEGORY_COLOURS, LEVEL_COLOURS, WINDOW_HU, overlay_levels
from LumbarBMDLib.patches import PATCH_PIXEL_MM, PATCH_SIZE, sample_axial_planes

LOW_CONFIDENCE = 0.7
DARK_TEXT = (34, 34, 34)  # the page's text colour (#222)
CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 24px; color: #222;
  max-width: 1100px; }
h1 { font-size: 20px; margin: 0 0 4px; }
.sub { color: #666; font-size: 13px; margin-bottom: 16px; }
.headline { border: 3px solid; border-radius: 8px; padding: 12px 18px; display: inline-block; margin-right: 24px; }
.big { font-size: 30px; font-weight: 700; }
.cat2 { display: inline-block; color: #fff; font-weight: 700; padding: 2px 10px; border-radius: 4px;
  margin: 4px 0; text-transform: uppercase; }
table { border-collapse: collapse; margin-top: 12px; }
td, th { border-bottom: 1px solid #ddd; padding: 5px 12px; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.cat { color: #fff; padding: 1px 8px; border-radius: 3px; }
.flags li { margin: 2px 0; }
.row { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 18px; }
.foot { color: #666; font-size: 12px; margin-top: 18px; border-top: 1px solid #ddd; padding-top: 8px; }
.disclaimer { background: #fff4e5; border: 1px solid #f0c36d; padding: 8px 12px; margin: 12px 0; font-size: 13px; }
"""
DISCLAIMER = ("Research software, not for clinical use. The default models were trained on synthetic (phantom) CTs "
              "and one public CT; BMD values are QCT-equivalent estimates and are not validated against real QCT.")


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def sagittal_figure(result) -> str:
    """The candidates' mean sagittal image with the L1–L4 overlay and level names (PNG data URI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = result.annotation.images.candidates_hu.mean(axis=0)
    fig, ax = plt.subplots(figsize=(5.2, 5.2))
    ax.imshow(image, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1])
    overlay_levels(ax, result.labels)
    for value, loc in enumerate(result.locations, start=1):
        if loc.centre_lps is not None and loc.found:
            col, row, _ = result.label_geometry.lps_to_pixel(loc.centre_lps)
            ax.text(col - 70, row, loc.level, color=np.array(LEVEL_COLOURS[value]) / 255, fontsize=11,
                    fontweight="bold", va="center")
    rows, cols = np.nonzero(result.labels)
    if rows.size:  # zoom on the lumbar spine
        r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
        half = max(r1 - r0, c1 - c0) / 2 + 90
        rc, cc = (r0 + r1) / 2, (c0 + c1) / 2
        ax.set_xlim(cc - half, cc + half)
        ax.set_ylim(rc + half, rc - half)
    ax.set_title("sagittal (anterior left)")
    ax.set_axis_off()
    return _png(fig)


def chain_figure(result) -> str:
    """The vertebral-body chain and its anchors found on the CT, named (PNG data URI; see
    :func:`LumbarBMDLib.figures.draw_chain`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from LumbarBMDLib.figures import draw_chain

    fig, axes = plt.subplots(1, 2, figsize=(7.0, 5.2), gridspec_kw={"width_ratios": [1.0, 1.4]})
    draw_chain(axes, result.spine)
    return _png(fig)


def axial_figure(result) -> str:
    """The axial slice of each measured level (±40 mm around the patch) with the patch outlined (PNG data URI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, 4, figsize=(11, 3.0))
    half_px = round(40.0 / PATCH_PIXEL_MM)
    for ax, patch, value in zip_strict(axes, result.patches, range(1, 5)):
        ax.set_axis_off()
        if not patch.found:
            ax.set_title(f"{patch.level}: not measured", fontsize=9)
            continue
        planes, _ = sample_axial_planes(result.annotation.volume, patch.centre_lps, half_px, half_px, (0.0,))
        ax.imshow(planes[0], cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1])
        c = half_px - PATCH_SIZE / 2
        ax.add_patch(Rectangle((c, c), PATCH_SIZE, PATCH_SIZE, fill=False, lw=1.5,
                               edgecolor=np.array(LEVEL_COLOURS[value]) / 255))
        ax.set_title(f"{patch.level} (patch 16 mm, {patch.mean_hu:.0f} HU)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def identified_by(vertebra: dict, unidentified: str = "–") -> str:
    """How a level was identified on the CT, in a few words (the report's column and the Slicer table's):
    "T12 and sacrum, 1 below T12 (0.97)", "edited labels"; ``unidentified`` when it was not."""
    ident = vertebra.get("identification") or {}
    anchor = ident.get("anchor")
    if not anchor:
        return unidentified
    if anchor == "edited labels":
        return "edited labels"
    count = ident.get("count")
    where = "" if count is None else (f", {count} above S1" if anchor == "sacrum" else f", {count} below T12")
    conf = ident.get("confidence")
    text = f"{anchor}{where}" + ("" if conf is None else f" ({conf:.2f})")
    return text + ("; outlined from the anatomy" if ident.get("source") == "classical outline" else "")


def qc_flags(results: dict) -> list[str]:
    """Plain-language quality flags from a results.json object: the identification's flags (transitional anatomy,
    uncertain identification, segments renumbered or dropped), then the per-level ones."""
    flags = [f["message"] for f in results.get("qc_flags") or []]
    for role, verified in (results.get("models_verified") or {}).items():
        if verified is False:
            flags.append(f"the {role} model was not verified (its model card has no sha256): accepted explicitly "
                         "with --allow-unverified-model; its results are only as trustworthy as the file's origin")
    for v in results["vertebrae"]:
        if not v["found"]:
            flags.append(f"{v['level']} not measured: {v.get('reason', 'not found')}")
            if "metal" in v.get("reason", ""):
                flags.append(f"{v['level']}: implant suspected (metal next to the vertebral body)")
        elif v.get("confidence") is not None and v["confidence"] < LOW_CONFIDENCE:
            flags.append(f"{v['level']}: low segmentation confidence ({v['confidence']:.2f}): check the label")
    if results.get("calibration") is None:
        flags.append("no scanner calibration: values assume the training scanner's HU scale "
                     "(other scanners can differ by several mg/cm³; see 'lumbarbmd calibrate')")
    return flags


def scanner_lines(results: dict) -> list[str]:
    """The report's "Scanner calibration and contrast" lines from results.json: the calibration applied, the
    internal fit, the contrast phase and the patient's water-equivalent diameter (empty when not assessed)."""
    lines = []
    cal = results.get("calibration") or {}
    if cal.get("sentence"):
        lines.append(cal["sentence"])
    elif cal:
        lines.append(f"Calibration: phantom scan, HU = {cal['intercept']:+.1f} + {cal['slope']:.3f} × BMD.")
    scanner = results.get("scanner") or {}
    fit = scanner.get("internal_calibration") or {}
    if fit.get("message"):
        lines.append("Internal calibration (reference tissues): " + fit["message"])
    phase = scanner.get("contrast_phase") or {}
    if phase:
        corr = (scanner.get("contrast_correction") or {}).get("sentence", "")
        lines.append(f"Contrast phase: {str(phase.get('phase', 'unknown')).replace('_', ' ')} "
                     f"({phase.get('evidence', '')})" + (f"; {corr}" if corr else "") + ".")
    wed = (scanner.get("tissues") or {}).get("water_equivalent_diameter_cm")
    kvp = scanner.get("kvp")
    if wed is not None or kvp is not None:
        lines.append("Scan: " + ", ".join(x for x in (f"{kvp:g} kVp (DICOM)" if kvp is not None else "no DICOM kVp",
                                                       f"water-equivalent diameter {wed:.1f} cm" if wed is not None
                                                       else "") if x) + ".")
    return lines


def _rgb(category: str | None) -> tuple[int, int, int]:
    return CATEGORY_COLOURS.get(category or "", (128, 128, 128))


def _colour(category: str | None) -> str:
    return f"rgb{_rgb(category)}"


def _luminance(rgb: tuple[int, int, int]) -> float:
    """WCAG 2 relative luminance of an sRGB colour (0–255 channels)."""
    lin = [c / 255 / 12.92 if c / 255 <= 0.04045 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def _text_colour(category: str | None) -> str:
    """The text colour on a category's background: white or near-black, whichever contrasts more (white on the
    osteopenia amber would be 1.7:1, below any legibility threshold)."""
    lum = _luminance(_rgb(category))
    on_white = 1.05 / (lum + 0.05)
    on_dark = (lum + 0.05) / (_luminance(DARK_TEXT) + 0.05)
    return "rgb(255, 255, 255)" if on_white >= on_dark else f"rgb{DARK_TEXT}"


def _badge(category: str | None) -> str:
    """The inline style of a category badge: its colour as background, a legible text colour on it."""
    return f"background:{_colour(category)};color:{_text_colour(category)}"


def render_report(results: dict, result) -> str:
    """The HTML text of the report of one case (``results``: the results.json object; ``result``: CaseResult)."""
    esc = html.escape
    mean = results["mean_bmd_mg_cm3"]
    category = results["category"]
    rows = []
    for v in results["vertebrae"]:
        ident = esc(identified_by(v))
        if v["found"]:
            conf = "" if v.get("confidence") is None else f"{v['confidence']:.2f}"
            rows.append(f"<tr><td>{esc(v['level'])}</td><td class=num>{v['bmd_mg_cm3']:.1f}</td>"
                        f"<td><span class=cat style='{_badge(v['category'])}'>{esc(v['category'])}"
                        f"</span></td><td class=num>{conf}</td><td>{ident}</td></tr>")
        else:
            rows.append(f"<tr><td>{esc(v['level'])}</td><td class=num>–</td><td colspan=2>"
                        f"{esc(v.get('reason', 'not measured'))}</td><td>{ident}</td></tr>")
    flags = qc_flags(results)
    flag_html = "".join(f"<li>{esc(f)}</li>" for f in flags) or "<li>none</li>"
    scanner_html = "".join(f"<li>{esc(line)}</li>" for line in scanner_lines(results)) or "<li>not assessed</li>"
    headline = (f"<div class=headline style='border-color:{_colour(category)}'>"
                f"<div class=big>{mean:.1f} mg/cm³</div><div class=cat2 style='{_badge(category)}'>"
                f"{esc(category)}</div><div>mean of {sum(v['found'] for v in results['vertebrae'])} measured "
                f"level(s), QCT-equivalent</div></div>") if mean is not None else \
        "<div class=headline><div class=big>no BMD</div><div>no level could be measured</div></div>"
    models = results["models"]
    t = results["timings_s"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>LumbarBMD report: {esc(str(results['input']))}</title>
<style>{CSS}</style></head><body>
<h1>Lumbar bone mineral density (opportunistic CT)</h1>
<div class=sub>{esc(str(results['input']))} · status {esc(results['status'])} ·
LumbarBMD {esc(results['version'])}</div>
<div class=disclaimer>{esc(DISCLAIMER)}</div>
<div class=row>{headline}
<table><tr><th>level</th><th>BMD (mg/cm³)</th><th>category</th><th>seg. confidence</th><th>identified by</th></tr>
{''.join(rows)}</table></div>
<p style="font-size:13px;color:#555">Categories (ACR/ISCD spine QCT): &lt; 80 osteoporosis,
80–120 osteopenia, &gt; 120 normal.</p>
<h2 style="font-size:16px">Quality control</h2><ul class=flags>{flag_html}</ul>
<h2 style="font-size:16px">Scanner calibration and contrast</h2><ul class=scanner>{scanner_html}</ul>
<div class=row><img alt="sagittal L1-L4" src="{sagittal_figure(result)}" style="max-width:420px">
<img alt="vertebral chain and anchors" src="{chain_figure(result)}" style="max-width:560px"></div>
<div class=row><img alt="axial patches" src="{axial_figure(result)}" style="max-width:1050px"></div>
<div class=foot>Models: segmentation {esc(str(models.get('segmentation') or 'edited labels')[:16])}…,
regression {esc(str(models['regression'])[:16])}… · canal found on {results['canal']['slices_found']} slices,
sagittal plane x = {results['canal']['sagittal_x_lps']:.1f} mm (LPS) · time {t.get('total', 0):.1f} s</div>
</body></html>
"""
