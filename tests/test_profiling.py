"""The `profile:` config block (dualner.profiling) through the real launchers on CPU: torch.profiler
over steps K..K+n-1 of the training loop, a TensorBoard trace and the top-operator table written into
the run folder."""

import json
import subprocess
import sys

from tests.conftest import REPO, child_env, launch

SMALL = ["train.log_every=1", "data.max_train_sentences=64", "data.max_eval_sentences=8", "data.test={}",
         "data.dev={en: data/panx-sample/en/dev.tsv}"]


def assert_profiled(run_dir, first: int, last: int) -> dict:
    folder = run_dir / "profile"
    traces = list(folder.glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1 and traces[0].stat().st_size > 10_000
    trace = json.loads(traces[0].read_text())
    assert any(str(event.get("name", "")).startswith("ProfilerStep#") for event in trace["traceEvents"])
    table = (folder / "top_ops_rank0.txt").read_text()
    assert f"steps {first}-{last}" in table and "aten::" in table and "Self CPU" in table
    summary = json.loads((folder / "summary_rank0.json").read_text())
    assert summary["steps"] == [first, last] and summary["aten_calls_per_step"] > 100
    assert len(summary["top"]) == 12
    return summary


def test_profile_block_writes_trace_and_operator_table_from_both_launchers(tmp_path, tiny_encoder):
    stage1 = tmp_path / "stage1"
    command = [sys.executable, "-m", "dualner", "stage1", "--config", "configs/tiny.yaml",
               f"run.output_dir={stage1}", "train.max_steps=4", "train.eval_every=4", *SMALL,
               "profile.enabled=true", "profile.start_step=2", "profile.steps=2", "profile.top=12"]
    result = subprocess.run(command, cwd=REPO, env=child_env(PYTHONPATH=str(REPO)), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_profiled(stage1, 2, 3)
    stage2 = tmp_path / "stage2"
    launch("launchers/stage2.py", ["--config", str(REPO / "configs" / "tiny_stage2.yaml"), f"run.output_dir={stage2}",
                                   f"stage2.init_from={stage1}", "train.max_steps=2", "train.eval_every=2", *SMALL,
                                   "profile.enabled=true", "profile.start_step=1", "profile.steps=5",
                                   "profile.top=12"])
    assert_profiled(stage2, 1, 2)  # cut at the run's last step; step 1 has no warm-up step before it
    config = (stage2 / "config.yaml").read_text()
    assert "profile:" in config and "start_step: 1" in config


def test_profile_block_is_typed_and_checked(tmp_path):
    from dualner.config import load_config
    from dualner.errors import ConfigError
    import pytest
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["profile.enabled=true", "profile.start_step=7"])
    assert cfg.profile.enabled and cfg.profile.start_step == 7 and cfg.profile.steps == 3
    with pytest.raises(ConfigError, match="unknown config key 'profile.enable'; valid keys under 'profile'"):
        load_config(REPO / "configs" / "tiny.yaml", ["profile.enable=true"])
    with pytest.raises(ConfigError, match="profile.steps: 0 is out of range"):
        load_config(REPO / "configs" / "tiny.yaml", ["profile.steps=0"])
    with pytest.raises(ConfigError, match="profile.enabled: expected bool"):
        load_config(REPO / "configs" / "tiny.yaml", ["profile.enabled=3"])
