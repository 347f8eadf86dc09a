"""Hardening, round 4, second probe (issue 25): run folders, encoder folders, export / predict /
evaluate / report and `config --check`. Each test is a row of the README's fault table; every refusal
is one line naming the file or key and writes nothing."""

import json
import re
import shutil
from pathlib import Path

import pytest

from dualner.errors import ConfigError, UserError
from dualner.stage1 import build_stage1
from dualner.stage2 import build_stage2
from tests.conftest import REPO
from tests.test_hardening import cli, config, one_line_error
from tests.test_hardening3 import copy_of, populated, snapshot  # noqa: F401  (populated: a fixture)


# -- 1. a damaged encoder folder: one line naming the file ---------------------------------------------------
def cut_short(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def as_pytorch_bin(folder: Path, keep: int | None = None) -> None:
    import torch
    from safetensors.torch import load_file
    weights = folder / "model.safetensors"
    torch.save(load_file(str(weights)), folder / "pytorch_model.bin")
    weights.unlink()
    if keep is not None:
        cut_short(folder / "pytorch_model.bin", keep)


DAMAGED_ENCODERS = {  # name: (damage done to a copy of the tiny encoder, the file named, what is said)
    "safetensors cut to its first 100 bytes": (lambda folder: cut_short(folder / "model.safetensors", 100),
                                              "model.safetensors", r" is not a whole safetensors file \(100 bytes"),
    "safetensors cut in half": (lambda folder: cut_short(folder / "model.safetensors", 300_000),
                                "model.safetensors", r" holds 300000 bytes but its header describes \d+ \(truncated\)"),
    "pytorch_model.bin cut short": (lambda folder: as_pytorch_bin(folder, 1000), "pytorch_model.bin",
                                    r" cannot be read as weights \(PytorchStreamReader failed"),
    "pytorch_model.bin of garbage": (lambda folder: (as_pytorch_bin(folder),
                                                     (folder / "pytorch_model.bin").write_bytes(b"garbage" * 10)),
                                     "pytorch_model.bin", r" cannot be read as weights"),
    "config.json not JSON": (lambda folder: (folder / "config.json").write_text("{not json"), "config.json",
                             r":1:2: not valid JSON \(Expecting property name"),
    "config.json a list": (lambda folder: (folder / "config.json").write_text("[]"), "config.json",
                           r" holds a JSON list, not an object"),
    "tokenizer.json cut short": (lambda folder: cut_short(folder / "tokenizer.json", 50), "tokenizer.json",
                                 r":\d+:\d+: not valid JSON \(Unterminated string"),
    "tokenizer_config.json binary": (lambda folder: (folder / "tokenizer_config.json").write_bytes(b"\xff\x00{"),
                                     "tokenizer_config.json", r" is not UTF-8 JSON \(byte 0\)"),
}


@pytest.mark.parametrize("name", list(DAMAGED_ENCODERS))
def test_a_damaged_encoder_folder_is_one_line_naming_the_file(tiny_encoder, tmp_path, name):
    damage, file_name, message = DAMAGED_ENCODERS[name]
    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_encoder, encoder)
    damage(encoder)
    output = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"model.encoder: {encoder / file_name}{message}.*the folder is "
                                          rf"damaged: copy or download it again"):
        build_stage1(config(output, f"model.encoder={encoder}"))
    assert not output.exists()


def test_a_truncated_encoder_is_one_line_on_the_command_line(tiny_encoder, tmp_path):
    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_encoder, encoder)
    cut_short(encoder / "model.safetensors", 100)
    result = cli("stage1", "--config", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={tmp_path / 'run'}",
                 f"model.encoder={encoder}", "train.max_steps=2")
    assert f"{encoder / 'model.safetensors'} is not a whole safetensors file" in one_line_error(result)
    assert not (tmp_path / "run").exists()


# -- 2. stage 2 never writes into (or moves aside) the stage-1 run it starts from ---------------------------
@pytest.mark.parametrize("where, init_from", [
    ("is", "run"), ("is", "step"), ("is inside", "run"), ("holds", "step"), ("is", "checkpoints")])
