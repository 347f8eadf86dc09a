"""Reproduce the paper's comparison (SPEC "Ablations and variants", Table 2 and Figure 3) on real data.

    python bench/reproduce.py --scale cpu                  # multilingual-e5-small, 2 CPU cores, < 3 h
    python bench/reproduce.py --scale paper --launcher "deepspeed --num_gpus 8"   # XLM-R base recipe
    python bench/reproduce.py --config my_scale.yaml       # any scale file of the same shape

A scale is one YAML file (bench/configs/reproduce_<scale>.yaml): where the data lives, which
languages, the source fractions of Figure 3, and the stage-1 and stage-2 config fragments every run
shares. The systems themselves are fixed here, because they are the definition of the experiment:

    mlt                stage 1 on all labeled English (the first teacher of every stage-2 system)
    dualner_trggold    stage 2 from mlt, the 19 target train splits as unlabeled text
    wo_mse             the same with lambda = 0
    w_selfkl           the same with self-teaching (KL to the teacher's soft distributions)
    wo_trg             stage 2 on the English source only
    mlt_pNN            stage 1 on NN% of the labeled English (Figure 3)
    dualner_pNN        stage 2 from mlt_pNN; the other (100-NN)% of English joins as unlabeled text

Each run is a normal launcher invocation with a generated config (kept in OUTPUT/configs/), so a
system is reproducible by hand. Running the command again skips every system whose results.json
exists and resumes an interrupted run from its newest checkpoint (the launchers' resume=auto).
At the end: results JSON (test F1 over the target languages, English separately), a Markdown table
side by side with the paper's numbers written into bench/RESULTS.md, diagnostics of the teacher, and
plots when matplotlib is installed (`pip install -e .[bench]`).
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

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dualner.config import Config, ConfigError, build_dataclass, save_config, set_dotted  # noqa: E402

# Test F1 averages of the paper (XLM-R base, averages over the paper's 40 languages; SPEC).
PAPER_TABLE2 = {"mlt": 61.53, "dualner_trggold": 68.64, "wo_mse": 68.05, "w_selfkl": 65.18, "wo_trg": 62.17}
LABELS = {"mlt": "MLT (stage 1 only)", "dualner_trggold": "DualNER + TRGGold", "wo_mse": "w/o MSE",
          "w_selfkl": "w/ selfKL", "wo_trg": "w/o TRG"}


@dataclass
class Scale:
    """One reproduction scale (bench/configs/reproduce_<scale>.yaml)."""
    name: str
    data_root: str  # <data_root>/<lang>/{train,dev,test}.tsv
    target_languages: list[str]
    source_language: str = "en"
    fractions: list[float] = field(default_factory=lambda: [0.2, 0.5])  # Figure 3, besides 1.0
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
    return scale


@dataclass
class System:
    name: str
    stage: int
    fraction: float = 1.0
    init_from: str = ""  # the stage-1 system a stage-2 system starts from
    targets: bool = True  # stage 2 reads the target languages' unlabeled text
    overrides: dict = field(default_factory=dict)  # dotted keys


def systems(scale: Scale) -> list[System]:
    """Main comparison first, so a partial run already answers the first question."""
    listed = [System("mlt", 1), System("dualner_trggold", 2, init_from="mlt"),
              System("wo_mse", 2, init_from="mlt", overrides={"stage2.mse_weight": 0.0}),
              System("w_selfkl", 2, init_from="mlt", overrides={"stage2.teaching": "self_kl"}),
              System("wo_trg", 2, init_from="mlt", targets=False)]
    for fraction in scale.fractions:
        suffix = f"p{round(fraction * 100):02d}"
        listed += [System(f"mlt_{suffix}", 1, fraction),
                   System(f"dualner_{suffix}", 2, fraction, init_from=f"mlt_{suffix}")]
    return listed


def run_config(scale: Scale, system: System, output: Path) -> Config:
    """The launcher config of one system, built through dualner.config: the scale's fragment, the
    data, the system's changes (a wrong key fails here, before hours of earlier systems are spent)."""
    root = Path(scale.data_root)
    languages = [scale.source_language, *scale.target_languages]
    tree = copy.deepcopy(scale.stage1 if system.stage == 1 else scale.stage2)
    set_dotted(tree, "run.output_dir", str(output / system.name))
    set_dotted(tree, "data.source_language", scale.source_language)
    set_dotted(tree, "data.train", {scale.source_language: str(root / scale.source_language / "train.tsv")})
    set_dotted(tree, "data.train_fraction", system.fraction)
    for split in ("dev", "test"):
        set_dotted(tree, f"data.{split}", {lang: str(root / lang / f"{split}.tsv") for lang in languages})
    if system.stage == 2:
        set_dotted(tree, "stage2.init_from", str(output / system.init_from))
        targets = {lang: str(root / lang / "train.tsv") for lang in scale.target_languages}
        set_dotted(tree, "stage2.target", targets if system.targets else {})
    for key, value in system.overrides.items():
        set_dotted(tree, key, value)
    try:
        return build_dataclass(Config, tree, f"system {system.name}")
    except ConfigError as error:
        raise SystemExit(str(error)) from None


