"""bench/reproduce.py end to end at a tiny size: every system trains through the real launchers,
the results JSON, the Markdown block and the plots are written, and a second invocation trains
nothing (systems with results are skipped)."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, child_env

TINY_FRAGMENT = {
    "model": {"encoder": "tiny-random"},
    "data": {"max_length": 64, "max_train_sentences": 256, "max_eval_sentences": 24},
    "train": {"global_batch_size": 8, "micro_batch_size": 8, "lr": 1.0e-3, "warmup_steps": 1,
              "max_steps": 2, "eval_every": 2, "log_every": 1, "keep_last": 1},
    "engine": {"kind": "deepspeed", "config": "ds_configs/zero0_fp32.json"},
    "logging": {"progress_bar": False, "tensorboard": False},
}


def test_reproduce_tiny_scale(tmp_path):
    """Two seeds for the seeded systems, one for the rest: per-seed runs paired across stages, mean and
    sd, the gain's interval, CLA and SPAN, a config-choice variant."""
    scale = {"name": "tiny", "data_root": "data/panx-sample", "target_languages": ["de", "zh"],
             "fractions": [], "seeds": 2, "systems": ["cla", "wo_mse", "dualner_shared"], "output_dir": str(tmp_path / "runs"),
             "single_seed": ["cla", "wo_mse", "dualner_shared"],
             "variants": {"dualner_shared": {"stage2.loss_normalization": "shared"}},
             "full_test_systems": ["mlt", "dualner_trggold"],
             "results": str(tmp_path / "reproduction.json"), "plots_dir": str(tmp_path / "plots"),
             "results_markdown": str(tmp_path / "RESULTS.md"), "diagnostic_sentences": 16,
             "stage1": TINY_FRAGMENT, "stage2": TINY_FRAGMENT}
    config = tmp_path / "scale.yaml"
    config.write_text(yaml.safe_dump(scale), encoding="utf-8")
    (tmp_path / "RESULTS.md").write_text("# Results\n\nearlier text stays\n", encoding="utf-8")
    command = [sys.executable, "bench/reproduce.py", "--config", str(config)]
    first = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    report = json.loads((tmp_path / "reproduction.json").read_text())
    names = {"mlt", "dualner_trggold", "cla", "wo_mse", "dualner_shared"}  # mlt and dualner_trggold always
    assert set(report["systems"]) == names
    for name, entry in report["systems"].items():
        seeds = [0] if name in scale["single_seed"] else [0, 1]
        assert entry["seeds"] == seeds and sorted(entry["runs"]) == [str(s) for s in seeds], name
        averages = [run["average"] for run in entry["runs"].values()]
        for run in entry["runs"].values():
            assert set(run["per_language"]) == {"de", "zh"}, name  # English is reported apart
            assert abs(run["average"] - sum(run["per_language"].values()) / 2) < 1e-9
            assert 0 <= run["english"] <= 100
        assert entry["average"]["n"] == len(seeds)
        assert abs(entry["average"]["mean"] - sum(averages) / len(averages)) < 1e-9
        if len(seeds) == 2:  # sample sd of two values = |a - b| / sqrt(2)
            assert abs(entry["average"]["sd"] - abs(averages[0] - averages[1]) / 2 ** 0.5) < 1e-9
    # seed k of a stage-2 system starts from seed k of its stage-1 system, with its own run.seed
    for seed in (0, 1):
        generated = yaml.safe_load((tmp_path / "runs" / "configs" / f"dualner_trggold_seed{seed}.yaml").read_text())
        assert generated["stage2"]["init_from"].endswith(f"mlt/seed{seed}") and generated["run"]["seed"] == 42 + seed
        assert generated["data"]["max_eval_sentences"] == 24
    assert yaml.safe_load((tmp_path / "runs" / "configs" / "cla_seed0.yaml").read_text())["model"]["variant"] == "cla"
    gain = report["gains"]["dualner_trggold - mlt"]
    paired = [report["systems"]["dualner_trggold"]["runs"][s]["per_language"][lang]
              - report["systems"]["mlt"]["runs"][s]["per_language"][lang] for s in ("0", "1") for lang in ("de", "zh")]
    assert gain["seeds"] == [0, 1] and abs(gain["mean"] - sum(paired) / 4) < 1e-9
    assert min(paired) - 1e-9 <= gain["ci95"][0] <= gain["mean"] <= gain["ci95"][1] <= max(paired) + 1e-9
    assert report["gains"]["dualner_shared - mlt"]["seeds"] == [0]
    assert report["gains"]["cla - mlt"]["seeds"] == [0]  # Table 1: a stage-1 variant against MLT
    # the full test sets (the fragment caps them at 24 sentences): every seed of the two systems
    for name in ("mlt", "dualner_trggold"):
        full = json.loads((tmp_path / "runs" / name / "seed1" / "test_full.json").read_text())
        assert report["systems"][name]["runs"]["1"]["full_test"]["per_language"]["zh"] == full["per_language"]["zh"]
        assert report["systems"][name]["full_test"]["average"]["n"] == 2
    assert "full_test" not in report["systems"]["cla"]
    assert report["gains_full_test"]["dualner_trggold - mlt"]["seeds"] == [0, 1]
    assert report["systems"]["wo_mse"]["runs"]["0"]["mse_first_last"] is None  # lambda = 0: not computed, not logged
    assert set(report["teacher_pseudo_label_f1"]) == {"span", "seq"}
    generated = yaml.safe_load((tmp_path / "runs" / "configs" / "wo_mse_seed0.yaml").read_text())
    assert generated["stage2"]["mse_weight"] == 0 and generated["stage2"]["init_from"].endswith("mlt/seed0")
    assert not (tmp_path / "runs" / "w_selfkl").exists()  # not among the scale's systems

    markdown = (tmp_path / "RESULTS.md").read_text()
    assert "earlier text stays" in markdown and markdown.count("<!-- reproduction:tiny:begin -->") == 1
    assert "| w/o MSE |" in markdown and "| 100% |" in markdown and "| CLA (sequence head only) | 1 |" in markdown
    assert "| DualNER + TRGGold | 2 |" in markdown and " ± " in markdown and "Final numbers, full test sets" in markdown
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped" in first.stdout
    else:
        for plot in ("per_language", "source_fraction", "gain_sorted"):
            assert (tmp_path / "plots" / f"reproduction_tiny_{plot}.png").read_bytes()[:4] == b"\x89PNG"

    second = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done earlier") == 2 * 2 + 3
    assert "finished in" not in second.stdout and ": stage " not in second.stdout  # nothing retrained
    assert (tmp_path / "RESULTS.md").read_text().count("<!-- reproduction:tiny:begin -->") == 1


