"""Reproduce the paper's comparison (SPEC "Ablations and variants", Tables 1-2, Figure 3) on real data.

    python bench/reproduce.py --scale cpu                  # multilingual-e5-small, 2 CPU cores, 3 seeds
    python bench/reproduce.py --scale paper --launcher "deepspeed --num_gpus 10"  # XLM-R base recipe (stage-2 batch 500: 10 ranks)
    python bench/reproduce.py --config my_scale.yaml --seeds 5 --systems mlt,dualner_trggold

A scale is one YAML file (bench/configs/reproduce_<scale>.yaml): where the data lives, which
languages, the source fractions of Figure 3, how many seeds, and the stage-1 and stage-2 config
fragments every run shares. The systems are fixed here, because they are the definition of the
experiment:

    mlt                stage 1 on all labeled English (the first teacher of every stage-2 system)
    dualner_trggold    stage 2 from mlt, the 19 target train splits as unlabeled text
    cla, span          stage 1 with the sequence head only / the span heads only (Table 1)
    wo_mse             DualNER with lambda = 0
    w_selfkl           DualNER with self-teaching (KL to the teacher's soft distributions)
    wo_trg             stage 2 on the English source only
    mlt_pNN            stage 1 on NN% of the labeled English (Figure 3)
    dualner_pNN        stage 2 from mlt_pNN; the other (100-NN)% of English joins as unlabeled text
    <variant>          DualNER + TRGGold with the scale's `variants` overrides (config choices)

Every system runs once per seed (`seeds`, or `--seeds`), except those the scale lists in
`single_seed` (run with the first seed only); seed k sets run.seed = base + k, and a stage-2 system's
seed k starts from its stage-1 system's seed k, so gains are paired. Each run is a normal launcher
invocation with a generated config (kept in OUTPUT/configs/), in OUTPUT/<system>/seed<k>/, so any run
is reproducible by hand. Running the command again skips every (system, seed) whose results.json
exists and resumes an interrupted one from its newest checkpoint (the launchers' resume=auto).
At the end: results JSON (test F1 per seed, mean and sd per system and language, the paired gain of
each stage-2 system over its stage-1 teacher with a bootstrap 95% interval), a Markdown block in
bench/RESULTS.md, diagnostics of the first teacher, and plots when matplotlib is installed
(`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dualner.config import Config, ConfigError, build_dataclass, save_config, set_dotted  # noqa: E402

# The paper's test F1 averages (XLM-R base, over its 40 languages; SPEC): Table 2 for the ablations,
# Table 1 for CLA and SPAN (Table 1's MLT is 61.02, Table 2's 61.53).
PAPER = {"mlt": 61.53, "dualner_trggold": 68.64, "wo_mse": 68.05, "w_selfkl": 65.18, "wo_trg": 62.17,
         "cla": 60.40, "span": 61.59}
LABELS = {"cla": "CLA (sequence head only)", "span": "SPAN (span heads only)", "mlt": "MLT (stage 1 only)",
          "dualner_trggold": "DualNER + TRGGold", "wo_mse": "w/o MSE", "w_selfkl": "w/ selfKL", "wo_trg": "w/o TRG"}
BOOTSTRAP_SAMPLES = 10_000


@dataclass
class Scale:
    """One reproduction scale (bench/configs/reproduce_<scale>.yaml)."""
    name: str
    data_root: str  # <data_root>/<lang>/{train,dev,test}.tsv
    target_languages: list[str]
    source_language: str = "en"
    fractions: list[float] = field(default_factory=lambda: [0.2, 0.5])  # Figure 3, besides 1.0
    seeds: int = 1  # runs per system (--seeds overrides)
    systems: list[str] | None = None  # the systems of this scale (default: all; mlt and dualner_trggold always)
    single_seed: list[str] = field(default_factory=list)  # systems run with the first seed only
    # systems whose best checkpoint is also evaluated on the whole test sets (final numbers) when the
    # fragments cap them (data.max_eval_sentences) for speed
    full_test_systems: list[str] = field(default_factory=list)
    # how many of their seeds (the first ones) get the full test sets; default: every seed. The full
    # test sets are 20x the capped ones and each takes longer than a run at the CPU scale.
    full_test_seeds: int | None = None
    # extra DualNER + TRGGold systems: name -> dotted config overrides (the method's config choices)
    variants: dict[str, dict] = field(default_factory=dict)
    output_dir: str = "runs/reproduce"
    results: str = "bench/results/reproduction.json"
    plots_dir: str = "bench/results"
    results_markdown: str = "bench/RESULTS.md"  # the table goes between this scale's markers
    diagnostic_sentences: int = 500  # target train sentences per language scored against held-back gold
    stage1: dict = field(default_factory=dict)  # config fragment of every stage-1 run
    stage2: dict = field(default_factory=dict)  # config fragment of every stage-2 run


def load_scale(path: Path) -> Scale:
    """The scale file, checked like a run config (dualner.config): unknown keys, types."""
    if not path.is_file():
        raise SystemExit(f"{path}: scale file not found")
    tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    missing = [name for name in ("name", "data_root", "target_languages") if name not in tree]
    if missing:
        raise SystemExit(f"{path}: missing key(s) {missing}")
    try:
        scale = build_dataclass(Scale, tree, path)
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    for fraction in scale.fractions:
        if not 0 < fraction < 1:
            raise SystemExit(f"{path}: fractions: {fraction} is not in (0, 1) (1.0 is always run)")
    if scale.seeds < 1:
        raise SystemExit(f"{path}: seeds: {scale.seeds} (at least 1)")
    if scale.full_test_seeds is not None and scale.full_test_seeds < 1:
        raise SystemExit(f"{path}: full_test_seeds: {scale.full_test_seeds} (at least 1, or leave it out)")
    every = {system.name: system for system in systems(Scale(**{**scale.__dict__, "systems": None}))}
    for name in scale.systems or []:
        if name not in every:
            raise SystemExit(f"{path}: systems: {name!r} is not a system ({', '.join(every)})")
    known = {system.name: system for system in systems(scale)}
    for name, system in known.items():
        if system.baseline and system.baseline not in known:
            raise SystemExit(f"{path}: systems: {name} needs {system.baseline}")
    for fraction in scale.fractions:
        pair = [f"{kind}_p{round(fraction * 100):02d}" for kind in ("mlt", "dualner")]
        if not set(pair) <= set(known):
            raise SystemExit(f"{path}: fractions: {fraction} needs systems {pair} (or drop it from fractions)")
    for key in ("single_seed", "full_test_systems"):
        for name in getattr(scale, key):
            if name not in known:
                raise SystemExit(f"{path}: {key}: {name!r} is not a system ({', '.join(sorted(known))})")
    return scale


@dataclass
class System:
    name: str
    stage: int
    fraction: float = 1.0
    init_from: str = ""  # the stage-1 system a stage-2 system starts from
    targets: bool = True  # stage 2 reads the target languages' unlabeled text
    overrides: dict = field(default_factory=dict)  # dotted keys
    compare_to: str = ""  # the system its gain is paired with (default: init_from)

    @property
    def baseline(self) -> str:
        return self.compare_to or self.init_from


def systems(scale: Scale) -> list[System]:
    """Main comparison first, so a partial run already answers the first question."""
    listed = [System("mlt", 1), System("dualner_trggold", 2, init_from="mlt"),
              System("cla", 1, overrides={"model.variant": "cla"}, compare_to="mlt"),
              System("span", 1, overrides={"model.variant": "span"}, compare_to="mlt"),
              System("wo_mse", 2, init_from="mlt", overrides={"stage2.mse_weight": 0.0}),
              System("w_selfkl", 2, init_from="mlt", overrides={"stage2.teaching": "self_kl"}),
              System("wo_trg", 2, init_from="mlt", targets=False)]
    for fraction in scale.fractions:
        suffix = f"p{round(fraction * 100):02d}"
        listed += [System(f"mlt_{suffix}", 1, fraction),
                   System(f"dualner_{suffix}", 2, fraction, init_from=f"mlt_{suffix}")]
    listed += [System(name, 2, init_from="mlt", overrides=dict(overrides)) for name, overrides in scale.variants.items()]
    if scale.systems is not None:
        wanted = {"mlt", "dualner_trggold", *scale.systems}
        listed = [system for system in listed if system.name in wanted]
    return listed


def seeds_of(scale: Scale, system: System) -> list[int]:
    return [0] if system.name in scale.single_seed else list(range(scale.seeds))


def schedule(scale: Scale, listed: list[System]) -> list[tuple[System, int]]:
    """Seed by seed through the seeded systems (the main comparison first), then the single-seed ones,
    so a run cut short has the seeded comparison complete."""
    seeded = [s for s in listed if s.name not in scale.single_seed]
    single = [s for s in listed if s.name in scale.single_seed]
    return [(s, seed) for seed in range(scale.seeds) for s in seeded] + [(s, 0) for s in single]


def wants_full_test(scale: Scale, system: System, seed: int) -> bool:
    return system.name in scale.full_test_systems and (scale.full_test_seeds is None or seed < scale.full_test_seeds)


def run_dir(output: Path, name: str, seed: int) -> Path:
    return output / name / f"seed{seed}"


def run_config(scale: Scale, system: System, seed: int, output: Path) -> Config:
    """The launcher config of one run, built through dualner.config: the scale's fragment, the data,
    the system's changes, the seed (a wrong key fails here, before hours of earlier runs are spent)."""
    root = Path(scale.data_root)
    languages = [scale.source_language, *scale.target_languages]
    tree = copy.deepcopy(scale.stage1 if system.stage == 1 else scale.stage2)
    set_dotted(tree, "run.output_dir", str(run_dir(output, system.name, seed)))
    set_dotted(tree, "run.seed", tree.get("run", {}).get("seed", Config().run.seed) + seed)
    set_dotted(tree, "data.source_language", scale.source_language)
    set_dotted(tree, "data.train", {scale.source_language: str(root / scale.source_language / "train.tsv")})
    set_dotted(tree, "data.train_fraction", system.fraction)
    for split in ("dev", "test"):
        set_dotted(tree, f"data.{split}", {lang: str(root / lang / f"{split}.tsv") for lang in languages})
    if system.stage == 2:
        set_dotted(tree, "stage2.init_from", str(run_dir(output, system.init_from, seed)))
        targets = {lang: str(root / lang / "train.tsv") for lang in scale.target_languages}
        set_dotted(tree, "stage2.target", targets if system.targets else {})
    for key, value in system.overrides.items():
        set_dotted(tree, key, value)
    try:
        return build_dataclass(Config, tree, f"system {system.name} seed {seed}")
    except ConfigError as error:
        raise SystemExit(str(error)) from None


