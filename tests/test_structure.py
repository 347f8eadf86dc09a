"""The shape of the code: a short loop over recipes, a new loss term as one function and one weight,
one way in, no copies."""

import ast
import json
import re
import subprocess
import sys

import pytest

from dualner.config import load_config
from dualner.stage1 import Stage1Recipe, run_stage1
from tests.conftest import REPO, child_env

LIBRARY = REPO / "dualner"


def function_lines(path, name):
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node.end_lineno - node.lineno + 1
    raise AssertionError(f"{path}: no function {name}")


def test_the_training_loop_is_one_short_function():
    assert function_lines(LIBRARY / "train.py", "train") <= 80


def test_a_new_loss_term_is_one_function_and_one_weight(tmp_path, tiny_encoder, monkeypatch):
    """A dummy term: registered in the recipe's TERMS, weighted in train.loss_weights; the loop
    trains on it and logs it without being edited."""
    monkeypatch.setitem(Stage1Recipe.TERMS, "dummy", lambda f: f.outputs.hidden_states.float().pow(2).mean())
    output = tmp_path / "run"
    run_stage1(load_config(REPO / "configs" / "tiny.yaml", [
        f"run.output_dir={output}", "train.max_steps=2", "train.eval_every=2", "train.log_every=1",
        "data.max_train_sentences=64", "data.max_eval_sentences=8", "train.loss_weights.dummy=0.5",
        f"deepspeed.config={REPO / 'ds_configs' / 'zero0_fp32.json'}"]))
    for line in (output / "losses.jsonl").read_text().splitlines():
        entry = json.loads(line)
        expected = entry["loss/seq"] + entry["loss/start"] + entry["loss/end"] + 0.5 * entry["loss/dummy"]
        assert entry["loss/dummy"] > 0 and entry["loss/total"] == pytest.approx(expected, rel=1e-5)


def test_unknown_loss_weight_is_refused_naming_the_terms(tmp_path, tiny_encoder):
    from dualner.errors import ConfigError
    with pytest.raises(ConfigError, match=r"train.loss_weights.dumy: not a loss term of this stage; its terms: seq, start, end"):
        run_stage1(load_config(REPO / "configs" / "tiny.yaml", [f"run.output_dir={tmp_path / 'run'}",
                                                                 "train.loss_weights.dumy=1"]))
    assert not (tmp_path / "run").exists()


def test_one_way_in_and_thin_launchers():
    result = subprocess.run([sys.executable, "-m", "dualner", "config", "--config", str(REPO / "configs" / "tiny.yaml"),
                             "run.output_dir=somewhere", "--get", "run.output_dir"], cwd=REPO, capture_output=True,
                            text=True, env=child_env(PYTHONPATH=str(REPO)))
    assert result.returncode == 0 and result.stdout.strip() == "somewhere", result.stderr[-2000:]
    for launcher in (REPO / "launchers").glob("*.py"):
        source = launcher.read_text()
        assert len(source.splitlines()) <= 25, launcher
        assert "from dualner.cli import launch" in source, launcher
        # the path is edited only when the package is not installed
        assert "except ImportError:" in source, launcher


def test_no_copies_of_the_helpers_folded_into_one_place():
    sources = {path: path.read_text() for folder in ("dualner", "bench", "tests") for path in (REPO / folder).rglob("*.py")}
    definitions = lambda name: [p for p, text in sources.items() if re.search(rf"^\s*def {name}\(", text, re.M)]  # noqa: E731
    assert [p.name for p in definitions("free_port")] == ["comm.py"]
    assert [p.name for p in definitions("iter_jsonl")] == ["readers.py"]
    assert not definitions("_set_dotted") and not definitions("_iter_jsonl")
    assert [p.name for p in definitions("read_source")] == ["sources.py"]
