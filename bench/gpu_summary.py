"""Collects what bench/gpu_check.sh measured into one JSON and a Markdown section, and (here, after the
run) writes them into bench/results/gpu_*.json and bench/RESULTS.md.

    python bench/gpu_summary.py --work /tmp/dualner_gpu --out $OUT          # on the GPU machine, after each step
    python bench/gpu_summary.py --from <folder with gpu_check.json> --write-results   # here
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEP_FILES = {"check": "packing_check", "b128": "tput_b128", "t16k": "tput_16k", "costs": "stage2_costs",
              "b32": "tput_b32", "t16k_compile": "tput_16k_compile", "profile": "profile_stage1"}
BEGIN, END = "<!-- gpu:begin -->", "<!-- gpu:end -->"


def collect(work: Path) -> dict:
    from bench.common import timed_windows
    result: dict = {"status": {}, "steps": {}, "runs": {}}
    status = work / "status.tsv"
    if status.is_file():
        for line in status.read_text().splitlines():
            name, rc, seconds = line.split("\t")
            result["status"][name] = {"rc": rc, "seconds": int(seconds)}
    for path in sorted((work / "steps").glob("*.json")):
        result["steps"][path.stem] = json.loads(path.read_text())
    for run in sorted((work / "runs").glob("*")):
        losses = run / "losses.jsonl"
        if not losses.is_file():
            continue
        windows = [json.loads(line) for line in losses.read_text().splitlines()]
        entry = {"windows": windows}
        if len(windows) > 1:
            warmup = windows[0]["step"]
            entry["timed"] = timed_windows(run, warmup)
        if (run / "results.json").is_file():
            entry["results"] = json.loads((run / "results.json").read_text())
        if (run / "profile" / "summary_rank0.json").is_file():  # the `profile:` block's summary
            entry["profile"] = json.loads((run / "profile" / "summary_rank0.json").read_text())
        result["runs"][run.name] = entry
    return result


def _fmt(value, spec=",.0f", suffix=""):
    return "-" if value is None else f"{format(value, spec)}{suffix}"


def markdown(result: dict) -> str:
    steps, runs = result["steps"], result["runs"]
    device = next((s.get("device") for s in steps.values() if s.get("device")), "?")
    lines = [f"Device: {device}. Encoder: XLM-R base shape (random weights, 278M parameters, 85M outside the "
             "embeddings), bf16, every parameter trained, English PAN-X. Command: `bash bench/gpu_check.sh` "
             "(each row's own command in `bench/results/gpu_*.json`).", "",
             "| measurement | target | measured |", "|---|---|---|"]
    b128 = steps.get("b128")
    if b128:
        for variant in ("tuned", "default"):
            ratio = b128.get(f"speedup_{variant}")
            if not isinstance(ratio, dict):
                continue
            hf = b128["hf_trainer_tuned"] if variant == "tuned" and "hf_trainer_tuned" in b128 else b128["hf_trainer"]
            lines.append(
                f"| stage 1 vs HF `Trainer` ({variant}), batch {b128['batch']} (same GPU), median of {ratio['n']} "
                f"interleaved | {'>= 2x' if variant == 'tuned' else ''} | **{ratio['median']:.2f}x** "
                f"[{ratio['min']:.2f}-{ratio['max']:.2f}] ({_fmt(b128['ours']['tokens_per_s'])} vs "
                f"{_fmt(hf['tokens_per_s'])} tokens/s, median runs; {1000 * b128['ours']['step_seconds']:.1f} vs "
                f"{1000 * hf['step_seconds']:.1f} ms/step) |")
        if not isinstance(b128.get("speedup_default"), dict):  # a run before --reps existed
            lines.append(f"| stage 1 vs HF `Trainer`, batch {b128['batch']} (same GPU), one run each | | "
                         f"**{b128['speedup']:.2f}x** ({_fmt(b128['ours']['tokens_per_s'])} vs "
                         f"{_fmt(b128['hf_trainer']['tokens_per_s'])} tokens/s) |")
    t16k = steps.get("t16k")
    if t16k:
        mfu = t16k["ours"].get("mfu") or {}
        lines.append(f"| stage 1, {t16k['batch']:,}-token steps | >= 250,000 tokens/s, >= 12% MFU (issue 20: >= 35%) | **{_fmt(t16k['ours']['tokens_per_s'])} "
                     f"tokens/s, {_fmt(100 * mfu['mfu'] if mfu else None, '.1f', '%')} MFU** "
                     f"({1000 * t16k['ours']['step_seconds']:.1f} ms/step, packing efficiency "
                     f"{_fmt(t16k['ours']['packing_efficiency'], '.3f')}) |")
    compiled = steps.get("t16k_compile")
    if compiled:
        mfu = compiled["ours"].get("mfu") or {}
        lines.append(f"| the same with `model.compile=true` | | {_fmt(compiled['ours']['tokens_per_s'])} tokens/s, "
                     f"{_fmt(100 * mfu['mfu'] if mfu else None, '.1f', '%')} MFU |")
    costs = steps.get("costs")
    if costs:
        lines.append(f"| stage-2 / stage-1 step, batch {costs['batch']}, same sentences | <= 1.4x | **{costs['step_ratio']:.2f}x** "
                     f"({1000 * costs['stage2_same_sentences']['step_seconds']:.1f} / "
                     f"{1000 * costs['stage1']['step_seconds']:.1f} ms) |")
        pinned = ", pinned" if costs["loader"]["pinned"] else ""
        lines.append(f"| stage-2 loader ({costs['loader']['workers']} workers{pinned}) / TRGGold consumption | >= 2x | "
                     f"**{costs['loader_over_consumption']:.1f}x** ({_fmt(costs['loader']['windows_per_s'])} vs "
                     f"{_fmt(costs['training_consumes_windows_per_s'])} windows/s); TRGGold waited for data "
                     f"{100 * costs['trggold_data_wait_share']:.2f}% of its step time |")
    b32 = steps.get("b32")
    if b32:
        lines.append(f"| stage 1 vs HF `Trainer`, batch {b32['batch']} | | {b32['speedup']:.2f}x ({_fmt(b32['ours']['tokens_per_s'])} "
                     f"vs {_fmt(b32['hf_trainer']['tokens_per_s'])} tokens/s) |")
    for name, label in (("profile_b128", "stage-1 launcher profiled (`profile:` block), batch 128"),
                        ("profile_t16k", "stage-1 launcher profiled (`profile:` block), 16k-token steps")):
        profile = runs.get(name, {}).get("profile")
        if profile:
            top = ", ".join(f"{e['op']} {e['self_ms_per_step']:.1f} ms" for e in profile["top"][:4])
            syncs = (runs[name].get("timed") or {}).get("host_syncs_per_step", {})
            sync_text = ", ".join(f"{k} {v:.1f}" for k, v in sorted(syncs.items())) or "none counted"
            lines.append(f"| {label}, steps {profile['steps'][0]}-{profile['steps'][1]} | | "
                         f"{profile['aten_dispatches_per_step']:.0f} aten dispatches per step; top by self (device) "
                         f"time: {top}; host syncs per step: {sync_text} |")
    for name, label in (("stage1_zero2", "stage-1 launcher, ZeRO-2"), ("stage1_zero3", "stage-1 launcher, ZeRO-3"),
                        ("stage2_zero3", "stage-2 launcher, ZeRO-3, teacher on the fly")):
        timed = runs.get(name, {}).get("timed")
        if timed:
            label += f", {timed['windows_per_step']:.0f} windows per step"
            syncs = timed.get("host_syncs_per_step", {})
            sync_text = ", ".join(f"{k} {v:.1f}" for k, v in sorted(syncs.items())) or "none counted"
            lines.append(f"| {label} | | {_fmt(timed['tokens_per_s'])} tokens/s, {1000 * timed['step_seconds']:.1f} "
                         f"ms/step; host syncs per step: {sync_text} |")
    check = steps.get("check")
    if check:
        diffs = ", ".join(f"{name} {max(v.values()):.1e}" for name, v in check["max_abs_difference"].items())
        mismatches = ", ".join(f"{k.removeprefix('pseudo_label_mismatches_')} {v}" for k, v in check.items()
                               if k.startswith("pseudo_label_mismatches_"))
        errors = f"; errors: {check['errors']}" if check.get("errors") else ""
        passed = {True: "passed", False: "**FAILED**: " + "; ".join(check.get("failures", [])[:3])}.get(
            check.get("passed"), "not asserted (older check)")
        worst = check.get("train_mode_fp32", {}).get("worst_gradient", {})
        gradients = (f"; train mode, worst gradient {worst['parameter']} {worst['difference']:.1e}"
                     if worst.get("parameter") else "")
        lines.append(f"| packed vs one window per row, largest output difference | fp32 <= 1e-4 | {passed}: "
                     f"{diffs}; pseudo labels differing: {mismatches}{gradients}{errors} |")
    profile = steps.get("profile")
    if profile:
        run = profile["runs"][0]
        phases = ", ".join(f"{name} {1000 * seconds:.1f}" for name, seconds in run["phase_seconds_per_step"].items())
        lines.append(f"| where a stage-1 step goes ({profile['ds_config']}, phases synchronised, ms) | | {phases} |")
    skipped = [name for name, s in result["status"].items() if s["rc"] not in ("0",)]
    if skipped:
        lines += ["", "Not completed: " + ", ".join(f"{n} ({result['status'][n]['rc']})" for n in skipped) + "."]
    return "\n".join(lines)


def write_results(result: dict) -> None:
    from bench.common import write_result
    for step, name in STEP_FILES.items():
        if step in result["steps"]:
            write_result(REPO / "bench" / "results" / f"gpu_{name}.json", result["steps"][step])
    runs = {name: {k: v for k, v in run.items() if k != "windows"} | {"windows": run["windows"]}
            for name, run in result["runs"].items()}
    write_result(REPO / "bench" / "results" / "gpu_runs.json", {"status": result["status"], "runs": runs})
    results_md = REPO / "bench" / "RESULTS.md"
    text = results_md.read_text()
    section = f"{BEGIN}\n{markdown(result)}\n{END}"
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text += f"\n## On a GPU\n\n{section}\n"
    results_md.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--from", dest="source", type=Path, help="a folder holding gpu_check.json")
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.source:
        result = json.loads((args.source / "gpu_check.json").read_text())
    else:
        result = collect(args.work)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
        (args.out / "gpu_summary.md").write_text(markdown(result) + "\n")
    if args.write_results:
        write_results(result)
    if not args.quiet:
        print(markdown(result))


if __name__ == "__main__":
    main()
