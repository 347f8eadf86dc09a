"""Hardening, round 2: one run per folder, nothing half-written, every user error one clear line.

Each test is a row of the README's fault table. In-process where the behaviour is the library's
(fast); through the real launchers where it is the command line's (exit codes, one-line errors,
signals, two runs at once)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dualner.backend.deepspeed_engine import load_deepspeed_config
from dualner.checkpoint import resolve_checkpoint
from dualner.run_folder import RunLock
from dualner.config import load_config
from dualner.data.batching import BatchLayout
from dualner.errors import (EXIT_STOPPED, EXIT_USER_ERROR, CheckpointError, ConfigError, DataFormatError,
                            MissingPathError, RunLockedError, describe_os_error)
from dualner.stage1 import build_stage1, run_stage1
from dualner.stage2 import build_stage2
from tests.conftest import REPO, SAMPLE, child_env

FP32 = f"engine.config={REPO / 'ds_configs' / 'zero0_fp32.json'}"
TINY = ["train.max_steps=4", "train.eval_every=2", "train.save_every=2", "train.log_every=1",
        "data.max_train_sentences=64", "data.max_eval_sentences=8", "train.keep_last=5", FP32]


def config(output, *overrides, file="tiny.yaml"):
    return load_config(REPO / "configs" / file, [f"run.output_dir={output}", *TINY, *overrides])


def cli(*args, env=None, timeout=300):
    """`python -m dualner ...` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "dualner", *args], cwd=REPO, capture_output=True, text=True,
                          env=child_env(PYTHONPATH=str(REPO), **(env or {})), timeout=timeout)


def one_line_error(result, code=EXIT_USER_ERROR) -> str:
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("dualner: error")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_encoder):
    output = tmp_path_factory.mktemp("hardening") / "run"
    run_stage1(config(output))
    return output


# -- numbers are range-checked, before anything is written ----------------------------------------
@pytest.mark.parametrize("override, message", [
    ("train.max_steps=0", "train.max_steps: 0 is out of range (must be >= 1)"),
    ("train.max_steps=-5", "train.max_steps: -5 is out of range"),
    ("train.micro_batch_size=0", "train.micro_batch_size: 0 is out of range"),
    ("train.global_batch_size=-16", "train.global_batch_size: -16 is out of range"),
    ("train.lr=-1", "train.lr: -1.0 is out of range (must be > 0.0)"),
    ("model.dropout=1.5", "model.dropout: 1.5 is out of range (must be >= 0.0 and < 1.0)"),
    ("data.train_fraction=0", "data.train_fraction: 0.0 is out of range"),
    ("stage2.confidence_threshold=1.5", "stage2.confidence_threshold: 1.5 is out of range"),
    ("data.loader_workers=-1", "data.loader_workers: -1 is out of range"),
    ("train.keep_last=-1", "train.keep_last: -1 is out of range"),
])
def test_out_of_range_numbers_are_refused_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(tmp_path / "run", override)


# -- the DeepSpeed JSON ---------------------------------------------------------------------------
LAYOUT = BatchLayout(16, 8, 2, 1)


def ds_json(tmp_path, content, name="ds.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_unknown_deepspeed_key_is_refused_with_the_valid_ones(tmp_path):
    path = ds_json(tmp_path, {"gradient_clippingg": 1.0, "zero_optimization": {"stage": 0}})
    with pytest.raises(ConfigError, match=r"unknown DeepSpeed key 'gradient_clippingg'; valid top-level keys: .*gradient_clipping"):
        load_deepspeed_config(path, LAYOUT)


@pytest.mark.parametrize("content, message", [
    ([1, 2], r"a DeepSpeed config is a JSON object"),
    ({"zero_optimization": {"stage": 2, "stagee": 1}}, r"DeepSpeed rejects this config: .*stagee"),
    ({"zero_optimization": {"stage": 7}}, r"zero_optimization.stage must be 0, 1, 2 or 3"),
])
def test_deepspeed_json_deepspeed_would_reject_is_one_clear_error(tmp_path, content, message):
    with pytest.raises(ConfigError, match=message):
        load_deepspeed_config(ds_json(tmp_path, content), LAYOUT)


def test_fp16_on_a_cpu_is_refused_before_anything_is_written(tmp_path):
    import torch
    with pytest.raises(ConfigError, match="fp16 does not run on a CPU"):
        load_deepspeed_config(REPO / "ds_configs" / "zero2_fp16.json", LAYOUT, torch.device("cpu"))


# -- the output folder ----------------------------------------------------------------------------
def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ConfigError, match=r"run.output_dir=.*taken is a file"):
        build_stage1(config(tmp_path / "taken"))


def test_output_dir_on_a_read_only_file_system_is_refused():
    read_only = next((path for path in ("/sys/kernel", "/sys", "/proc/1") if os.path.isdir(path)
                      and not os.access(path, os.W_OK)), None)
    if read_only is None:
        pytest.skip("no read-only folder on this machine to test with")
    with pytest.raises(ConfigError, match=r"cannot write in .* \(read-only or no permission\)"):
        build_stage1(config(f"{read_only}/dualner-run"))


