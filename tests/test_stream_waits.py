"""Issue 24, item 3: a stream that cannot keep up makes the training step wait for it (the mix is
never changed to hide it), and TensorBoard shows that wait per stream."""

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

    import dualner.data.streaming as streaming
    from dualner.stage2 import run_stage2
    real_read_range = streaming.read_range
    slow_records = [0]

    def read_range_slowly(spec, *args, **kwargs):
        for item in real_read_range(spec, *args, **kwargs):
            if spec.kind == streaming.KIND_TARGET:
                time.sleep(0.01)
                slow_records[0] += 1
            yield item

    monkeypatch.setattr(streaming, "read_range", read_range_slowly)
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
