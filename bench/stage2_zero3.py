"""Where a stage-2 step's time goes under ZeRO-2 and ZeRO-3 on 2 CPU ranks, and what stage 2 costs
per token against stage 1 (issue: stage 2 at cluster scale, "the teacher off the critical path").

Each variant is the real launcher under torchrun (2 gloo ranks), run through this file's `--rank`
mode, which times the phases of every step (loader wait, teacher forward, pseudo labels, student
forward, loss terms, backward, optimizer step) and counts the collectives each step issues:

    stage1            stage 1 on English
    stage2-replica    stage 2 under ZeRO-3, the frozen teacher a whole replica (teacher_placement=replica)
    stage2-partition  stage 2 under ZeRO-3, the teacher partitioned like the student (the old path)
    stage2-zero2      stage 2 under ZeRO-2 (teacher whole on each rank)

Stage 2 trains on the same English sentences as stage 1 (stage2.target={}), so the per-token ratio
measures the method's extra work, not another corpus's lengths. Variants are interleaved (stage1,
replica, partition, zero2, stage1, ...) for --repeats rounds; medians with min-max.

    python bench/stage2_zero3.py --output bench/results/stage2_zero3.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "stage1": (1, "ds_configs/zero3_fp32.json", []),
    "stage2-replica": (2, "ds_configs/zero3_fp32.json", ["stage2.teacher_placement=replica"]),
    "stage2-partition": (2, "ds_configs/zero3_fp32.json", ["stage2.teacher_placement=partitioned"]),
    "stage2-zero2": (2, "ds_configs/zero2_fp32.json", []),
}
COLLECTIVES = ("all_gather_into_tensor", "all_gather", "reduce_scatter_tensor", "all_reduce", "broadcast",
               "reduce_scatter", "all_to_all_single")


# -- inside one rank ---------------------------------------------------------------------------------------
def instrument(warmup: int) -> dict:
    """Wrap the step's phases and torch.distributed's collectives with timers and counters."""
    import torch.distributed as dist

    import dualner.stage2 as stage2
    import dualner.train as train
    from dualner.backend import deepspeed_engine as backend
    from dualner.recipe import Recipe
    record = {"steps": 0, "phases": defaultdict(float), "collectives": defaultdict(int), "step_seconds": 0.0,
              "tokens": 0.0}
    state = {"step_started": None}

    def counting() -> bool:
        return record["steps"] >= warmup

    def timed(owner, name, phase):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if counting():
                    record["phases"][phase] += time.perf_counter() - started
        setattr(owner, name, wrapper)

    timed(backend.DeepSpeedTeacher, "__call__", "teacher_forward")
    timed(backend.ReplicaTeacher, "__call__", "teacher_forward")
    timed(backend.DeepSpeedTrainingEngine, "__call__", "student_forward")
    timed(backend.DeepSpeedTrainingEngine, "backward", "backward")
    timed(backend.DeepSpeedTrainingEngine, "optimizer_step", "optimizer_step")
    timed(stage2, "build_pseudo_labels", "pseudo_labels")
    timed(Recipe, "losses", "forward_and_loss_terms")
    timed(train.MetricWindow, "wait_for", "loader_wait")
    for name in COLLECTIVES:
        if hasattr(dist, name):
            original = getattr(dist, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                if counting():
                    record["collectives"][_name] += 1
                return _original(*args, **kwargs)
            setattr(dist, name, counted)
    original_end = train.NonFiniteGuard.record  # called once at the end of every step

    def end_step(guard, *args):
        now = time.perf_counter()
        if state["step_started"] is not None and counting():
            record["step_seconds"] += now - state["step_started"]
        original_end(guard, *args)
        record["steps"] += 1
        state["step_started"] = time.perf_counter()
    train.NonFiniteGuard.record = end_step
    original_wait = train.MetricWindow.wait_for

    def wait_for(window, batches):
        batch = original_wait(window, batches)
        if counting():
            record["tokens"] += batch["real_tokens"]
        return batch
    train.MetricWindow.wait_for = wait_for
    return record


def rank_main(args) -> None:
    record = instrument(args.warmup)
    from dualner.backend import comm
    from dualner.config import load_config
    cfg = load_config(args.config, args.overrides)
    if args.stage == 1:
        from dualner.stage1 import run_stage1
        run_stage1(cfg)
    else:
        from dualner.stage2 import run_stage2
        run_stage2(cfg)
    measured = max(1, record["steps"] - args.warmup - 1)  # the first counted step's start is the warm-up's end
    phases = dict(record["phases"])
    # the loss terms' own time: what `losses` took beyond the forwards and pseudo labels inside it
    inner = sum(phases.get(k, 0.0) for k in ("teacher_forward", "student_forward", "pseudo_labels"))
    phases["loss_terms"] = phases.pop("forward_and_loss_terms", 0.0) - inner
    result = {"steps": measured, "seconds_per_step": record["step_seconds"] / measured,
              "tokens_per_step": record["tokens"] / max(1, record["steps"] - args.warmup),
              "phase_seconds_per_step": {k: v / measured for k, v in phases.items()},
              "collectives_per_step": {k: v / measured for k, v in record["collectives"].items()}}
    result["seconds_per_1k_tokens"] = 1000 * result["seconds_per_step"] / max(1.0, result["tokens_per_step"])
    if comm.current().is_main:
        Path(args.result).write_text(json.dumps(result, indent=1))


# -- the orchestrator ----------------------------------------------------------------------------------------
def launch(variant: str, args, folder: Path, stage1_dir: Path) -> dict:
    stage, ds_config, extra = VARIANTS[variant]
    output = folder / f"{variant}-{time.monotonic_ns()}"
    result_file = output.with_suffix(".json")
    overrides = [f"run.output_dir={output}", f"model.encoder={args.encoder}", "model.freeze_word_embeddings=true",
                 f"data.train.en={REPO / 'data' / 'panx-sample' / 'en' / 'train.tsv'}",
                 f"data.max_train_sentences={args.sentences}", "data.dev={}", "data.test={}",
                 f"data.max_length={args.max_length}", "data.packing=true",
                 f"train.global_batch_size={2 * args.micro_batch}", f"train.micro_batch_size={args.micro_batch}",
                 f"train.max_steps={args.steps}",
                 "train.log_every=1000", "train.eval_every=1000", "train.warmup_steps=0",
                 f"engine.config={REPO / ds_config}", "logging.tensorboard=false", "logging.progress_bar=false",
                 *extra]
    if stage == 2:
        overrides += [f"stage2.init_from={stage1_dir}", "stage2.target={}", "stage2.bucket_pool=256"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={29500 + os.getpid() % 1000}", str(Path(__file__).resolve()), "--rank",
               "--stage", str(stage), "--config", str(REPO / "configs" / ("tiny_stage2.yaml" if stage == 2 else "tiny.yaml")),
               "--result", str(result_file), "--warmup", str(args.warmup), "--", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}")
    return json.loads(result_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--encoder", default="multilingual-e5-small")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--sentences", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.rank:
        rank_main(args)
        return
    from bench.common import write_result
    runs: dict[str, list] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        stage1_dir = folder / "init"  # the stage-2 runs start from a short stage-1 run
        subprocess.run([sys.executable, str(REPO / "launchers" / "stage1.py"), "--config",
                        str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={stage1_dir}",
                        f"model.encoder={args.encoder}", "model.freeze_word_embeddings=true", "train.max_steps=1",
                        "train.eval_every=1", "data.max_eval_sentences=8", "data.test={}",
                        f"data.max_length={args.max_length}", f"engine.config={REPO / 'ds_configs/zero0_fp32.json'}"],
                       cwd=REPO, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        for round_ in range(args.repeats):
            for variant in VARIANTS:
                runs[variant].append(launch(variant, args, folder, stage1_dir))
                print(round_, variant, f"{runs[variant][-1]['seconds_per_1k_tokens']:.3f} s/1k tokens", flush=True)
    def med(values):
        return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}
    summary = {}
    for variant, results in runs.items():
        phases = sorted({k for r in results for k in r["phase_seconds_per_step"]})
        summary[variant] = {
            "seconds_per_1k_tokens": med([r["seconds_per_1k_tokens"] for r in results]),
            "seconds_per_step": med([r["seconds_per_step"] for r in results]),
            "tokens_per_step": round(statistics.median(r["tokens_per_step"] for r in results), 1),
            "phase_seconds_per_step": {k: round(statistics.median(r["phase_seconds_per_step"].get(k, 0.0)
                                                                  for r in results), 4) for k in phases},
            "collectives_per_step": results[-1]["collectives_per_step"]}
    base = statistics.median(r["seconds_per_1k_tokens"] for r in runs["stage1"])
    ratios = {variant: round(statistics.median(r["seconds_per_1k_tokens"] for r in runs[variant]) / base, 3)
              for variant in VARIANTS if variant != "stage1"}
    result = {"command": "python bench/stage2_zero3.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "encoder": args.encoder, "ranks": 2, "micro_batch": args.micro_batch, "max_length": args.max_length,
              "repeats": args.repeats, "per_token_vs_stage1": ratios, "variants": summary}
    print(json.dumps(ratios))
    if args.output:
        write_result(args.output, result)


if __name__ == "__main__":
    main()
