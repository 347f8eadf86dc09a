"""bf16 against fp32 on this CPU: why train.cpu_bf16=auto trains in fp32 on CPUs without bf16
instructions. One multilingual-e5-small feed-forward linear (384 -> 1536) forward and backward on
4,096 tokens, as in a quickstart micro batch, in fp32, in bf16 weights and inputs, and under torch
autocast to bf16; the median of interleaved repeats, and the ratio to fp32 in the same process.

    python bench/cpu_precision.py [--repeats 5] [--tokens 4096] [--output bench/results/cpu_precision.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import write_result  # noqa: E402
from dualner.backend.placement import cpu_has_bf16  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def forward_backward(mode: str, tokens: int = 4096, inputs: int = 384, outputs: int = 1536) -> float:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    layer = torch.nn.Linear(inputs, outputs).to(dtype)
    x = torch.randn(tokens, inputs, dtype=dtype, requires_grad=True)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast-bf16"):
        loss = layer(x).float().square().mean()
    loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--output", default="bench/results/cpu_precision.json")
    args = parser.parse_args()
    modes = ["fp32", "bf16", "autocast-bf16"]
    for mode in modes:  # warm-up: first calls pick kernels
        forward_backward(mode, args.tokens)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):  # interleaved, so a busy moment of the machine hits every mode
        for mode in modes:
            times[mode].append(forward_backward(mode, args.tokens))
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    result = {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "cpu_has_bf16": cpu_has_bf16(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "tokens": args.tokens, "median_seconds": medians,
              "ratio_to_fp32": {mode: medians[mode] / medians["fp32"] for mode in modes}, "raw": times}
    write_result(args.output, result)
    print(f"{result['cpu']} ({result['cpu_capability']}, bf16 instructions: {result['cpu_has_bf16']}), "
          f"{result['threads']} threads")
    for mode in modes:
        print(f"{mode:>14}: {medians[mode] * 1000:8.1f} ms  ({result['ratio_to_fp32'][mode]:.1f}x fp32)")


if __name__ == "__main__":
    main()
