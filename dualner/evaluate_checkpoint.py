"""Evaluate a saved model on labeled files, on one or many ranks (the evaluate launcher's body)."""

from __future__ import annotations

from pathlib import Path

from dualner.backend.comm import accelerator_device, init_distributed
from dualner.checkpoint import write_json_atomic
from dualner.config import evaluation_head
from dualner.data.encoding import WindowTokenizer
from dualner.evaluate import evaluate_sets, format_table, load_eval_sets
from dualner.model_io import inference_collator, load_trained_model
from dualner.logging import get_logger


def evaluate_checkpoint(checkpoint: str | Path, data: dict[str, str], output: str | Path | None,
                        head: str = "auto", batch_size: int = 64, max_sentences: int | None = None) -> dict:
    info = init_distributed()
    log = get_logger()
    device = accelerator_device(info.local_rank)
    loaded = load_trained_model(checkpoint)
    head = evaluation_head(loaded.variant, head)
    model = loaded.model.to(device)
    encoder = WindowTokenizer(loaded.tokenizer, loaded.label_set, loaded.max_length)
    eval_sets = load_eval_sets(data, "--data", encoder, loaded.label_set, max_sentences)
    results = evaluate_sets(model, eval_sets, loaded.label_set, head, batch_size,
                            inference_collator(loaded, device), device)
    if info.is_main:
        log.info("%s (%s head):\n%s", loaded.checkpoint, head, format_table(results, "F1"))
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(output), results)
    return results