def test_paired_gain_interval():
    """A gain that is the same on every seed and language has a point interval at that value; noise
    widens it around the mean; seeds only one side has are left out of the pairing."""
    import numpy as np
    sys.path.insert(0, str(REPO / "bench"))
    from reproduce import paired_gain
    languages = [f"l{i}" for i in range(8)]
    rng = np.random.default_rng(0)
    base = {seed: {lang: float(rng.uniform(30, 80)) for lang in languages} for seed in range(3)}
    constant = paired_gain({s: {lang: f + 2.5 for lang, f in row.items()} for s, row in base.items()}, base, languages)
    assert constant["mean"] == pytest.approx(2.5) and constant["ci95"] == pytest.approx([2.5, 2.5])
    noisy = {s: {lang: f + 2.5 + float(rng.normal(0, 3)) for lang, f in row.items()} for s, row in base.items() if s < 2}
    gain = paired_gain(noisy, base, languages, samples=2000)
    assert gain["seeds"] == [0, 1]
    assert gain["ci95"][0] < gain["mean"] < gain["ci95"][1] and gain["ci95"][1] - gain["ci95"][0] > 0.5
    assert paired_gain(noisy, {5: base[0]}, languages) is None


@pytest.mark.parametrize("keys, message", [
    ({"systems": ["dualner_p20"]}, "dualner_p20 needs mlt_p20"),
    ({"systems": ["spann"]}, "'spann' is not a system"),
    ({"systems": ["cla"], "fractions": [0.2]}, r"fractions: 0.2 needs systems \['mlt_p20', 'dualner_p20'\]"),
    ({"single_seed": ["w_selfkl"], "systems": ["cla"], "fractions": []}, "single_seed: 'w_selfkl' is not a system"),
    ({"seeds": 0}, "seeds: 0"),
    ({"full_test_seeds": 0}, "full_test_seeds: 0"),
])
def test_scale_files_are_checked(tmp_path, keys, message):
    sys.path.insert(0, str(REPO / "bench"))
    from reproduce import load_scale
    path = tmp_path / "scale.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "data_root": "d", "target_languages": ["de"], **keys}))
    with pytest.raises(SystemExit, match=message):
        load_scale(path)


def test_full_test_sets_for_the_first_seeds_only(tmp_path):
    """`full_test_seeds: 1`: only seed 0 of the full-test systems is evaluated on the full test sets;
    its statistics say n = 1, the gain pairs that seed only, and the per-language table keeps the
    capped sets, which every seed has."""
    sys.path.insert(0, str(REPO / "bench"))
    from reproduce import Scale, markdown, run_dir, summarize, systems, wants_full_test
    scale = Scale(name="x", data_root="d", target_languages=["de", "zh"], fractions=[], seeds=2,
                  full_test_systems=["mlt", "dualner_trggold"], full_test_seeds=1,
                  stage1={"data": {"max_eval_sentences": 24}})
    listed = systems(Scale(**{**scale.__dict__, "systems": []}))
    assert [s.name for s in listed] == ["mlt", "dualner_trggold"]
    assert [wants_full_test(scale, s, seed) for s in listed for seed in (0, 1)] == [True, False, True, False]
    for system, offset in zip(listed, (0.0, 5.0)):
        for seed in (0, 1):
            folder = run_dir(tmp_path, system.name, seed)
            folder.mkdir(parents=True)
            scores = {"per_language": {"en": 80.0, "de": 60.0 + offset + seed, "zh": 40.0 + offset}}
            (folder / "results.json").write_text(json.dumps(
                {"test": scores, "best_score": 50.0, "best_step": 10, "steps": 20}))
            (folder / "losses.jsonl").write_text("")
            if seed == 0:
                full = {"per_language": {"en": 81.0, "de": 61.0 + 2 * offset, "zh": 41.0 + 2 * offset}}
                (folder / "test_full.json").write_text(json.dumps(full))
    teacher = {head: {"per_language": {"de": 50.0, "zh": 30.0}, "average": 40.0} for head in ("span", "seq")}
    report = summarize(scale, tmp_path, listed, teacher, {})
    dual = report["systems"]["dualner_trggold"]
    assert dual["average"]["n"] == 2 and dual["full_test"]["average"]["n"] == 1
    assert dual["full_test"]["average"]["mean"] == pytest.approx(61.0)
    assert report["gains"]["dualner_trggold - mlt"]["mean"] == pytest.approx(5.0)
    assert report["gains_full_test"]["dualner_trggold - mlt"]["seeds"] == [0]
    assert report["gains_full_test"]["dualner_trggold - mlt"]["mean"] == pytest.approx(10.0)
    table = markdown(report, scale)
    assert "Final numbers, full test sets:" in table
    assert "Per language (test F1, test sets capped at 24 sentences" in table