def test_stage2_refuses_an_output_folder_over_its_init_from_whatever_overwrite_says(populated, tmp_path, where,
                                                                                    init_from):
    run = copy_of(populated, tmp_path)
    output = {"is": run, "is inside": run / "stage2", "holds": tmp_path}[where]
    source = {"run": run, "step": run / "checkpoints" / "step-2", "checkpoints": run / "checkpoints"}[init_from]
    before = snapshot(tmp_path)
    for overwrite in ("false", "true"):
        with pytest.raises(ConfigError, match=rf"run.output_dir={output} {where} the stage-1 run {run} that "
                                              rf"stage2.init_from={source} starts from; stage 2 writes a folder of "
                                              rf"its own \(run.overwrite does not change this\), e.g. "
                                              rf"run.output_dir={run}-stage2"):
            build_stage2(config(output, f"stage2.init_from={source}", f"run.overwrite={overwrite}",
                                file="tiny_stage2.yaml"))
    assert snapshot(tmp_path) == before and not list(tmp_path.glob("*.old-*"))


def test_config_check_refuses_stage2_over_its_init_from(populated):
    line = one_line_error(cli("config", "--check", "--config", str(REPO / "configs" / "tiny_stage2.yaml"),
                              f"run.output_dir={populated}", f"stage2.init_from={populated}", "run.overwrite=true"))
    assert f"is the stage-1 run {populated} that stage2.init_from={populated} starts from" in line


# -- 4, 5. an exported folder: evaluated as predict reads it; a damaged one named ------------------------------
@pytest.fixture(scope="module")
def exported(populated, tmp_path_factory):
    from dualner.model_io import export_model
    return export_model(populated, tmp_path_factory.mktemp("round2") / "exported")


DEV = REPO / "data" / "panx-sample" / "en" / "dev.tsv"


def test_evaluate_reads_an_exported_folder_as_its_run(populated, exported):
    from dualner.evaluate_checkpoint import evaluate_checkpoint
    assert evaluate_checkpoint(exported, {"en": str(DEV)}, None, max_sentences=8) == \
        evaluate_checkpoint(populated, {"en": str(DEV)}, None, max_sentences=8)


DAMAGED_EXPORTS = {  # name: (damage, what is said)
    "config.json not JSON": (lambda folder: cut_short(folder / "config.json", 40),
                             r"config.json:\d+:\d+: not valid JSON"),
    "config.json without the entity types": (
        lambda folder: (folder / "config.json").write_text('{"model_type": "xlm-roberta"}'),
        r"config.json has no dualner_entity_types: not a folder written by `dualner export`"),
    "model.safetensors cut short": (lambda folder: cut_short(folder / "model.safetensors", 5000),
                                    r"model.safetensors holds 5000 bytes but its header describes"),
    "tokenizer.json cut short": (lambda folder: cut_short(folder / "tokenizer.json", 50),
                                 r"tokenizer.json:\d+:\d+: not valid JSON"),
}


@pytest.mark.parametrize("name", list(DAMAGED_EXPORTS))
def test_a_damaged_exported_folder_is_named_by_predict_and_evaluate(exported, tmp_path, name):
    from dualner.evaluate_checkpoint import evaluate_checkpoint
    from dualner.predict import predict_file
    damage, message = DAMAGED_EXPORTS[name]
    folder = copy_of(exported, tmp_path, "exported")
    damage(folder)
    source = tmp_path / "in.txt"
    source.write_text("Paris is nice\n")
    with pytest.raises(UserError, match=rf"--model {folder}\S* .*{message}.*export the run again"):
        predict_file(folder, source, tmp_path / "out.jsonl")
    with pytest.raises(UserError, match=rf"--checkpoint {folder}\S* .*{message}.*export the run again"):
        evaluate_checkpoint(folder, {"en": str(DEV)}, tmp_path / "f1.json", max_sentences=4)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["exported", "in.txt"]