def train(scale: Scale, system: System, seed: int, output: Path, launcher: list[str], index: int, total: int) -> bool:
    """Train one (system, seed) unless its results exist; True when it trained."""
    folder, label = run_dir(output, system.name, seed), f"[{index}/{total}] {system.name} seed {seed}"
    if (folder / "results.json").is_file():
        print(f"{label}: done earlier, results in {folder}/results.json", flush=True)
        return False
    config_path = output / "configs" / f"{system.name}_seed{seed}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    save_config(run_config(scale, system, seed, output), config_path)
    resumed = " (resuming)" if (folder / "checkpoints").is_dir() else ""
    print(f"{label}: stage {system.stage}{resumed}, config {config_path}", flush=True)
    started = time.monotonic()
    command = [*launcher, str(REPO / "launchers" / f"stage{system.stage}.py"), "--config", str(config_path)]
    completed = subprocess.run(command, cwd=REPO)
    if completed.returncode != 0:
        raise SystemExit(f"{system.name} seed {seed}: `{shlex.join(command)}` exited with {completed.returncode}; "
                         f"run this command again to resume")
    print(f"{label}: finished in {(time.monotonic() - started) / 60:.1f} min", flush=True)
    return True


def evaluate_full_test(scale: Scale, system: System, seed: int, output: Path, launcher: list[str]) -> bool:
    """The best checkpoint of one run on the whole test sets (test_full.json in its folder), unless done."""
    folder = run_dir(output, system.name, seed)
    path = folder / "test_full.json"
    if path.is_file():
        return False
    root = Path(scale.data_root)
    data = [f"{lang}={root / lang / 'test.tsv'}" for lang in [scale.source_language, *scale.target_languages]]
    print(f"{system.name} seed {seed}: full test sets", flush=True)
    command = [*launcher, str(REPO / "launchers" / "evaluate.py"), "--checkpoint", str(folder / "checkpoints"),
               "--output", str(path), "--data", *data]
    completed = subprocess.run(command, cwd=REPO)
    if completed.returncode != 0:
        raise SystemExit(f"{system.name} seed {seed}: `{shlex.join(command)}` exited with {completed.returncode}")
    return True


