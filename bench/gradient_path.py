"""Operator calls and time per stage-1 step with the backend's own gradient work at ZeRO-0 (foreach
clipping; no all-reduce at world size 1) against DeepSpeed's per-parameter path
(DUALNER_DEEPSPEED_GRADIENTS=deepspeed), through the real launcher with the `profile:` block.

    python bench/gradient_path.py                 # multilingual-e5-small, every parameter trained, fp32 ZeRO-0
    python bench/gradient_path.py --smoke         # tiny random encoder (CI)

Runs the two paths interleaved (deepspeed, direct, deepspeed, direct, ...), `--reps` times each; per
run: operator calls per profiled step (all / aten::* / aten calls dispatched from outside another
aten op, from profile/summary_rank0.json), the calls of
the operators that change (aten::cat, copy_, norm, mul_, ...), and seconds per step of the steps after
the profiled ones (losses.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import SHARED_DATA, device_facts, english_run, run_launcher, today, write_result  # noqa: E402

WATCHED = ("aten::cat", "aten::copy_", "aten::linalg_vector_norm", "aten::_foreach_norm", "aten::mul_",
           "aten::_foreach_mul_", "aten::stack", "aten::zeros", "aten::div_", "c10d::allreduce_",
           "aten::_fused_adamw_")


def one_run(args, path: str) -> dict:
    with tempfile.TemporaryDirectory() as output:
        run_dir = Path(output, "run")
        steps = args.profile_start + args.profile_steps - 1 + args.timed
        run_launcher(1, REPO / "configs" / "tiny.yaml", [
            *english_run(run_dir, args.encoder, args.data, steps * args.batch, args.max_length, args.batch, steps, 1,
                         args.ds_config),
            "profile.enabled=true", f"profile.start_step={args.profile_start}",
            f"profile.steps={args.profile_steps}", "profile.top=400"],
            env={**os.environ, "DUALNER_DEEPSPEED_GRADIENTS": path})
        summary = json.loads((run_dir / "profile" / "summary_rank0.json").read_text())
        windows = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
        after = [w["throughput/step_seconds"] for w in windows if w["step"] > steps - args.timed]
    calls = {entry["op"]: entry["calls_per_step"] for entry in summary["top"]}
    return {"path": path, "operator_calls_per_step": summary["operator_calls_per_step"],
            "aten_calls_per_step": summary["aten_calls_per_step"],
            "aten_dispatches_per_step": summary["aten_dispatches_per_step"],
            "watched_calls_per_step": {op: calls.get(op, 0.0) for op in WATCHED},
            "step_seconds": statistics.median(after), "losses": [w["loss/total"] for w in windows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="multilingual-e5-small")
    parser.add_argument("--data", default=str(SHARED_DATA / "en" / "train.tsv"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--ds-config", default="ds_configs/zero0_fp32.json")
    parser.add_argument("--profile-start", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--timed", type=int, default=4, help="steps timed after the profiled ones")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "gradient_path.json"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.encoder, args.batch, args.max_length, args.timed, args.reps = "tiny-random", 8, 64, 2, 1
        args.data = str(REPO / "data" / "panx-sample" / "en" / "train.tsv")
    runs = [one_run(args, path) for _ in range(args.reps) for path in ("deepspeed", "direct")]
    by_path = {path: [r for r in runs if r["path"] == path] for path in ("deepspeed", "direct")}
    summary = {path: {"operator_calls_per_step": statistics.median(r["operator_calls_per_step"] for r in rs),
                      "aten_calls_per_step": statistics.median(r["aten_calls_per_step"] for r in rs),
                      "aten_dispatches_per_step": statistics.median(r["aten_dispatches_per_step"] for r in rs),
                      "step_seconds_median": statistics.median(r["step_seconds"] for r in rs),
                      "step_seconds_range": [min(r["step_seconds"] for r in rs), max(r["step_seconds"] for r in rs)]}
               for path, rs in by_path.items()}
    result = {"command": "python bench/gradient_path.py " + " ".join(sys.argv[1:]), "date": today(), **device_facts(),
              "encoder": args.encoder, "batch": args.batch, "ds_config": args.ds_config, "runs": runs,
              "summary": summary,
              "max_loss_difference": max(abs(a - b) for r in runs for a, b in zip(r["losses"], runs[0]["losses"]))}
    write_result(args.output, result)
    for path, values in summary.items():
        print(f"{path}: {values['operator_calls_per_step']:.0f} operator calls per step "
              f"({values['aten_calls_per_step']:.0f} aten, {values['aten_dispatches_per_step']:.0f} dispatched from "
              f"outside an aten op), {values['step_seconds_median']:.3f} s/step "
              f"[{values['step_seconds_range'][0]:.3f}-{values['step_seconds_range'][1]:.3f}]")
    print({path: by_path[path][0]["watched_calls_per_step"] for path in by_path})


if __name__ == "__main__":
    main()
