"""dualner.build: both stages built in one order from their TrainSpec; the job's config settled (stage 2
adopts its stage-1 encoder), validated once and frozen."""

import dataclasses
import re

import pytest
import yaml

import dualner.build
import dualner.config.loading
from dualner.config import ConfigError, freeze, load_config, thawed_copy
from tests.conftest import REPO

STAGE1 = REPO / "configs" / "tiny.yaml"
STAGE2 = REPO / "configs" / "tiny_stage2.yaml"
QUICK = ["train.max_steps=2", "train.eval_every=2", "data.max_eval_sentences=8",
         f"engine.config={REPO / 'ds_configs' / 'zero0_fp32.json'}"]


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, tiny_encoder):
    from dualner.stage1 import run_stage1
    run = tmp_path_factory.mktemp("build") / "stage1"
    run_stage1(load_config(STAGE1, [f"run.output_dir={run}", *QUICK]))
    return run


def close(trainer) -> None:
    trainer.metrics.close()
    trainer.folder.close()


def test_a_frozen_config_refuses_assignment_and_a_thawed_copy_takes_it():
    cfg = freeze(load_config(STAGE1))
    with pytest.raises(dataclasses.FrozenInstanceError, match="'lr'.*frozen"):
        cfg.train.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = None
    copy = thawed_copy(cfg)
    copy.train.lr = 1.0
    assert (copy.train.lr, cfg.train.lr) == (1.0, load_config(STAGE1).train.lr)
    assert copy.data.train is not cfg.data.train  # a deep copy: the job's mappings are its own


def test_a_stage2_job_validates_once_after_adopting_the_stage1_encoder(stage1_run, tmp_path, monkeypatch):
    """Counted in both places validate is reached from (the build, and load_config): one call, made
    with the stage-1 run's encoder already adopted, then the job's config is frozen and the caller's
    is left as it was."""
    cfg = load_config(STAGE2, [f"run.output_dir={tmp_path / 'run'}", f"stage2.init_from={stage1_run}",
                               "model.encoder=xlm-roberta-base", *QUICK])  # the default: stage 2 adopts stage 1's
    calls = []

    def counted(real):
        def validate(cfg, *args, **kwargs):
            calls.append((cfg.model.encoder, args))
            return real(cfg, *args, **kwargs)
        return validate
    monkeypatch.setattr(dualner.build, "validate", counted(dualner.build.validate))
    monkeypatch.setattr(dualner.config.loading, "validate", counted(dualner.config.loading.validate))
    from dualner.stage2 import build_stage2
    trainer = build_stage2(cfg)
    try:
        assert [(encoder, args[0]) for encoder, args in calls] == [("tiny-random", 2)], calls
        with pytest.raises(dataclasses.FrozenInstanceError):
            trainer.job.cfg.stage2.mse_weight = 0.0
        assert cfg.model.encoder == "xlm-roberta-base"  # the caller's config: not settled, not frozen
        cfg.train.lr = 1e-4
    finally:
        close(trainer)


def test_a_config_only_stage2_rule_refuses_before_any_input_is_read(stage1_run, tmp_path, monkeypatch):
    """stage2.mix=size with an `hf:` corpus: refused by the validation, before the job starts."""
    started = []
    monkeypatch.setattr(dualner.build, "start_job", lambda *args: started.append(args))
    cfg = load_config(STAGE2, [f"run.output_dir={tmp_path / 'run'}", f"stage2.init_from={stage1_run}",
                               "stage2.target={de: 'hf:wikiann:de@train'}", *QUICK])
    from dualner.stage2 import build_stage2
    with pytest.raises(ConfigError, match=r"stage2.target.de: stage2.mix=size counts every corpus's sentences"):
        build_stage2(cfg)
    assert not started and not (tmp_path / "run").exists()


def test_both_stages_are_built_by_the_one_build_order():
    """Neither stage starts a job, opens a folder or assembles a trainer itself: build does."""
    from dualner import stage1, stage2
    for module, spec in ((stage1, stage1.STAGE1), (stage2, stage2.STAGE2)):
        source = open(module.__file__).read()
        for step in ("start_job(", "RunFolder.open(", "assemble(", "validate("):
            assert step not in source, (module.__name__, step)
        assert spec.stage == int(module.__name__[-1])



def test_a_stage_rule_broken_names_the_override_or_the_file(tmp_path, tiny_encoder):
    """The stage's one validation (in the build) names where the mistake is, as loading does."""
    from dualner.stage1 import build_stage1
    overridden = load_config(STAGE1, ["data.train={}", f"run.output_dir={tmp_path / 'a'}"])
    with pytest.raises(ConfigError, match=r"^data\.train: no labeled training file.*\(command-line override\)$"):
        build_stage1(overridden)
    tree = yaml.safe_load(STAGE1.read_text())
    tree["data"]["train"] = {}
    tree.setdefault("run", {})["output_dir"] = str(tmp_path / "b")
    in_file = tmp_path / "no_train.yaml"
    in_file.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(in_file))}: data\.train: no labeled training file"):
        build_stage1(load_config(in_file))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