def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_rerun(tmp_path, tiny_encoder):
    output = tmp_path / "run"
    with pytest.raises(MissingPathError):
        build_stage1(config(output, f"data.dev.xx={tmp_path / 'missing.tsv'}"))
    assert not output.exists()
    with pytest.raises(ConfigError):
        build_stage1(config(output, f"engine.config={ds_json(tmp_path, {'bf16': {'enabled': True}, 'zero_optimizationn': {}})}"))
    assert not output.exists()
    run_stage1(config(output, "train.max_steps=2"))  # the corrected rerun
    assert (output / "results.json").is_file() and not (output / ".dualner.lock").exists()


@pytest.mark.parametrize("content, message", [
    ("", r"stage2.target.de: .*empty.tsv: file is empty"),
    (b"\xff\xfe\x00bad\tO\n", r"stage2.target.de: .*bad.tsv:1 \(byte 0\): not UTF-8"),
])
def test_stage2_with_an_unreadable_target_file_writes_nothing(tmp_path, trained_run, content, message):
    corpus = tmp_path / ("empty.tsv" if content == "" else "bad.tsv")
    corpus.write_bytes(content.encode() if isinstance(content, str) else content)
    output = tmp_path / "stage2"
    with pytest.raises(DataFormatError, match=message):
        build_stage2(config(output, f"stage2.init_from={trained_run}", f"stage2.target={{de: {corpus}}}",
                             file="tiny_stage2.yaml"))
    assert not output.exists()  # no config.yaml, no step-0 checkpoint


# -- one live run per folder ------------------------------------------------------------------------
def test_a_live_run_holds_the_folder_and_a_dead_one_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from dualner.run_folder import RunLock\n"
        "from pathlib import Path\n"
        "lock = RunLock(Path(%r)); lock.acquire(); print('held', flush=True); time.sleep(60)") % (str(REPO), str(tmp_path / "run"))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"is in use by another run \(host .*, pid {holder.pid}, started"):
            RunLock(tmp_path / "run").acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path / "run")
    message = lock.acquire()  # the holder died without releasing: its lock is stale
    assert message and f"pid {holder.pid}" in message
    lock.release()
    assert not (tmp_path / "run" / ".dualner.lock").exists()


def test_two_runs_on_one_folder_one_is_refused(tmp_path, tiny_encoder):
    output = tmp_path / "run"
    common = ["stage1", "--config", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={output}", FP32,
              "train.max_steps=5000", "train.eval_every=5000", "train.log_every=1", "data.max_train_sentences=512"]
    first = subprocess.Popen([sys.executable, "-m", "dualner", *common, "train.lr=1e-3"], cwd=REPO,
                             env=child_env(PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (output / "losses.jsonl").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    second = cli(*common, "train.lr=5e-4")
    first.send_signal(signal.SIGTERM)  # the first run checkpoints and stops (resumable)
    first_log = first.communicate(timeout=300)[0]
    assert first.returncode == EXIT_STOPPED, first_log[-2000:]
    assert "is in use by another run" in one_line_error(second)
    lrs = {json.loads(line)["lr"] for line in (output / "losses.jsonl").read_text().splitlines()}
    assert max(lrs) == pytest.approx(1e-3)  # one run's log only
    assert "lr: 0.001" in (output / "config.yaml").read_text()


# -- checkpoints damaged after they were completed -------------------------------------------------
def truncate(path, keep=100):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_resume_skips_a_damaged_checkpoint_naming_the_file(tmp_path, tiny_encoder, capfd):
    output = tmp_path / "run"
    run_stage1(config(output, "run.max_steps_per_job=4", "train.max_steps=6"))
    damaged = output / "checkpoints" / "step-4" / "mp_rank_00_model_states.pt"
    truncate(damaged)
    capfd.readouterr()
    summary = run_stage1(config(output, "train.max_steps=6"))
    log = capfd.readouterr().out
    assert summary["steps"] == 6
    assert "skipping a damaged checkpoint" in log and "step-4/mp_rank_00_model_states.pt" in log
    assert "truncated or damaged" in log and "resumed from" in log and "step-2 at step 2" in log


def test_export_and_predict_name_the_damaged_file(trained_run, tmp_path):
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained_run), str(copy)], check=True)
    best = resolve_checkpoint(copy)
    damaged = next(best.glob("*model_states.pt"))
    truncate(damaged)
    with pytest.raises(CheckpointError, match=rf"{damaged.name}: .* bytes, .* when it was written"):
        resolve_checkpoint(copy)
    line = one_line_error(cli("export", "--checkpoint", str(copy), "--output", str(tmp_path / "exported")))
    assert damaged.name in line and not (tmp_path / "exported").exists()


