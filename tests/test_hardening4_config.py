"""Hardening, round 4 (issue 25): config files, `config --check` as the job checks, the tokenizer against
the encoder's embeddings, `report` on damaged results, `evaluate`'s arguments. Each refusal is one line,
exit 2, and writes nothing."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from dualner.config import ConfigError, load_config
from dualner.config_check import load_checked
from tests.conftest import REPO, child_env

STAGE1 = REPO / "configs" / "tiny.yaml"
FP32 = f"engine.config={REPO / 'ds_configs' / 'zero0_fp32.json'}"


def dualner(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dualner", *args], cwd=cwd, capture_output=True, text=True,
                          env=child_env(PYTHONPATH=str(REPO)), timeout=300)


def refused(result: subprocess.CompletedProcess, pattern: str) -> str:
    """The one error line of a refusal (exit 2, nothing on stdout, no traceback), matching `pattern`."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("dualner: error: ")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stdout == "", result.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def write(path, text: str | bytes):
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


# -- YAML files ---------------------------------------------------------------------------------------

YAML_FILES = {
    "a second train section": ("train:\n  global_batch_size: 16\n  max_steps: 12\nmodel:\n  variant: mlt\n"
                               "train:\n  lr: 1.0e-4\n",
                               r"c.yaml:6: duplicate key 'train' \(first at line 1\)"),
    "a key twice deep down": ("data:\n  train:\n    en: a.tsv\n    de: b.tsv\n    en: c.tsv\n",
                              r"c.yaml:5: duplicate key 'data.train.en' \(first at line 3\)"),
    "empty": ("", r"c.yaml is empty"),
    "only comments": ("# nothing set yet\n\n", r"c.yaml is empty"),
    "a tab for indentation": ("train:\n\tlr: 1.0e-4\n",
                              r"c.yaml:2:1: a tab: YAML does not allow tabs for indentation; use spaces$"),
    "a tab after a colon": ("train:\n  lr:\t1.0e-4\n", r"c.yaml:2:6: a tab where YAML needs a space"),
    "broken YAML": ("train: {lr: 1\n", r"c.yaml:2:1: not valid YAML: while parsing a flow mapping: expected ',' or '}'"),
    "a list": ("- train\n- data\n", r"c.yaml: a config is a YAML mapping of sections .* found a list"),
    "not UTF-8": (b"train:\n  lr: \xff\n", r"c.yaml: not UTF-8 text \(invalid start byte at byte 13\)"),
    "a DeepSpeed JSON given as the config": ((REPO / "ds_configs" / "zero0_fp32.json").read_text(),
                                             r"c.yaml is a DeepSpeed JSON, not an experiment config: give it as "
                                             r"engine.config="),
}


@pytest.mark.parametrize("name", list(YAML_FILES))
def test_a_damaged_yaml_file_is_one_line_naming_it(name, tmp_path):
    text, message = YAML_FILES[name]
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=message):
        load_checked(path, [])  # with the engines' rules: their own config files are told apart


def test_config_check_refuses_a_duplicate_section_in_one_line(tmp_path):
    """What `config --check` printed "ok" for: the second section replaced the first (batch 16 -> 128)."""
    text = STAGE1.read_text() + "train:\n  lr: 1.0e-4\n"
    path = write(tmp_path / "c.yaml", text)
    line = len(text.splitlines()) - 1
    first = STAGE1.read_text().splitlines().index("train:") + 1
    assert yaml.safe_load(text)["train"] == {"lr": 1e-4}  # what YAML alone makes of it: the first section lost
    refused(dualner("config", "--check", "--config", str(path)),
            rf"c.yaml:{line}: duplicate key 'train' \(first at line {first}\)")
    refused(dualner("config", "--config", str(path), "--get", "run.output_dir"), r"duplicate key 'train'")


