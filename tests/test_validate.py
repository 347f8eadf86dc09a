"""dualner.config.validate: every cross-field rule the config decides alone, refused by
`python -m dualner config --check` (what slurm/dualner.sbatch runs before any rank starts) with exit 2
and one line, by load_config(stage=..., world_size=..., engine=...) (dualner.config_check.load_checked), and
by the stage launchers (the build's one validation)."""

import inspect
import re
import subprocess
import sys

import pytest
import yaml

from dualner.config import ConfigError, load_config, loading, rules
from dualner.config_check import load_checked
from tests.conftest import REPO, child_env

STAGE1, STAGE2 = REPO / "configs" / "tiny.yaml", REPO / "configs" / "tiny_stage2.yaml"

# name: (config file, stage, world size, overrides, DeepSpeed JSON written to a file (None: the file's), message)
RULES = {
    "eval head the variant never trains": (STAGE1, None, None, ["model.variant=cla", "eval.head=span"], None,
                                           r"eval.head=span reads a head that model.variant=cla never trains"),
    "global batch over the ranks": (STAGE1, None, 3, [], None,
                                    r"train.global_batch_size=16 is not divisible by the world size 3"),
    "micro batch over a rank's share": (STAGE1, None, 2, ["train.micro_batch_size=3"], None,
                                        r"train.micro_batch_size=3 does not divide the 8 sentences each of 2 rank"),
    "stage 1 without data.train": (STAGE1, 1, None, ["data.train=null"], None,
                                   r"data.train: no labeled training file given"),
    "stage 2 without init_from": (STAGE2, 2, None, ["stage2.init_from=''"], None,
                                  r"stage2.init_from: name the stage-1 run folder"),
    "stage 2 without a length": (STAGE2, 2, None, ["train.max_steps=null"], None,
                                 r"stage 2's length: set train.max_steps \(optimizer steps\) or stage2.epochs"),
    "stage 2 with two lengths": (STAGE2, 2, None, ["stage2.epochs=2"], None, r"stage 2's length"),
    "stage 2 epochs with mix=equal": (STAGE2, 2, None, ["train.max_steps=null", "stage2.epochs=1", "stage2.mix=equal"],
                                      None, r"stage2.epochs counts passes over the mixed corpus: it needs stage2.mix=size"),
    "stage 2 epochs with token batches": (STAGE2, 2, None, ["train.max_steps=null", "stage2.epochs=1",
                                                           "train.batch_unit=tokens", "train.micro_batch_size=128"],
                                          None, r"stage2.epochs counts passes .* train.batch_unit=sentences"),
    "stage 2 mix=size with a hub corpus": (STAGE2, 2, None, ["stage2.target={de: 'hf:wikiann:de@train'}"], None,
                                           r"stage2.target.de: stage2.mix=size counts every corpus's sentences"),
    "stage 2 of a span model": (STAGE2, 2, None, ["model.variant=span"], None,
                                r"model.variant=span: dual teaching needs both heads \(mlt\)"),
    "stage 1 with an empty encoder": (STAGE1, 1, None, ["model.encoder=''"], None, r"model.encoder is empty"),
    "an empty run folder": (STAGE2, 2, None, ["run.output_dir=' '"], None, r"run.output_dir is empty; name the run"),
    "select on a source without dev set": (STAGE1, 1, None, ["eval.select_on=source", "data.dev=null"], None,
                                           r"eval.select_on=source needs data.dev.en"),
    "token batches unpacked": (STAGE1, 1, None, ["train.batch_unit=tokens", "data.packing=false"], None,
                               r"train.batch_unit=tokens needs packed rows"),
    "rows shorter than a window": (STAGE1, 1, None, ["data.pack_length=32"], None,
                                   r"data.pack_length=32 must hold a whole window \(data.max_length=64\)"),
    "token micro batch not whole rows": (STAGE1, 1, None, ["train.batch_unit=tokens", "train.global_batch_size=1000",
                                                          "train.micro_batch_size=100"], None,
                                         r"train.micro_batch_size=100 tokens is not a whole number of rows of "
                                         r"data.pack_length=64"),
    "DeepSpeed JSON missing": (STAGE1, 1, None, ["engine.config=ds_configs/nothing.json"], None,
                               r"engine.config: file not found: ds_configs/nothing.json"),
    "DeepSpeed JSON a folder": (STAGE1, 1, None, ["engine.config=ds_configs"], None,
                                r"engine.config: ds_configs is a folder; name a JSON file"),
    "DeepSpeed JSON empty": (STAGE1, 1, None, [], " \n", r"engine.config: .*ds.json is empty"),
    "DeepSpeed JSON not JSON": (STAGE1, 1, None, [], '{\n "bf16": {"enabled": true,}\n}', r"ds.json:2: not valid JSON"),
    "DeepSpeed JSON not UTF-8": (STAGE1, 1, None, [], b'{"a": "\xff"}', r"ds.json: not UTF-8 text"),
    "DeepSpeed JSON not an object": (STAGE1, 1, None, [], "[1, 2]", r"ds.json: a DeepSpeed config is a JSON object"),
    "DeepSpeed zero_optimization not an object": (STAGE1, 1, None, [], '{"zero_optimization": 2}',
                                                  r"ds.json: zero_optimization must be an object"),
    "DeepSpeed ZeRO stage unknown": (STAGE2, 2, None, [], '{"zero_optimization": {"stage": 7}}',
                                     r"ds.json: zero_optimization.stage must be 0, 1, 2 or 3, got 7"),
    "DeepSpeed JSON key given twice": (STAGE1, 1, None, [], '{"gradient_clipping": 1.0, "gradient_clipping": 2.0}',
                                       r"ds.json: key 'gradient_clipping' given twice in one object"),
    "DeepSpeed optimizer in the JSON": (STAGE1, 1, None, [], '{"optimizer": {"type": "Adam"}}',
                                        r"ds.json: optimizer and scheduler come from the train section"),
    "DeepSpeed batch sizes that disagree": (STAGE1, 1, 2, [], '{"gradient_accumulation_steps": 2}',
                                            r"ds.json: gradient_accumulation_steps=2 disagrees with 1 derived from "
                                            r"train.global_batch_size=16 on 2 rank\(s\)"),
    "compile under ZeRO-3": (STAGE1, 1, None, ["model.compile=true", "engine.config=ds_configs/zero3_fp32.json"],
                             None, r"model.compile=true works with ZeRO stages 0-2"),
    # DeepSpeed's own parser (dualner.backend.deepspeed_engine): imports DeepSpeed
    "DeepSpeed rejects the JSON": (STAGE1, 1, None, [], '{"zero_optimization": {"stage": 2, "stagee": 1}}',
                                   r"ds.json: DeepSpeed rejects this config: .*stagee"),
    "DeepSpeed key it never reads": (STAGE2, 2, None, [], '{"gradient_clippingg": 1.0}',
                                     r"ds.json: unknown DeepSpeed key 'gradient_clippingg'; valid top-level keys: "
                                     r".*gradient_clipping"),
}
DEEPSPEED_PARSER_RULES = 2  # the last two: raised by dualner.backend.deepspeed_engine.check_with_deepspeed


