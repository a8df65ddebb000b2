"""Make the README's screenshot of the HTML report: ``lumbarbmd demo`` (the embedded default case: phantom seed 2026,
vendor A, full size) and its ``report.html`` opened in headless Chromium, the whole page at 1200 px wide.

Usage:  python docs/screenshot_report.py [--report PATH/report.html] [--out PNG] [--chromium PATH]

Without ``--report`` the demo is run into a temporary folder first (about a minute on a CPU). Chromium is the
system's (Debian: ``apt-get install chromium``), driven by Playwright (``pip install playwright``; no browser
download). The PNG is reduced to 256 colours (the page is grey CT, white and a few colours) to stay small.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images" / "report_chromium.png"
WIDTH = 1200
GREYS = 192  # of the PNG's 256 palette entries


def screenshot(report: Path, out: Path, chromium: str) -> Path:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": WIDTH, "height": 900}, device_scale_factor=1)
        page.goto(report.resolve().as_uri(), wait_until="load")
        page.evaluate("() => Promise.all([...document.images].map(i => i.decode()))")
        png = page.screenshot(full_page=True, type="png")
        browser.close()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    out.parent.mkdir(parents=True, exist_ok=True)
    small_palette(image).save(out, optimize=True)
    return out


def small_palette(image):
    """The screenshot in 256 colours without banding the CT: 192 evenly spaced greys, and 64 colours chosen among
    the page's coloured pixels (category badges, level overlays, the disclaimer), no dithering (~160 KB, not 380)."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(image)
    wide = rgb.astype(int)
    coloured = rgb[wide.max(axis=-1) - wide.min(axis=-1) > 12]
    greys = np.repeat(np.linspace(0, 255, GREYS).round().astype(np.uint8)[:, None], 3, axis=1)
    palette = [greys]
    if len(coloured):
        picked = Image.fromarray(coloured.reshape(1, -1, 3)).quantize(256 - GREYS, method=Image.Quantize.FASTOCTREE)
        palette.append(np.array(picked.getpalette()[: 3 * (256 - GREYS)], np.uint8).reshape(-1, 3))
    holder = Image.new("P", (1, 1))
    holder.putpalette(np.concatenate(palette).ravel().tolist())
    return image.quantize(palette=holder, dither=Image.Dither.NONE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="an existing report.html (default: run `lumbarbmd demo`)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    if not args.chromium:
        sys.exit("no Chromium found: apt-get install -y chromium (or give --chromium PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        report = args.report
        if report is None:
            # run where a user would: the report then names the input as ./lumbarbmd-demo/phantom/… like theirs
            subprocess.run([sys.executable, "-m", "LumbarBMDLib", "demo", "--device", "cpu"], cwd=tmp, check=True)
            report = Path(tmp) / "lumbarbmd-demo" / "A_002026" / "report.html"
        out = screenshot(report, args.out, args.chromium)
    print(f"{out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
