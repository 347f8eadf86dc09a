"""The catalogue of bad inputs: each is refused with an error naming the file and line, the key or
the path, and leaves existing outputs untouched. (Reader-level cases: tests/test_data.py; config
and DeepSpeed JSON: tests/test_config.py; corpora: tests/test_streaming.py.)"""

import hashlib
import json

import pytest

from dualner.checkpoint import CheckpointError
from dualner.config import ConfigError, load_config
from dualner.data.conll import DataFormatError, read_conll
from dualner.stage1 import build_stage1, run_stage1
from dualner.stage2 import build_stage2
from tests.conftest import REPO

TINY = ["train.max_steps=2", "data.max_train_sentences=64", "data.max_eval_sentences=8",
        f"engine.config={REPO / 'ds_configs' / 'zero0_fp32.json'}"]


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def config(output, *overrides, file="tiny.yaml"):
    return load_config(REPO / "configs" / file, [f"run.output_dir={output}", *TINY, *overrides])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_encoder):
    output = tmp_path_factory.mktemp("bad") / "run"
    run_stage1(config(output))
    return output


def test_output_dir_holding_another_run_is_refused_untouched(finished_run):
    before = snapshot(finished_run)
    with pytest.raises(ConfigError, match=r"holds another run .* section\(s\) model"):
        build_stage1(config(finished_run, "model.dropout=0.3"))
    assert snapshot(finished_run) == before


def test_eval_data_with_other_entity_types(tmp_path, tiny_encoder):
    dev = tmp_path / "dev.tsv"
    dev.write_text("Bob\tB-PER\n\nIBM\tB-ORG\nWatson\tI-MISC\n")
    with pytest.raises(DataFormatError, match=r"data.dev.xx: .*dev.tsv:3: entity type 'MISC' is not one"):
        build_stage1(config(tmp_path / "run", f"data.dev.xx={dev}"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_missing_model_path_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.encoder: no such folder ./no/such/model"):
        build_stage1(config(tmp_path / "run", "model.encoder=./no/such/model"))


def test_tokenizer_that_does_not_match_the_model(tmp_path, tiny_encoder):
    from dualner.encoders.tiny import build_tokenizer
    build_tokenizer(vocab_size=6000).save_pretrained(tmp_path / "big-tokenizer")
    with pytest.raises(ConfigError, match=r"model.tokenizer: .*big-tokenizer has \d+ tokens but the encoder"):
        build_stage1(config(tmp_path / "run", f"model.tokenizer={tmp_path / 'big-tokenizer'}"))


def test_missing_training_file_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.train.en: data file not found: .*missing.tsv"):
        build_stage1(config(tmp_path / "run", f"data.train.en={tmp_path / 'missing.tsv'}"))


def test_batch_sizes_that_do_not_divide(tmp_path):
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=6 does not divide the 16 sentences"):
        build_stage1(config(tmp_path / "run", "train.micro_batch_size=6"))


@pytest.mark.parametrize("init_from, message", [
    ("nowhere", "stage2.init_from: checkpoint not found: nowhere"),
    ("EMPTY", "stage2.init_from: .*empty: holds no complete step-N checkpoint"),
    ("FILE", "stage2.init_from: .*a-file: is a file, not a checkpoint; name a run folder"),
])
def test_stage2_needs_a_stage1_model(tmp_path, init_from, message):
    if init_from == "EMPTY":
        (tmp_path / "empty").mkdir()
        init_from = str(tmp_path / "empty")
    if init_from == "FILE":
        (tmp_path / "a-file").write_text("not a run\n")
        init_from = str(tmp_path / "a-file")
    with pytest.raises((FileNotFoundError, CheckpointError), match=message):
        build_stage2(config(tmp_path / "run", f"stage2.init_from={init_from}", file="tiny_stage2.yaml"))
    assert not (tmp_path / "run").exists()


def test_stage2_on_a_folder_without_model_assets(finished_run, tmp_path):
    import shutil
    copy = tmp_path / "not-dualner"
    shutil.copytree(finished_run / "checkpoints", copy / "checkpoints")
    with pytest.raises(CheckpointError, match=r"step-2: no model assets at .*\(not a DualNER run folder\)"):
        build_stage2(config(tmp_path / "run", f"stage2.init_from={copy}", file="tiny_stage2.yaml"))


def test_stage2_corpus_glob_that_matches_nothing(finished_run, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"stage2.target.de: .*nothing-\*.txt' matches no file"):
        build_stage2(config(tmp_path / "run", f"stage2.init_from={finished_run}",
                             f"stage2.target.de={tmp_path}/nothing-*.txt", file="tiny_stage2.yaml"))
    assert not (tmp_path / "run").exists()


def test_empty_sentences_are_skipped_not_errors(tmp_path):
    path = tmp_path / "gaps.tsv"
    path.write_text("\n\nParis\tB-LOC\n\n\n\nBob\tB-PER\n\n")
    assert [s.words for s in read_conll(path)] == [["Paris"], ["Bob"]]


def test_stage2_without_a_length(finished_run, tmp_path):
    """Refused by the one validation, after the stage-1 run of stage2.init_from gave its encoder (a
    stage2.init_from that does not exist is refused first, naming it: test_stage2_needs_a_stage1_model)."""
    with pytest.raises(ConfigError, match=r"stage 2's length: set train.max_steps \(optimizer steps\) or stage2.epochs"):
        build_stage2(load_config(REPO / "configs" / "tiny_stage2.yaml",
                                  [f"run.output_dir={tmp_path / 'run'}", f"stage2.init_from={finished_run}",
                                   "train.max_steps=null"]))
    assert not (tmp_path / "run").exists()


def test_results_of_a_finished_run_are_complete(finished_run):
    results = json.loads((finished_run / "results.json").read_text())
    assert results["steps"] == 2 and (finished_run / "checkpoints" / "best.json").is_file()