def overrides_of(name, tmp_path) -> list[str]:
    """The rule's overrides, its DeepSpeed JSON written into `tmp_path` and named."""
    _, _, _, overrides, ds_json, _ = RULES[name]
    if ds_json is None:
        return overrides
    target = tmp_path / "ds.json"
    (target.write_bytes if isinstance(ds_json, bytes) else target.write_text)(ds_json)
    return [*overrides, f"engine.config={target}"]


def config_check(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dualner", "config", "--check", *args], cwd=REPO,
                          capture_output=True, text=True, env=child_env(PYTHONPATH=str(REPO)), timeout=120)


@pytest.mark.parametrize("name", list(RULES))
def test_config_check_refuses_every_rule(name, tmp_path):
    path, stage, world_size, _, _, message = RULES[name]
    flags = [*(["--stage", str(stage)] if stage else []), *(["--world-size", str(world_size)] if world_size else [])]
    result = config_check(["--config", str(path), *flags, *overrides_of(name, tmp_path)])
    lines = [line for line in result.stderr.splitlines() if line.startswith("dualner: error: ")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert result.stdout == ""
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("name", list(RULES))
def test_load_config_with_the_stage_refuses_every_rule(name, tmp_path):
    path, stage, world_size, _, _, message = RULES[name]
    overrides = overrides_of(name, tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_checked(path, overrides, stage=stage, world_size=world_size)
    if stage is not None:  # a rule of training: loading the config for anything else does not apply it
        load_checked(path, overrides, world_size=world_size)
    if world_size is not None and stage is None:  # a rule of the world size: not applied without one
        load_checked(path, overrides)


def test_every_rule_of_validate_has_a_case():
    """A rule added to validate without a refusal case above fails here (counts its refusals: the
    raises of the checks that raise, the problems the config's rules collect)."""
    from dualner.backend import deepspeed_config, deepspeed_json
    raising = [rules.batch_split, deepspeed_json.read_deepspeed_json, deepspeed_json.check_deepspeed_batch_sizes,
               deepspeed_config.check_config, loading.unique_keys]
    collecting = [rules.config_problems, rules._stage1_problems, rules._stage2_problems, rules._training_problems]
    refusals = sum(inspect.getsource(function).count("raise ConfigError(") for function in raising)
    refusals += sum(len(re.findall(r'problems(\.append\(f?"| \+= \[f")', inspect.getsource(function)))
                    for function in collecting)
    two_ways = 2  # "stage 2's length" (neither / both) and stage2.epochs (mix / batch unit): one refusal each
    assert refusals == len(RULES) - DEEPSPEED_PARSER_RULES - two_ways
    assert "validate(cfg, stage, world_size, engine)" in inspect.getsource(load_config)


def test_every_problem_is_reported_at_once():
    """Three independent mistakes: one ConfigError naming each of them by its key, the engine's too."""
    overrides = ["model.variant=cla", "eval.head=span", "data.pack_length=32", "engine.config=ds_configs/nothing.json"]
    with pytest.raises(ConfigError) as refused:
        load_checked(STAGE1, overrides, stage=1, world_size=1)
    message = str(refused.value)
    assert message.startswith("3 problems: (1) eval.head=span reads a head"), message
    assert "(2) data.pack_length=32 must hold a whole window" in message, message
    assert "(3) engine.config: file not found: ds_configs/nothing.json" in message, message
    result = config_check(["--config", str(STAGE1), "--stage", "1", "--world-size", "1", *overrides])
    lines = [line for line in result.stderr.splitlines() if line.startswith("dualner: error: ")]
    assert result.returncode == 2 and len(lines) == 1 and "3 problems: " in lines[0], result.stderr[-3000:]


def test_config_check_says_ok_and_names_what_it_checked():
    for args, expected in (([], "ok: configs/tiny.yaml (stage 1 inferred: no stage2.init_from, target or "
                                "translations; --stage 2 for the other; 1 rank(s) assumed: --world-size N for "
                                "another) passes every config rule"),
                           (["--stage", "1", "--world-size", "2"],
                            "ok: configs/tiny.yaml (stage 1; 2 rank(s)) passes every config rule")):
        result = config_check(["--config", "configs/tiny.yaml", *args])
        assert result.returncode == 0 and result.stdout == expected + "\n", result.stdout + result.stderr[-3000:]
    result = config_check(["--config", "configs/tiny_stage2.yaml", "--stage", "2", "--world-size", "16"])
    assert result.returncode == 0 and result.stdout.startswith("ok: "), result.stderr[-3000:]


def test_stage_and_world_size_arguments():
    with pytest.raises(ConfigError, match="stage 3: expected 1 or 2"):
        load_config(STAGE1, stage=3)
    with pytest.raises(ConfigError, match="world size 0: expected at least 1"):
        load_config(STAGE1, world_size=0)
    result = config_check(["--config", "configs/tiny.yaml", "--stage", "3"])
    assert result.returncode == 2 and "invalid choice: 3" in result.stderr
    result = config_check(["--config", "configs/tiny.yaml", "--world-size", "0"])
    assert result.returncode == 2 and "--world-size must be at least 1" in result.stderr


def test_shipped_configs_pass_their_stage():
    for path in (REPO / "configs").glob("*.yaml"):
        stage = 2 if "stage2" in path.name or "dualner" in path.name else 1
        load_checked(path, [], stage=stage, world_size=2)


def test_launchers_validate_for_their_stage_and_world_size(tmp_path):
    """The stage launchers refuse a config broken for their stage (and world size) before any process
    group starts (the build's one validation): the rule's own line, exit 2, nothing written."""
    env = child_env(PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "dualner", "stage2", "--config", str(STAGE1),
                             f"run.output_dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "stage2.init_from: name the stage-1 run folder" in result.stderr, result.stderr
    result = subprocess.run([sys.executable, str(REPO / "launchers" / "stage1.py"), "--config", str(STAGE1),
                             f"run.output_dir={tmp_path / 'run'}"], cwd=REPO, env={**env, "RANK": "0", "WORLD_SIZE": "3"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "is not divisible by the world size 3" in result.stderr, result.stderr
    result = subprocess.run([sys.executable, "-m", "dualner", "stage1", "--config", str(STAGE1),
                             f"run.output_dir={tmp_path / 'run'}", "train.micro_batch_size=6"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)  # plain python: one rank
    assert result.returncode == 2 and "train.micro_batch_size=6 does not divide the 16 sentences" in result.stderr
    assert not (tmp_path / "run").exists()


def test_launch_world_size(monkeypatch):
    """What dualner.backend.comm.init_distributed will take as the world size."""
    import torch.distributed
    from dualner.backend import launch_world_size
    # before any process group: an earlier test in this process may have left one (whose size wins)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    for name in ("WORLD_SIZE", "RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert launch_world_size() == 1  # plain python: a world of one
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert launch_world_size() == 4  # srun
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_world_size() == 2  # torchrun, deepspeed (and srun after comm has set them)


def test_a_config_valid_only_on_more_ranks_passes_for_them(tmp_path):
    """Before any process group exists, the DeepSpeed JSON is still judged for the job's world size:
    120 sentences with micro batches of 48 split over 5 ranks (24 each), not over 1; a JSON that spells
    the 5-rank batch keys passes too."""
    overrides = ["train.global_batch_size=120", "train.micro_batch_size=48"]
    load_checked(STAGE1, overrides, stage=1, world_size=5)
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=48 does not divide the 120 sentences each of 1"):
        load_checked(STAGE1, overrides, stage=1, world_size=1)
    spelled = tmp_path / "zero0_5ranks.json"
    spelled.write_text('{"zero_optimization": {"stage": 0}, "train_batch_size": 120, '
                       '"train_micro_batch_size_per_gpu": 24, "gradient_accumulation_steps": 1}')
    load_checked(STAGE1, [*overrides, f"engine.config={spelled}"], stage=1, world_size=5)
    result = subprocess.run([sys.executable, "-m", "dualner", "config", "--check", "--stage", "1", "--world-size", "5",
                             "--config", str(STAGE1), *overrides, f"engine.config={spelled}"], cwd=REPO,
                            capture_output=True, text=True, env=child_env(PYTHONPATH=str(REPO)))
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-2000:]


def test_a_deepspeed_rejection_from_the_yaml_file_names_the_file(tmp_path):
    """A DeepSpeed JSON that DeepSpeed's parser rejects, named in the YAML file itself: the error
    names the file (the file alone fails the same way), not the command line."""
    rejected = tmp_path / "unknown_key.json"
    rejected.write_text('{"zero_optimization": {"stage": 0}, "no_such_deepspeed_key": 1}')
    experiment = tmp_path / "experiment.yaml"
    tree = yaml.safe_load(STAGE1.read_text())
    tree["engine"]["config"] = str(rejected)
    experiment.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(experiment))}: {re.escape(str(rejected))}: unknown "
                                          r"DeepSpeed key 'no_such_deepspeed_key'"):
        load_checked(experiment, ["train.lr=1e-4"], stage=1, world_size=1)
