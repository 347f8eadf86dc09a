"""The shape of the code: a short loop over recipes, a new loss term as one function and one weight,
one way in, no copies."""

import ast
from pathlib import Path
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


# What only the backend may name: DeepSpeed's modules, classes, engine attributes and our readings of
# its JSON (identifiers), and its keys, file names and ZeRO stages (strings, docstrings aside).
DEEPSPEED_NAMES = re.compile(r"deepspeed|^ds_|_ds_|zero_stage|ds_tensor|GatheredParameters|gradient_accumulation_steps$|"
                             r"is_gradient_accumulation_boundary|save_checkpoint|load_checkpoint|^_config$|"
                             r"zero_to_fp32|ds_to_universal", re.IGNORECASE)
DEEPSPEED_TEXT = re.compile(r"deepspeed|zero_optimization|zero_stage|zero_pp_rank|mp_rank_|ds_config|\bZeRO\b", re.IGNORECASE)


def deepspeed_mentions(path, text):
    """Every identifier (imports, names, attributes, definitions, arguments) and string constant but
    docstrings of a module's source that names DeepSpeed."""
    tree = ast.parse(text)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        names = [alias.name for alias in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
        names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        names += [node.id] if isinstance(node, ast.Name) else [node.attr] if isinstance(node, ast.Attribute) else []
        names += [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []
        names += [argument.arg for argument in node.args.args] if isinstance(node, ast.FunctionDef) else []
        found += [f"{path.name}:{node.lineno}: {name}" for name in names if DEEPSPEED_NAMES.search(name)]
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                and DEEPSPEED_TEXT.search(node.value)):
            found.append(f"{path.name}:{node.lineno}: {node.value[:60]!r}")
    found += [f"{path.name}: .engine.engine" for _ in re.finditer(r"\.engine\.engine\b", text)]
    return found


def test_deepspeed_is_named_only_under_the_backend():
    """Outside dualner/backend/ the code uses the engine interfaces (dualner.backend.EngineSetup,
    TrainingEngine), never DeepSpeed itself, its JSON, its file names or its ZeRO stages."""
    found = []
    for path in sorted(LIBRARY.rglob("*.py")):
        if "backend" not in path.relative_to(LIBRARY).parts:
            found += deepspeed_mentions(path, path.read_text())
    assert not found, found
    # ... and the check finds what it is for, in the backend and in a sample of each kind
    assert deepspeed_mentions(LIBRARY / "backend" / "deepspeed_config.py",
                              (LIBRARY / "backend" / "deepspeed_config.py").read_text())
    sample = ("import deepspeed\nx = self.engine.engine.gradient_accumulation_steps()\n"
              "def f(ds_config):\n    return {'zero_stage': 3, 'name': f'{x}/mp_rank_00_model_states.pt'}\n")
    assert len(deepspeed_mentions(LIBRARY / "sample.py", sample)) == 6


def test_the_engine_interface_is_the_one_the_backend_implements():
    import inspect

    from dualner.backend import EngineSetup, TeacherEngine, TrainingEngine
    from dualner.backend.deepspeed_config import DeepSpeedSetup
    from dualner.backend.deepspeed_engine import DeepSpeedTeacher, DeepSpeedTrainingEngine
    from dualner.backend.fsdp2 import FSDP2Setup, FSDP2TrainingEngine, ShardedTeacher
    from dualner.backend.teacher import ReplicaTeacher
    from dualner.train import Trainer

    def members(protocol):
        return {name for name in vars(protocol) if not name.startswith("_") or name == "__call__"} - {
            "_is_protocol", "_is_runtime_protocol"}

    def assigned(cls):
        return inspect.signature(cls.__init__).parameters.keys() | set(cls.__init__.__code__.co_names)
    for engine in (DeepSpeedTrainingEngine, FSDP2TrainingEngine):
        for name in members(TrainingEngine) | set(TrainingEngine.__annotations__):
            assert hasattr(engine, name) or name in assigned(engine), (engine, name)
        assert hasattr(engine, "whole_parameters")  # what ReplicaTeacher.copy_from reads
    for teacher in (DeepSpeedTeacher, ReplicaTeacher, ShardedTeacher):
        for name in members(TeacherEngine) | set(TeacherEngine.__annotations__):
            assert hasattr(teacher, name) or name in assigned(teacher), (teacher, name)
    for setup in (DeepSpeedSetup, FSDP2Setup):
        for name in members(EngineSetup) | set(EngineSetup.__annotations__):
            assert hasattr(setup, name) or name in setup.__dataclass_fields__, (setup, name)
    assert Trainer.__annotations__["engine"] in ("TrainingEngine", TrainingEngine)


def test_a_new_loss_term_is_one_function_and_one_weight(tmp_path, tiny_encoder, monkeypatch):
    """A dummy term: registered in the recipe's TERMS, weighted in train.loss_weights; the loop
    trains on it and logs it without being edited."""
    monkeypatch.setitem(Stage1Recipe.TERMS, "dummy", lambda f: f.outputs.hidden_states.float().pow(2).mean())
    output = tmp_path / "run"
    run_stage1(load_config(REPO / "configs" / "tiny.yaml", [
        f"run.output_dir={output}", "train.max_steps=2", "train.eval_every=2", "train.log_every=1",
        "data.max_train_sentences=64", "data.max_eval_sentences=8", "train.loss_weights.dummy=0.5",
        f"engine.config={REPO / 'ds_configs' / 'zero0_fp32.json'}"]))
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


def test_the_package_carries_no_test_hooks():
    """Fault injection and the collective audit are installed from tests/hooks (a sitecustomize in
    every launched job): no module of the package reads their switches or imports test code."""
    hooks = {path.stem for path in (REPO / "tests" / "hooks").glob("*.py")} | {"tests"}
    for path in sorted(LIBRARY.rglob("*.py")):
        text = path.read_text()
        for switch in ("DUALNER_FAULT", "DUALNER_TEST_FAULTS", "DUALNER_STRICT_COLLECTIVES"):
            assert switch not in text, f"{path.relative_to(REPO)} reads {switch}"
        for node in ast.walk(ast.parse(text)):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {module.split(".")[0] for module in modules} & hooks, f"{path.relative_to(REPO)} imports test code"


def module_names() -> dict[str, "Path"]:
    """dualner's modules by dotted name (a package by its own name)."""
    names = {}
    for path in LIBRARY.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, modules: dict) -> list[str]:
    """The dualner modules one import statement loads (`from package import module` names the module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    base = node.module or ""
    if node.level:
        package = importer.split(".") if modules[importer].name == "__init__.py" else importer.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
            for alias in node.names if f"{base}.{alias.name}" in modules or base in modules]


def import_graph() -> dict[str, set[str]]:
    """Who imports whom inside dualner: module-level, function-level and TYPE_CHECKING imports alike
    (a module that imports its own package's __init__ is not an arrow: that runs first anyway)."""
    modules = module_names()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= {target for target in imported_modules(node, name, modules)
                                if target != name and not name.startswith(target + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_import_graph_has_no_cycle():
    """Layers: a module never imports, at any depth and in any place (a function, TYPE_CHECKING), a
    module that imports it back. The config is a leaf of the package's own layers."""
    graph = import_graph()
    assert {"dualner.config.rules", "dualner.config.schema"} <= graph["dualner.config.loading"]
    config_layer = {module for module in graph if module == "dualner.config" or module.startswith("dualner.config.")}
    below_config = {target for module in config_layer for target in graph[module]} - config_layer
    assert below_config <= {"dualner.errors", "dualner.run_layout"}, below_config
    found = cycles(graph)
    described = "; ".join(" <-> ".join(cycle) + " (" + ", ".join(
        f"{module} -> {sorted(graph[module] & set(cycle))}" for module in cycle) + ")" for cycle in found)
    assert not found, f"import cycles: {described}"


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    modules = {"dualner.x": tmp_path / "x.py", "dualner.y": tmp_path / "y.py", "dualner": tmp_path / "__init__.py"}
    inside_a_function = ast.parse("def f():\n    from dualner.y import thing\n    from . import x\n")
    imports = [node for node in ast.walk(inside_a_function) if isinstance(node, ast.ImportFrom)]
    assert imported_modules(imports[0], "dualner.x", modules) == ["dualner.y"]
    assert imported_modules(imports[1], "dualner.y", modules) == ["dualner.x"]


def test_no_module_is_over_450_lines():
    """A module over 450 lines holds several concerns: split it by concern."""
    long = {str(path.relative_to(LIBRARY)): len(path.read_text().splitlines()) for path in LIBRARY.rglob("*.py")
            if len(path.read_text().splitlines()) > 450}
    assert not long, long
