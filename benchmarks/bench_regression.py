"""Speed of the BMD stage on this machine: patch extraction and DenseNet-121 regression of four levels.

Usage:  python benchmarks/bench_regression.py [--bmd M] [--repeats 20] [--device cpu|cuda]

Prints the median and minimum seconds of (a) cutting the four trabecular patches from a full-size phantom CT
(truth centres) and (b) regressing the four patches in one batch with the default (or given) model.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from LumbarBMDLib.localisation import LevelLocation, locate_in_ct
from LumbarBMDLib.patches import trabecular_patches
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.regression import RegressionModel, predict_bmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bmd", default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = RegressionModel.load(args.bmd, device=args.device)
    case = generate_case(2026, "A", "full")
    locs = locate_in_ct([LevelLocation(lv, True, "", np.array(case.truth["levels"][lv]["centre_lps"]))
                         for lv in ("L1", "L2", "L3", "L4")], case.ct)
    t_patch, t_reg = [], []
    predict_bmd(model, trabecular_patches(case.ct, locs))  # warm-up
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        patches = trabecular_patches(case.ct, locs)
        t1 = time.perf_counter()
        levels = predict_bmd(model, patches)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t_reg.append(time.perf_counter() - t1)
        t_patch.append(t1 - t0)
    print(f"device {model.device}, torch threads {torch.get_num_threads()}")
    print(f"4 trabecular patches: median {np.median(t_patch):.3f} s, min {np.min(t_patch):.3f} s")
    print(f"DenseNet-121 regression of 4 levels: median {np.median(t_reg):.3f} s, min {np.min(t_reg):.3f} s")
    print("BMD: " + ", ".join(f"{lv.level} {lv.bmd_mg_cm3:.1f} (truth {case.truth['bmd_mg_cm3'][lv.level]:.1f})"
                              for lv in levels if lv.found))


if __name__ == "__main__":
    main()
