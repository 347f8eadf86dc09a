"""Hardening, round 4 (issue 25): no run or file lost. A run folder's fate is decided again under the
run lock; a resume or an export never overwrites finished work without an explicit flag and a kept
copy; every refusal writes nothing. Each test is a row of the README's fault table.

In-process where the behaviour is the library's (fast), through `python -m dualner` where it is the
command line's (exit codes, one-line errors)."""

import errno
import json
import re
import shutil

import pytest

import dualner.build
from dualner.run_folder import RunLock
from dualner.errors import CheckpointError, ConfigError, RunLockedError, UserError
from dualner.model_io import export_model
from dualner.stage1 import build_stage1, run_stage1
from tests.conftest import REPO
# the tiny run's overrides, `python -m dualner`, one-line errors; a finished tiny run (step-2, step-4,
# best.json, results.json) shared by this module, a copy of it, every file's bytes under a folder
from tests.test_hardening import TINY, cli, config, one_line_error
from tests.test_hardening3 import copy_of, populated, snapshot  # noqa: F401  (populated: a fixture)


def logged_steps(run):
    return [json.loads(line)["step"] for line in (run / "losses.jsonl").read_text().splitlines()]


# -- item 2: two jobs started together on one new folder ----------------------------------------------
def test_a_job_whose_folder_changed_before_it_took_the_lock_is_refused(tmp_path, tiny_encoder, monkeypatch, capfd):
    """Job B decides its fresh folder's fate, then job A (the real command line) runs there from
    start to finish before B takes the lock: B decides again, is refused, and writes nothing."""
    run = tmp_path / "run"
    after_first = {}
    real_start_job = dualner.build.start_job

    def start_job_then_another_job_runs(cfg, stage):
        job = real_start_job(cfg, stage)  # B's first decision: a fresh folder, a new run
        assert job.folder_plan.resume_from is None and job.folder_plan.aside is None
        result = cli("stage1", "--config", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={run}", *TINY)
        assert result.returncode == 0, result.stderr[-3000:]
        after_first["files"] = snapshot(run)
        return job

    monkeypatch.setattr(dualner.build, "start_job", start_job_then_another_job_runs)
    with pytest.raises(RunLockedError, match=r"changed while this job was starting \(another job wrote a finished "
                                             r"run \(checkpoints step-2, step-4\) there\); this job wrote nothing"):
        build_stage1(config(run))
    assert snapshot(run) == after_first["files"]  # the first job's run, byte for byte; the lock released
    assert not list(tmp_path.glob("run.old-*")) and logged_steps(run) == [1, 2, 3, 4]
    monkeypatch.setattr(dualner.build, "start_job", real_start_job)
    capfd.readouterr()
    run_stage1(config(run))  # run again, as the message says: continues (re-reports) the first job's run
    assert f"resumed from {run / 'checkpoints' / 'step-4'} at step 4" in capfd.readouterr().out
    assert logged_steps(run) == [1, 2, 3, 4]


# -- every refusal writes nothing -----------------------------------------------------------------------
def unchanged(run):
    pass


def newest_checkpoint_deleted(run):
    shutil.rmtree(run / "checkpoints" / "step-4")


def newest_model_states_cut_in_half(run):
    states = next((run / "checkpoints" / "step-4").rglob("*model_states.pt"))
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])


def best_json_cut_short(run):
    (run / "checkpoints" / "best.json").write_text('{"step": 4, "pa')


