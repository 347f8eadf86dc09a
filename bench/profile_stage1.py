"""Where a stage-1 step's time goes, with the word-embedding table trained or frozen; on the GPU when
there is one (CUDA kernels profiled too), else the CPU.

    python bench/profile_stage1.py             # multilingual-e5-small, 32 real English sentences per step
    python bench/profile_stage1.py --encoder DIR --batch 128 --ds-config ds_configs/zero0.json   # a GPU
    python bench/profile_stage1.py --smoke     # tiny random encoder (CI)

The model and DeepSpeed engine are built as the stage-1 launcher builds them (fp32 ZeRO-0 by
default; --ds-config for bf16), micro batches laid out as the launcher lays them out on this device
(data.packing=auto: packed on GPUs, length-bucketed padded on CPU; --layout packed|padded to
choose). Each step is timed by phase (collate on the host, forward + losses, backward, optimizer
step) with a device synchronisation between phases, and one step is recorded with torch.profiler
(the most expensive operators by self time, CPU and CUDA). Tokenizing the training sentences happens
once per run, before training; its cost per sentence is measured too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import SHARED_DATA, device_facts, stage1_losses, write_result  # noqa: E402


def profile(args, freeze: bool) -> dict:
    import torch
    from transformers import AutoTokenizer
    from dualner.backend.deepspeed_engine import DeepSpeedTrainingEngine, load_deepspeed_config
    from dualner.backend.comm import accelerator_device
    from dualner.backend.placement import to_device
    from dualner.data.packing import packs_by_default
    from dualner.config import TrainConfig
    from dualner.data.batching import bucketed_micro_batches, derive_batch_layout
    from dualner.data.conll import read_conll
    from dualner.data.encoding import WindowTokenizer
    from dualner.data.packing import Collator, model_inputs
    from dualner.encoders import resolve_encoder
    from dualner.labels import LabelSet
    from dualner.model import DualNERModel

    torch.manual_seed(0)
    folder = resolve_encoder(args.encoder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sentences = read_conll(Path(args.data), "en", max_sentences=args.batch * (args.steps + 2))
    label_set = LabelSet.from_tags([tag for s in sentences for tag in s.tags])
    started = time.perf_counter()
    rows = WindowTokenizer(tokenizer, label_set, 128).encode(sentences).to_list()
    tokenize_seconds = time.perf_counter() - started
    lengths = [len(row["input_ids"]) for row in rows]
    packed = args.layout == "packed" or (args.layout == "auto" and packs_by_default(accelerator_device(0)))
    batches = bucketed_micro_batches(lengths, args.batch, seed=0, epoch=0, pool_batches=1 if packed else 50)

    model = DualNERModel.from_pretrained_encoder(folder, len(label_set.entity_types))
    if freeze:
        model.freeze_word_embeddings()
    collate = Collator(tokenizer.pad_token_id, packed=packed and model.supports_packing, row_length=128,
                       position_offset=model.position_offset or 0)
    train = TrainConfig(global_batch_size=args.batch, micro_batch_size=args.batch, lr=1e-4, warmup_steps=0)
    engine = DeepSpeedTrainingEngine(model, load_deepspeed_config(REPO / args.ds_config, derive_batch_layout(train, 1)),
                                     train, total_steps=100)
    device = engine.device
    engine.train()  # as the launcher trains (dropout on; from_pretrained returns a model in eval mode)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    phases = {"collate": 0.0, "forward_and_losses": 0.0, "backward": 0.0, "optimizer_step": 0.0}

    def step(batch_indices, timed: bool) -> None:
        synchronize()
        marks = [time.perf_counter()]
        batch = to_device(collate([rows[i] for i in batch_indices]), device)
        synchronize()
        marks.append(time.perf_counter())
        loss = stage1_losses(engine(**model_inputs(batch)), batch)["total"]
        synchronize()
        marks.append(time.perf_counter())
        engine.backward(loss)
        synchronize()
        marks.append(time.perf_counter())
        engine.optimizer_step()
        synchronize()
        marks.append(time.perf_counter())
        if timed:
            for name, begin, end in zip(phases, marks, marks[1:]):
                phases[name] += end - begin

    step(batches[0], timed=False)  # warm-up: first-call allocations
    for indices in batches[1:args.steps + 1]:
        step(indices, timed=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        step(batches[args.steps + 1 if len(batches) > args.steps + 1 else 1], timed=False)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=12)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    top = [{"op": event.key, "self_ms": getattr(event, key, 0) / 1000, "calls": event.count}
           for event in sorted(profiler.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:12]]
    total = sum(phases.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"frozen_word_embeddings": freeze, "packed": collate.packed, "trainable_parameters": trainable,
            "seconds_per_step": total / args.steps,
            "phase_seconds_per_step": {name: value / args.steps for name, value in phases.items()},
            "phase_share": {name: value / total for name, value in phases.items()},
            "tokenize_ms_per_sentence": 1000 * tokenize_seconds / len(sentences),
            "top_ops_one_step": top, "profiler_table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="multilingual-e5-small")
    parser.add_argument("--data", default=str(SHARED_DATA / "en" / "train.tsv"))
    parser.add_argument("--layout", choices=["auto", "packed", "padded"], default="auto",
                        help="micro batch layout (auto: as data.packing=auto on this device)")
    parser.add_argument("--embeddings", choices=["both", "trained", "frozen"], default="both")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ds-config", default="ds_configs/zero0_fp32.json")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "profile_stage1.json"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.encoder, args.steps, args.batch = "tiny-random", 2, 8
        args.data = str(REPO / "data" / "panx-sample" / "en" / "train.tsv")
    from dualner.backend.comm import init_distributed
    init_distributed()  # a world of one, as `python launchers/stage1.py` makes
    runs = [profile(args, freeze) for freeze in (False, True)
            if args.embeddings == "both" or args.embeddings == ("frozen" if freeze else "trained")]
    result = {"command": "python bench/profile_stage1.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              **device_facts(), "layout": args.layout, "encoder": args.encoder, "batch": args.batch, "ds_config": args.ds_config, "runs": runs,
              **({"frozen_speedup": runs[0]["seconds_per_step"] / runs[1]["seconds_per_step"]} if len(runs) == 2 else {})}
    write_result(args.output, result)
    for run in runs:
        shares = ", ".join(f"{name} {share:.0%}" for name, share in run["phase_share"].items())
        print(f"frozen={run['frozen_word_embeddings']}: {run['seconds_per_step']:.3f} s/step ({shares}); "
              f"tokenizing {run['tokenize_ms_per_sentence']:.3f} ms/sentence once")
        print(run["profiler_table"])


if __name__ == "__main__":
    main()
