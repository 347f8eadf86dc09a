"""Host synchronisations per training step, counted on a CPU: calls that make the host wait for the
device when the tensor lives on a GPU (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool()`/`int()`/
`float()` of a tensor, `nonzero`), by the package that made them.

    python bench/host_syncs.py                        # this working tree
    python bench/host_syncs.py --revision 85b3f97     # an earlier commit (a git worktree of it)
    python bench/host_syncs.py --smoke

A CPU has no device to wait for, so this counts the calls, not the waits: a call on a tensor that
would stay on the host on a GPU counts too (an upper bound). bench/gpu_check.sh measures the real
thing on a GPU with torch's sync debug mode. The counting is injected from outside (a sitecustomize
module on PYTHONPATH), so any revision of the launchers can be measured the same way. Per step:
(count after N2 steps - count after N1 steps) / (N2 - N1), with no evaluation and one save at the end,
so start-up, evaluation and saving cancel out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import today, write_result  # noqa: E402

SITECUSTOMIZE = r'''
import atexit, json, os, sys
_counts = {}
def _install():
    import torch
    def wrap(owner, name):
        original = getattr(owner, name)
        def counted(*args, **kwargs):
            module = sys._getframe(1).f_globals.get("__name__", "")
            origin = module.split(".")[0] if module.split(".")[0] in ("dualner", "deepspeed", "torch", "transformers",
                                                                      "datasets", "torchdata", "seqeval") else "other"
            key = f"{origin}:{name}"
            _counts[key] = _counts.get(key, 0) + 1
            return original(*args, **kwargs)
        setattr(owner, name, counted)
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero"):
        wrap(torch.Tensor, name)
    wrap(torch, "nonzero")
try:
    _install()
except Exception as error:
    print("host_syncs: not installed:", error, file=sys.stderr)
@atexit.register
def _dump():
    path = os.environ.get("DUALNER_SYNC_COUNTS")
    if path and os.environ.get("RANK", "0") == "0":
        with open(path, "w") as handle:
            json.dump(_counts, handle)
'''


def count(repo: Path, stage: int, steps: int, folder: Path, init_from: Path | None,
          ds_config: str) -> tuple[dict, Path]:
    run_dir = folder / f"stage{stage}_{steps}"
    counts = folder / f"counts_{stage}_{steps}.json"
    config = repo / "configs" / ("tiny.yaml" if stage == 1 else "tiny_stage2.yaml")
    overrides = [f"run.output_dir={run_dir}", f"train.max_steps={steps}", "train.eval_every=1000",
                 "train.save_every=1000", "train.log_every=1000", "data.dev={}", "data.test={}",
                 f"engine.config={repo / ds_config}", "logging.tensorboard=false"]
    if init_from is not None:
        overrides.append(f"stage2.init_from={init_from}")
    env = {**os.environ, "PYTHONPATH": f"{folder / 'inject'}:{repo}", "DUALNER_SYNC_COUNTS": str(counts),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(repo / "launchers" / f"stage{stage}.py"), "--config", str(config), *overrides]
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return json.loads(counts.read_text()), run_dir


def per_step(short: dict, long: dict, steps: int) -> dict:
    keys = sorted(set(short) | set(long))
    table = {key: (long.get(key, 0) - short.get(key, 0)) / steps for key in keys}
    by_origin: dict[str, float] = {}
    for key, value in table.items():
        by_origin[key.split(":")[0]] = by_origin.get(key.split(":")[0], 0) + value
    return {"by_call": {k: v for k, v in table.items() if v}, "by_origin": {k: v for k, v in by_origin.items() if v}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revision", help="measure this commit instead of the working tree")
    parser.add_argument("--steps", type=int, nargs=2, default=(4, 12), metavar=("N1", "N2"))
    parser.add_argument("--ds-config", default="ds_configs/zero0_fp32.json")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "host_syncs.json"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.steps = (2, 4)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        (folder / "inject").mkdir()
        (folder / "inject" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        repo = REPO
        if args.revision:
            repo = folder / "checkout"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(repo), args.revision],
                           check=True, capture_output=True)
        try:
            first, n2 = args.steps
            stages = {}
            s1_short, _ = count(repo, 1, first, folder, None, args.ds_config)
            s1_long, stage1_run = count(repo, 1, n2, folder, None, args.ds_config)
            stages["stage1"] = per_step(s1_short, s1_long, n2 - first)
            s2_short, _ = count(repo, 2, first, folder, stage1_run, args.ds_config)
            s2_long, _ = count(repo, 2, n2, folder, stage1_run, args.ds_config)
            stages["stage2"] = per_step(s2_short, s2_long, n2 - first)
        finally:
            if args.revision:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(repo)], capture_output=True)
    revision = args.revision or subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                               capture_output=True, text=True).stdout.strip() + "+worktree"
    result = {"command": "python bench/host_syncs.py " + " ".join(sys.argv[1:]), "date": today(), "revision": revision,
              "setup": f"tiny encoder, configs/tiny*.yaml (global 16 = micro 8 x 2), {args.ds_config}, one process",
              "steps": list(args.steps), **stages}
    write_result(args.output, result)
    for stage in ("stage1", "stage2"):
        print(stage, json.dumps(result[stage]["by_origin"]))


if __name__ == "__main__":
    main()