def diagnose_teacher(scale: Scale, output: Path, launcher: list[str]) -> dict:
    """How good the first teacher's pseudo labels are on the unlabeled target text: F1 of each head
    of MLT (seed 0) on the first sentences of every target train split against its (held back) gold
    tags. The span head makes the pseudo BIO labels, the sequence head the pseudo start/end labels."""
    folder = output / "diagnostics"
    folder.mkdir(parents=True, exist_ok=True)
    data = [f"{lang}={Path(scale.data_root) / lang / 'train.tsv'}" for lang in scale.target_languages]
    scores = {}
    for head in ("span", "seq"):
        path = folder / f"teacher_{head}_on_target_train.json"
        if not path.is_file():
            command = [*launcher, str(REPO / "launchers" / "evaluate.py"), "--checkpoint",
                       str(run_dir(output, "mlt", 0) / "checkpoints"), "--head", head, "--output", str(path),
                       "--max-sentences", str(scale.diagnostic_sentences), "--data", *data]
            subprocess.run(command, cwd=REPO, check=True)
        scores[head] = json.loads(path.read_text(encoding="utf-8"))
    return scores


# -- statistics ---------------------------------------------------------------------------------------

def mean_sd(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value) of `values`, and how many."""
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if len(array) > 1 else 0.0, "n": len(array)}


def paired_gain(better: dict[int, dict[str, float]], base: dict[int, dict[str, float]], languages: list[str],
                samples: int = BOOTSTRAP_SAMPLES, rng_seed: int = 0) -> dict | None:
    """The paired gain better - base (test F1 per seed and language, seeds present in both): its mean,
    per-language mean and sd, and a 95% percentile interval from a two-level bootstrap that resamples
    the seeds and, independently, the languages (both sources of variation), keeping pairs intact."""
    seeds = sorted(set(better) & set(base))
    if not seeds:
        return None
    gains = np.array([[better[s][lang] - base[s][lang] for lang in languages] for s in seeds])  # (seeds, languages)
    rng = np.random.default_rng(rng_seed)
    seed_draws = rng.integers(0, len(seeds), size=(samples, len(seeds)))
    language_draws = rng.integers(0, len(languages), size=(samples, len(languages)))
    # mean over the resampled grid = mean over resampled seeds of (mean over resampled languages)
    per_seed = np.stack([gains[:, language_draws[b]].mean(axis=1) for b in range(samples)])  # (samples, seeds)
    means = np.take_along_axis(per_seed, seed_draws, axis=1).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(gains.mean()), "ci95": [float(low), float(high)], "seeds": seeds,
            "per_language": {lang: mean_sd(list(gains[:, i])) for i, lang in enumerate(languages)},
            "languages_improved": int((gains.mean(axis=0) > 0).sum()),
            "method": f"two-level bootstrap over seeds and languages, {samples} samples, percentile interval"}


def _losses(folder: Path) -> list[dict]:
    path = folder / "losses.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_scores(scale: Scale, scores: dict) -> dict:
    """Target languages, their average, English apart, from {"per_language": ...}."""
    per_language = {lang: scores["per_language"][lang] for lang in scale.target_languages}
    return {"per_language": per_language, "average": sum(per_language.values()) / len(per_language),
            "english": scores["per_language"][scale.source_language]}


def run_entry(scale: Scale, system: System, folder: Path) -> dict:
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    entry = test_scores(scale, results["test"]) | {
        "dev_average": results["best_score"], "best_step": results["best_step"], "steps": results["steps"]}
    if (folder / "test_full.json").is_file():
        entry["full_test"] = test_scores(scale, json.loads((folder / "test_full.json").read_text(encoding="utf-8")))
    if system.stage == 2:
        losses = _losses(folder)
        agreement = [row["teacher/agreement"] for row in losses if "teacher/agreement" in row]
        entry["teacher_refreshes"] = max((row.get("teacher/refreshes", 0) for row in losses), default=0)
        entry["teacher_head_agreement"] = sum(agreement) / len(agreement) if agreement else None
        mse = [row["loss/mse"] for row in losses if "loss/mse" in row]
        entry["mse_first_last"] = [mse[0], mse[-1]] if mse else None
        share = [row["loss/mse_share"] for row in losses if "loss/mse_share" in row]
        entry["mse_share_of_loss"] = sum(share) / len(share) if share else None
    return entry


def statistics(runs: list[dict], languages: list[str]) -> dict:
    """Mean and sd over seeds of the average, English and each language."""
    return {"average": mean_sd([r["average"] for r in runs]), "english": mean_sd([r["english"] for r in runs]),
            "per_language": {lang: mean_sd([r["per_language"][lang] for r in runs]) for lang in languages}}


def summarize(scale: Scale, output: Path, listed: list[System], teacher: dict, minutes: dict) -> dict:
    report: dict = {"meta": {"scale": scale.name, "encoder": scale.stage1.get("model", {}).get("encoder"),
                             "source_language": scale.source_language,
                             "target_languages": scale.target_languages, "seeds": scale.seeds,
                             "single_seed": scale.single_seed, "variants": scale.variants,
                             "full_test_systems": scale.full_test_systems,
                             "test_sets": "full test sets" if scale.stage1.get("data", {}).get("full_test_sets")
                             or not scale.stage1.get("data", {}).get("max_eval_sentences")
                             else f"test sets capped at {scale.stage1['data']['max_eval_sentences']} sentences",
                             "average": "unweighted mean test F1 (percent) over the target languages",
                             "sd": "sample standard deviation over seeds",
                             "date": time.strftime("%Y-%m-%d"), "paper": PAPER},
                    "systems": {}, "gains": {}, "gains_full_test": {}}
    languages = scale.target_languages
    for system in listed:
        runs = {seed: run_entry(scale, system, run_dir(output, system.name, seed)) for seed in seeds_of(scale, system)}
        entry = {"stage": system.stage, "source_fraction": system.fraction, "init_from": system.init_from,
                 "baseline": system.baseline, "overrides": system.overrides, "seeds": sorted(runs),
                 **statistics(list(runs.values()), languages),
                 "runs": {str(seed): run | ({"minutes": minutes[f"{system.name}/seed{seed}"]}
                                            if f"{system.name}/seed{seed}" in minutes else {})
                          for seed, run in runs.items()}}
        full = [run["full_test"] for run in runs.values() if "full_test" in run]  # n says how many seeds
        if full:
            entry["full_test"] = statistics(full, languages)
        report["systems"][system.name] = entry
    for name, entry in report["systems"].items():  # each gain paired seed by seed with its baseline
        if not entry["baseline"]:
            continue
        base = report["systems"][entry["baseline"]]
        for key, scores in (("gains", lambda run: run), ("gains_full_test", lambda run: run.get("full_test"))):
            mine = {int(s): scores(r) for s, r in entry["runs"].items() if scores(r)}
            theirs = {int(s): scores(r) for s, r in base["runs"].items() if scores(r)}
            if mine and theirs:
                report[key][f"{name} - {entry['baseline']}"] = paired_gain(
                    {s: r["per_language"] for s, r in mine.items()}, {s: r["per_language"] for s, r in theirs.items()},
                    languages)
    report["teacher_pseudo_label_f1"] = {
        head: {"per_language": scores["per_language"], "average": scores["average"]}
        for head, scores in teacher.items()}
    return report


# -- report -------------------------------------------------------------------------------------------

def _ms(stat: dict) -> str:
    return f"{stat['mean']:.2f} ± {stat['sd']:.2f}" if stat["n"] > 1 else f"{stat['mean']:.2f}"


def _gain(gain: dict | None) -> str:
    if gain is None:
        return "-"
    return f"{gain['mean']:+.2f} [{gain['ci95'][0]:+.2f}, {gain['ci95'][1]:+.2f}]"


def _label(name: str, entry: dict) -> str:
    return LABELS.get(name, f"{name} ({', '.join(f'{k}={v}' for k, v in entry['overrides'].items())})")


def _full_test_every_seed(entry: dict) -> bool:
    """The per-language table and plots use the full test sets only where every seed has them (else
    the capped sets, with their spread)."""
    return "full_test" in entry and entry["full_test"]["average"]["n"] == entry["average"]["n"]


def _system_table(report: dict, names: list[str], test: str) -> list[str]:
    """One row per system: seeds, target average, the paired gain over its baseline, English, paper."""
    systems_ = report["systems"]
    gains = report["gains_full_test" if test == "full_test" else "gains"]
    lines = ["| system | seeds | target avg (ours) | gain over | English (ours) | paper avg (XLM-R base) |",
             "|---|---|---|---|---|---|"]
    for name in names:
        entry = systems_[name]
        scores = entry[test] if test == "full_test" else entry
        gain = gains.get(f"{name} - {entry['baseline']}")
        against = f"{_gain(gain)} ({entry['baseline']})" if gain else "-"
        paper = f"{PAPER[name]:.2f}" if name in PAPER else "-"
        lines.append(f"| {_label(name, entry)} | {scores['average']['n']} | {_ms(scores['average'])} | {against} | "
                     f"{_ms(scores['english'])} | {paper} |")
    return lines


def markdown(report: dict, scale: Scale) -> str:
    systems_, meta = report["systems"], report["meta"]
    ordered = [name for name in LABELS if name in systems_] + [name for name in scale.variants if name in systems_]
    full = [name for name in ordered if "full_test" in systems_[name]]
    intro = (f"Test F1 averaged over the {len(scale.target_languages)} target languages, mean ± sd over seeds "
             f"(sample sd; n = seeds run). A gain is paired seed by seed with the system named after it (a "
             f"stage-2 system's stage-1 teacher), with a 95% interval from a bootstrap over seeds and languages.")
    lines = [intro, ""]
    if full:
        lines += ["Final numbers, full test sets:", "", *_system_table(report, full, "full_test"), ""]
    lines += [f"Every system ({meta['test_sets']}; the ablations and config choices are compared here):", "",
              *_system_table(report, ordered, "test"), ""]
    gains = report["gains"]
    lines += ["Source fraction (Figure 3): average test F1 over the target languages "
              f"({meta['test_sets']}).", "",
              "| labeled English | MLT | DualNER + TRGGold | gain |", "|---|---|---|---|"]
    for fraction in [*scale.fractions, 1.0]:
        suffix = "" if fraction == 1.0 else f"_p{round(fraction * 100):02d}"
        mlt_name, dual_name = f"mlt{suffix}", "dualner_trggold" if fraction == 1.0 else f"dualner{suffix}"
        lines.append(f"| {fraction:.0%} | {_ms(systems_[mlt_name]['average'])} | "
                     f"{_ms(systems_[dual_name]['average'])} | {_gain(gains.get(f'{dual_name} - {mlt_name}'))} |")
    columns = [name for name in ("cla", "span", "mlt", "dualner_trggold") if name in systems_]
    test = "full_test" if all(_full_test_every_seed(systems_[c]) for c in columns) else "test"
    per_language = (lambda c: systems_[c]["full_test"]) if test == "full_test" else (lambda c: systems_[c])
    main_gain = report["gains_full_test" if test == "full_test" else "gains"].get("dualner_trggold - mlt")
    lines += ["", f"Per language (test F1, {'full test sets' if test == 'full_test' else meta['test_sets']}, "
              f"mean ± sd over seeds):", "",
              "| language | " + " | ".join(LABELS[c] for c in columns) + " | DualNER − MLT |",
              "|---|" + "---|" * (len(columns) + 1)]
    for lang in scale.target_languages:
        cells = [_ms(per_language(c)["per_language"][lang]) for c in columns]
        gain = main_gain["per_language"][lang] if main_gain else None
        lines.append(f"| {lang} | " + " | ".join(cells) + (f" | {_ms(gain)} |" if gain else " | - |"))
    lines.append("| **average** | " + " | ".join(f"**{_ms(per_language(c)['average'])}**" for c in columns)
                 + f" | **{_gain(main_gain)}** |")
    teacher = report["teacher_pseudo_label_f1"]
    dual = systems_["dualner_trggold"]["runs"]["0"]
    lines += ["", f"Diagnostics (seed 0): the first teacher (MLT) on {scale.diagnostic_sentences} target train "
              f"sentences per language against their held-back gold tags: span head (makes the pseudo "
              f"BIO labels) {teacher['span']['average']:.2f} F1, sequence head (makes the pseudo "
              f"start/end labels) {teacher['seq']['average']:.2f} F1; word-level agreement of the "
              f"teacher's two heads during DualNER + TRGGold {100 * (dual['teacher_head_agreement'] or 0):.1f}%; "
              f"the student replaced the teacher {int(dual['teacher_refreshes'])} times; the MSE term's weighted "
              f"share of the stage-2 loss {100 * (dual.get('mse_share_of_loss') or 0):.2f}%."]
    return "\n".join(lines)


def write_markdown(path: Path, scale_name: str, table: str, command: str) -> None:
    begin, end = f"<!-- reproduction:{scale_name}:begin -->", f"<!-- reproduction:{scale_name}:end -->"
    block = f"{begin}\nCommand: `{command}`\n\n{table}\n{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n## Reproduction ({scale_name} scale)\n\n{block}\n"
    path.write_text(text, encoding="utf-8")


def plot(report: dict, scale: Scale, folder: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]); plots skipped", flush=True)
        return []
    folder.mkdir(parents=True, exist_ok=True)
    systems_ = report["systems"]
    languages = scale.target_languages
    encoder = report["meta"]["encoder"]

    def finish(figure, axes, ylabel: str, title: str, name: str) -> Path:
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.legend()
        figure.tight_layout()
        path = folder / f"reproduction_{scale.name}_{name}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path

    # per language, error bars = sd over seeds
    shown = [name for name in ("mlt", "dualner_trggold") if name in systems_]
    full = all(_full_test_every_seed(systems_[name]) for name in shown)
    scores = {name: systems_[name]["full_test"] if full else systems_[name] for name in shown}
    which = "full test sets" if full else report["meta"]["test_sets"]
    figure, axes = plt.subplots(figsize=(max(6, 0.55 * len(languages) + 2), 4))
    width = 0.8 / len(shown)
    for column, name in enumerate(shown):
        stats = [scores[name]["per_language"][lang] for lang in languages]
        axes.bar([i + (column - (len(shown) - 1) / 2) * width for i in range(len(languages))],
                 [s["mean"] for s in stats], width, yerr=[s["sd"] for s in stats], capsize=2,
                 label=f"{LABELS[name]} (avg {_ms(scores[name]['average'])}, {scores[name]['average']['n']} seeds)")
    axes.set_xticks(range(len(languages)), languages)
    written = [finish(figure, axes, f"test F1 (mean ± sd over seeds; {which})",
                      f"Zero-shot test F1 per target language ({encoder}, {scale.name} scale)", "per_language")]

    gain = report["gains_full_test" if full else "gains"].get("dualner_trggold - mlt")
    if gain is not None:
        ordered = sorted(languages, key=lambda lang: gain["per_language"][lang]["mean"])
        figure, axes = plt.subplots(figsize=(max(6, 0.45 * len(languages) + 2), 4))
        values = [gain["per_language"][lang] for lang in ordered]
        axes.bar(range(len(ordered)), [v["mean"] for v in values], yerr=[v["sd"] for v in values], capsize=2,
                 color=["tab:green" if v["mean"] > 0 else "tab:red" for v in values])
        axes.axhline(gain["mean"], color="black", linestyle="--",
                     label=f"average {gain['mean']:+.2f} (95% CI {gain['ci95'][0]:+.2f}..{gain['ci95'][1]:+.2f})")
        axes.axhline(0, color="grey", linewidth=0.8)
        axes.set_xticks(range(len(ordered)), ordered)
        written.append(finish(figure, axes, "DualNER − MLT, test F1 (mean ± sd)",
                              f"Gain per target language, sorted ({len(gain['seeds'])} paired seeds)", "gain_sorted"))

    fractions = [*scale.fractions, 1.0]
    names = [("mlt", "dualner_trggold") if p == 1.0 else (f"mlt_p{round(p * 100):02d}", f"dualner_p{round(p * 100):02d}")
             for p in fractions]
    figure, axes = plt.subplots(figsize=(5, 4))
    for column, label in ((0, "MLT"), (1, "DualNER + TRGGold")):
        stats = [systems_[pair[column]]["average"] for pair in names]
        axes.errorbar([100 * p for p in fractions], [s["mean"] for s in stats], yerr=[s["sd"] for s in stats],
                      marker="o", capsize=3, label=label)
    axes.set_xlabel("labeled English used in stage 1 (%)")
    written.append(finish(figure, axes, "average test F1, target languages", "Source fraction (paper Fig. 3)",
                          "source_fraction"))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--scale", help="a scale under bench/configs/reproduce_<scale>.yaml: cpu, cpu_main or paper")
    where.add_argument("--config", type=Path, help="a scale file")
    parser.add_argument("--launcher", default=sys.executable,
                        help='how each run is started, e.g. "deepspeed --num_gpus 8" (default: this python)')
    parser.add_argument("--seeds", type=int, default=None, help="runs per system (default: the scale's `seeds`)")
    parser.add_argument("--systems", default=None,
                        help="comma-separated systems to train now (default: all); the report needs all of them")
    args = parser.parse_args(argv)
    path = args.config.resolve() if args.config else REPO / "bench" / "configs" / f"reproduce_{args.scale}.yaml"
    scale = load_scale(path)
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit(f"--seeds {args.seeds}: at least 1")
        scale.seeds = args.seeds
    os.chdir(REPO)  # relative paths in a scale file are relative to the repository, like the configs
    output = Path(scale.output_dir)
    launcher = shlex.split(args.launcher)
    listed = systems(scale)
    wanted = set(args.systems.split(",")) if args.systems else {system.name for system in listed}
    unknown = wanted - {system.name for system in listed}
    if unknown:
        raise SystemExit(f"--systems: unknown {sorted(unknown)}; systems: {', '.join(s.name for s in listed)}")
    plan = [(system, seed) for system, seed in schedule(scale, listed) if system.name in wanted]
    for system, seed in plan:  # every generated config is checked before the first run starts
        run_config(scale, system, seed, output)
    minutes_path = output / "minutes.json"
    minutes = json.loads(minutes_path.read_text()) if minutes_path.is_file() else {}
    started = time.monotonic()
    for index, (system, seed) in enumerate(plan, 1):
        began = time.monotonic()
        trained = train(scale, system, seed, output, launcher, index, len(plan))
        if trained:
            minutes[f"{system.name}/seed{seed}"] = round((time.monotonic() - began) / 60, 2)
        if wants_full_test(scale, system, seed):
            began = time.monotonic()
            if evaluate_full_test(scale, system, seed, output, launcher):
                minutes[f"{system.name}/seed{seed}/full_test"] = round((time.monotonic() - began) / 60, 2)
                trained = True
        if trained:
            output.mkdir(parents=True, exist_ok=True)
            minutes_path.write_text(json.dumps(minutes, indent=1))
    if args.systems:
        print(f"trained {sorted(wanted)}; run without --systems for the report", flush=True)
        return
    teacher = diagnose_teacher(scale, output, launcher)
    report = summarize(scale, output, listed, teacher, minutes)
    results = Path(scale.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    table = markdown(report, scale)
    command = f"python bench/reproduce.py --scale {args.scale}" if args.scale else f"python bench/reproduce.py --config {path}"
    if args.seeds is not None:
        command += f" --seeds {args.seeds}"
    write_markdown(Path(scale.results_markdown), scale.name, table, command)
    plots = plot(report, scale, Path(scale.plots_dir))
    print(table)
    print(f"\n{results} written; table in {scale.results_markdown}; plots: {[str(p) for p in plots]}; "
          f"{(time.monotonic() - started) / 60:.1f} min this invocation", flush=True)


if __name__ == "__main__":
    main()