REFUSALS = {  # name: (what the user did to the run first, overrides given the run and another, message)
    "resume an older step of a finished run": (
        unchanged, lambda run, other: ["run.resume=step-2"],
        r"run.resume=step-2: .* holds newer work \(step-4, results.json \(a run finished at step 4\)\) that "
        r"continuing from step-2 would overwrite; set run.overwrite=true as well"),
    "resume=auto on a finished run whose newest checkpoint was deleted": (
        newest_checkpoint_deleted, lambda run, other: [],
        r"holds results.json \(a run finished at step 4\), but its newest usable checkpoint is step-2; continuing "
        r"would train again over those results. Set run.resume=step-2 run.overwrite=true"),
    "resume=auto on a finished run whose newest checkpoint is damaged": (
        newest_model_states_cut_in_half, lambda run, other: [],
        r"its newest usable checkpoint is step-2 \(newer ones are damaged: .*step-4/.*model_states.pt: \d+ bytes, "
        r"\d+ when it was written \(truncated or damaged\)\); continuing would train again"),
    "a best.json cut short by hand": (
        best_json_cut_short, lambda run, other: [],
        r"best.json: unreadable \(Unterminated string .*\); remove it to use the newest complete checkpoint"),
    "resume another run's step into a folder holding a run": (
        unchanged, lambda run, other: [f"run.resume={other / 'checkpoints' / 'step-2'}"],
        r"is a checkpoint of another run, and run.output_dir=.* holds a finished run .*run.overwrite=true"),
    "resume a run folder instead of a step": (
        unchanged, lambda run, other: [f"run.resume={other}"],
        r"not a checkpoint folder \(a checkpoint is a <run>/checkpoints/step-N"),
    "another run's step with other model settings": (
        unchanged,
        lambda run, other: [f"run.resume={other / 'checkpoints' / 'step-2'}", "run.overwrite=true", "model.dropout=0.3"],
        r"is a checkpoint of a run whose config.yaml .* differs in section\(s\) model: model.dropout 0.1 -> 0.3"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_a_resume_that_would_overwrite_newer_work_is_refused_writing_nothing(populated, tmp_path, name):
    prepare, overrides, message = REFUSALS[name]
    run = copy_of(populated, tmp_path)
    prepare(run)
    before, other = snapshot(run), snapshot(populated)
    with pytest.raises(UserError, match=message):
        build_stage1(config(run, *overrides(run, populated)))
    assert snapshot(run) == before and snapshot(populated) == other
    assert not list(tmp_path.glob("run.old-*"))


def test_a_damaged_best_json_is_one_line_for_export_and_predict(populated, tmp_path):
    from dualner.predict import predict_file
    run = copy_of(populated, tmp_path)
    best_json_cut_short(run)
    source = tmp_path / "in.txt"
    source.write_text("Paris is nice\n")
    line = one_line_error(cli("export", "--checkpoint", str(run), "--output", str(tmp_path / "exported")))
    assert "best.json: unreadable" in line and not (tmp_path / "exported").exists()
    with pytest.raises(CheckpointError, match=r"best.json: unreadable .* or name a step-N folder"):
        predict_file(run, source, tmp_path / "out.jsonl")


def test_a_log_line_cut_by_a_crash_is_not_glued_to_the_next_jobs(populated, tmp_path):
    run = copy_of(populated, tmp_path)
    with (run / "losses.jsonl").open("a") as handle:
        handle.write('{"step": 5, "loss/to')  # the crash came while step 5 was logged, before its save
    run_stage1(config(run, "train.max_steps=6"))
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]  # every line whole


def test_overwrite_while_another_job_holds_the_lock_moves_nothing(populated, tmp_path):
    run = copy_of(populated, tmp_path)
    before = snapshot(run)
    holder = RunLock(run)
    holder.acquire()  # another job (another open file description: flock refuses us as it would a process)
    try:
        with pytest.raises(RunLockedError, match=r"is in use by another run \(host .*, pid"):
            build_stage1(config(run, "run.overwrite=true"))
    finally:
        holder.release()
    assert snapshot(run) == before and not list(tmp_path.glob("run.old-*"))


# -- item 3: run.resume=step-2 on a run finished at step 4, with run.overwrite=true -------------------
def test_rewinding_a_finished_run_keeps_the_newer_work_aside(populated, tmp_path, capfd):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = copy_of(populated, tmp_path)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    # as if step 4 had scored best: the rewind must put back best.json as it stood at step 2
    (run / "checkpoints" / "best.json").write_text(json.dumps({**best, "step": 4, "path": "step-4", "average": 99.0}))
    before = snapshot(run)
    capfd.readouterr()
    run_stage1(config(run, "run.resume=step-2", "run.overwrite=true", "train.lr=0.002"))
    log = capfd.readouterr().out
    (aside,) = tmp_path.glob("run.old-*")
    assert "continuing from step 2 over newer work: moved checkpoints/step-4, results.json" in log
    kept = snapshot(aside)
    for name in ("results.json", "losses.jsonl", "config_history.jsonl", "config.yaml", "checkpoints/best.json"):
        assert kept[name] == before[name], name
    assert {name: digest for name, digest in kept.items() if name.startswith("checkpoints/step-4/")} == \
        {name: digest for name, digest in before.items() if name.startswith("checkpoints/step-4/")}
    assert logged_steps(aside) == [1, 2, 3, 4] and logged_steps(run) == [1, 2, 3, 4]  # cut back to 2, then 3, 4
    assert '"average": 99.0' not in (run / "checkpoints" / "best.json").read_text()
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["from_step"] == 2 and history[-1]["changes"]["train.lr"] == [0.001, 0.002]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss/total")] == [1, 2, 3, 4]  # the first job's 3, 4 hidden


def test_a_stage2_rewind_teaches_with_the_best_model_as_of_that_step(populated, tmp_path, capfd):
    from dualner.checkpoint import recorded_best
    from dualner.stage2 import run_stage2
    run = tmp_path / "stage2"

    def stage2(*overrides):
        return config(run, f"stage2.init_from={populated}", *overrides, file="tiny_stage2.yaml")

    run_stage2(stage2())
    pointer = run / "checkpoints" / "best.json"
    # as if step 4 had scored best: the rewind to step 2 must teach with the best as of step 2
    pointer.write_text(json.dumps({**json.loads(pointer.read_text()), "step": 4, "path": "step-4"}))
    earlier = recorded_best(run / "checkpoints" / "step-2")
    assert earlier is not None and earlier["step"] <= 2
    capfd.readouterr()
    run_stage2(stage2("run.resume=step-2", "run.overwrite=true"))
    assert f"teacher from {run / 'checkpoints' / earlier['path']}\n" in capfd.readouterr().out
    assert logged_steps(run) == [1, 2, 3, 4]


# -- item 4: export ------------------------------------------------------------------------------------------
def test_export_refuses_a_non_empty_folder_and_the_run_folder(populated, tmp_path):
    output = tmp_path / "exported"
    output.mkdir()
    (output / "config.json").write_text('{"mine": true}')
    line = one_line_error(cli("export", "--checkpoint", str(populated), "--output", str(output)))
    assert "is not empty (config.json); choose a new folder, or add --overwrite" in line
    assert (output / "config.json").read_text() == '{"mine": true}'
    before = snapshot(populated)
    for inside in (populated, populated / "model", populated.parent):
        with pytest.raises(ConfigError, match=rf"--output {inside} (is|is inside|holds) the run folder {populated}; "
                                              rf"export into a folder of its own"):
            export_model(populated / "checkpoints" / "step-2", inside, overwrite=True)
    assert snapshot(populated) == before
    result = cli("export", "--checkpoint", str(populated), "--output", str(output), "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    (aside,) = tmp_path.glob("exported.old-*")
    assert (aside / "config.json").read_text() == '{"mine": true}'  # the user's file, kept
    assert "dualner_entity_types" in (output / "config.json").read_text()
    assert not list(tmp_path.glob(".exported.partial-*"))


def test_a_failed_export_leaves_nothing_half_written(populated, tmp_path, monkeypatch):
    import dualner.model_io as model_io

    def disk_full(loaded, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(model_io, "_write_export", disk_full)
    with pytest.raises(OSError):
        model_io.export_model(populated, tmp_path / "exported")
    assert sorted(path.name for path in tmp_path.iterdir()) == []
    # two exports into one folder: the one that finishes second finds it filled and replaces nothing
    partial, output = tmp_path / ".exported.partial-1", tmp_path / "exported"
    partial.mkdir()
    (partial / "config.json").write_text("second")
    output.mkdir()
    (output / "config.json").write_text("first")
    with pytest.raises(ConfigError, match=r"files appeared there while this export ran .* they are kept"):
        model_io._put_in_place(partial, output, overwrite=False, log=None)
    assert (output / "config.json").read_text() == "first"


# -- item 8 and the output files of predict, evaluate, report ---------------------------------------------
def test_predict_without_best_json_says_which_step(populated, tmp_path, capfd):
    from dualner.predict import predict_file
    run = copy_of(populated, tmp_path)
    (run / "checkpoints" / "best.json").unlink()
    source, output = tmp_path / "in.txt", tmp_path / "out.jsonl"
    source.write_text("Paris is nice\n")
    capfd.readouterr()
    assert predict_file(run, source, output) == 1
    assert (f"--model {run} has no best checkpoint recorded; predicting with step-4 of {run}: its newest complete "
            f"checkpoint: the run has no best.json") in capfd.readouterr().out


def test_predict_and_evaluate_replace_only_their_own_output(populated, tmp_path):
    from dualner.evaluate_checkpoint import evaluate_checkpoint
    from dualner.predict import predict_file
    source, notes = tmp_path / "in.txt", tmp_path / "notes.txt"
    source.write_text("Paris is nice\n")
    notes.write_text("my notes\n")
    with pytest.raises(ConfigError, match=r"--output .*notes.txt exists and is not an earlier prediction"):
        predict_file(populated, source, notes)
    assert notes.read_text() == "my notes\n"
    output = tmp_path / "out.jsonl"
    output.write_text('{"tokens": ["old"], "entities": []}\n')
    assert predict_file(populated, source, output) == 1  # an earlier prediction: replaced
    assert json.loads(output.read_text())["tokens"] == ["Paris", "is", "nice"]
    assert predict_file(populated, source, notes, overwrite=True) == 1
    data = REPO / "data" / "panx-sample" / "en" / "dev.tsv"
    with pytest.raises(ConfigError, match=r"is the --data file of en; evaluation would replace it"):
        evaluate_checkpoint(populated, {"en": str(data)}, data)
    source.write_text("x: 1\n")
    with pytest.raises(ConfigError, match=r"in.txt exists and is not an earlier evaluation's results"):
        evaluate_checkpoint(populated, {"en": str(data)}, source, max_sentences=4)
    with pytest.raises(ConfigError, match=r"is a folder; name the JSON file to write"):
        evaluate_checkpoint(populated, {"en": str(data)}, tmp_path, max_sentences=4)
    assert source.read_text() == "x: 1\n"


def test_report_gives_two_runs_of_one_name_a_column_each(populated, tmp_path):
    for parent in ("a", "b"):
        shutil.copytree(populated, tmp_path / parent / "quick")
    result = cli("report", str(tmp_path / "a" / "quick"), str(tmp_path / "b" / "quick"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"| test F1 | {tmp_path / 'a' / 'quick'} | {tmp_path / 'b' / 'quick'} |" in result.stdout


@pytest.mark.parametrize("content, message", [
    ("[]", r"a results file is a JSON object, found a list"),
    ('{"test": []}', r"'test' lacks its per_language scores or its average"),
    ('{"test": {"per_language": {"en": "x"}, "average": 1}}', r"'test.per_language.en' is 'x', not a number"),
])
def test_report_on_a_results_file_of_another_shape_is_one_line(populated, tmp_path, content, message):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(populated / "config.yaml", run)
    (run / "results.json").write_text(content)
    line = one_line_error(cli("report", str(run)))
    assert "results.json: not a DualNER results file" in line
    assert re.search(message, line), line
