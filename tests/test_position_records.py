"""Stage 2's typed position records (dualner.data.range_state) and the checkpoint layout they keep:
a position written by main before the records were typed (lists read by index, a fixture made by
4460beb's own code on these files) loads with today's code and continues with exactly the samples
that code drew from it, on the same and on another number of ranks."""

import gzip
import json
import os
from pathlib import Path

import pytest

from dualner.data.encoding import WindowTokenizer
from dualner.data.packing import Collator
from dualner.data.range_state import RangeState, Segment
from dualner.data.source_kinds import open_sources
from dualner.data.stream_spec import KIND_TARGET, STREAM_META, StreamSpec
from dualner.data.streaming import Stage2Stream
from dualner.labels import LabelSet

FIXTURE = Path(__file__).parent / "fixtures" / "stage2_position_v2.json"
MTIME_NS = 1_700_000_000_000_000_000  # the files' identity (path, size, mtime) must match the checkpoint's


def write_corpus(root: Path) -> list[str]:
    """The files the fixture's stream read (byte for byte, and their modification times)."""
    root.mkdir(parents=True, exist_ok=True)
    for part in range(2):
        (root / f"part{part}.txt").write_text("".join(f"file{part} sentence {i} " + "w " * (i % 5) + "\n"
                                                      for i in range(40)))
    (root / "one.txt.gz").write_bytes(gzip.compress("".join(f"gz {i} x\n" for i in range(30)).encode(), mtime=0))
    files = [str(root / name) for name in ("one.txt.gz", "part0.txt", "part1.txt")]
    for path in files:
        os.utime(path, ns=(MTIME_NS, MTIME_NS))
    return files


def make_stream(tokenizer, files, rank, world):
    specs = [StreamSpec("target/xx", KIND_TARGET, "xx", open_sources(files, "k"), 1.0)]
    return Stage2Stream(specs, WindowTokenizer(tokenizer, LabelSet(("LOC", "ORG", "PER")), 32), 4, 0, rank, world,
                        Collator(tokenizer.pad_token_id, row_length=32, meta_columns=STREAM_META), pool=16,
                        workers=0, repeat=True, range_bytes=256)


@pytest.fixture
def saved(tmp_path):
    root = tmp_path / "c"
    files = write_corpus(root)
    return files, json.loads(FIXTURE.read_text().replace("{root}", str(root)))


def take(stream, batches):
    return [sample for _ in range(batches) for sample in stream.next_batch()["meta"]["sample_id"]]


@pytest.mark.parametrize("world, rank, expected", [(2, 0, "continued_on_2_ranks_rank_0"),
                                                   *[(3, rank, f"continued_on_3_ranks/{rank}") for rank in range(3)]])
def test_a_position_written_before_typed_records_resumes_as_it_did(saved, tiny_tokenizer, world, rank, expected):
    """Written on 2 ranks with pools seen in part (their segments) and a .gz shared by stride."""
    files, fixture = saved
    assert any(pool["segments"] for state in fixture["rank_states"] for pool in state["pools"])
    stream = make_stream(tiny_tokenizer, files, rank, world)
    stream.load_state_dict(fixture["rank_states"])
    key, _, index = expected.partition("/")
    assert take(stream, 6) == (fixture[key][index] if index else fixture[key])


def test_todays_position_is_written_in_the_same_layout(saved, tiny_tokenizer):
    """What a checkpoint holds is unchanged: lists in the documented field order, so that a position
    written now loads wherever one written by main loads."""
    files, fixture = saved
    stream = make_stream(tiny_tokenizer, files, 0, 2)
    stream.load_state_dict(fixture["rank_states"])
    state = stream.state_dict()
    assert state["version"] == fixture["rank_states"][0]["version"]
    assert all(isinstance(entry, list) and len(entry) == 10 for entry in state["ranges"]["target/xx"])
    assert all(isinstance(segment, list) and len(segment) == 12 for pool in state["pools"] for segment in pool["segments"])
    assert json.loads(json.dumps(state)) == state  # plain data: no record object reaches the checkpoint


def test_records_round_trip_through_their_saved_lists():
    state = RangeState.fresh(2, 100, 300, 1, step=3, offset=1)
    assert state.saved() == [2, 100, 300, 1, -1, 3, 1, 1, -1]
    state.advance(1, 150, False)
    assert (state.pass_, state.cursor, state.skip) == (1, 150, 2)
    assert RangeState.from_saved(state.saved()) == state
    state.advance(1, -1, True)
    assert (state.pass_, state.cursor, state.skip) == (2, -1, 1)
    leftover = RangeState.fresh(0, 0, 10, 4, once=4)
    assert not leftover.spent
    leftover.advance(4, -1, True)
    assert leftover.spent
    segment = Segment.opened(1, state, 42)
    assert segment.range_key() == state.key()
    assert Segment.from_saved(segment.saved()) == segment
    again = segment.range_to_read_again()
    assert (again.cursor, again.skip, again.pass_) == (42, 0, 2)