def test_a_tab_is_one_line_not_pyyamls_four(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n\tlr: 1.0e-4\n")
    result = dualner("config", "--check", "--config", str(path))
    refused(result, r"c.yaml:2:1: a tab: YAML does not allow tabs for indentation; use spaces$")
    assert len(result.stderr.strip().splitlines()) == 1


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    """`<<: *anchor` then a key of the anchor: YAML's way of overriding, not a duplicate."""
    path = write(tmp_path / "c.yaml", "train: &base\n  lr: 1.0e-4\n  epochs: 2\neval:\n  batch_size: 8\n"
                                      "profile:\n  <<: {steps: 2, top: 5}\n  top: 7\n")
    cfg = load_config(path)
    assert cfg.profile.steps == 2 and cfg.profile.top == 7 and cfg.train.lr == 1e-4


def test_a_json_config_is_read_as_json(tmp_path):
    """JSON written by a tool (tab-indented: YAML refuses tabs) is read; its mistakes are JSON's."""
    path = write(tmp_path / "c.json", '{\n\t"train": {\n\t\t"lr": 0.5\n\t}\n}\n')
    assert load_config(path).train.lr == 0.5
    with pytest.raises(ConfigError, match=r"c.json: key 'lr' given twice in one object"):
        load_config(write(path, '{"train": {"lr": 1, "lr": 2}}'))
    with pytest.raises(ConfigError, match=r"c.json:1:20: not valid JSON: Expecting property name"):
        load_config(write(path, '{"train": {"lr": 1,}}'))
    with pytest.raises(ConfigError, match=r"c.json is empty"):
        load_config(write(path, "\n"))


def test_a_folder_as_the_config(tmp_path):
    refused(dualner("config", "--check", "--config", str(tmp_path)), r"--config .* is a folder; name a YAML file")


# -- config --check applies the job's rules: the stage and world size inferred --------------------------

def test_config_check_infers_the_stage_and_says_so():
    result = dualner("config", "--check", "--config", str(STAGE1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(stage 1 inferred: no stage2.init_from, target or translations" in result.stdout
    assert "1 rank(s) assumed" in result.stdout
    result = dualner("config", "--check", "--config", str(REPO / "configs" / "tiny_stage2.yaml"))
    assert result.returncode == 0 and "(stage 2 inferred: it sets stage2.init_from" in result.stdout, result.stderr


def test_every_shipped_config_is_inferred_its_stage_and_passes_on_one_rank():
    from dualner.config import inferred_stage
    for path in sorted((REPO / "configs").glob("*.yaml")):
        stage, _ = inferred_stage(load_config(path))
        assert stage == (2 if "stage2" in path.name or "dualner" in path.name else 1), path
        load_config(path, stage=stage, world_size=1)


CHECKED_AS_THE_JOB = {
    "no training data": (["data.train={}"], r"data.train: no labeled training file given .*\[config --check "
                                            r"assumed stage 1 inferred"),
    "a global batch no micro batch divides": (["train.global_batch_size=7", "train.micro_batch_size=2"],
                                              r"train.micro_batch_size=2 does not divide the 7 sentences each of 1 "
                                              r"rank.* assumed: --world-size N for another"),
    "a stage-2 config without its length": (["stage2.init_from=runs/tiny", "train.max_steps=null"],
                                            r"stage 2's length: .*\[config --check assumed stage 2 inferred: it "
                                            r"sets stage2.init_from"),
}


@pytest.mark.parametrize("name", list(CHECKED_AS_THE_JOB))
def test_config_check_without_stage_refuses_what_the_job_refuses(name):
    overrides, message = CHECKED_AS_THE_JOB[name]
    refused(dualner("config", "--check", "--config", str(STAGE1), *overrides), message)


def test_config_check_runs_deepspeeds_parser_without_stage(tmp_path):
    """A `bf_16` typo in the DeepSpeed JSON: refused by the job through DeepSpeed's parser, and now by
    `config --check` without --stage."""
    typo = write(tmp_path / "ds.json", (REPO / "ds_configs" / "zero0.json").read_text().replace('"bf16"', '"bf_16"'))
    refused(dualner("config", "--check", "--config", str(STAGE1), f"engine.config={typo}"),
            r"ds.json: unknown DeepSpeed key 'bf_16'; valid top-level keys: .*bf16")


def test_the_launcher_world_size_is_the_one_assumed():
    """Under srun (or torchrun's variables) config --check takes the job's world size, as the job does."""
    env = child_env(PYTHONPATH=str(REPO), SLURM_PROCID="0", SLURM_NTASKS="3")
    result = subprocess.run([sys.executable, "-m", "dualner", "config", "--check", "--config", str(STAGE1)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    refused(result, r"train.global_batch_size=16 is not divisible by the world size 3 .*3 rank\(s\) assumed")


def test_a_deepspeed_json_key_given_twice(tmp_path):
    twice = write(tmp_path / "ds.json", '{"zero_optimization": {"stage": 0, "stage": 2}}')
    with pytest.raises(ConfigError, match=r"ds.json: key 'stage' given twice in one object"):
        load_checked(STAGE1, [f"engine.config={twice}"], stage=1)


# -- overrides ------------------------------------------------------------------------------------------

OVERRIDES = {
    "a value that is not YAML": ("train.lr=[", r"override 'train.lr=\[': the value is not valid YAML"),
    "no key": ("=3", r"override '=3': no key before '='"),
    "an empty key part": ("train..lr=3", r"override 'train..lr=3': no key before '=' \(or an empty part"),
    "no '='": ("train.lr", r"override 'train.lr' must look like section.key=value"),
    "an unknown section": ("trian.lr=1", r"unknown config key 'trian'; valid keys .* \(command-line override\)"),
    "a section given a value": ("train=3", r"train: expected a mapping, got 3 \(command-line override\)"),
    "a word for a number": ("train.epochs=two", r"train.epochs: expected int, got str 'two'"),
    "not a number": ("train.lr=nan", r"train.lr: nan is not a finite number"),
    "infinite": ("stage2.mse_weight=.inf", r"stage2.mse_weight: inf is not a finite number"),
    "YAML's 1e3 for a whole number": ("train.max_steps=1e3", r"train.max_steps: expected int, got str '1e3' "
                                                             r"\(write 1000\)"),
    "neither of a union's kinds": ("data.packing=Auto", r"data.packing: expected bool or 'auto', got str 'Auto'"),
    "no value": ("run.output_dir=", r"run.output_dir: no value given \(expected str\) \(command-line override\)"),
    "a key under a value": ("run.seed.x=1", r"run.seed.x: run.seed is a value \(42\), not a section \(command-line"),
}


@pytest.mark.parametrize("name", list(OVERRIDES))
def test_a_bad_override_is_one_line(name):
    override, message = OVERRIDES[name]
    refused(dualner("config", "--config", str(STAGE1), override), message)


def test_an_override_into_an_empty_yaml_section(tmp_path):
    """`train:` with nothing under it (every key commented out) is an empty section, not a value."""
    path = write(tmp_path / "c.yaml", "train:\n  # lr: 1.0e-3\nrun:\n  seed: 1\n")
    assert load_config(path, ["train.lr=0.5"]).train.lr == 0.5


def test_overrides_on_both_sides_of_a_flag_and_one_config():
    result = dualner("config", "--config", str(STAGE1), "train.lr=0.5", "--get", "train", "train.epochs=3")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["epochs"] == 3 and yaml.safe_load(result.stdout)["lr"] == 0.5
    for command in ("config", "stage1"):
        result = dualner(command, "--config", str(STAGE1), "--config", str(REPO / "configs" / "quickstart.yaml"))
        assert result.returncode == 2 and "--config given twice" in result.stderr, result.stderr
        assert result.stdout == ""


# -- the tokenizer against the encoder's embeddings ---------------------------------------------------

def encoder_folder(tmp_path, tiny_encoder, rows: int):
    """The tiny encoder's tokenizer (3,742 entries) beside a config.json of `rows` embeddings."""
    from transformers import AutoConfig
    folder = tmp_path / f"encoder-{rows}"
    shutil.copytree(tiny_encoder, folder)
    config = AutoConfig.from_pretrained(folder)
    config.vocab_size = rows
    config.save_pretrained(folder)
    return folder


def test_a_tokenizer_of_another_model_is_refused(tmp_path, tiny_encoder):
    """The issue's pair: 3,742 tokens against e5's 250,037 rows trained to the end at F1 0."""
    from dualner.stage1 import build_stage1
    folder = encoder_folder(tmp_path, tiny_encoder, 250037)
    run = tmp_path / "run"
    cfg = load_config(STAGE1, [f"model.encoder={folder}", f"run.output_dir={run}", FP32])
    with pytest.raises(ConfigError, match=rf"model.encoder: the tokenizer of {re.escape(str(folder))} has 3742 "
                                          rf"tokens but the encoder .* has 250037 embeddings .*another model's .*"
                                          rf"set model.tokenizer"):
        build_stage1(cfg)
    assert not run.exists()


def test_a_tokenizer_larger_than_the_embeddings_is_refused(tmp_path, tiny_encoder):
    from dualner.stage1 import build_stage1
    small = encoder_folder(tmp_path, tiny_encoder, 3000)
    run = tmp_path / "run"
    cfg = load_config(STAGE1, [f"model.encoder={small}", f"model.tokenizer={tiny_encoder}", f"run.output_dir={run}",
                               FP32])
    with pytest.raises(ConfigError, match=r"model.tokenizer: .* has 3742 tokens but the encoder .* has 3000 "
                                          r"embeddings .*: ids past 2999 have no embedding"):
        build_stage1(cfg)
    assert not run.exists()


ENCODER_FOLDERS = {
    "a file": (lambda folder: STAGE1, "model.encoder", r"model.encoder: .*tiny.yaml is a file; name a model folder"),
    "an empty folder": (lambda folder: folder, "model.encoder", r"model.encoder: .* holds no config.json"),
    "no weights": (lambda folder: [(folder / "model.safetensors").unlink(), folder][1], "model.encoder",
                   r"model.encoder: .* holds no model.safetensors or .*pytorch_model.bin"),
    # transformers would build a tokenizer of the 5 special tokens from config.json alone
    "no tokenizer files": (lambda folder: [(folder / "tokenizer.json").unlink(), folder][1], "model.encoder",
                           r"model.encoder: .* holds no tokenizer.json or .*; model.tokenizer may name"),
    "an empty tokenizer folder": (lambda folder: folder.parent / "empty", "model.tokenizer",
                                  r"model.tokenizer: .*empty holds no tokenizer.json"),
    "a config.json that is not JSON": (lambda folder: [(folder / "config.json").write_text("{"), folder][1],
                                       "model.encoder", r"model.encoder: .*config.json:1:2: not valid JSON .*; the "
                                                        r"folder is damaged: copy or download it again"),
}


@pytest.mark.parametrize("name", list(ENCODER_FOLDERS))
def test_an_encoder_folder_missing_its_parts_is_one_line(name, tmp_path, tiny_encoder):
    from dualner.stage1 import build_stage1
    damage, key, message = ENCODER_FOLDERS[name]
    folder = tmp_path / "encoder"
    if name == "an empty folder":
        folder.mkdir()
    else:
        shutil.copytree(tiny_encoder, folder)
    (tmp_path / "empty").mkdir()
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        build_stage1(load_config(STAGE1, [f"{key}={damage(folder)}", f"run.output_dir={run}", FP32]))
    assert not run.exists()


@pytest.mark.parametrize("rows", [3742, 3744, 3800, 7484])
def test_padding_rows_past_the_vocabulary_are_accepted(tmp_path, tiny_encoder, rows):
    """XLM-R and e5 round their embedding matrix up (e5: 250,002 tokens, 250,037 rows); up to twice the
    tokenizer's ids pass."""
    from transformers import AutoConfig, AutoTokenizer
    from dualner.limits import check_vocabulary
    folder = encoder_folder(tmp_path, tiny_encoder, rows)
    check_vocabulary(AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder), str(folder), str(folder))
    if rows == 7484:
        config = AutoConfig.from_pretrained(folder)
        config.vocab_size += 1
        with pytest.raises(ConfigError, match="under half of the embeddings"):
            check_vocabulary(AutoTokenizer.from_pretrained(folder), config, str(folder), str(folder))


# -- report -------------------------------------------------------------------------------------------

RESULTS = {
    "an empty list": ("[]", r"results.json: not a DualNER results file: a results file is a JSON object, found a list"),
    "truncated": ('{"test": {"per_language": {"de": 1', r"results.json: not a readable results file"),
    "empty": ("", r"results.json: not a readable results file"),
    "no per_language": ('{"test": {"average": 50.0}}', r"results.json: .*'test' lacks its per_language scores"),
    "a score that is text": ('{"test": {"per_language": {"de": "x"}, "average": 1}}',
                             r"results.json: .*'test.per_language.de' is 'x', not a number"),
    "no test results": ('{"steps": 4, "best_step": 4, "best_score": 1.0}', r"no test results in .*; try --split dev"),
}


@pytest.mark.parametrize("name", list(RESULTS))
def test_report_on_damaged_results_names_the_file(name, tmp_path):
    text, message = RESULTS[name]
    run = tmp_path / "run"
    run.mkdir()
    write(run / "results.json", text)
    refused(dualner("report", str(run)), message)


def test_report_of_runs_sharing_a_folder_name_keeps_both(tmp_path):
    for parent, f1 in (("a", 50.0), ("b", 60.0)):
        (tmp_path / parent / "run").mkdir(parents=True)
        write(tmp_path / parent / "run" / "results.json",
              json.dumps({"test": {"per_language": {"de": f1}, "average": f1}}))
    result = dualner("report", "a/run", "b/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| test F1 | a/run | b/run |" in result.stdout and "| de | 50.00 | 60.00 |" in result.stdout


# -- evaluate's arguments -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_encoder):
    from dualner.stage1 import run_stage1
    run = tmp_path_factory.mktemp("h4") / "run"
    run_stage1(load_config(STAGE1, [f"run.output_dir={run}", "train.max_steps=2", "data.max_train_sentences=32",
                                    "data.max_eval_sentences=8", FP32]))
    return run


def test_evaluate_refuses_an_output_it_would_lose(finished, tmp_path):
    data = tmp_path / "de.tsv"
    shutil.copy(REPO / "data" / "panx-sample" / "de" / "test.tsv", data)
    before = data.read_bytes()
    cases = [(["--data", f"de={data}", "--output", str(data)], r"--output .*de.tsv is the --data file of de"),
             (["--data", f"de={data}", "--output", str(tmp_path)], r"--output: .* is a folder; name the JSON file"),
             (["--data", f"de={data}", "--output", str(data / "f1.json")], r"de.tsv is a file, not a folder"),
             (["--data", f"de={data}", f"de={REPO / 'data' / 'panx-sample' / 'en' / 'test.tsv'}"],
              r"--data: language 'de' given twice"),
             (["--data", f"de={data}", "--output", str(finished / "results.json")],
              r"results.json is one of the run's own records in"),
             (["--data", f"de={data}", "--output", str(finished / "checkpoints" / "f1.json")],
              r"f1.json is one of the run's own records in")]
    results = (finished / "results.json").read_bytes()
    for args, message in cases:
        refused(dualner("evaluate", "--checkpoint", str(finished), *args), message)
    assert data.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["de.tsv"]
    assert (finished / "results.json").read_bytes() == results and not (finished / "checkpoints" / "f1.json").exists()


def test_evaluate_refuses_a_head_the_model_never_trained(finished, tmp_path):
    from dualner.evaluate_checkpoint import evaluate_checkpoint
    cla = tmp_path / "cla"
    shutil.copytree(finished, cla)
    assets = cla / "model" / "dualner.json"
    assets.write_text(assets.read_text().replace('"mlt"', '"cla"'))  # a model whose span heads were never trained
    data = {"de": str(REPO / "data" / "panx-sample" / "de" / "test.tsv")}
    with pytest.raises(ConfigError, match=r"--head span: this model \(variant cla\) never trained that head"):
        evaluate_checkpoint(cla, data, None, head="span", max_sentences=4)
