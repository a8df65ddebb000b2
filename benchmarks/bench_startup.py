"""Start-up and process overhead of the ``lumbarbmd`` command (issue 16).

Usage:  python benchmarks/bench_startup.py [--repeats 7] [--work DIR] [--profile]

1. ``lumbarbmd --help``: wall time of the whole process (median and best of ``--repeats``; ``python -c pass`` for
   reference) and the import time of ``LumbarBMDLib.cli`` (``python -X importtime``). Target ≤ 0.3 s.
2. ``lumbarbmd info CASE`` on a full phantom case (512² × ~300 slices, .nii.gz) against a process that only does
   SimpleITK's ``ReadImage`` of the same file. Target ≤ 1.5×.
3. ``lumbarbmd run CASE`` (one full case, a fresh process) against the pipeline's own time in its results.json
   ``timings_s.total`` (read + method). Target ≤ 1.5×. The first case is read while torch and MONAI load, which
   slows its read; the stricter reference is the same CT measured as the second case of a two-case batch.
   ``--profile`` also runs it under cProfile and prints where the
   rest goes: imports, model loading, the case's files and report, summary.csv — and, measured apart, the
   interpreter teardown of torch and MONAI that the command skips (``os._exit`` once its output is flushed).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "LumbarBMDLib"]


def script() -> list[str]:
    """The installed ``lumbarbmd`` console script beside this Python (what a user runs), else ``-m``."""
    exe = Path(sys.executable).with_name("lumbarbmd")
    return [str(exe)] if exe.is_file() else CLI


def wall(cmd: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def fmt(times: list[float]) -> str:
    return f"median {statistics.median(times):.3f} s, best {min(times):.3f} s (n {len(times)})"


def cli_import_s() -> float:
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "import LumbarBMDLib.cli"], capture_output=True,
                         text=True, check=True).stderr
    lines = [m for m in re.finditer(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", err)]
    return sum(int(m[1]) for m in lines if m[2] == "" and m[3] not in ("site", "encodings")) / 1e6


def full_case(work: Path) -> Path:
    path = work / "inputs" / "A_000000" / "ct.nii.gz"
    if not path.is_file():
        subprocess.run([*CLI, "phantom", str(work / "inputs"), "--cases", "1", "--size", "full", "--quiet"],
                       check=True)
    return path


def profile_run(case: Path, out: Path) -> None:
    prof = out.parent / "run.prof"
    argv = ["run", str(case), "--out", str(out), "--force", "--quiet", "--device", "cpu"]
    code = (f"import cProfile, json; from LumbarBMDLib.cli import main; argv = json.loads({json.dumps(argv)!r}); "
            f"cProfile.runctx('main(argv)', globals(), locals(), {str(prof)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)  # main(argv) returns: no os._exit
    stats = pstats.Stats(str(prof))
    cum = {}
    for (file, _, name), (_, _, _, ct, _) in stats.stats.items():
        cum.setdefault((Path(file).name, name), 0.0)
        cum[(Path(file).name, name)] = max(cum[(Path(file).name, name)], ct)

    def c(file: str, name: str) -> float:
        return cum.get((file, name), 0.0)

    total = c("cli.py", "_main")
    rows = [("imports (all, wherever they happen)", c("<frozen importlib._bootstrap>", "_find_and_load")),
            ("model loading (both, incl. their imports)", c("segmentation.py", "load") + c("regression.py", "load")),
            ("read_ct", c("volume.py", "read_ct")), ("measure (the method)", c("pipeline.py", "measure")),
            ("case files + report.html", c("batch.py", "write_case_outputs")),
            ("  of which render_report", c("report.py", "render_report")),
            ("summary.csv", c("batch.py", "write_summary"))]
    print(f"  cProfile of one run (profiling slows everything ~1.5x; shares matter): main {total:.2f} s")
    for label, secs in rows:
        print(f"    {label:<44} {secs:6.2f} s")


def teardown_s() -> float:
    """Seconds a process spends ending after its last statement once torch and MONAI are imported (what os._exit
    spares)."""
    code = ("import time, LumbarBMDLib.pipeline, LumbarBMDLib.report, monai.networks.nets; "
            "print(time.time(), flush=True)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return time.time() - float(proc.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--runs", type=int, default=2, help="repeats of the whole `lumbarbmd run` (default 2)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lumbarbmd-bench-startup"))
    ap.add_argument("--profile", action="store_true", help="also profile one run with cProfile")
    args = ap.parse_args()
    work = Path(args.work)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (other users make every figure noisy)")

    helps = wall([*script(), "--help"], args.repeats)
    bare = wall([sys.executable, "-c", "pass"], args.repeats)
    print(f"lumbarbmd --help: {fmt(helps)} (target <= 0.3 s); python -c pass: {fmt(bare)}; "
          f"import LumbarBMDLib.cli: {cli_import_s():.3f} s")

    case = full_case(work)
    info = wall([*script(), "info", str(case)], max(3, args.repeats // 2))
    read = wall([sys.executable, "-c", f"import SimpleITK as s; s.ReadImage({str(case)!r})"], max(3, args.repeats // 2))
    print(f"lumbarbmd info (full case): {fmt(info)}; a process that only runs SimpleITK ReadImage: {fmt(read)}; "
          f"ratio {statistics.median(info) / statistics.median(read):.2f} (target <= 1.5)")

    out = work / "run"
    ratios, processes = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        subprocess.run([*script(), "run", str(case), "--out", str(out), "--force", "--quiet", "--device", "cpu"],
                       check=True, capture_output=True)
        process = time.perf_counter() - t0
        processes.append(process)
        timings = json.loads((out / "A_000000" / "results.json").read_text(encoding="utf-8"))["timings_s"]
        ratios.append(process / timings["total"])
        print(f"lumbarbmd run (one full case): process {process:.2f} s, pipeline {timings['total']:.2f} s (load "
              f"{timings['load']:.2f}): ratio {ratios[-1]:.2f} (target <= 1.5); outside the pipeline "
              f"{process - timings['total']:.2f} s")
    print(f"run ratio median {statistics.median(ratios):.2f}; interpreter teardown once torch and MONAI are imported "
          f"(skipped by the command): {teardown_s():.2f} s")
    # the first case is read while torch and MONAI load (batch.read_ahead), so its own read is slowed by them; the
    # stricter reference is the same CT measured as the second case of a batch, read in turn with nothing beside it
    twin = work / "inputs" / "twin" / "ct.nii.gz"
    if not twin.exists():
        twin.parent.mkdir(parents=True, exist_ok=True)
        os.link(case, twin)
    pair = work / "pair"
    subprocess.run([*script(), "run", str(case), str(twin), "--out", str(pair), "--force", "--quiet", "--device",
                    "cpu"], check=True, capture_output=True)
    alone = json.loads((pair / "twin" / "results.json").read_text(encoding="utf-8"))["timings_s"]
    first = json.loads((pair / "A_000000" / "results.json").read_text(encoding="utf-8"))["timings_s"]
    print(f"the same CT as the second case of a batch (read in turn, nothing beside it): pipeline "
          f"{alone['total']:.2f} s (load {alone['load']:.2f}; the first case, read ahead: load {first['load']:.2f}); "
          f"run ratio against it {statistics.median(processes) / alone['total']:.2f} (target <= 1.5)")
    if args.profile:
        profile_run(case, work / "profiled")


if __name__ == "__main__":
    main()