def train(scale: Scale, system: System, output: Path, launcher: list[str], index: int, total: int) -> None:
    run_dir = output / system.name
    if (run_dir / "results.json").is_file():
        print(f"[{index}/{total}] {system.name}: done earlier, results in {run_dir}/results.json", flush=True)
        return
    config_path = output / "configs" / f"{system.name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    save_config(run_config(scale, system, output), config_path)
    resumed = " (resuming)" if (run_dir / "checkpoints").is_dir() else ""
    print(f"[{index}/{total}] {system.name}: stage {system.stage}{resumed}, config {config_path}", flush=True)
    started = time.monotonic()
    command = [*launcher, str(REPO / "launchers" / f"stage{system.stage}.py"), "--config", str(config_path)]
    completed = subprocess.run(command, cwd=REPO)
    if completed.returncode != 0:
        raise SystemExit(f"{system.name}: `{shlex.join(command)}` exited with {completed.returncode}; "
                         f"run this command again to resume")
    print(f"[{index}/{total}] {system.name}: finished in {(time.monotonic() - started) / 60:.1f} min", flush=True)


def diagnose_teacher(scale: Scale, output: Path, launcher: list[str]) -> dict:
    """How good the first teacher's pseudo labels are on the unlabeled target text: F1 of each head
    on the first sentences of every target train split against its (held back) gold tags. The span
    head makes the pseudo BIO labels, the sequence head the pseudo start/end labels."""
    folder = output / "diagnostics"
    folder.mkdir(parents=True, exist_ok=True)
    data = [f"{lang}={Path(scale.data_root) / lang / 'train.tsv'}" for lang in scale.target_languages]
    scores = {}
    for head in ("span", "seq"):
        path = folder / f"teacher_{head}_on_target_train.json"
        if not path.is_file():
            command = [*launcher, str(REPO / "launchers" / "evaluate.py"), "--checkpoint",
                       str(output / "mlt" / "checkpoints"), "--head", head, "--output", str(path),
                       "--max-sentences", str(scale.diagnostic_sentences), "--data", *data]
            subprocess.run(command, cwd=REPO, check=True)
        scores[head] = json.loads(path.read_text(encoding="utf-8"))
    return scores


def _losses(run_dir: Path) -> list[dict]:
    path = run_dir / "losses.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summarize(scale: Scale, output: Path, listed: list[System], teacher: dict, minutes: dict) -> dict:
    report: dict = {"meta": {"scale": scale.name, "encoder": scale.stage1.get("model", {}).get("encoder"),
                             "source_language": scale.source_language,
                             "target_languages": scale.target_languages,
                             "average": "unweighted mean test F1 (percent) over the target languages",
                             "date": time.strftime("%Y-%m-%d"), "paper_table2": PAPER_TABLE2},
                    "systems": {}}
    for system in listed:
        results = json.loads((output / system.name / "results.json").read_text(encoding="utf-8"))
        per_language = {lang: results["test"]["per_language"][lang] for lang in scale.target_languages}
        entry = {"per_language": per_language,
                 "average": sum(per_language.values()) / len(per_language),
                 "english": results["test"]["per_language"][scale.source_language],
                 "dev_average": results["best_score"], "best_step": results["best_step"],
                 "steps": results["steps"], "stage": system.stage, "source_fraction": system.fraction}
        if system.stage == 2:
            losses = _losses(output / system.name)
            agreement = [row["teacher/agreement"] for row in losses if "teacher/agreement" in row]
            entry["teacher_refreshes"] = max((row.get("teacher/refreshes", 0) for row in losses), default=0)
            entry["teacher_head_agreement"] = sum(agreement) / len(agreement) if agreement else None
            mse = [row["loss/mse"] for row in losses if "loss/mse" in row]
            entry["mse_first_last"] = [mse[0], mse[-1]] if mse else None
        if system.name in minutes:
            entry["minutes"] = minutes[system.name]
        report["systems"][system.name] = entry
    report["teacher_pseudo_label_f1"] = {
        head: {"per_language": scores["per_language"], "average": scores["average"]}
        for head, scores in teacher.items()}
    return report