def test_model_weights_are_read_without_running_code(trained_run, tmp_path):
    """A checkpoint is read weights-only for evaluation, export, prediction and the stage-2 start: a
    pickled payload that would run a command is refused instead."""
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained_run), str(copy)], check=True)
    best = resolve_checkpoint(copy)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch
    model_states = next(best.glob("*model_states.pt"))
    state = torch.load(model_states, map_location="cpu", weights_only=False)
    state["payload"] = Payload()
    torch.save(state, model_states)
    (best / "COMPLETE").unlink()  # re-record the files as the (now malicious) checkpoint's own
    from dualner.checkpoint import COMPLETE_MARKER, file_manifest, write_json_atomic
    write_json_atomic(best / COMPLETE_MARKER, {"step": 0, "files": file_manifest(best)})
    from dualner.model_io import load_trained_model
    with pytest.raises(CheckpointError, match="cannot read its weights"):
        load_trained_model(copy)
    assert not marker.exists()


# -- prediction input ---------------------------------------------------------------------------------
def test_prediction_keeps_empty_sentences_and_refuses_bad_input(trained_run, tmp_path):
    good = tmp_path / "in.jsonl"
    good.write_text(json.dumps({"tokens": ["Paris"]}) + "\n" + json.dumps({"tokens": []}) + "\n")
    out = tmp_path / "out.jsonl"
    result = cli("predict", "--model", str(trained_run), "--input", str(good), "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["tokens"] for line in lines] == [["Paris"], []] and lines[1]["entities"] == []
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    line = one_line_error(cli("predict", "--model", str(trained_run), "--input", str(binary), "--output", str(out)))
    assert "binary.txt:1: a NUL byte at byte 0 (a binary file" in line
    assert not list(tmp_path.glob(".*partial*"))
    assert [json.loads(line)["tokens"] for line in out.read_text().splitlines()] == [["Paris"], []]  # untouched
    line = one_line_error(cli("predict", "--model", str(trained_run), "--input", str(tmp_path / "nope.txt"),
                              "--output", str(tmp_path / "c.jsonl")))
    assert "--input: no such file" in line and "nope.txt" in line
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    line = one_line_error(cli("predict", "--model", str(trained_run), "--input", str(empty), "--output",
                              str(tmp_path / "d.jsonl")))
    assert f"--input: {empty}: file is empty" in line and not (tmp_path / "d.jsonl").exists()


# -- the command line: one line, exit codes, signals ---------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["train.lrr=1"], "unknown config key 'train.lrr'"),
    (["train.max_steps=0"], "train.max_steps: 0 is out of range"),
    ([f"data.train.en={SAMPLE / 'nope.tsv'}"], "data.train.en: data file not found"),
    ([f"engine.config={REPO / 'ds_configs' / 'zero2_fp16.json'}"], "fp16 does not run on a CPU"),
])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, tiny_encoder, args, expected):
    result = cli("stage1", "--config", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={tmp_path / 'run'}",
                 *args)
    assert expected in one_line_error(result)
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = cli("stage1", "--config", str(REPO / "configs" / "tiny.yaml"), "--debug", "train.lrr=1")
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_offline_hub_name_fails_at_once_naming_the_key(tmp_path):
    started = time.time()
    result = cli("stage1", "--config", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={tmp_path / 'run'}",
                 "model.encoder=no-such-encoder", env={"HF_HUB_OFFLINE": "1"})
    line = one_line_error(result)
    assert "model.encoder: 'no-such-encoder' is not a folder" in line and "HF_HUB_OFFLINE=1" in line
    assert time.time() - started < 40  # no hub retries


def test_disk_full_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, tiny_encoder):
    output = tmp_path / "run"
    common = ["stage1", "--config", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={output}", *TINY]
    line = one_line_error(cli(*common, env={"DUALNER_FAULT": "enospc_in_save:rank=0:step=4"}))
    assert "no space left on the device" in line and "step-4" in line
    assert (output / "checkpoints" / "step-2" / "COMPLETE").is_file()
    assert not (output / ".dualner.lock").exists()
    result = cli(*common)  # space freed: the rerun resumes from step 2 and finishes
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout + result.stderr and (output / "results.json").is_file()


def test_sigint_checkpoints_and_exits_75(tmp_path, tiny_encoder):
    output = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "dualner", "stage1", "--config", str(REPO / "configs" / "tiny.yaml"),
                                f"run.output_dir={output}", FP32, "train.max_steps=400", "train.eval_every=1000",
                                "train.log_every=1", "data.max_train_sentences=512"],
                               cwd=REPO, env=child_env(PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (output / "losses.jsonl").exists() and len((output / "losses.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    log = process.communicate(timeout=300)[0]
    assert process.returncode == EXIT_STOPPED, log[-3000:]
    assert "signal SIGINT" in log and (output / "stopped.json").is_file()
    stopped = json.loads((output / "stopped.json").read_text())["step"]
    assert (output / "checkpoints" / f"step-{stopped}" / "COMPLETE").is_file()


def test_describe_os_error_names_the_path_and_the_cause():
    import errno
    assert "cannot write /x/y: no space left on the device; free some space" in describe_os_error(
        OSError(errno.ENOSPC, "No space left", "/x/y"))
    assert "read-only file system" in describe_os_error(OSError(errno.EROFS, "ro", "/x"))
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "quota", "/q")
    assert "disk quota exceeded" in describe_os_error(wrapped)
    assert describe_os_error(ValueError("not an OS error")) is None
