"""What the benchmarks share: result files, the launchers' timed windows, the mixed stage-2 stream,
the device and its peak rate, model FLOPs utilisation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "panx"
TARGETS = ["ar", "de", "es", "et", "fa", "fi", "fr", "he", "hi", "id", "it", "ja", "ko", "nl", "pt", "ru", "tr",
           "vi", "zh"]
# Dense bf16 tensor-core peak of the datasheets (H100 / H200 SXM); MFU is reported against it.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def write_result(path: str | Path, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def timed_windows(run_dir: Path, warmup: int) -> dict:
    """Steps, seconds and real tokens a launcher logged after its first window (the warm-up; the
    runs log every `warmup` steps), from its losses.jsonl."""
    windows = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    timed = [w for w in windows if w["step"] > warmup]
    steps = warmup * len(timed)
    seconds = sum(w["throughput/step_seconds"] * warmup for w in timed)
    tokens = sum(w["throughput/tokens_per_step"] * warmup for w in timed)
    windows_per_step = sum(w.get("throughput/windows_per_step", 0) * warmup for w in timed) / steps
    efficiency = [w["data/packing_efficiency"] for w in timed if "data/packing_efficiency" in w]
    wait = sum(w.get("data/wait_seconds", 0.0) for w in timed)
    syncs = [w["debug/host_syncs_per_step"] for w in timed if "debug/host_syncs_per_step" in w]
    return {"steps": steps, "seconds": seconds, "tokens": tokens, "step_seconds": seconds / steps,
            "tokens_per_step": tokens / steps, "tokens_per_s": tokens / seconds,
            "windows_per_step": windows_per_step, "seconds_per_1k_tokens": 1000 * seconds / tokens,
            "packing_efficiency": sum(efficiency) / len(efficiency) if efficiency else None,
            "data_wait_seconds": wait, "data_wait_share": wait / seconds,
            **({"host_syncs_per_step": {k: sum(s.get(k, 0) for s in syncs) / len(syncs)
                                        for k in {k for s in syncs for k in s}}} if syncs else {})}


def run_launcher(stage: int, config: str | Path, overrides: list[str], verbose: bool = False,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    # data.packing=auto first: a benchmark measures the launcher's default layout for the device, not
    # the packed rows configs/tiny*.yaml pin for the tests (an override after it still wins)
    command = [sys.executable, str(REPO / "launchers" / f"stage{stage}.py"), "--config", str(config),
               "data.packing=auto", *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=not verbose, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{(result.stdout or '')[-2000:]}\n{(result.stderr or '')[-4000:]}")
    return result


def english_run(output: str | Path, encoder: str, data: str | Path, sentences: int | None, max_length: int,
                batch: int, steps: int, log_every: int, ds_config: str | Path, micro: int | None = None) -> list[str]:
    """The launcher overrides of a timed run on English alone: `sentences` of `data` (None: all), no
    dev or test sets, no warm-up, evaluated only after the last step, no TensorBoard. A benchmark
    adds what it measures after these."""
    return [f"run.output_dir={output}", f"model.encoder={encoder}", f"data.train.en={data}",
            f"data.max_train_sentences={'null' if sentences is None else sentences}", "data.dev={}", "data.test={}",
            f"data.max_length={max_length}", f"train.global_batch_size={batch}",
            f"train.micro_batch_size={micro or batch}", f"train.max_steps={steps}", f"train.log_every={log_every}",
            f"train.eval_every={steps}", "train.warmup_steps=0", f"engine.config={ds_config}",
            "logging.tensorboard=false"]


def mixed_stream(root: Path, encoder, batch: int, pool: int, collate=None, workers: int = 0,
                 pin_memory: bool = False):
    """The stage-2 loader over labeled English and every target language's train text, weighted as
    stage 2 weights them (source 1, the targets sharing 1)."""
    from dualner.data.packing import Collator
    from dualner.data.source_kinds import open_sources
    from dualner.data.stream_spec import KIND_SOURCE, KIND_TARGET, STREAM_META, StreamSpec
    from dualner.data.streaming import Stage2Stream
    targets = [lang for lang in TARGETS if (root / lang / "train.tsv").is_file()]
    specs = [StreamSpec("source/en", KIND_SOURCE, "en", open_sources([str(root / "en" / "train.tsv")], "en"), 1.0)]
    specs += [StreamSpec(f"target/{lang}", KIND_TARGET, lang, open_sources([str(root / lang / "train.tsv")], lang),
                         1.0 / len(targets)) for lang in targets]
    collate = collate or Collator(encoder.tokenizer.pad_token_id, packed=False, meta_columns=STREAM_META)
    return ["en", *targets], Stage2Stream(specs, encoder, batch, seed=0, rank=0, world_size=1, collate=collate,
                                          pool=pool, workers=workers, pin_memory=pin_memory)


def stage1_losses(outputs, batch: dict, variant: str = "mlt") -> dict:
    """Stage 1's loss terms as training computes them (dualner.stage1.Stage1Recipe.TERMS, the
    variant's heads) and their sum under `total` (the tests use it too)."""
    from dualner.losses import VARIANT_TERMS
    from dualner.stage1 import Forward, Stage1Recipe
    forward = Forward(outputs, batch)
    terms = {name: Stage1Recipe.TERMS[name](forward) for name in VARIANT_TERMS[variant]}
    return {**terms, "total": sum(terms.values())}


def device_facts() -> dict:
    import torch
    if not torch.cuda.is_available():
        return {"device": "cpu", "peak_bf16_flops": None}
    name = torch.cuda.get_device_name()
    peak = next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)
    return {"device": name, "peak_bf16_flops": peak, "torch": torch.__version__}


def encoder_parameters(encoder: str) -> dict:
    """Parameter counts of an encoder folder (read on the meta device, no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModel
    from dualner.encoders import resolve_encoder
    from dualner.model import _accepts_pooling_flag
    config = AutoConfig.from_pretrained(resolve_encoder(encoder))
    with torch.device("meta"):  # as DualNER builds it: BERT-family encoders without their pooler
        model = AutoModel.from_config(config, **({"add_pooling_layer": False} if _accepts_pooling_flag(config) else {}))
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for name, p in model.named_parameters() if "embeddings" in name)
    return {"model_type": config.model_type, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
            "parameters": total, "embedding_parameters": embedding, "non_embedding_parameters": total - embedding}


def mfu(tokens_per_s: float, parameters: dict, peak: float | None) -> dict | None:
    """Model FLOPs utilisation with the usual 6N FLOPs per trained token (N: non-embedding
    parameters; the three small heads and attention scores are left out, so this is a floor)."""
    if not peak:
        return None
    flops = 6 * parameters["non_embedding_parameters"]
    return {"flops_per_token": flops, "peak_flops": peak, "mfu": tokens_per_s * flops / peak}


def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M")
