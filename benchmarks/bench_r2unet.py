"""Benchmark of the R2U-Net on CPU: inference time on the 10 candidate slices, and training-step time.

Usage:
    python benchmarks/bench_r2unet.py [--widths 4 8 16] [--sizes 256 512] [--repeats 3]

For each base width (features base, 2b, 4b, 8b, 16b) it prints the parameter count and

- the time of one forward pass on a batch of 10 single-channel images (the 10 sagittal candidate slices)
  in eval mode under ``torch.inference_mode()``, for each image size;
- the time of one forward + backward pass (cross-entropy over 5 classes) on a batch of 4 at 256 × 256 in
  train mode, for training-time planning.

Each figure is the median of ``--repeats`` runs after one warm-up run. torch uses its default thread count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from LumbarBMDLib.r2unet import count_parameters, r2unet_from_width


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def inference_time(net: nn.Module, size: int, repeats: int) -> float:
    net.eval()
    x = torch.rand(10, 1, size, size, generator=torch.Generator().manual_seed(0))

    def step() -> torch.Tensor:
        with torch.inference_mode():
            return net(x)

    return median_time(step, repeats)


def train_step_time(net: nn.Module, size: int, batch: int, repeats: int) -> float:
    net.train()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, generator=g)
    target = torch.randint(0, 5, (batch, size, size), generator=g)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), target).backward()

    return median_time(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, median of {args.repeats} runs")
    header = f"{'base':>5}{'parameters':>12}" + "".join(f"{f'fwd 10x{s}² s':>16}" for s in args.sizes)
    header += f"{'fwd+bwd 4x256² s':>19}"
    print(header)
    for base in args.widths:
        net = r2unet_from_width(base)
        row = f"{base:>5}{count_parameters(net):>12,}"
        for size in args.sizes:
            row += f"{inference_time(net, size, args.repeats):>16.2f}"
        row += f"{train_step_time(net, 256, 4, args.repeats):>19.2f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