def test_evaluate_of_an_exported_folder_on_the_command_line(exported, tmp_path):
    output = tmp_path / "f1.json"
    result = cli("evaluate", "--checkpoint", str(exported), "--data", f"en={DEV}", "--max-sentences", "4",
                 "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "per_language" in output.read_text()
    broken = copy_of(exported, tmp_path, "broken")
    cut_short(broken / "config.json", 40)
    line = one_line_error(cli("evaluate", "--checkpoint", str(broken), "--data", f"en={DEV}"))
    assert f"--checkpoint {broken} (an exported folder): {broken / 'config.json'}:" in line


# -- 3. report on a damaged results.json: a remedy that works ---------------------------------------------------
def test_reports_remedy_for_a_damaged_results_file_works(populated, tmp_path):
    import shlex
    run = copy_of(populated, tmp_path)
    (run / "results.json").write_text('{"test": {"per_la')
    line = one_line_error(cli("report", str(run)))
    assert f"{run / 'results.json'}: not a readable results file" in line
    move, command = re.search(r"move it aside \(mv (\S+ \S+)\) and run `([^`]+)`", line).groups()
    source, target = move.split()
    assert command.startswith("python -m dualner stage1 ")
    Path(source).rename(target)
    result = cli(*shlex.split(command)[3:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-4'} at step 4" in result.stdout
    report = cli("report", str(run))
    assert report.returncode == 0 and "| **average** |" in report.stdout, report.stderr[-3000:]


def test_reports_remedy_names_stage2_for_a_stage2_run(tmp_path):
    from dualner.report import main
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("stage2:\n  init_from: runs/stage1\n")
    (run / "results.json").write_text("[]")
    with pytest.raises(UserError, match=rf"a results file is a JSON object, found a list; move it aside .* run "
                                        rf"`python -m dualner stage2 --config {run / 'config.yaml'} "
                                        rf"run.output_dir={run}`"):
        main([str(run)])


def test_report_says_what_a_dash_means(populated, tmp_path, capsys):
    from dualner.report import main
    other = copy_of(populated, tmp_path)
    results = json.loads((other / "results.json").read_text())
    results["test"]["per_language"]["xx"] = 50.0
    (other / "results.json").write_text(json.dumps(results))
    main([str(populated), str(other)])
    table = capsys.readouterr().out
    assert "| xx | - | 50.00 |" in table
    assert "-: no test score: that run had no data.test set for the language" in table
    main([str(populated)])
    assert "no test score" not in capsys.readouterr().out


# -- 6. a moved run folder resumes where it stopped --------------------------------------------------------------
def test_a_moved_stage2_run_resumes_at_its_checkpoints_positions(populated, tmp_path, capfd):
    from dualner.stage2 import run_stage2
    first, moved = tmp_path / "a", tmp_path / "b"

    def stage2(output, steps):
        return config(output, f"stage2.init_from={populated}", f"train.max_steps={steps}", file="tiny_stage2.yaml")

    run_stage2(stage2(first, 2))
    first.rename(moved)  # mv runs/a runs/b
    capfd.readouterr()
    run_stage2(stage2(moved, 4))
    log = capfd.readouterr().out
    assert f"resumed from {moved / 'checkpoints' / 'step-2'} at step 2" in log
    assert "changed since the checkpoint" not in log  # its source file, stage2_data/, moved with it
    steps = [json.loads(line)["step"] for line in (moved / "losses.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# -- 7. config --check finds the missing files the job would refuse -----------------------------------------------
@pytest.mark.parametrize("config_file, overrides, message", [
    ("tiny.yaml", ["data.dev.xx=/no/such/dev.tsv"], r"data.dev.xx: data file not found: /no/such/dev.tsv"),
    ("tiny.yaml", [f"data.train.en={REPO / 'data'}"], r"data.train.en: .*data is a folder, not a data file"),
    ("tiny_stage2.yaml", ["stage2.target={de: /no/such/*.txt}"], r"stage2.target.de: '/no/such/\*.txt' matches no file"),
])
def test_config_check_refuses_a_data_file_that_does_not_exist(config_file, overrides, message):
    line = one_line_error(cli("config", "--check", "--config", str(REPO / "configs" / config_file), *overrides))
    assert re.search(message, line), line


def test_config_check_notes_a_stage1_run_not_made_yet(tmp_path):
    result = cli("config", "--check", "--config", str(REPO / "configs" / "tiny_stage2.yaml"),
                 f"stage2.init_from={tmp_path / 'stage1'}")
    assert result.returncode == 0 and result.stdout.startswith("ok: "), result.stderr[-3000:]
    assert f"note: stage2.init_from={tmp_path / 'stage1'} does not exist yet" in result.stderr


def test_config_check_refuses_a_max_length_beyond_the_encoders_positions(tiny_encoder):
    line = one_line_error(cli("config", "--check", "--config", str(REPO / "configs" / "tiny.yaml"),
                              f"model.encoder={tiny_encoder}", "data.max_length=1000"))
    assert "data.max_length=1000 is more than model.encoder=" in line and "set data.max_length=512 or less" in line


def test_config_check_refuses_one_file_under_two_keys(tmp_path):
    link = tmp_path / "de.tsv"
    link.symlink_to(REPO / "data" / "panx-sample" / "en" / "train.tsv")
    line = one_line_error(cli("config", "--check", "--config", str(REPO / "configs" / "tiny.yaml"),
                              f"data.train.de={link}"))
    assert "data.train.en and data.train.de name one file" in line and "trained twice" in line
