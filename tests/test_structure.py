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


def class_lines(path, name):
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node.end_lineno - node.lineno + 1
    raise AssertionError(f"{path}: no class {name}")


def test_the_training_loop_is_one_short_function_over_small_components():
    """The loop shows forward, backward and the optimizer step; what holds the run stays small."""
    assert function_lines(LIBRARY / "train.py", "train") <= 80
    assert class_lines(LIBRARY / "train.py", "Trainer") <= 120
    loop = ast.get_source_segment((LIBRARY / "train.py").read_text(), next(
        node for node in ast.parse((LIBRARY / "train.py").read_text()).body
        if isinstance(node, ast.FunctionDef) and node.name == "train"))
    for call in ("recipe.losses(", "engine.backward(", "engine.optimizer_step()", "engine.accumulation_steps"):
        assert call in loop, call


# What only the backend may name: DeepSpeed's modules, classes and engine attributes.
DEEPSPEED_NAMES = re.compile(r"^(DeepSpeed[A-Z]\w*|deepspeed_engine|ds_tensor|GatheredParameters|"
                             r"gradient_accumulation_steps|is_gradient_accumulation_boundary|save_checkpoint|"
                             r"load_checkpoint|_config|zero_to_fp32|ds_to_universal)$")


def test_deepspeed_is_named_only_under_the_backend():
    """Imports, names and attribute accesses: outside dualner/backend/ the code uses the engine
    interface (dualner.backend.TrainingEngine), never DeepSpeed itself."""
    found = []
    for path in sorted(LIBRARY.rglob("*.py")):
        if "backend" in path.relative_to(LIBRARY).parts:
            continue
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            names = ([node.id] if isinstance(node, ast.Name) else [node.attr] if isinstance(node, ast.Attribute)
                     else [alias.name for alias in node.names] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}:{node.lineno}: imports {module}" for module in modules if "deepspeed" in module]
            # (config.DeepSpeedConfig is our schema of the YAML's `deepspeed:` section, not DeepSpeed's)
            found += [f"{path.name}:{node.lineno}: {name}" for name in names
                      if DEEPSPEED_NAMES.match(name) and name != "DeepSpeedConfig"]
        found += [f"{path.name}: .engine.engine" for _ in re.finditer(r"\.engine\.engine\b", text)]
    assert not found, found
    # ... and the check finds what it is for
    sample = "import deepspeed\nx = self.engine.engine.gradient_accumulation_steps()\n"
    assert any(DEEPSPEED_NAMES.match(n.attr) for n in ast.walk(ast.parse(sample)) if isinstance(n, ast.Attribute))


def test_the_engine_interface_is_the_one_the_backend_implements():
    import inspect

    from dualner.backend import TeacherEngine, TrainingEngine
    from dualner.backend.deepspeed_engine import DeepSpeedTeacher, DeepSpeedTrainingEngine, ReplicaTeacher
    from dualner.train import Trainer

    def members(protocol):
        return {name for name in vars(protocol) if not name.startswith("_") or name == "__call__"} - {
            "_is_protocol", "_is_runtime_protocol"}
    for name in members(TrainingEngine) | set(TrainingEngine.__annotations__):
        assert hasattr(DeepSpeedTrainingEngine, name) or name in inspect.signature(
            DeepSpeedTrainingEngine.__init__).parameters or name in DeepSpeedTrainingEngine.__init__.__code__.co_names, name
    for teacher in (DeepSpeedTeacher, ReplicaTeacher):
        for name in members(TeacherEngine) | set(TeacherEngine.__annotations__):
            assert hasattr(teacher, name), (teacher, name)
    assert Trainer.__annotations__["engine"] in ("TrainingEngine", TrainingEngine)


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


def test_the_checkpointer_saves_the_components_it_was_told_of():
    """Shared components once under their names, per-rank ones gathered by rank and handed back
    whole; a checkpoint of the earlier layout (the recipe's keys at the top level) still loads."""
    from dualner.checkpoint import Checkpointer

    class Manager:
        def save(self, engine, step, client_state, best=None):
            self.saved = client_state
            return step

        def load(self, engine, path, world_size):
            return self.saved

    class Value:
        def __init__(self, **state):
            self.state = state

        def state_dict(self):
            return dict(self.state)

        def load_state_dict(self, state):
            self.state = state

    manager = Manager()
    progress, recipe, stream = Value(step=4), Value(teacher_refreshes=2), Value(cursor=17)
    Checkpointer(manager, None, {"trainer": progress, "recipe": recipe}, {"stream": stream}).save(4)
    assert manager.saved == {"trainer": {"step": 4}, "recipe": {"teacher_refreshes": 2}, "ranks": [{"stream": {"cursor": 17}}]}
    fresh = Value(), Value(), Value()
    Checkpointer(manager, None, {"trainer": fresh[0], "recipe": fresh[1]}, {"stream": fresh[2]}).load("step-4")
    assert fresh[0].state == {"step": 4} and fresh[1].state == {"teacher_refreshes": 2}
    assert fresh[2].state == [{"cursor": 17}]  # every rank's, for a resume on any number of ranks
    manager.saved = {"trainer": {"step": 4}, "ranks": [{"stream": {"cursor": 17}}], "teacher_refreshes": 3}
    Checkpointer(manager, None, {"trainer": fresh[0], "recipe": fresh[1]}, {"stream": fresh[2]}).load("step-4")
    assert fresh[1].state["teacher_refreshes"] == 3
