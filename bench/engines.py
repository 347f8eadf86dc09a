"""engine.kind=fsdp2 against DeepSpeed ZeRO-3: time per step and peak memory per rank of the real
stage-1 launcher on `--ranks` gloo ranks (CPU) or GPUs, fp32, the same config, seed and data.
Repeats interleaved (the order alternating), medians reported with their ratios to ZeRO-3.

    python bench/engines.py --repeats 3 --steps 16 --output bench/results/engines.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import timed_windows, write_result  # noqa: E402
from dualner.backend.comm import free_port  # noqa: E402

ENGINES = {"zero3": f"engine={{kind: deepspeed, config: {REPO / 'ds_configs' / 'zero3_fp32.json'}}}",
           "fsdp2": "engine={kind: fsdp2}"}
# The launch runs in a child that reports its descendants' peak resident memory (the largest rank's).
_MEASURED = ("import resource, subprocess, sys\n"
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")


def run(engine: str, run_dir: Path, ranks: int, steps: int, window: int, config: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
               str(REPO / "launchers" / "stage1.py"), "--config", str(REPO / config), f"run.output_dir={run_dir}",
               ENGINES[engine], f"train.max_steps={steps}", f"train.log_every={window}", "train.eval_every=100000",
               "train.save_every=100000", "data.max_eval_sentences=8", "logging.progress_bar=false"]
    result = subprocess.run([sys.executable, "-c", _MEASURED, *command], cwd=REPO, capture_output=True, text=True,
                            check=True)
    timed = timed_windows(run_dir, window)
    return {"step_seconds": timed["step_seconds"], "peak_rss_mib": int(result.stdout.split()[-1]) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--window", type=int, default=4, help="steps per log window; the first is the warm-up")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--output", default="bench/results/engines.json")
    args = parser.parse_args()
    measured: dict[str, list[dict]] = {name: [] for name in ENGINES}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            order = list(ENGINES) if repeat % 2 == 0 else list(reversed(ENGINES))
            for name in order:
                measured[name].append(run(name, Path(scratch) / f"{name}-{repeat}", args.ranks, args.steps,
                                          args.window, args.config))
                print(name, repeat, measured[name][-1], flush=True)
    summary = {name: {key: statistics.median(entry[key] for entry in runs) for key in ("step_seconds", "peak_rss_mib")}
               for name, runs in measured.items()}
    ratios = {key: summary["fsdp2"][key] / summary["zero3"][key] for key in ("step_seconds", "peak_rss_mib")}
    write_result(args.output, {"args": vars(args), "runs": measured, "median": summary, "fsdp2_over_zero3": ratios})
    print(json.dumps({"median": summary, "fsdp2_over_zero3": ratios}, indent=1))


if __name__ == "__main__":
    main()
