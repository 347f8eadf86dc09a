"""Evaluate a saved model on labeled files, on one or many ranks (the evaluate launcher's body)."""

from __future__ import annotations

import json
from pathlib import Path

from dualner.backend.comm import accelerator_device, init_distributed
from dualner.checkpoint import choice_without_best, write_json_atomic
from dualner.config import check_head, evaluation_head
from dualner.data.encoding import WindowTokenizer
from dualner.evaluate import evaluate_sets, format_table, load_eval_sets
from dualner.model_io import inference_collator, load_any
from dualner.errors import ConfigError
from dualner.logging import get_logger
from dualner.run_layout import RunLayout


def check_output(output: Path, data: dict[str, str], overwrite: bool) -> None:
    """Before the model loads: --output is a file that can be written (its missing folders are
    created), neither a --data file nor one of a run's own records, nor a file of another kind (an
    earlier evaluation's results are replaced; anything else only with --overwrite)."""
    if output.is_dir():
        raise ConfigError(f"--output: {output} is a folder; name the JSON file to write (e.g. {output / 'f1.json'})")
    existing = next(folder for folder in output.parents if folder.exists())
    if not existing.is_dir():
        raise ConfigError(f"--output {output}: {existing} is a file, not a folder; choose another --output")
    for language, path in data.items():
        if output.exists() and Path(path).exists() and output.resolve() == Path(path).resolve():
            raise ConfigError(f"--output {output} is the --data file of {language}; evaluation would replace it: "
                              f"choose another --output")
    run = next((folder for folder in output.absolute().parents if RunLayout(folder).config.is_file()), None)
    if run is not None and (output.absolute().parent == run and output.name in RunLayout.ENTRIES
                            or {RunLayout(run).checkpoints, RunLayout(run).model} & set(output.absolute().parents)):
        raise ConfigError(f"--output {output} is one of the run's own records in {run}; evaluation would replace "
                          f"or join them: choose another name (e.g. {run / 'f1_test.json'})")
    if not output.is_file():
        return
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
    if output:
        check_output(Path(output), data, overwrite)
    info = init_distributed()
    log = get_logger()
    device = accelerator_device(info.local_rank)
    loaded = load_any(checkpoint, "--checkpoint")  # an exported folder too, as predict reads it
    fallback = choice_without_best(checkpoint)
    if fallback:  # an unfinished run (or one without dev sets): not the model selection would pick
        log.warning("--checkpoint %s has no best checkpoint recorded; evaluating %s (name a step-N folder to "
                    "choose another)", checkpoint, fallback)
    check_head(loaded.variant, head)
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
