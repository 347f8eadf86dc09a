"""The README's main command, run as a new user would: in a fresh copy of the repository."""

import json
import re
import shutil
import subprocess

from tests.conftest import REPO, child_env

# Shortened so the suite stays within its budget (2 steps of 8 sentences, 8 sentences a dev and test
# set: what is left is the start-up of each command); the full-length run is measured in bench/RESULTS.md.
SHORT = ["train.max_steps=2", "train.eval_every=2", "train.warmup_steps=1", "train.global_batch_size=8",
         "train.micro_batch_size=8", "data.max_train_sentences=64", "data.max_eval_sentences=8"]


def readme_command(kind: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {kind} -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)
    assert match, f"README has no {kind} command block"
    return match.group(1).strip()


def test_readme_has_two_setup_commands():
    assert readme_command("main-command") == "bash scripts/quickstart.sh"
    assert readme_command("test-command") == "bash scripts/test.sh"
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci


def test_main_command_in_a_fresh_directory(tmp_path):
    fresh = tmp_path / "clone"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        if (REPO / name).is_file():
            (fresh / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, fresh / name)
    env = child_env()
    env.pop("PYTHONPATH", None)  # the scripts set up their own
    result = subprocess.run(readme_command("main-command").split() + SHORT, cwd=fresh, env=env,
                            capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    table = output[output.index("Test F1 per language"):]
    assert "| test F1 | quickstart | quickstart_stage2 |" in table
    for language in ("en", "de", "es", "fr", "ru", "ar", "zh"):
        assert re.search(rf"\| {language} \| \d+\.\d\d \| \d+\.\d\d \|", table), language
    for run in ("quickstart", "quickstart_stage2"):
        results = json.loads((fresh / "runs" / run / "results.json").read_text())
        assert set(results["test"]["per_language"]) == {"en", "de", "es", "fr", "ru", "ar", "zh"}
        assert (fresh / "runs" / run / "checkpoints" / "best.json").is_file()
