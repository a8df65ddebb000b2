"""Draw the LumbarBMD icon: a stylised lumbar spine, L1–L4 in the level colours, on a dark rounded tile.

Regenerate both copies (extension icon and module icon) with::

    python Resources/Icons/make_icon.py

Drawn with Pillow at 4× and downsampled, so the edges are anti-aliased.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = (
    REPO_ROOT / "Resources" / "Icons" / "LumbarBMD.png",  # extension icon (EXTENSION_ICONURL)
    REPO_ROOT / "LumbarBMD" / "Resources" / "Icons" / "LumbarBMD.png",  # module icon
)

SIZE = 128
SCALE = 4  # supersampling factor
BACKGROUND = (28, 32, 44, 255)
BACKGROUND_EDGE = (62, 70, 92, 255)
CANAL = (150, 160, 185, 255)
DISC = (120, 128, 150, 255)
LEVEL_COLOURS = {  # DESIGN.md, "Colours"
    "L1": (230, 25, 75),
    "L2": (60, 180, 75),
    "L3": (0, 130, 200),
    "L4": (245, 130, 48),
}


def draw_icon(size: int = SIZE) -> Image.Image:
    """The icon as an RGBA image of ``size`` × ``size`` pixels."""
    s = size * SCALE

    def px(v: float) -> int:
        return round(v * s / 128)

    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle(
        (px(2), px(2), px(126), px(126)), radius=px(24), fill=BACKGROUND, outline=BACKGROUND_EDGE, width=px(2)
    )

    # Four vertebral bodies, top (L1) to bottom (L4), in the module's sagittal view (anterior on the
    # left): a gentle lordosis shifts the middle levels forward. Grey discs between them, the spinal
    # canal behind them and a posterior element behind the canal.
    body_w, body_h, gap = 50.0, 20.0, 7.0
    top = (128 - (4 * body_h + 3 * gap)) / 2
    shift = (3.0, 0.0, -1.5, 0.5)  # lordosis, mm-free icon units
    left = (128 - (body_w + 8 + 16)) / 2
    canal = []
    for n, colour in enumerate(LEVEL_COLOURS.values()):
        y0 = top + n * (body_h + gap)
        x0 = left + shift[n]
        d.rounded_rectangle((px(x0), px(y0), px(x0 + body_w), px(y0 + body_h)), radius=px(6), fill=(*colour, 255))
        # A lighter window in the body: the trabecular patch the regression reads.
        light = tuple(min(255, c + 80) for c in colour)
        d.rounded_rectangle(
            (px(x0 + 17), px(y0 + 6), px(x0 + body_w - 17), px(y0 + body_h - 6)), radius=px(2), fill=(*light, 255)
        )
        # Posterior element (pedicle + spinous process), behind the canal.
        xp = x0 + body_w + 8
        d.rounded_rectangle((px(xp), px(y0 + 3), px(xp + 16), px(y0 + body_h - 3)), radius=px(5), fill=(*colour, 140))
        canal += [(x0 + body_w + 4, y0), (x0 + body_w + 4, y0 + body_h)]
        if n < 3:  # intervertebral disc
            nx = left + shift[n + 1]
            xd = (x0 + nx) / 2
            d.rounded_rectangle(
                (px(xd + 4), px(y0 + body_h + 1.5), px(xd + body_w - 4), px(y0 + body_h + gap - 1.5)),
                radius=px(2),
                fill=DISC,
            )
    d.line([(px(x), px(y)) for x, y in canal], fill=CANAL, width=px(2.5), joint="curve")

    return img.resize((size, size), Image.Resampling.LANCZOS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=SIZE, help="icon size in pixels (default 128)")
    args = parser.parse_args(argv)
    icon = draw_icon(args.size)
    for path in OUTPUTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        icon.save(path, optimize=True)
        print(path)


if __name__ == "__main__":
    main()
