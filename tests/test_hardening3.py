"""Hardening, round 3 (issue 18): no setting loses a run, what the user asked for is what runs, every
refusal writes nothing. Each test is a row of the README's fault table; the numbers are the issue's.

In-process where the behaviour is the library's (fast), through `python -m dualner` where it is the
command line's (exit codes, one-line errors)."""

import hashlib
import json
import shutil

import pytest

from dualner.checkpoint import (COMPLETE_MARKER, CheckpointManager, checkpoint_choice, prunable, resolve_checkpoint,
                                write_json_atomic)
from dualner.config import load_config
from dualner.errors import (CheckpointError, ConfigError, DataFormatError, MissingPathError,
                            UserError)
from dualner.run_layout import RunLayout
from dualner.stage1 import build_stage1, run_stage1
from dualner.data.stage2_inputs import check_translation_pairs
from dualner.stage2 import adopt_stage1_encoder, build_stage2, warn_if_unfinished
from tests.conftest import REPO
# one set of run helpers for both hardening files: the tiny run's overrides, `python -m dualner`, one-line errors
from tests.test_hardening import cli, config, one_line_error

ZERO3 = f"engine.config={REPO / 'ds_configs' / 'zero3_fp32.json'}"


def snapshot(folder):
    """Every file's bytes under `folder` (config, TensorBoard, checkpoints, universal/, logs)."""
    if not folder.exists():
        return None
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}



@pytest.fixture(scope="module")
def populated(tmp_path_factory, tiny_encoder):
    """A finished stage-1 run: config.yaml, model/, checkpoints step-2 and step-4, best.json,
    tensorboard/, losses.jsonl, results.json."""
    output = tmp_path_factory.mktemp("round3") / "run"
    run_stage1(config(output))
    return output


