"""Issue 24, item 3: a stream that cannot keep up makes the training step wait for it (the mix is
never changed to hide it), and TensorBoard shows that wait per stream."""

import json
import re
import time

import pytest

from dualner.data.position import stream_waits
from tests.test_hardening import config
from tests.test_hardening3 import populated  # noqa: F401  (a finished tiny stage-1 run: a fixture)


def test_a_wait_is_charged_to_the_streams_that_kept_the_pool_waiting():
    assert stream_waits(3.0, [1.0, 0.5]) == [1.0, 0.5]  # the rest of the wait: tokenizing, collating
    assert stream_waits(0.3, [2.0, 1.0]) == pytest.approx([0.2, 0.1])  # workers read ahead: only the wait is charged
    assert stream_waits(1.0, [0.0, 0.0]) == [0.0, 0.0]


def test_tensorboard_shows_the_steps_wait_for_a_slow_stream(populated, tmp_path, monkeypatch):
    """The target's records are read slowly (as from a single-block .xz shared by many readers): the
    step's wait shows under data/wait_seconds/target/de, not under the labeled source's name."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import dualner.data.range_reading as range_reading
    from dualner.data.stream_spec import KIND_TARGET
    from dualner.stage2 import run_stage2
    real_read_range = range_reading.read_range
    slow_records = [0]

    def read_range_slowly(spec, *args, **kwargs):
        for item in real_read_range(spec, *args, **kwargs):
            if spec.kind == KIND_TARGET:
                time.sleep(0.01)
                slow_records[0] += 1
            yield item

    monkeypatch.setattr(range_reading, "read_range", read_range_slowly)
    run = tmp_path / "stage2"
    run_stage2(config(run, f"stage2.init_from={populated}", "stage2.target={de: data/panx-sample/de/train.tsv}",
                      "stage2.mix=equal", "train.eval_every=100", "data.loader_workers=0", file="tiny_stage2.yaml"))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    target = [event.value for event in events.Scalars("data/wait_seconds/target/de")]
    source = [event.value for event in events.Scalars("data/wait_seconds/source/en")]
    total = [event.value for event in events.Scalars("data/wait_seconds")]
    assert len(target) == len(source) == len(total) == 4  # one per step (log_every=1)
    slept = 0.01 * slow_records[0]
    assert slept > 0.1 and 0.8 * slept <= sum(target) <= sum(total) + 1e-6
    assert sum(source) < 0.5 * sum(target)


def test_a_resume_whose_catch_up_outlasts_the_collective_timeout_still_trains(populated, tmp_path, monkeypatch):
    """2 ranks, the target one .gz file (a piece that cannot be split: a resume decompresses up to
    its position). Start-up says what the catch-up costs and names `prepare`; rank 1 catching up 30 s
    longer than rank 0, with the default group's collectives timing out after 20 s, the resume still
    trains: rank 0 waits for rank 1's catch-up at a barrier sized for it, before the first step, not
    in a collective of training (the first step's data wait is 30 s on both ranks; without the
    barrier rank 0 waited in DeepSpeed's gradient all-reduce instead, whose group keeps torch's
    30-minute timeout on CPU, so this short run would not trip it)."""
    import gzip

    from tests.conftest import REPO, launch
    target = tmp_path / "de.txt.gz"
    with gzip.open(target, "wt") as handle:
        handle.writelines(f"Satz {i} aus Berlin und Hamburg\n" for i in range(3000))
    run = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "tiny_stage2.yaml"), f"run.output_dir={run}",
            f"stage2.init_from={populated}", f"stage2.target={{de: {target}}}", "stage2.mix=equal",
            "stage2.bucket_pool=16", "train.eval_every=100", "train.save_every=2", "data.max_eval_sentences=8",
            f"engine.config={REPO / 'ds_configs' / 'zero0_fp32.json'}"]
    launch("launchers/stage2.py", [*args, "train.max_steps=4"], nproc=2)
    monkeypatch.setenv("DUALNER_COLLECTIVE_TIMEOUT_S", "20")
    monkeypatch.setenv("SLOW_CATCH_UP_S", "30")
    resumed = launch("tests/stage2_with_a_slow_catch_up.py", [*args, "train.max_steps=6"], nproc=2)
    log = resumed.stdout + resumed.stderr
    assert re.search(r"resuming target/de decompresses and discards about [\d.]+ MB of \S+de\.txt\.gz up to the "
                     r"checkpoint's position \(about \d+ s on one CPU per reader\).*python -m dualner prepare", log)
    caught_up = re.search(r"caught up with the checkpoint's position in ([\d.]+) s, every rank in ([\d.]+) s "
                          r"\(the wait's timeout: (\d+) s\)", log)
    assert caught_up and float(caught_up.group(2)) >= 30 and int(caught_up.group(3)) >= 40, log[-3000:]
    logged = {entry["step"]: entry for entry in map(json.loads, (run / "losses.jsonl").read_text().splitlines())}
    assert max(logged) == 6 and logged[5]["data/wait_seconds"] >= 27  # the mean over ranks: both waited


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_bad_collective_timeout_is_refused_naming_the_variable(monkeypatch, value):
    from dualner.backend.comm import collective_timeout
    from dualner.errors import ConfigError
    monkeypatch.setenv("DUALNER_COLLECTIVE_TIMEOUT_S", value)
    with pytest.raises(ConfigError, match=rf"DUALNER_COLLECTIVE_TIMEOUT_S='{value}': expected a positive number"):
        collective_timeout()
    monkeypatch.setenv("DUALNER_COLLECTIVE_TIMEOUT_S", "90")
    assert collective_timeout().total_seconds() == 90
