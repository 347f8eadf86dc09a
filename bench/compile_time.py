"""`model.compile=true` with token budgets (one fixed rows x pack_length shape per micro batch)
against eager, through the stage-1 launcher: compile time (the first steps' extra seconds), seconds
per step after it, graphs compiled, and whether the losses agree (no dropout, so both compute the
same function; inductor draws other dropout masks than eager).

    python bench/compile_time.py                  # tiny random encoder, CPU (inductor, C++)
    python bench/compile_time.py --encoder multilingual-e5-small --tokens 2048 --steps 8
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

from bench.common import device_facts, english_run, run_launcher, today, write_result  # noqa: E402


def one_run(args, compiled: bool) -> dict:
    with tempfile.TemporaryDirectory() as output:
        run_dir = Path(output, "run")
        result = run_launcher(1, REPO / "configs" / "tiny.yaml", [
            *english_run(run_dir, args.encoder, args.data, None, args.pack_length, args.tokens, args.steps, 1,
                         args.ds_config),
            "train.batch_unit=tokens", f"data.pack_length={args.pack_length}", "model.dropout=0.0",
            "model.encoder_dropout=0.0", f"model.compile={str(compiled).lower()}"],
            env={**os.environ, "TORCH_LOGS": "recompiles"})
        windows = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    seconds = [w["throughput/step_seconds"] for w in windows]
    steady = statistics.median(seconds[args.first:])
    log = (result.stderr or "") + (result.stdout or "")
    return {"compiled": compiled, "step_seconds": seconds, "steady_step_seconds": steady,
            "first_steps_extra_seconds": sum(s - steady for s in seconds[:args.first]),
            "recompiles_logged": log.count("Recompiling function"), "losses": [w["loss/total"] for w in windows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="tiny-random")
    parser.add_argument("--data", default=str(REPO / "data" / "panx-sample" / "en" / "train.tsv"))
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (one micro batch)")
    parser.add_argument("--pack-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--first", type=int, default=2, help="steps counted as compile (the rest: steady state)")
    parser.add_argument("--ds-config", default="ds_configs/zero0_fp32.json")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "compile_time.json"))
    args = parser.parse_args()
    eager, compiled = one_run(args, False), one_run(args, True)
    difference = max(abs(a - b) for a, b in zip(eager["losses"], compiled["losses"]))
    result = {"command": "python bench/compile_time.py " + " ".join(sys.argv[1:]), "date": today(), **device_facts(),
              "encoder": args.encoder, "tokens_per_step": args.tokens, "pack_length": args.pack_length,
              "eager": eager, "compiled": compiled, "max_loss_difference": difference,
              "compile_seconds": compiled["first_steps_extra_seconds"] - eager["first_steps_extra_seconds"],
              "steady_speedup": eager["steady_step_seconds"] / compiled["steady_step_seconds"]}
    write_result(args.output, result)
    print(f"compile: {result['compile_seconds']:.1f} s extra in the first {args.first} steps; steady "
          f"{compiled['steady_step_seconds']:.3f} s/step compiled vs {eager['steady_step_seconds']:.3f} eager "
          f"({result['steady_speedup']:.2f}x); recompiles logged {compiled['recompiles_logged']}; "
          f"max loss difference {difference:.2e}")


if __name__ == "__main__":
    main()
