"""The HTML report as a reader sees it: ``lumbarbmd run`` on phantom CTs, each ``report.html`` opened in headless
Chromium (Playwright driving the system's Chromium: ``apt-get install chromium``, no browser download).

Checked through the rendered page (DOM text as displayed, computed styles, decoded images): the document title, the
patient's mean BMD and its category, the four level rows L1–L4 with their BMD and category, each category badge's
colours (the category colour behind a legible text colour), the refused levels and the QC flags, every image
loaded, no console error, no request leaving the file (the report is self-contained), and a hostile file name shown
as text, never run as markup.

A missing browser is a failure, not a skip: CI installs Chromium. ``LUMBARBMD_SKIP_BROWSER=1`` skips these tests on
purpose (a machine without Chromium); ``LUMBARBMD_CHROMIUM`` names another Chromium or Chrome binary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from LumbarBMDLib.figures import CATEGORY_COLOURS
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.regression import bmd_category
from LumbarBMDLib.report import qc_flags, scanner_lines
from LumbarBMDLib.volume import write_volume

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL = ("apt-get install -y chromium chromium-driver, and pip install playwright (in the dev extra); "
           "or set LUMBARBMD_SKIP_BROWSER=1 to skip the browser tests on purpose")
# a file name that would run script if the report pasted it into the page as markup (no "/": it is a file name)
HOSTILE = "x<img src=x onerror=\"document.title='pwned'\">&amp;'q'"
LEVELS = ["L1", "L2", "L3", "L4"]


def require_browser() -> str:
    """The Chromium binary to drive; a test failure when there is none (a skip only with LUMBARBMD_SKIP_BROWSER=1)."""
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "the playwright package is not installed"
    named = os.environ.get("LUMBARBMD_CHROMIUM")
    exe = named if named else next((p for p in map(shutil.which, BROWSERS) if p), None)
    if problem is None and not (exe and os.path.isfile(exe) and os.access(exe, os.X_OK)):
        problem = f"no Chromium found ({named!r} is not an executable file)" if named else \
            f"no Chromium on PATH (looked for {', '.join(BROWSERS)})"
    if problem is None:
        return exe
    if os.environ.get("LUMBARBMD_SKIP_BROWSER") == "1":
        pytest.skip(f"{problem}; skipped because LUMBARBMD_SKIP_BROWSER=1")
    pytest.fail(f"{problem}: the report's browser test needs it. Install: {INSTALL}", pytrace=False)


@pytest.fixture(scope="module")
def browser():
    exe = require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Three phantom CTs through ``lumbarbmd run`` (a real subprocess, the shipped models): a complete
    osteoporotic case, an implant case whose metal refuses two levels (osteopenia, QC flags), and a normal one
    whose file name is hostile markup. {name: (report.html, results.json object)}."""
    root = tmp_path_factory.mktemp("report_browser")
    inputs = root / "inputs"
    inputs.mkdir()
    cases = {"good": generate_case(2027, "A", "small"), "implant": generate_case(2028, "B", "small", "implant"),
             "hostile": generate_case(2029, "A", "small", category="normal")}
    names = {"good": "good", "implant": "implant", "hostile": HOSTILE}
    for key, case in cases.items():
        write_volume(case.ct, inputs / f"{names[key]}.nii.gz")
    out = root / "out"
    proc = subprocess.run([sys.executable, "-m", "LumbarBMDLib", "run", *(str(inputs / f"{n}.nii.gz")
                           for n in names.values()), "--out", str(out), "--device", "cpu", "--quiet"],
                          capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = {}
    for folder in out.iterdir():
        if (folder / "report.html").is_file():
            results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
            key = next(k for k, n in names.items() if Path(results["input"]).name == f"{n}.nii.gz")
            found[key] = (folder / "report.html", results)
    assert sorted(found) == sorted(names), sorted(found)
    return found


READ_PAGE = """async () => {
  const text = e => e ? e.innerText.trim() : null;
  const style = e => { const s = getComputedStyle(e); return {background: s.backgroundColor, color: s.color,
                       visible: e.getBoundingClientRect().width > 0 && s.visibility !== 'hidden'}; };
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  const headline = document.querySelector('.headline');
  const badge = headline.querySelector('.cat2');
  const table = document.querySelector('table');
  return {
    title: document.title,
    sub: text(document.querySelector('.sub')),
    disclaimer: text(document.querySelector('.disclaimer')),
    big: text(headline.querySelector('.big')),
    headline: text(headline),
    headline_border: getComputedStyle(headline).borderTopColor,
    badge: badge ? {text: text(badge), ...style(badge)} : null,
    header: [...table.rows[0].cells].map(text),
    rows: [...table.rows].slice(1).map(r => ({cells: [...r.cells].map(text),
      badge: r.querySelector('.cat') ? {text: text(r.querySelector('.cat')), ...style(r.querySelector('.cat'))}
                                     : null})),
    flags_heading: text([...document.querySelectorAll('h2')].find(h => h.innerText.includes('Quality'))),
    flags: [...document.querySelectorAll('ul.flags li')].map(text),
    scanner_heading: text([...document.querySelectorAll('h2')].find(h => h.innerText.includes('Scanner'))),
    scanner: [...document.querySelectorAll('ul.scanner li')].map(text),
    images: imgs.map(i => ({alt: i.alt, complete: i.complete, natural: [i.naturalWidth, i.naturalHeight],
      shown: [i.getBoundingClientRect().width, i.getBoundingClientRect().height], scheme: i.src.split(':')[0]})),
    links: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href')),
    scripts: document.scripts.length,
  };
}"""


@pytest.fixture(scope="module")
def seen(browser, reports) -> dict[str, dict]:
    """What the browser shows of each report, with the page's console errors and the requests it made."""
    pages = {}
    for key, (path, _) in reports.items():
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        page = context.new_page()
        errors, requests = [], []
        page.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
        page.on("request", lambda r, requests=requests: requests.append(r.url))
        # anything but the report itself and its embedded data: URIs would leave the file: refuse and record it
        context.route(lambda url: not url.startswith(("file:", "data:")), lambda route: route.abort())
        url = path.resolve().as_uri()
        page.goto(url, wait_until="load")
        info = page.evaluate(READ_PAGE)
        info.update(url=url, errors=errors, requests=requests)
        pages[key] = info
        context.close()
    return pages


def rgb(colour: tuple[int, int, int]) -> str:
    return "rgb({}, {}, {})".format(*colour)


def contrast(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two computed CSS colours ``rgb(r, g, b)``."""
    def luminance(css: str) -> float:
        channels = [int(c) / 255 for c in css.removeprefix("rgb(").removesuffix(")").split(",")[:3]]
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def assert_badge(badge: dict, category: str) -> None:
    """A category badge: the category's word on the category's colour, in a text colour one can read on it."""
    assert badge is not None and badge["visible"], badge
    assert badge["text"].lower() == category, badge
    assert badge["background"] == rgb(CATEGORY_COLOURS[category]), badge
    assert contrast(badge["background"], badge["color"]) >= 4.5, badge  # WCAG AA for normal text


def test_the_three_cases_cover_every_category_and_a_refused_level(reports):
    """The cases are chosen so that the tests below see each category's colour and a level not measured."""
    assert {r["category"] for _, r in reports.values()} == set(CATEGORY_COLOURS)
    assert reports["good"][1]["status"] == reports["hostile"][1]["status"] == "ok"
    implant = reports["implant"][1]
    assert implant["status"] == "partial" and any("metal" in v.get("reason", "") for v in implant["vertebrae"])


@pytest.mark.parametrize("case", ["good", "implant", "hostile"])
def test_title_mean_and_category_as_displayed(seen, reports, case):
    page, results = seen[case], reports[case][1]
    assert page["title"] == f"LumbarBMD report: {results['input']}"
    assert results["input"] in page["sub"] and f"status {results['status']}" in page["sub"]
    assert "not for clinical use" in page["disclaimer"]
    mean, category = results["mean_bmd_mg_cm3"], results["category"]
    assert page["big"] == f"{mean:.1f} mg/cm³"
    assert category == bmd_category(float(page["big"].split()[0]))  # the word agrees with the number displayed
    assert page["badge"]["text"] == category.upper()  # the headline badge is set in capitals
    assert_badge(page["badge"], category)
    assert page["headline_border"] == rgb(CATEGORY_COLOURS[category])
    measured = [v for v in results["vertebrae"] if v["found"]]
    assert f"mean of {len(measured)} measured level(s)" in page["headline"]
    # the mean displayed is the mean of the levels displayed (to the rounding of one decimal)
    shown = [float(r["cells"][1]) for r in page["rows"] if r["cells"][1] != "–"]
    assert len(shown) == len(measured) and abs(sum(shown) / len(shown) - mean) < 0.06


@pytest.mark.parametrize("case", ["good", "implant", "hostile"])
def test_four_level_rows_with_bmd_category_and_colours(seen, reports, case):
    page, results = seen[case], reports[case][1]
    assert page["header"] == ["level", "BMD (mg/cm³)", "category", "seg. confidence", "identified by"]
    assert [r["cells"][0] for r in page["rows"]] == LEVELS
    for row, v in zip(page["rows"], results["vertebrae"], strict=True):
        assert row["cells"][0] == v["level"]
        if v["found"]:
            assert row["cells"][1] == f"{v['bmd_mg_cm3']:.1f}" and row["cells"][2] == v["category"]
            assert v["category"] == bmd_category(float(row["cells"][1]))
            assert row["cells"][3] == f"{v['confidence']:.2f}"
            assert row["cells"][4].startswith(v["identification"]["anchor"])
            assert_badge(row["badge"], v["category"])
        else:  # a refused level: a dash for the BMD and the reason in place of category and confidence
            assert row["cells"][1] == "–" and row["cells"][2] == v["reason"] and row["badge"] is None, row


def test_refused_levels_and_qc_flags_are_listed(seen, reports):
    page, results = seen["implant"], reports["implant"][1]
    refused = [v for v in results["vertebrae"] if not v["found"]]
    assert page["flags_heading"] == "Quality control"
    for v in refused:
        assert f"{v['level']} not measured: {v['reason']}" in page["flags"]
        assert f"{v['level']}: implant suspected (metal next to the vertebral body)" in page["flags"]
    for flag in results["qc_flags"]:  # the identification's own flags (here: numbered from one anchor only)
        assert flag["message"] in page["flags"]
    assert page["flags"] == qc_flags(results)  # every flag, in order, nothing else
    assert not any(f.startswith("no scanner calibration") for f in page["flags"])  # the pipeline always maps
    good = seen["good"]
    # no flag at all is shown as the one line "none"
    assert good["flags"] == (qc_flags(reports["good"][1]) or ["none"])
    assert not any("not measured" in f for f in good["flags"])


@pytest.mark.parametrize("case", ["good", "implant"])
def test_scanner_calibration_and_contrast_are_shown(seen, reports, case):
    """The report says which calibration mapped the HU (internal, nominal or phantom) and which contrast phase was
    read, as results.json records them."""
    page, results = seen[case], reports[case][1]
    assert page["scanner_heading"] == "Scanner calibration and contrast"
    assert page["scanner"] == scanner_lines(results)
    assert page["scanner"][0] == results["calibration"]["sentence"] and page["scanner"][0].startswith("Calibration:")
    assert any(line.startswith("Contrast phase: non contrast") for line in page["scanner"])


@pytest.mark.parametrize("case", ["good", "implant", "hostile"])
def test_images_load_and_the_page_is_self_contained(seen, case):
    page = seen[case]
    assert [i["alt"] for i in page["images"]] == ["sagittal L1-L4", "vertebral chain and anchors", "axial patches"]
    for img in page["images"]:
        assert img["complete"] and img["scheme"] == "data", img
        assert min(img["natural"]) > 100 and min(img["shown"]) > 100, img  # decoded and laid out, not a broken icon
    assert page["errors"] == []
    assert page["scripts"] == 0
    assert all(link.startswith("data:image/png;base64,") for link in page["links"]), page["links"]
    assert [u for u in page["requests"] if not u.startswith("data:")] == [page["url"]]  # nothing but the file


def test_hostile_file_name_is_shown_as_text_never_run(seen, reports):
    page, results = seen["hostile"], reports["hostile"][1]
    assert Path(results["input"]).name == f"{HOSTILE}.nii.gz"
    assert page["title"] == f"LumbarBMD report: {results['input']}"  # not 'pwned': the onerror never ran
    assert f"{HOSTILE}.nii.gz" in page["sub"]  # the reader sees the characters themselves
    assert len(page["images"]) == 3 and page["scripts"] == 0 and page["errors"] == []
    html = reports["hostile"][0].read_text(encoding="utf-8")
    assert "<img src=x" not in html and "&lt;img src=x onerror=" in html and "&amp;amp;" in html


def test_a_missing_browser_fails_unless_skipping_is_asked_for(monkeypatch, tmp_path):
    monkeypatch.setenv("LUMBARBMD_CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.delenv("LUMBARBMD_SKIP_BROWSER", raising=False)
    with pytest.raises(pytest.fail.Exception, match="no Chromium found"):
        require_browser()
    monkeypatch.setenv("LUMBARBMD_SKIP_BROWSER", "true")  # only exactly "1" skips
    with pytest.raises(pytest.fail.Exception):
        require_browser()
    monkeypatch.setenv("LUMBARBMD_SKIP_BROWSER", "1")
    with pytest.raises(pytest.skip.Exception, match="LUMBARBMD_SKIP_BROWSER=1"):
        require_browser()
