"""bench/reproduce.py end to end at a tiny size: every system trains through the real launchers,
the results JSON, the Markdown block and the plots are written, and a second invocation trains
nothing (systems with results are skipped)."""

import json
import subprocess
import sys

import yaml

from conftest import REPO, child_env

TINY_FRAGMENT = {
    "model": {"encoder": "tiny-random"},
    "data": {"max_length": 64, "max_train_sentences": 256, "max_eval_sentences": 24},
    "train": {"global_batch_size": 8, "micro_batch_size": 8, "lr": 1.0e-3, "warmup_steps": 1,
              "max_steps": 4, "eval_every": 2, "log_every": 1, "keep_last": 1},
    "deepspeed": {"config": "ds_configs/zero0_fp32.json"},
    "logging": {"progress_bar": False, "tensorboard": False},
}


def test_reproduce_tiny_scale(tmp_path):
    scale = {"name": "tiny", "data_root": "data/panx-sample", "target_languages": ["de", "zh"],
             "fractions": [0.5], "output_dir": str(tmp_path / "runs"),
             "results": str(tmp_path / "reproduction.json"), "plots_dir": str(tmp_path / "plots"),
             "results_markdown": str(tmp_path / "RESULTS.md"), "diagnostic_sentences": 16,
             "stage1": TINY_FRAGMENT, "stage2": TINY_FRAGMENT}
    config = tmp_path / "scale.yaml"
    config.write_text(yaml.safe_dump(scale), encoding="utf-8")
    (tmp_path / "RESULTS.md").write_text("# Results\n\nearlier text stays\n", encoding="utf-8")
    command = [sys.executable, "bench/reproduce.py", "--config", str(config)]
    first = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    report = json.loads((tmp_path / "reproduction.json").read_text())
    names = {"mlt", "dualner_trggold", "wo_mse", "w_selfkl", "wo_trg", "mlt_p50", "dualner_p50"}
    assert set(report["systems"]) == names
    for name, entry in report["systems"].items():
        assert set(entry["per_language"]) == {"de", "zh"}, name  # English is reported apart
        assert abs(entry["average"] - sum(entry["per_language"].values()) / 2) < 1e-9
        assert 0 <= entry["english"] <= 100
    stage2 = report["systems"]["dualner_trggold"]
    assert stage2["stage"] == 2 and stage2["teacher_head_agreement"] is not None
    assert report["systems"]["wo_mse"]["mse_first_last"] == [0.0, 0.0]  # lambda = 0: the term is not computed
    assert report["systems"]["mlt_p50"]["source_fraction"] == 0.5
    assert set(report["teacher_pseudo_label_f1"]) == {"span", "seq"}
    # the generated configs are the record of each run and reload as launcher configs
    generated = yaml.safe_load((tmp_path / "runs" / "configs" / "wo_trg.yaml").read_text())
    assert generated["stage2"]["target"] == {} and generated["stage2"]["init_from"].endswith("mlt")
    assert yaml.safe_load((tmp_path / "runs" / "configs" / "dualner_p50.yaml").read_text())["data"]["train_fraction"] == 0.5

    markdown = (tmp_path / "RESULTS.md").read_text()
    assert "earlier text stays" in markdown and markdown.count("<!-- reproduction:tiny:begin -->") == 1
    assert "| w/o MSE |" in markdown and "| 50% |" in markdown
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped" in first.stdout
    else:
        for plot in ("reproduction_tiny_per_language.png", "reproduction_tiny_source_fraction.png"):
            assert (tmp_path / "plots" / plot).read_bytes()[:4] == b"\x89PNG"

    second = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done earlier") == len(names)
    assert "finished in" not in second.stdout and ": stage " not in second.stdout  # nothing retrained
    assert (tmp_path / "RESULTS.md").read_text().count("<!-- reproduction:tiny:begin -->") == 1
