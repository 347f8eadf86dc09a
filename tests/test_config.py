import pytest
import yaml

from dualner.config import ConfigError, load_config, save_config
from dualner.config_check import load_checked
from dualner.backend.deepspeed_engine import load_deepspeed_config
from dualner.data.batching import BatchLayout, derive_batch_layout
from tests.conftest import REPO


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3.0e-5\ndata:\n  train:\n    en: a.tsv\n")
    cfg = load_config(path, ["train.epochs=2", "data.dev.de=d.tsv", "model.variant=span",
                             "train.weight_decay=1e-3"])
    assert cfg.train.weight_decay == 1e-3  # YAML reads 1e-3 as a string; a float field takes it
    assert cfg.train.lr == 3e-5 and cfg.train.epochs == 2 and cfg.model.variant == "span"
    assert cfg.data.train == {"en": "a.tsv"} and cfg.data.dev == {"de": "d.tsv"}
    assert cfg.train.global_batch_size == 128 and cfg.train.warmup_steps == 300  # SPEC defaults
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_unknown_key_lists_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rate'.*valid keys.*lr"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        load_config(None, ["nope.x=1"])


def test_an_earlier_versions_engine_section_says_what_it_became(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("deepspeed:\n  config: ds_configs/zero0_fp32.json\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'deepspeed'; .*\(a 'deepspeed:' section is now "
                                          r"'engine:' with 'kind: deepspeed' and the same keys\)"):
        load_checked(path, [])  # the config asks the engines (dualner.backend) which sections were theirs


@pytest.mark.parametrize("override, message", [
    ("train.epochs=abc", "train.epochs: expected int"),
    ("train.lr=[1]", "train.lr: expected float"),
    ("train.lr=fast", "train.lr: expected float"),
    ("model.variant=both", r"model.variant: 'both' is not one of"),
    ("logging.tensorboard=3", "logging.tensorboard: expected bool"),
])
def test_wrong_value_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_shipped_configs_load():
    for path in (REPO / "configs").glob("*.yaml"):
        load_config(path)


def test_batch_layout_keeps_global_batch():
    cfg = load_config(None, ["train.global_batch_size=128", "train.micro_batch_size=32"])
    assert derive_batch_layout(cfg.train, 1) == BatchLayout(128, 32, 4, 1)
    assert derive_batch_layout(cfg.train, 2) == BatchLayout(128, 32, 2, 2)
    assert derive_batch_layout(cfg.train, 8) == BatchLayout(128, 16, 1, 8)
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        derive_batch_layout(cfg.train, 3)


def test_deepspeed_json_is_validated(tmp_path):
    layout = BatchLayout(128, 32, 4, 1)  # this process is a world of one, which DeepSpeed's parser checks
    derived = load_deepspeed_config(REPO / "ds_configs" / "zero3.json", layout)
    assert derived["train_batch_size"] == 128 and derived["gradient_accumulation_steps"] == 4
    bad_stage = tmp_path / "bad.json"
    bad_stage.write_text('{"zero_optimization": {"stage": 4}}')
    with pytest.raises(ConfigError, match="bad.json: zero_optimization.stage must be"):
        load_deepspeed_config(bad_stage, layout)
    disagreeing = tmp_path / "batch.json"
    disagreeing.write_text('{"train_batch_size": 100}')
    with pytest.raises(ConfigError, match="train_batch_size=100 disagrees with 128"):
        load_deepspeed_config(disagreeing, layout)
    broken = tmp_path / "broken.json"
    broken.write_text('{\n "bf16": {"enabled": true,}\n}')
    with pytest.raises(ConfigError, match="broken.json:2: not valid JSON"):
        load_deepspeed_config(broken, layout)
    with pytest.raises(ConfigError, match="file not found"):
        load_deepspeed_config(tmp_path / "missing.json", layout)


def test_every_shipped_deepspeed_config_is_valid():
    for path in (REPO / "ds_configs").glob("*.json"):
        assert load_deepspeed_config(path, BatchLayout(128, 32, 4, 1))["train_batch_size"] == 128
        assert yaml.safe_load(path.read_text())["zero_optimization"]["stage"] in (0, 2, 3)


def test_the_engine_section_holds_its_kinds_own_keys():
    """engine.kind chooses the engine; the other keys are that engine's, checked by the backend (the
    config loaded with the engines' rules, as a job and `config --check` load it)."""
    from dualner.backend import engine_settings
    tiny = REPO / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"engine.kind: 'fsdp3' is not one of \['deepspeed', 'fsdp2'\]"):
        load_checked(tiny, ["engine.kind=fsdp3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'engine.config'; valid keys under 'engine': precision, "
                                          r"gradient_clipping, reshard_after_forward \(the keys of engine.kind=fsdp2"):
        load_checked(tiny, ["engine.kind=fsdp2"])  # the YAML's deepspeed key stays: replace the section whole
    with pytest.raises(ConfigError, match=r"engine.precision: 'fp16' is not one of \['fp32', 'bf16'\]"):
        load_checked(tiny, ["engine={kind: fsdp2, precision: fp16}"])
    with pytest.raises(ConfigError, match=r"model.compile=true works with engine.kind=deepspeed"):
        load_checked(tiny, ["engine={kind: fsdp2}", "model.compile=true"], stage=1)
    cfg = load_checked(tiny, ["engine={kind: fsdp2, precision: bf16, gradient_clipping: 0}"], stage=1, world_size=2)
    _, settings = engine_settings(cfg.engine)
    assert (settings.precision, settings.gradient_clipping, settings.reshard_after_forward) == ("bf16", 0.0, True)
    _, default = engine_settings(load_checked(tiny, ["engine={}"], stage=1).engine)  # no kind: DeepSpeed's defaults
    assert default.config == "ds_configs/zero2.json"
