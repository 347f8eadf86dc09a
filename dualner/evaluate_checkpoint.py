"""Evaluate a saved model on labeled files, on one or many ranks (the evaluate launcher's body)."""

from __future__ import annotations

import json
from pathlib import Path

from dualner.backend.comm import accelerator_device, init_distributed
from dualner.checkpoint import choice_without_best, write_json_atomic
from dualner.config import evaluation_head
from dualner.errors import ConfigError
from dualner.data.encoding import WindowTokenizer
from dualner.evaluate import evaluate_sets, format_table, load_eval_sets
from dualner.model_io import inference_collator, load_trained_model
from dualner.logging import get_logger


def check_results_output(output: Path, data: dict[str, str], overwrite: bool) -> None:
    """Before the model loads: --output is a file to write, neither a --data file nor a file of
    another kind (an earlier evaluation's results are replaced; anything else only with --overwrite)."""
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; name the JSON file to write (e.g. {output / 'f1.json'})")
    if not output.is_file():
        return
    if any(Path(path).exists() and Path(path).resolve() == output.resolve() for path in data.values()):
        raise ConfigError(f"--output {output} is a --data file; the results would replace it: choose another --output")
    try:
        earlier = json.loads(output.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        earlier = None
    if not overwrite and not (isinstance(earlier, dict) and "per_language" in earlier):
        raise ConfigError(f"--output {output} exists and is not an earlier evaluation's results; choose another "
                          f"--output, or add --overwrite to replace it")


def evaluate_checkpoint(checkpoint: str | Path, data: dict[str, str], output: str | Path | None,
                        head: str = "auto", batch_size: int = 64, max_sentences: int | None = None,
                        overwrite: bool = False) -> dict:
    info = init_distributed()
    log = get_logger()
    device = accelerator_device(info.local_rank)
    if output:
        check_results_output(Path(output), data, overwrite)
    loaded = load_trained_model(checkpoint)
    fallback = choice_without_best(checkpoint)
    if fallback:  # an unfinished run (or one without dev sets): not the model selection would pick
        log.warning("--checkpoint %s has no best checkpoint recorded; evaluating %s (name a step-N folder to "
                    "choose another)", checkpoint, fallback)
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
