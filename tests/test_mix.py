"""Stage 2's global mix and equal shares, property-tested over random layouts: every prefix of the
plan is within about a sample of the weights, a block computed alone is the block of the whole plan,
every reader holds an equal share of every stream, and every record is used once per pass across
resumes on other numbers of readers (at plan level, and with the real loader on small files)."""

import gzip

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualner.data.corpus import CorpusFile
from dualner.data.mix import MixPlan
from dualner.data.shares import equal_shares, reshare
from dualner.data.source_kinds import source_of_file

QUICK = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
weights = st.lists(st.one_of(st.floats(1e-6, 1e-3), st.floats(0.01, 1.0)), min_size=1, max_size=8)


@QUICK
@given(weights=weights, blocks=st.integers(1, 3), small=st.booleans())
def test_every_prefix_of_the_plan_is_within_a_sample_of_the_weights(weights, blocks, small):
    plan = MixPlan(weights, block=4 * len(weights) + 13 if small else None)
    order = plan.streams(0, blocks * plan.block)
    counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[order], axis=0)
    expected = plan.weights * np.arange(1, len(order) + 1)[:, None]
    assert np.abs(counts - expected).max() < 2
    assert (counts[-1] == plan.cumulative(len(order))).all()  # the closed form at block boundaries


@QUICK
@given(weights=weights, start=st.integers(0, 10**12), count=st.integers(1, 300))
def test_any_span_of_the_plan_is_computed_alone_and_near_the_weights(weights, start, count):
    """A resume at sample 10^12 computes its block alone; the counts of any span follow the weights."""
    plan = MixPlan(weights, block=4 * len(weights) + 7)
    span = plan.streams(start, count)
    block = start - start % plan.block
    assert (span == plan.streams(block, start - block + count)[start - block:]).all()
    assert (np.abs(plan.counts(start, count) - plan.weights * count) < 3).all()
    assert (plan.counts_between(start, start + 5 * plan.block + count)
            == plan.counts(start, 5 * plan.block + count)).all()


# -- shares at plan level: positions stand for records --------------------------------------------------
def _sources(sizes, compressed):
    return [source_of_file(CorpusFile(f"f{index}", "text", "gzip" if packed else "", size, 0))
            for index, (size, packed) in enumerate(zip(sizes, compressed))]


def _take(state, sources):
    """The next record of a range (a plan-level read: record i of a file sits at position i), its state
    advanced as the loader advances it; None when its pass ends."""
    size = sources[state.file].file.size
    position = state.start if state.cursor < 0 else state.cursor
    if state.step == 1:
        if position >= min(state.end, size):
            state.advance(state.pass_, -1, True)
            return None
        state.advance(state.pass_, position + 1, False)
        return position
    position += state.skip
    if position >= size:
        state.advance(state.pass_, -1, True)
        return None
    state.advance(state.pass_, position + 1, False)
    return position


def _read(share, sources, records, used):
    """One reader reads `records` records of its share in pass order (the loader's rule)."""
    for _ in range(records):
        for _attempt in range(len(share) + 1):  # a share may hold no record at all (a stride past the end)
            live = [state for state in share if not state.spent]
            if not live:  # more readers than records: a share may be empty
                return
            state = min(live, key=lambda s: (s.pass_, s.file, s.start, s.once))
            pass_ = state.pass_
            position = _take(state, sources)
            if position is not None:
                used.append((pass_, state.file, position))
                break


@QUICK
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=4),
       compressed=st.lists(st.booleans(), min_size=4, max_size=4),
       shapes=st.lists(st.integers(1, 7), min_size=2, max_size=4), data=st.data())
def test_every_record_is_used_once_per_pass_across_resumes_on_other_readers(sizes, compressed, shapes, data):
    sources = _sources(sizes, compressed)
    limits = {"bytes": 16, "sentences": 16}
    shares = equal_shares(sources, shapes[0], limits)
    contiguous = [sum(s.end - s.start for s in share if s.step == 1) for share in shares]
    assert max(contiguous) - min(contiguous) <= 1  # equal spans
    used = []
    for readers in shapes[1:]:
        for share in shares:
            _read(share, sources, data.draw(st.integers(0, 2 * sum(sizes) // len(shares) + 2)), used)
        shares = reshare([state for share in shares for state in share], sources, readers, limits)
    for share in shares:  # the last shape reads on until every range is two passes on
        while min([s.pass_ for s in share if not s.spent] or [3]) < 3:
            _read(share, sources, 1, used)
    everything = [(file, position) for file, size in enumerate(sizes) for position in range(size)]
    for pass_ in (0, 1, 2):
        taken = [(file, position) for p, file, position in used if p == pass_]
        assert sorted(taken) == everything, pass_


def test_stride_shares_cover_a_compressed_file_once_with_the_real_reader(tmp_path, tiny_tokenizer):
    """Reader level: a one-piece .gz and a plain file in one stream, 3 readers, then 2 (elastic)."""
    from tests.test_streaming import run_world, write_text_corpus
    packed = tmp_path / "c" / "packed.txt.gz"
    expected = write_text_corpus(tmp_path / "c", 1, 45)
    with gzip.open(packed, "wt") as handle:
        handle.writelines(f"gz {i}\n" for i in range(31))
        expected |= {f"{packed}@{sum(len(f'gz {j}') + 1 for j in range(i))}" for i in range(31)}
    files = [str(tmp_path / "c" / "part0.txt"), str(packed)]
    first, states = run_world(tiny_tokenizer, files, 3, 0, batches=3)
    second, _ = run_world(tiny_tokenizer, files, 2, 0, states=states)
    everything = [s for rank in first + second for s in rank]
    assert sorted(everything) == sorted(expected)