def markdown(report: dict, scale: Scale) -> str:
    systems_ = report["systems"]
    lines = ["| system | target avg (ours) | English (ours) | paper avg (XLM-R base) |", "|---|---|---|---|"]
    for name, label in LABELS.items():
        entry = systems_[name]
        lines.append(f"| {label} | {entry['average']:.2f} | {entry['english']:.2f} | {PAPER_TABLE2[name]:.2f} |")
    lines += ["", "Source fraction (Figure 3): average test F1 over the target languages.", "",
              "| labeled English | MLT | DualNER + TRGGold |", "|---|---|---|"]
    for fraction in [*scale.fractions, 1.0]:
        suffix = "" if fraction == 1.0 else f"_p{round(fraction * 100):02d}"
        mlt, dual = systems_[f"mlt{suffix}"], systems_["dualner_trggold" if fraction == 1.0 else f"dualner{suffix}"]
        lines.append(f"| {fraction:.0%} | {mlt['average']:.2f} | {dual['average']:.2f} |")
    columns = ["mlt", "dualner_trggold", "wo_mse", "w_selfkl", "wo_trg"]
    lines += ["", "Per language (test F1):", "",
              "| language | " + " | ".join(LABELS[c] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for lang in scale.target_languages:
        lines.append(f"| {lang} | " + " | ".join(f"{systems_[c]['per_language'][lang]:.2f}" for c in columns) + " |")
    lines.append("| **average** | " + " | ".join(f"**{systems_[c]['average']:.2f}**" for c in columns) + " |")
    teacher = report["teacher_pseudo_label_f1"]
    dual = systems_["dualner_trggold"]
    lines += ["", f"Diagnostics: the first teacher (MLT) on {scale.diagnostic_sentences} target train "
              f"sentences per language against their held-back gold tags: span head (makes the pseudo "
              f"BIO labels) {teacher['span']['average']:.2f} F1, sequence head (makes the pseudo "
              f"start/end labels) {teacher['seq']['average']:.2f} F1; word-level agreement of the "
              f"teacher's two heads during DualNER + TRGGold {100 * (dual['teacher_head_agreement'] or 0):.1f}%; "
              f"the student replaced the teacher {int(dual['teacher_refreshes'])} times."]
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
    figure, axes = plt.subplots(figsize=(max(6, 0.55 * len(languages) + 2), 4))
    width = 0.4
    for offset, name in ((-width / 2, "mlt"), (width / 2, "dualner_trggold")):
        values = [systems_[name]["per_language"][lang] for lang in languages]
        axes.bar([i + offset for i in range(len(languages))], values, width,
                 label=f"{LABELS[name]} (avg {systems_[name]['average']:.1f})")
    axes.set_xticks(range(len(languages)), languages)
    axes.set_ylabel("test F1")
    axes.set_title(f"Zero-shot test F1 per target language ({report['meta']['encoder']}, {scale.name} scale)")
    axes.legend()
    figure.tight_layout()
    bars = folder / f"reproduction_{scale.name}_per_language.png"
    figure.savefig(bars, dpi=120)
    plt.close(figure)

    fractions = [*scale.fractions, 1.0]
    names = [("mlt", "dualner_trggold") if p == 1.0 else (f"mlt_p{round(p * 100):02d}", f"dualner_p{round(p * 100):02d}")
             for p in fractions]
    figure, axes = plt.subplots(figsize=(5, 4))
    for column, label in ((0, "MLT"), (1, "DualNER + TRGGold")):
        axes.plot([100 * p for p in fractions], [systems_[pair[column]]["average"] for pair in names],
                  marker="o", label=label)
    axes.set_xlabel("labeled English used in stage 1 (%)")
    axes.set_ylabel("average test F1, target languages")
    axes.set_title("Source fraction (paper Fig. 3)")
    axes.legend()
    figure.tight_layout()
    curve = folder / f"reproduction_{scale.name}_source_fraction.png"
    figure.savefig(curve, dpi=120)
    plt.close(figure)
    return [bars, curve]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--scale", help="a scale under bench/configs/reproduce_<scale>.yaml: cpu or paper")
    where.add_argument("--config", type=Path, help="a scale file")
    parser.add_argument("--launcher", default=sys.executable,
                        help='how each run is started, e.g. "deepspeed --num_gpus 8" (default: this python)')
    args = parser.parse_args(argv)
    path = args.config.resolve() if args.config else REPO / "bench" / "configs" / f"reproduce_{args.scale}.yaml"
    scale = load_scale(path)
    os.chdir(REPO)  # relative paths in a scale file are relative to the repository, like the configs
    output = Path(scale.output_dir)
    launcher = shlex.split(args.launcher)
    listed = systems(scale)
    minutes_path = output / "minutes.json"
    minutes = json.loads(minutes_path.read_text()) if minutes_path.is_file() else {}
    started = time.monotonic()
    for index, system in enumerate(listed, 1):
        began = time.monotonic()
        fresh = not (output / system.name / "results.json").is_file()
        train(scale, system, output, launcher, index, len(listed))
        if fresh:
            minutes[system.name] = round((time.monotonic() - began) / 60, 2)
            output.mkdir(parents=True, exist_ok=True)
            minutes_path.write_text(json.dumps(minutes, indent=1))
    teacher = diagnose_teacher(scale, output, launcher)
    report = summarize(scale, output, listed, teacher, minutes)
    results = Path(scale.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    table = markdown(report, scale)
    command = f"python bench/reproduce.py --scale {args.scale}" if args.scale else f"python bench/reproduce.py --config {path}"
    write_markdown(Path(scale.results_markdown), scale.name, table, command)
    plots = plot(report, scale, Path(scale.plots_dir))
    print(table)
    print(f"\n{results} written; table in {scale.results_markdown}; plots: {[str(p) for p in plots]}; "
          f"{(time.monotonic() - started) / 60:.1f} min this invocation", flush=True)


if __name__ == "__main__":
    main()
