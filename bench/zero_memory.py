"""Training-state memory per rank at 2 ranks under ZeRO-0, ZeRO-2 and ZeRO-3.

    python bench/zero_memory.py                 # multilingual-e5-small, every parameter trained, bf16
    python bench/zero_memory.py --precision fp32
    python bench/zero_memory.py --smoke         # tiny random encoder (CI)

For each ZeRO stage, 2 ranks (torchrun, gloo) build the dual-head model and the DeepSpeed engine
exactly as the launchers do (dualner.engine.build_engine), run two optimizer steps and the forward
and backward of a third, free the batch and activations, and then measure on each rank, with the
third step's gradients in place, the bytes of every tensor alive in the process (found through
the garbage collector, each storage counted once): parameters, gradients and optimizer state, with
DeepSpeed's flat buffers and partitions, whatever holds them. Reported alongside: the parameter
bytes that rank holds and the optimizer.state bytes, and the process's resident memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import stage1_losses, write_result  # noqa: E402
from dualner.backend.comm import free_port  # noqa: E402

CONFIGS = {"bf16": {0: "ds_configs/zero0.json", 2: "ds_configs/zero2.json", 3: "ds_configs/zero3.json"},
           "fp32": {0: "ds_configs/zero0_fp32.json", 2: "ds_configs/zero2_fp32.json", 3: "ds_configs/zero3_fp32.json"}}
STAGES = (0, 2, 3)


def live_tensor_bytes() -> int:
    import torch
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001  (objects that look like tensors but are not backed by one)
            continue
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from dualner.backend.comm import all_gather_objects, init_distributed
    from dualner.backend.deepspeed_engine import DeepSpeedTrainingEngine, load_deepspeed_config
    from dualner.config import TrainConfig
    from dualner.data.batching import derive_batch_layout
    from dualner.encoders import resolve_encoder
    from dualner.model import DualNERModel

    info = init_distributed()
    torch.manual_seed(0)
    train = TrainConfig(global_batch_size=2 * args.batch, micro_batch_size=args.batch, lr=1e-4, warmup_steps=0)
    ds_config = load_deepspeed_config(REPO / CONFIGS[args.precision][args.stage], derive_batch_layout(train, info.world_size))
    model = DualNERModel.from_pretrained_encoder(resolve_encoder(args.encoder), 3)
    training = DeepSpeedTrainingEngine(model, ds_config, train, total_steps=10)
    engine = training.engine
    generator = torch.Generator().manual_seed(info.rank)
    for step in range(3):
        ids = torch.randint(5, 200, (args.batch, 48), generator=generator)
        mask = torch.ones_like(ids)
        labels = torch.randint(0, 7, ids.shape, generator=generator)
        spans = torch.randint(0, 4, ids.shape, generator=generator)
        outputs = engine(ids, attention_mask=mask)
        loss = stage1_losses(outputs, {"seq_labels": labels, "start_labels": spans, "end_labels": spans})["total"]
        engine.backward(loss)
        if step == 2:
            break  # measured with this step's gradients in place and the optimizer state of two steps
        engine.step()
    del ids, mask, labels, spans, outputs, loss
    parameters = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p.data).numel() * p.element_size()
                     for p in engine.module.parameters())
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    optimizer_state = sum(value.numel() * value.element_size() for state in inner.state.values()
                          for value in state.values() if torch.is_tensor(value))
    mine = {"rank": info.rank, "live_tensor_bytes": live_tensor_bytes(), "parameter_bytes": parameters,
            "optimizer_state_bytes": optimizer_state, "rss_bytes": rss_bytes()}
    everyone = all_gather_objects(mine)
    if info.is_main:
        Path(args.worker_output).write_text(json.dumps(everyone))
    # An explicit, collective end: left to interpreter exit, gloo's threads can abort a rank.
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="multilingual-e5-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=sorted(CONFIGS), default="bf16")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "zero_memory.json"))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.encoder, args.batch = "tiny-random", 4
    if args.worker_output:
        worker(args)
        return
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    per_stage = {}
    for stage in STAGES:
        output = Path(args.output).with_suffix(f".stage{stage}.tmp")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   __file__, "--encoder", args.encoder, "--batch", str(args.batch), "--stage", str(stage),
                   "--precision", args.precision,
                   "--worker-output", str(output)]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise SystemExit(f"ZeRO-{stage} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
        ranks = json.loads(output.read_text())
        output.unlink()
        per_stage[f"zero{stage}"] = {"ranks": ranks,
                                     "max_live_tensor_mb": max(r["live_tensor_bytes"] for r in ranks) / 2**20,
                                     "max_rss_mb": max(r["rss_bytes"] for r in ranks) / 2**20}
    base = per_stage["zero0"]["max_live_tensor_mb"]
    result = {"command": "python bench/zero_memory.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "encoder": args.encoder, "world_size": 2, "precision": args.precision,
              "ds_configs": CONFIGS[args.precision], "stages": per_stage,
              "ratio_to_zero0": {name: stage["max_live_tensor_mb"] / base for name, stage in per_stage.items()}}
    write_result(args.output, result)
    for name, stage in per_stage.items():
        print(f"{name}: {stage['max_live_tensor_mb']:.0f} MB of tensors per rank "
              f"({result['ratio_to_zero0'][name]:.2f}x ZeRO-0), RSS {stage['max_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