def copy_of(run, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(run, target)
    return target


# -- 1. retention never removes the best or the newest complete checkpoint -------------------------
def fake_checkpoints(root, steps, best=None):
    for step in steps:
        (root / f"step-{step}").mkdir(parents=True)
        (root / f"step-{step}" / COMPLETE_MARKER).write_text("{}")
    if best is not None:
        write_json_atomic(root / "best.json", {"step": best, "path": f"step-{best}"})


@pytest.mark.parametrize("keep_last, best, kept", [
    (0, 2, [2, 8]), (0, None, [8]), (0, 8, [8]), (1, 4, [4, 8]), (2, 2, [2, 6, 8]), (5, 2, [2, 4, 6, 8])])
def test_retention_keeps_the_best_and_the_newest(tmp_path, keep_last, best, kept):
    root = tmp_path / "checkpoints"
    fake_checkpoints(root, [2, 4, 6, 8], best)
    assert sorted(int(p.name[5:]) for p in prunable(root, keep_last)) == sorted({2, 4, 6, 8} - set(kept))
    CheckpointManager(tmp_path, keep_last, 2).prune()
    assert sorted(int(p.name[5:]) for p in root.glob("step-*")) == kept


def test_keep_last_0_keeps_best_and_newest_and_the_run_exports(tmp_path, tiny_encoder):
    output = tmp_path / "run"
    summary = run_stage1(config(output, "train.keep_last=0", "train.max_steps=6"))
    steps = sorted(int(p.name[5:]) for p in (output / "checkpoints").glob("step-*"))
    best = json.loads((output / "checkpoints" / "best.json").read_text())["step"]
    assert steps == sorted({best, 6}) and summary["steps"] == 6 and "test" in summary
    assert resolve_checkpoint(output).name == f"step-{best}"


# -- 2-4. run-folder semantics --------------------------------------------------------------------
def test_overwrite_starts_a_new_run_and_moves_the_old_one_aside(populated, tmp_path, capfd):
    run = copy_of(populated, tmp_path)
    (run / "profile").mkdir()  # an earlier run's profile.steps: moved with it, not left for the new run
    (run / "profile" / "summary_rank0.json").write_text("{}")
    before = snapshot(run)
    capfd.readouterr()
    summary = run_stage1(config(run, "run.overwrite=true", "train.max_steps=2", "data.max_length=32"))
    log = capfd.readouterr().out
    assert "resumed from" not in log and "moved the earlier run's files" in log
    assert summary["steps"] == 2
    (aside,) = tmp_path.glob("run.old-*")
    assert snapshot(aside) == before  # the old run, whole, under its new name
    assert not (run / "profile").exists()
    assert [json.loads(line)["step"] for line in (run / "losses.jsonl").read_text().splitlines()] == [1, 2]
    assert "max_length: 32" in (run / "config.yaml").read_text()
    assert len(RunLayout(run).config_history.read_text().splitlines()) == 1


def test_other_train_settings_resume_and_are_recorded(populated, tmp_path, capfd):
    run = copy_of(populated, tmp_path)
    saved = (run / "config.yaml").read_text()
    capfd.readouterr()
    run_stage1(config(run, "train.lr=0.5", "train.max_steps=6"))
    log = capfd.readouterr().out
    assert "resumed from" in log and "train.lr 0.001 -> 0.5" in log and "train.max_steps 4 -> 6" in log
    assert (run / "config.yaml").read_text() == saved  # the settings the run started with
    history = [json.loads(line) for line in RunLayout(run).config_history.read_text().splitlines()]
    assert history[-1]["from_step"] == 4 and history[-1]["changes"]["train.lr"] == [0.001, 0.5]
    assert history[-1]["config"]["train"]["lr"] == 0.5
    steps = [json.loads(line)["step"] for line in (run / "losses.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # one run, continued


def test_resume_from_a_named_step(populated, tmp_path, capfd):
    run = copy_of(populated, tmp_path)
    capfd.readouterr()
    run_stage1(config(run, "run.resume=step-2", "run.overwrite=true"))  # over step-4: tests/test_hardening4_folders.py
    assert f"resumed from {run / 'checkpoints' / 'step-2'} at step 2" in capfd.readouterr().out


def test_leftovers_of_a_start_that_never_checkpointed_go_aside(tmp_path, tiny_encoder):
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "losses.jsonl").write_text('{"step": 1, "loss/total": 9.0}\n')
    (run / "config.yaml").write_text("train: {lr: 0.7}\n")
    (run / "notes.txt").write_text("mine")  # not a run file: stays
    run_stage1(config(run, "train.max_steps=2"))
    assert [json.loads(line)["step"] for line in (run / "losses.jsonl").read_text().splitlines()] == [1, 2]
    (aside,) = tmp_path.glob("run.old-*")
    assert "9.0" in (aside / "losses.jsonl").read_text() and (run / "notes.txt").read_text() == "mine"


# -- 7. every refusal decided before anything is written -------------------------------------------
def stage2(output, *overrides, init_from=None):
    return build_stage2(config(output, f"stage2.init_from={init_from}", *overrides, file="tiny_stage2.yaml"))


REFUSALS = {  # name: (builder, overrides, where, environment, message)
    "resume a step that does not exist": (build_stage1, ["run.resume=step-999"], "run", {},
                                          r"run.resume=step-999: no such step; the run has step-2, step-4"),
    "resume=none on a finished run": (build_stage1, ["run.resume=none"], "run", {},
                                      r"run.resume=none: .* holds a finished run .*run.overwrite=true"),
    "other model settings": (build_stage1, ["model.dropout=0.3"], "run", {},
                             r"holds another run .*model.dropout 0.1 -> 0.3"),
    "other data settings": (build_stage1, ["data.max_length=32"], "run", {}, r"holds another run .*data.max_length"),
    "ZeRO-stage change on resume": (build_stage1, [ZERO3], "run", {},
                                    r"written under ZeRO stage 0, but engine.config=.*zero3_fp32.json is stage 3"),
    "max_length above the positions, with overwrite": (build_stage1, ["data.max_length=1000", "run.overwrite=true"],
                                                       "run", {}, r"data.max_length=1000 is more than .* 512"),
    "max_length above the positions": (build_stage1, ["data.max_length=1000"], "fresh", {},
                                       r"data.max_length=1000 is more than model.encoder=tiny-random"),
    "global batch larger than the data": (build_stage1, ["train.global_batch_size=100000"], "run", {},
                                          r"train.global_batch_size=100000 sentences is more than the training data"),
    "malformed fault under the test switch": (build_stage1, [], "run",
                                              {"DUALNER_FAULT": "garbage"},
                                              r"DUALNER_FAULT='garbage': expected KIND:rank=R:step=S"),
    "missing dev file": (build_stage1, ["data.dev.xx=/no/such/dev.tsv"], "fresh", {}, r"data.dev.xx: data file not found"),
    "data file that is a folder": (build_stage1, [f"data.dev.xx={REPO / 'data'}"], "fresh", {}, r"is a folder"),
    "fp16 on a CPU": (build_stage1, [f"engine.config={REPO / 'ds_configs' / 'zero2_fp16.json'}"], "run", {},
                      r"fp16 does not run on a CPU"),
    "stage 2 into the stage-1 folder": (stage2, [], "run", {}, r"run.output_dir=.* is the stage-1 run .* that "
                                                               r"stage2.init_from=.* starts from"),
    "stage 2 into the stage-1 folder, with overwrite": (stage2, ["run.overwrite=true"], "run", {},
                                                        r"stage 2 writes a folder of its own \(run.overwrite does not"),
    "stage 2 with another encoder": (stage2, ["model.encoder=multilingual-e5-small"], "fresh", {},
                                     r"model.encoder=multilingual-e5-small: stage 2 continues the model"),
    "stage 2 target that is a folder": (stage2, [f"stage2.target={{de: {REPO / 'data'}}}"], "fresh", {},
                                        r"stage2.target.de: .* is a folder"),
    "stage 2 max_length above the positions": (stage2, ["data.max_length=1000"], "fresh", {},
                                               r"data.max_length=1000 is more than the stage-1 model's encoder"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_every_refusal_leaves_the_folder_untouched(populated, tmp_path, monkeypatch, name):
    builder, overrides, where, environment, message = REFUSALS[name]
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    fresh = tmp_path / "fresh"
    before = snapshot(populated)
    output = populated if where == "run" else fresh
    with pytest.raises(UserError, match=message):
        if builder is stage2:
            stage2(output, *overrides, init_from=populated)
        else:
            builder(config(output, *overrides))
    assert snapshot(populated) == before
    assert not fresh.exists() and not list(populated.parent.glob("run.old-*"))


# -- 8. raw tracebacks -> one line --------------------------------------------------------------------
def test_fault_injection_is_a_test_hook_only(monkeypatch):
    import fault_injection as faults  # tests/hooks, on the path through tests/conftest.py (the package
    # never reads DUALNER_FAULT: tests/test_structure.py)
    monkeypatch.setenv("DUALNER_FAULT", "garbage")
    with pytest.raises(ConfigError, match="DUALNER_FAULT='garbage'"):
        faults.check()
    for spec in ("nan:rank=0", "boom:rank=0:step=1", "nan:rank=x:step=1"):
        monkeypatch.setenv("DUALNER_FAULT", spec)
        with pytest.raises(ConfigError, match="expected KIND:rank=R:step=S"):
            faults.check()
    monkeypatch.setenv("DUALNER_FAULT", "nan:rank=0:step=3")
    faults.check()
    assert faults.planned() == ("nan", 0, 3)
    monkeypatch.delenv("DUALNER_FAULT")
    faults.check()


def test_predict_output_problems_are_one_line_before_the_model_loads(populated, tmp_path):
    from dualner.predict import predict_file
    source = tmp_path / "in.txt"
    source.write_text("Paris is nice\n")
    with pytest.raises(MissingPathError, match=r"--output: the folder .*missing does not exist"):
        predict_file(populated, source, tmp_path / "missing" / "out.jsonl")
    with pytest.raises(ConfigError, match=r"--output: .* is a folder; name the file"):
        predict_file(populated, source, tmp_path)
    with pytest.raises(ConfigError, match=r"is the --input file"):
        predict_file(populated, source, source)
    with pytest.raises(MissingPathError, match=r"--input: .* is a folder"):
        predict_file(populated, tmp_path, tmp_path / "out.jsonl")
    assert source.read_text() == "Paris is nice\n" and not list(tmp_path.glob(".*partial*"))


def test_predict_device_batch_size_and_head_are_checked(populated, tmp_path):
    import torch
    from dualner.predict import Predictor
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"--device cuda: this machine has no CUDA device; use --device cpu"):
            Predictor(populated, device="cuda")
    with pytest.raises(ConfigError, match=r"--device 'gpu0': not a device"):
        Predictor(populated, device="gpu0")
    with pytest.raises(ConfigError, match=r"--batch-size 0"):
        Predictor(populated, batch_size=0)
    cla = copy_of(populated, tmp_path)
    assets = cla / "model" / "dualner.json"
    assets.write_text(assets.read_text().replace('"variant": "mlt"', '"variant": "cla"'))
    with pytest.raises(ConfigError, match=r"--head span: this model \(variant cla\) never trained that head"):
        Predictor(cla, head="span", device="cpu")


def test_command_line_one_liners(populated, tmp_path):
    assert cli("--help").returncode == 0
    line = one_line_error(cli("predict", "--model", str(populated), "--input", str(REPO / "README.md"),
                              "--output", str(tmp_path / "no" / "out.jsonl")))
    assert "--output: the folder" in line
    line = one_line_error(cli("stage1", "--config", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={tmp_path / 'r'}",
                              env={"DUALNER_FAULT": "garbage"}))
    assert "DUALNER_FAULT='garbage'" in line and not (tmp_path / "r").exists()


# -- 4. limits from the encoder; predict windows long sentences ------------------------------------
def test_window_limit_follows_the_encoder_family():
    from transformers import BertConfig, XLMRobertaConfig
    from dualner.limits import check_max_length, window_limit
    assert window_limit(XLMRobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert window_limit(BertConfig(max_position_embeddings=512)) == 512
    check_max_length(512, BertConfig(max_position_embeddings=512), "model.encoder=x")
    with pytest.raises(ConfigError, match=r"data.max_length=513 is more than model.encoder=x can hold"):
        check_max_length(513, BertConfig(max_position_embeddings=512), "model.encoder=x")


def test_predict_windows_a_long_sentence_even_with_a_saved_length_beyond_the_positions(populated, tmp_path):
    from dualner.predict import predict_file
    run = copy_of(populated, tmp_path)
    assets = run / "model" / "dualner.json"
    meta = json.loads(assets.read_text())
    assets.write_text(json.dumps({**meta, "max_length": 1000}))  # what an older version accepted
    source = tmp_path / "long.txt"
    source.write_text(" ".join(["Paris"] * 5000) + "\nBerlin\n")
    output = tmp_path / "out.jsonl"
    assert predict_file(run, source, output, device="cpu") == 2
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines[0]["tokens"]) == 5000 and all(e["end"] <= 5000 for e in lines[0]["entities"])


# -- 9. misleading messages -------------------------------------------------------------------------
def test_help_exits_0():
    from dualner.cli import dispatch
    assert dispatch(["--help"]) == 0 and dispatch(["-h"]) == 0


def test_report_tells_a_missing_folder_from_an_unfinished_run(populated, tmp_path):
    from dualner.report import main
    with pytest.raises(MissingPathError, match=r"nope: no such run folder"):
        main([str(tmp_path / "nope")])
    stopped = copy_of(populated, tmp_path)
    (stopped / "results.json").unlink()
    (stopped / "stopped.json").write_text('{"step": 2}')
    with pytest.raises(MissingPathError, match=r"stopped before its last step"):
        main([str(stopped)])
    (stopped / "stopped.json").unlink()
    with pytest.raises(MissingPathError, match=r"no results yet: the run has not finished"):
        main([str(stopped)])
    (tmp_path / "plain").mkdir()
    with pytest.raises(MissingPathError, match=r"not a DualNER run folder"):
        main([str(tmp_path / "plain")])


def test_a_data_path_that_is_a_folder_says_so(tmp_path):
    from dualner.data.sources import read_labeled
    with pytest.raises(MissingPathError, match=r"data.train.en: .* is a folder, not a data file"):
        read_labeled({"en": str(tmp_path)}, "data.train")


def test_dualner_cache_that_is_a_file_names_the_variable(tmp_path, monkeypatch):
    from dualner.encoders import default_cache_dir
    (tmp_path / "cache").write_text("x")
    monkeypatch.setenv("DUALNER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"DUALNER_CACHE=.*cache: .* is a file, not a folder"):
        default_cache_dir()
    monkeypatch.setenv("DUALNER_CACHE", str(tmp_path / "cache" / "below"))
    with pytest.raises(ConfigError, match=r"DUALNER_CACHE="):
        default_cache_dir()


def test_disk_full_in_a_save_names_the_step_and_the_path(tmp_path):
    class FullDisk:
        def save(self, root, tag, state):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: basic_ios::clear")

    with pytest.raises(CheckpointError, match=r"checkpoint step-7 \(.*checkpoints/step-7\) not saved: a write "
                                              r"failed .* disk is probably full"):
        CheckpointManager(tmp_path, 2, 1).save(FullDisk(), 7, {})


def test_override_errors_do_not_blame_the_yaml_file(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_config(REPO / "configs" / "tiny.yaml", ["train.lrr=1"])
    assert "tiny.yaml" not in str(raised.value) and "(command-line override)" in str(raised.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lrr: 1}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.lrr'"):
        load_config(bad, ["train.lr=0.1"])


# -- 10. silent cases ---------------------------------------------------------------------------------
def test_export_without_best_json_says_which_checkpoint(populated, tmp_path):
    run = copy_of(populated, tmp_path)
    assert "its best checkpoint (best.json)" in checkpoint_choice(run)
    (run / "checkpoints" / "best.json").unlink()
    assert checkpoint_choice(run).startswith("step-4 of") and "the run has no best.json" in checkpoint_choice(run)


def test_stage2_takes_the_stage1_encoder_and_refuses_another(populated):
    cfg = load_config(REPO / "configs" / "tiny_stage2.yaml", [f"stage2.init_from={populated}"])
    cfg.model.encoder = "xlm-roberta-base"  # the default: left unset in a stage-2 config
    adopt_stage1_encoder(cfg)
    assert cfg.model.encoder == "tiny-random"
    cfg.model.encoder = "./some/other/encoder"
    with pytest.raises(ConfigError, match=r"model.encoder=./some/other/encoder: stage 2 continues the model"):
        adopt_stage1_encoder(cfg)


def test_stage2_from_an_unfinished_stage1_run_says_so(populated, tmp_path):
    messages = []

    class Log:
        def warning(self, message, *args):
            messages.append(message % args)

    run = copy_of(populated, tmp_path)
    warn_if_unfinished(str(run), resolve_checkpoint(run), Log())
    assert messages == []
    (run / "results.json").unlink()
    warn_if_unfinished(str(run), resolve_checkpoint(run), Log())
    (run / "checkpoints" / "best.json").unlink()
    warn_if_unfinished(str(run), resolve_checkpoint(run), Log())
    assert "has not finished (no results.json)" in messages[0] and "no best checkpoint" in messages[1]


def test_translations_without_src_id_are_refused_under_parallel_mse(tmp_path):
    from dualner.data.conll import Sentence
    from dualner.data.source_kinds import open_sources
    source = ([Sentence(["Paris"], ["B-LOC"], "en", "0"), Sentence(["Bob"], ["B-PER"], "en", "1")], [])
    missing = tmp_path / "de.jsonl"
    missing.write_text(json.dumps({"tokens": ["Paris"]}) + "\n")
    with pytest.raises(ConfigError, match=r"stage2.translations.de: .*de.jsonl@0: no src_id"):
        check_translation_pairs(open_sources([str(missing)], "k"), "stage2.translations.de", source)
    strangers = tmp_path / "fr.jsonl"
    strangers.write_text(json.dumps({"tokens": ["Paris"], "src_id": "s-17"}) + "\n")
    with pytest.raises(ConfigError, match=r"none of the first 1 src_ids names a labeled source sentence"):
        check_translation_pairs(open_sources([str(strangers)], "k"), "stage2.translations.fr", source)
    text = tmp_path / "es.txt"
    text.write_text("Paris\n")
    with pytest.raises(ConfigError, match=r"only JSONL records carry"):
        check_translation_pairs(open_sources([str(text)], "k"), "stage2.translations.es", source)
    good = tmp_path / "it.jsonl"
    good.write_text(json.dumps({"tokens": ["Parigi"], "src_id": "0"}) + "\n")
    check_translation_pairs(open_sources([str(good)], "k"), "stage2.translations.it", source)


# -- the readers: what real files carry ----------------------------------------------------------------
READER_CASES = {
    "byte-order mark": ("\ufeffParis\tB-LOC\nis\tO\n", [["Paris", "is"]], [["B-LOC", "O"]]),
    "CRLF line ends": ("Paris\tB-LOC\r\nis\tO\r\n\r\nBob\tB-PER\r\n", [["Paris", "is"], ["Bob"]], None),
    "old Mac CR line ends": ("Paris\tB-LOC\ris\tO\r\rBob\tB-PER\r", [["Paris", "is"], ["Bob"]], None),
    "spaces instead of a tab": ("Paris B-LOC\nis   O\n", [["Paris", "is"]], [["B-LOC", "O"]]),
    "-DOCSTART- lines": ("-DOCSTART- -X- -X- O\n\nParis\tB-LOC\n\n-DOCSTART-\tO\nBob\tB-PER\n", [["Paris"], ["Bob"]], None),
    "trailing whitespace and tab": ("Paris \tB-LOC \nis\tO\t\n", [["Paris", "is"]], [["B-LOC", "O"]]),
    "whitespace-only line": ("Paris\tB-LOC\n \t  \nBob\tB-PER\n", [["Paris"], ["Bob"]], None),
    "zero-width-only line and tag": ("Paris\tB-LOC\u200b\n\u200b\nBob\tB-PER\n", [["Paris"], ["Bob"]], None),
    "no final newline": ("Paris\tB-LOC", [["Paris"]], None),
    "IOBES and lower-case tags": ("New\tb-LOC\nYork\tE-LOC\nBob\tS-PER\nsays\to\n", [["New", "York", "Bob", "says"]],
                                  [["B-LOC", "I-LOC", "B-PER", "O"]]),
    "a very long line": ("P" * 200_000 + "\tB-LOC\n", [["P" * 200_000]], None),
    "language prefix only when the file has one": ("ftp://x\tO\n\nParis\tB-LOC\nis\tO\n", [["ftp://x"], ["Paris", "is"]],
                                                    None),
}


@pytest.mark.parametrize("name", list(READER_CASES))
def test_conll_reader_reads_real_world_files_as_meant(tmp_path, name):
    from dualner.data.conll import read_conll
    text, words, tags = READER_CASES[name]
    path = tmp_path / "data.tsv"
    path.write_bytes(text.encode())
    sentences = read_conll(path)
    assert [s.words for s in sentences] == words
    if tags is not None:
        assert [s.tags for s in sentences] == tags


@pytest.mark.parametrize("content, message", [
    (b"Par\x00is\tB-LOC\n", r"data.tsv:1: a NUL byte at byte 3"),
    ("Paris\tB-LOC\n".encode("utf-16"), r"data.tsv: not UTF-8 text \(a UTF-16 byte-order mark"),
    (b"a\tO\n" * 3000 + "Z\u00fcrich\tB-LOC\n".encode("latin-1"), r"not UTF-8 text \(invalid .* at byte 12001, line 3001\)"),
    (b"\n \n\n", r"data.tsv: holds no sentence"),
    (b"-DOCSTART- -X- -X- O\n\n", r"data.tsv: holds no sentence"),
    (b"EU NNP B-NP B-ORG\n", r"data.tsv:1: expected .token<TAB>label., found 4 column\(s\).*keep only the token"),
    (b"Paris\tB_LOC\n", r"data.tsv:1: unknown tag 'B_LOC'"),
])
def test_conll_reader_refuses_what_it_cannot_read_naming_the_line(tmp_path, content, message):
    from dualner.data.conll import read_conll
    path = tmp_path / "data.tsv"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=message):
        read_conll(path)


def test_predict_reads_a_byte_order_mark_and_docstart_as_meant(tmp_path):
    from dualner.predict import read_input
    text = tmp_path / "in.txt"
    text.write_bytes("\ufeffAngela Merkel\nBerlin\n".encode())
    assert list(read_input(text)) == [["Angela", "Merkel"], ["Berlin"]]
    conll = tmp_path / "in.conll"
    conll.write_bytes(b"-DOCSTART- -X- O O\r\n\r\nAngela B-PER\r\nMerkel\r\n")
    assert list(read_input(conll)) == [["Angela", "Merkel"]]


def test_batch_size_flags_take_positive_numbers():
    import argparse
    from dualner.cli import _positive
    assert _positive("--batch-size")("8") == 8
    for text in ("0", "-3", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="--batch-size"):
            _positive("--batch-size")(text)


def test_a_finished_run_whose_checkpoints_are_gone_is_not_silently_retrained(populated, tmp_path):
    run = copy_of(populated, tmp_path)
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=r"holds a finished run but no checkpoint to continue from"):
        build_stage1(config(run))
    assert snapshot(run) == before


def test_a_checkpoint_tells_its_zero_stage(tmp_path):
    from dualner.backend.deepspeed_config import checkpoint_zero_stage
    from dualner.checkpoint import completion_record
    recorded = tmp_path / "step-2"
    recorded.mkdir()
    (recorded / COMPLETE_MARKER).write_text(json.dumps({"step": 2, "zero_stage": 2, "files": {}}))
    assert checkpoint_zero_stage(completion_record(recorded), recorded) == 2
    older = tmp_path / "step-4"  # written before the stage was recorded: ZeRO-3 by its file names
    older.mkdir()
    (older / COMPLETE_MARKER).write_text(json.dumps({"step": 4, "files": {}}))
    assert checkpoint_zero_stage(completion_record(older), older) is None
    (older / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    assert checkpoint_zero_stage(completion_record(older), older) == 3
