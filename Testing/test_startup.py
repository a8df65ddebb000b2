"""Issue 16: a light start-up. ``lumbarbmd --help`` (and every subcommand's) imports none of the heavy stages, and a
command that ends the process early (``os._exit`` after its work) still delivers all its output (real processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from LumbarBMDLib.cli import PHANTOM_VARIANTS, build_parser
from LumbarBMDLib.phantom import VARIANTS
from LumbarBMDLib.volume import CTVolume, write_volume

HEAVY = ("torch", "monai", "matplotlib", "scipy", "SimpleITK", "numpy", "distributed", "safetensors")

PROBE = """
import json, sys
from LumbarBMDLib.cli import main
try:
    main({argv!r})
except SystemExit as done:
    code = done.code
print(json.dumps({{"code": code, "heavy": [m for m in {heavy!r} if m in sys.modules]}}), file=sys.stderr)
"""


def probe(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=list(argv), heavy=HEAVY)], capture_output=True,
                          text=True, encoding="utf-8", timeout=120)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    return {**report, "stdout": proc.stdout}


def test_help_imports_no_heavy_stage():
    top = probe("--help")
    assert top["code"] == 0 and "run" in top["stdout"] and "phantom" in top["stdout"]
    assert top["heavy"] == []
    commands = [a for a in build_parser()._subparsers._group_actions[0].choices]  # every subcommand
    assert {"run", "demo", "phantom", "info", "evaluate", "train-seg"} <= set(commands)
    for command in commands:
        sub = probe(command, "--help")
        assert sub["code"] == 0 and sub["heavy"] == [], (command, sub["heavy"])
    run_help = probe("run", "--help")["stdout"]
    assert "--scheduler" in run_help and "--threads-per-worker" in run_help and "--retries" in run_help


def test_the_parsers_variants_are_the_phantoms():
    assert PHANTOM_VARIANTS == VARIANTS


def test_a_command_ended_early_still_delivers_its_output(tmp_path):
    block = np.full((30, 64, 64), -1000, np.int16)
    block[:, 8:56, 8:56] = 40
    src = write_volume(CTVolume(hu=block, spacing=(2.0, 2.0, 2.5), origin=(0.0, 0.0, 0.0)), tmp_path / "b.nii.gz")
    info = subprocess.run([sys.executable, "-m", "LumbarBMDLib", "info", str(src)], capture_output=True, text=True,
                          encoding="utf-8", timeout=120)
    assert info.returncode == 0 and json.loads(info.stdout)["size_xyz"] == [64, 64, 30]  # all of it, flushed
    run = subprocess.run([sys.executable, "-m", "LumbarBMDLib", "run", str(src), "--out", str(tmp_path / "o"),
                          "--device", "cpu", "--quiet"], capture_output=True, text=True, encoding="utf-8",
                         timeout=300)
    assert run.returncode == 1 and "b: failed: no spinal canal found" in run.stdout
    assert run.stdout.rstrip().endswith(f"summary: {tmp_path / 'o' / 'summary.csv'}")
    assert json.loads((tmp_path / "o" / "b" / "results.json").read_text(encoding="utf-8"))["status"] == "failed"
    missing = subprocess.run([sys.executable, "-m", "LumbarBMDLib", "info", str(tmp_path / "none.nii.gz")],
                             capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert missing.returncode == 1 and missing.stderr.startswith("lumbarbmd: error: ")
