"""The stage-2 loader (dualner.data.streaming, corpus, prepared): byte ranges read every record
once for any cut; ranks x workers cover a corpus once per pass; a checkpointed position resumes
identically on the same readers and exactly once on other numbers of ranks and workers, reading
O(1) records; compressed corpora; bad records; prepared corpora give the raw path's windows."""

import bz2
import gzip
import json
import lzma

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualner.data.corpus import BadRecord, RecordReader, describe_file, parse_record
from dualner.data.encoding import WindowTokenizer
from dualner.data.packing import Collator
from dualner.data.file_source import estimate_records, iter_sentences
from dualner.data.source_kinds import check_corpus, expand_files, open_sources
from dualner.data.stream_spec import KIND_TARGET, STREAM_META, StreamSpec
from dualner.data.streaming import Stage2Stream
from dualner.errors import DataFormatError, MissingPathError
from dualner.labels import LabelSet

LABELS = LabelSet(("LOC", "ORG", "PER"))


def stream_collator(tokenizer, **extra):
    return Collator(tokenizer.pad_token_id, row_length=32, meta_columns=STREAM_META, **extra)


def write_text_corpus(folder, files, sentences_per_file, suffix=".txt"):
    """Files of short sentences; returns every sentence's sample id (file@byte)."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = set()
    for f in range(files):
        path = folder / f"part{f}{suffix}"
        position, lines = 0, []
        for i in range(sentences_per_file):
            line = f"file{f} sentence {i} " + "w " * (i % 5) + "\n"
            expected.add(f"{path}@{position}")
            lines.append(line)
            position += len(line.encode())
        path.write_text("".join(lines))
    return expected


def make_stream(tokenizer, files, rank=0, world=1, workers=0, repeat=False, pool=16, micro=4, kind=KIND_TARGET,
                **extra):
    specs = [StreamSpec(f"{kind}/xx", kind, "xx", open_sources(files, "stage2.target.xx"), 1.0)]
    return Stage2Stream(specs, WindowTokenizer(tokenizer, LABELS, 32), micro, 0, rank, world,
                        stream_collator(tokenizer), pool=pool, workers=workers, repeat=repeat, **extra)


def run_world(tokenizer, files, world, workers, states=None, batches=None, micro=4):
    """Every rank of a world in turn (one process): the sample ids each trained, and its position."""
    samples, positions = [], []
    for rank in range(world):
        stream = make_stream(tokenizer, files, rank, world, workers, micro=micro)
        if states is not None:
            stream.load_state_dict(states)
        taken = []
        for index, batch in enumerate(stream):
            taken += batch["meta"]["sample_id"]
            if batches is not None and index + 1 == batches:
                break
        samples.append(taken)
        positions.append(stream.state_dict())
    return samples, positions


# -- byte ranges ---------------------------------------------------------------------------------------------
def _records(path, cuts):
    file = describe_file(path, "k")
    bounds = [0, *sorted(cuts), file.size]
    return [(record.start, b"".join(record.lines)) for a, b in zip(bounds, bounds[1:])
            for record in RecordReader(file, a, b)]


line_text = st.text(alphabet="ab é\t", min_size=0, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line_text, min_size=1, max_size=30), crlf=st.booleans(), final_newline=st.booleans(),
       conll=st.booleans(), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_any_cut_into_byte_ranges_reads_every_record_once(tmp_path, lines, crlf, final_newline, conll, cuts):
    """Hadoop's rule: a range owns the records that start in it, so any partition of a file, whatever
    the number of pieces and wherever they fall (mid-line, on a newline, in a blank run, inside a
    CoNLL block), reads each record exactly once."""
    newline = "\r\n" if crlf else "\n"
    text = newline.join(lines) + (newline if final_newline else "")
    path = tmp_path / ("c.tsv" if conll else "c.txt")
    path.write_bytes(text.encode())
    size = path.stat().st_size
    whole = _records(path, [])
    assert _records(path, [cut for cut in cuts if 0 < cut < size]) == whole
    bodies = [body for _, body in whole]
    if conll:  # a CoNLL record is a block of non-blank lines
        assert all(line.strip() for body in bodies for line in body.splitlines())
    else:  # one non-blank line each
        assert [body.strip() for body in bodies] == [line.encode().strip() for line in text.splitlines()
                                                     if line.strip()]


def test_conll_ranges_split_blocks_only_at_blank_lines(tmp_path):
    path = tmp_path / "c.tsv"
    blocks = [f"w{i}\tO\nx{i}\tB-PER\n" for i in range(40)]
    path.write_text("\n".join(blocks) + "\n")
    whole = _records(path, [])
    assert len(whole) == 40
    for cut in range(1, path.stat().st_size, 7):
        assert _records(path, [cut]) == whole


@pytest.mark.parametrize("world, workers", [(2, 0), (2, 2), (3, 1), (1, 3)])
def test_ranks_and_workers_cover_the_corpus_once(tmp_path, tiny_tokenizer, world, workers):
    expected = write_text_corpus(tmp_path / "corpus", 2, 37)
    files = expand_files(str(tmp_path / "corpus" / "*.txt"), "stage2.target.xx")
    per_rank, _ = run_world(tiny_tokenizer, files, world, workers)
    everything = [sample for rank in per_rank for sample in rank]
    assert len(everything) == len(set(everything))  # no sentence twice, within or across ranks
    assert set(everything) == expected  # and none left out
    assert min(len(rank) for rank in per_rank) > 0.5 * len(expected) / world  # every rank has a share


# -- resume ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("before, after", [((2, 0), (1, 0)), ((1, 0), (2, 0)), ((2, 0), (3, 0)),
                                           ((2, 2), (3, 1)), ((1, 2), (2, 0))],
                         ids=["2to1", "1to2", "2to3", "2x2to3x1", "1x2to2"])
def test_elastic_resume_uses_every_sentence_exactly_once(tmp_path, tiny_tokenizer, before, after):
    """Stop mid-pass on one number of ranks x workers (pools partly trained, prefetched batches
    dropped), resume on another: the pass still holds every sentence exactly once."""
    expected = write_text_corpus(tmp_path / "c", 3, 41)
    files = expand_files(str(tmp_path / "c" / "*.txt"), "k")
    first, states = run_world(tiny_tokenizer, files, *before, batches=5)
    second, _ = run_world(tiny_tokenizer, files, *after, states=states)
    everything = [s for rank in first + second for s in rank]
    assert len(everything) == len(set(everything))
    assert set(everything) == expected


def test_elastic_resume_with_another_micro_batch_shape(tmp_path, tiny_tokenizer):
    """A pool trained in part under one micro batch size is finished under another."""
    expected = write_text_corpus(tmp_path / "c", 1, 50)
    files = [str(tmp_path / "c" / "part0.txt")]
    first, states = run_world(tiny_tokenizer, files, 1, 0, batches=3, micro=5)
    second, _ = run_world(tiny_tokenizer, files, 2, 0, states=states, micro=2)
    everything = [s for rank in first + second for s in rank]
    assert sorted(everything) == sorted(expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_on_the_same_readers_continues_identically(tmp_path, tiny_tokenizer, workers):
    write_text_corpus(tmp_path / "c", 2, 40)
    files = expand_files(str(tmp_path / "c" / "*.txt"), "k")

    def batches(stream, count):
        return [tuple(stream.next_batch()["meta"]["sample_id"]) for _ in range(count)]
    straight = batches(make_stream(tiny_tokenizer, files, 0, 2, workers, repeat=True), 50)
    ranks = [make_stream(tiny_tokenizer, files, rank, 2, workers, repeat=True) for rank in (0, 1)]
    head = batches(ranks[0], 23)
    batches(ranks[1], 23)
    resumed = make_stream(tiny_tokenizer, files, 0, 2, workers, repeat=True)
    resumed.load_state_dict([stream.state_dict() for stream in ranks])
    assert head + batches(resumed, 27) == straight  # several passes: ranges cycle on their own


def test_resume_reads_o1_records(tmp_path, tiny_tokenizer):
    """Resuming deep into a corpus reads one pool again, not what came before (records counted)."""
    path = tmp_path / "big.txt"
    path.write_text("".join(f"sentence {i} of many\n" for i in range(20_000)))
    early, late = make_stream(tiny_tokenizer, [str(path)], pool=64), make_stream(tiny_tokenizer, [str(path)], pool=64)
    for _ in range(3):
        early.next_batch()
    for _ in range(3000):  # 12,000 sentences in
        late.next_batch()
    costs = []
    for stream in (early, late):
        resumed = make_stream(tiny_tokenizer, [str(path)], pool=64)
        resumed.load_state_dict([stream.state_dict()])
        resumed.next_batch()
        costs.append(resumed.records_read())
    assert costs[0] == costs[1] <= 64  # the pool seen in part, read again; nothing else


def test_a_resumed_stream_plans_its_readers_once(tmp_path, tiny_tokenizer, monkeypatch):
    """Planning (assigning ranges to readers; a hub dataset asks the hub for its shards) happens
    once: from the checkpoint on a resume, from the start otherwise."""
    import dualner.data.streaming as streaming
    expected = write_text_corpus(tmp_path / "c", 2, 30)
    files = sorted(str(p) for p in (tmp_path / "c").glob("*.txt"))
    planned = []
    original = streaming.global_ranges
    monkeypatch.setattr(streaming, "global_ranges", lambda *a, **k: planned.append(a[1]) or original(*a, **k))
    first = make_stream(tiny_tokenizer, files)
    assert planned == []
    taken = [s for _ in range(3) for s in first.next_batch()["meta"]["sample_id"]]
    assert planned == [None]
    resumed = make_stream(tiny_tokenizer, files)
    resumed.load_state_dict([first.state_dict()])
    taken += [s for batch in resumed for s in batch["meta"]["sample_id"]]
    assert len(planned) == 2 and planned[1] is not None
    assert sorted(taken) == sorted(expected)


# -- formats ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix, opener", [(".gz", gzip.open), (".xz", lzma.open), (".bz2", bz2.open),
                                            (".zst", None)])
def test_compressed_corpora_read_like_plain_ones(tmp_path, tiny_tokenizer, suffix, opener):
    plain = tmp_path / "c.jsonl"
    plain.write_text("".join(json.dumps({"tokens": [f"w{i}", "x"] * (1 + i % 3)}) + "\n" for i in range(60)))
    packed = tmp_path / f"c.jsonl{suffix}"
    if opener is None:
        import zstandard
        packed.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    else:
        with opener(packed, "wb") as handle:
            handle.write(plain.read_bytes())
    expected = [s["words"] for s in iter_sentences(describe_file(plain, "k"), "xx", False)]
    assert [s["words"] for s in iter_sentences(describe_file(packed, "k"), "xx", False)] == expected
    assert estimate_records(describe_file(packed, "k")) == (60, True)
    per_rank, states = run_world(tiny_tokenizer, [str(packed)], 1, 0, batches=4)
    rest, _ = run_world(tiny_tokenizer, [str(packed)], 1, 0, states=states)  # decompress-and-skip to the cursor
    offsets = sorted(int(s.rsplit("@", 1)[1]) for rank in per_rank + rest for s in rank)
    assert len(offsets) == 60 == len(set(offsets))
    # one compressed file is one piece, shared by stride: 2 ranks x 2 workers keep 15 records each;
    # stopped there and resumed on 3 ranks, the pass still holds every record once
    first, states = run_world(tiny_tokenizer, [str(packed)], 2, 2, batches=2)
    rest, _ = run_world(tiny_tokenizer, [str(packed)], 3, 0, states=states)
    offsets = [int(s.rsplit("@", 1)[1]) for rank in first + rest for s in rank]
    assert len(offsets) == 60 == len(set(offsets))


def test_formats_and_labels(tmp_path):
    (tmp_path / "t.jsonl").write_text(
        "\ufeff" + json.dumps({"tokens": ["Paris", "est"], "lang": "fr", "src_id": 7}) + "\r\n\n"
        + json.dumps({"tokens": ["Bob"], "tags": ["B-PER"]}) + "\n")
    (tmp_path / "t.tsv").write_text("Berlin\tB-LOC\nist\n\n\nda\tO\n")
    rows = list(iter_sentences(describe_file(tmp_path / "t.jsonl", "k"), "fr", False))  # another lang: bad
    assert [r["words"] for r in rows] == [["Paris", "est"], ["Bob"]]
    assert rows[0]["language"] == "fr" and rows[0]["src_id"] == "7"  # a leading byte-order mark is not text
    assert rows[1]["tags"] == []  # target text is unlabeled whatever the file says
    source = list(iter_sentences(describe_file(tmp_path / "t.jsonl", "k"), "en", True))
    assert source[1]["tags"] == ["B-PER"]
    conll = list(iter_sentences(describe_file(tmp_path / "t.tsv", "k"), "de", False))
    assert [r["words"] for r in conll] == [["Berlin", "ist"], ["da"]] and conll[0]["language"] == "de"


def test_bad_corpora_name_the_file_line_or_key(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"words": ["b"]}\n')
    with pytest.raises(DataFormatError, match=r"stage2.target.de: .*bad.jsonl:1 \(byte 0\): expected a JSON object"):
        check_corpus(open_sources([str(tmp_path / "bad.jsonl")], "k"), "de", KIND_TARGET, "stage2.target.de")
    with pytest.raises(MissingPathError, match=r"stage2.target.de: .*matches no file"):
        expand_files(str(tmp_path / "nothing-*.txt"), "stage2.target.de")
    with pytest.raises(MissingPathError, match=r"stage2.target.de: .* is a folder"):
        expand_files(str(tmp_path), "stage2.target.de")
    (tmp_path / "c.parquet").write_text("x")
    with pytest.raises(DataFormatError, match=r"c.parquet: unknown corpus format"):
        open_sources([str(tmp_path / "c.parquet")], "stage2.target.de")


def test_bad_records_are_skipped_and_reported_with_file_line_and_byte(tmp_path, tiny_tokenizer):
    path = tmp_path / "c.jsonl"
    good = [json.dumps({"tokens": [f"w{i}"]}) + "\n" for i in range(30)]
    lines = good[:11] + ['{"tokens": [broken\n'] + good[11:20] + [b"\xff\xfe not utf-8\n".decode("latin-1")] + good[20:]
    path.write_bytes("".join(lines).encode("latin-1"))
    stream = make_stream(tiny_tokenizer, [str(path)], world=1)
    seen = [s for batch in stream for s in batch["meta"]["sample_id"]]
    assert len(seen) == 30
    reports = stream.take_bad_records()
    assert [(r["line"], r["byte"]) for r in reports] == [
        (12, sum(len(l) for l in lines[:11])), (22, sum(len(l) for l in lines[:21]))]
    assert "JSON" in reports[0]["reason"] and "not UTF-8" in reports[1]["reason"]
    assert stream.position.bad_records == 2 and len(stream.state_dict()["bad"]) == 2
    with pytest.raises(BadRecord, match=r"c.jsonl:12 \(byte \d+\)"):
        list(iter_sentences(describe_file(path, "k"), "xx", False))
    # rank 1 of 2 reads the second half from its middle: the line is counted, not read from the records
    second = make_stream(tiny_tokenizer, [str(path)], rank=1, world=2)
    for _ in second:
        pass
    assert [(r["line"], r["byte"]) for r in second.take_bad_records()] == [(22, sum(len(l) for l in lines[:21]))]


def test_a_bad_records_line_is_counted_from_the_last_one_counted(tmp_path, monkeypatch):
    """Lines of bad records deep in one file: each counted forward from the one before, not from byte 0."""
    from dualner.data import pools
    path = tmp_path / "c.txt"
    path.write_text("".join(f"line {i}\n" for i in range(1000)))
    starts = []
    original = pools.skip_to
    monkeypatch.setattr(pools, "skip_to", lambda handle, file, position: starts.append(position)
                        or original(handle, file, position))
    index = pools.LineIndex(describe_file(path, "k"))
    offsets = [sum(len(f"line {i}\n") for i in range(line)) for line in (300, 700, 500)]
    assert [index.line_of(offset) for offset in offsets] == [301, 701, 501]
    assert starts == [0, offsets[0], offsets[0]]  # 500 counted from 300, not from byte 0


def test_hub_datasets_are_streamed_by_shard(tmp_path, tiny_tokenizer):
    """`hf:NAME@SPLIT` goes through datasets.load_dataset(streaming=True), the same call as a hub
    name; here NAME is a local folder, so no network is needed."""
    folder = tmp_path / "hubby"
    folder.mkdir()
    for part in range(2):
        (folder / f"train-{part}.jsonl").write_text("".join(
            json.dumps({"tokens": [f"w{part}-{i}", "x"], "lang": "sw"}) + "\n" for i in range(10)))
    spec = f"hf:{folder}@train"
    assert expand_files(spec, "k") == [spec]
    per_rank, _ = run_world(tiny_tokenizer, [spec], 2, 0)
    everything = [s for rank in per_rank for s in rank]
    assert len(everything) == 20 == len(set(everything)) and all(per_rank)


def test_a_translation_and_its_source_always_share_a_micro_batch(tmp_path, tiny_tokenizer):
    """Pairs are units: however the pool is cut and shuffled, no pair is split between micro batches."""
    source = tmp_path / "source.jsonl"
    source.write_text("".join(json.dumps({"tokens": [f"w{i}", "x"], "tags": ["B-LOC", "O"], "src_id": str(i)}) + "\n"
                              for i in range(40)))
    translations = tmp_path / "fr.jsonl"
    translations.write_text("".join(json.dumps({"tokens": [f"v{i}"] * (1 + i % 5), "src_id": str(i)}) + "\n"
                                    for i in range(40)) + json.dumps({"tokens": ["rien"], "src_id": "99"}) + "\n")
    spec = StreamSpec("translation/fr", "translation", "fr", open_sources([str(translations)], "k"), 1.0,
                      pair_with=str(source))
    stream = Stage2Stream([spec], WindowTokenizer(tiny_tokenizer, LABELS, 32), 5, 0, 0, 1,
                          stream_collator(tiny_tokenizer, pair_translations=True), pool=16, repeat=False)
    paired = 0
    for batch in stream:
        kinds, ids = batch["meta"]["kind"], batch["meta"]["src_id"]
        translated = {i for k, i in zip(kinds, ids) if k == "translation" and i != "99"}
        assert translated == {i for k, i in zip(kinds, ids) if k == "source"}
        paired += batch["pairs"].shape[0]
    assert paired == 40


def test_mix_holds_when_a_stream_has_fewer_pieces_than_readers(tmp_path, tiny_tokenizer):
    """A compressed file is one piece: every reader keeps one record in 4 of it (stride), so every
    rank (not only the whole world) draws the configured mix; start-up says what the stride costs and
    names the remedy."""
    import logging
    small = tmp_path / "one.txt.gz"
    with gzip.open(small, "wt") as handle:
        handle.writelines(f"gz {i}\n" for i in range(400))
    write_text_corpus(tmp_path / "big", 1, 400)
    specs = [StreamSpec("target/aa", KIND_TARGET, "aa", open_sources([str(small)], "k"), 1.0),
             StreamSpec("target/bb", KIND_TARGET, "bb", open_sources([str(tmp_path / "big" / "part0.txt")], "k"), 4.0)]
    messages = []
    log = logging.getLogger("test-mix")
    log.warning = lambda message, *args: messages.append(message % args)
    for rank in range(4):
        counts = {"aa": 0, "bb": 0}
        stream = Stage2Stream(specs, WindowTokenizer(tiny_tokenizer, LABELS, 32), 4, 0, rank, 4,
                              stream_collator(tiny_tokenizer), pool=16, repeat=True, log=log)
        for _ in range(24):  # 6 pools
            for language in stream.next_batch()["meta"]["language"]:
                counts[language] += 1
        assert abs(counts["aa"] / sum(counts.values()) - 0.2) < 0.02  # configured: 1 / (1 + 4)
    assert any("target/aa has 1 piece(s) that cannot be split" in m and "about 4x slower" in m
               and "dualner prepare" in m for m in messages)


# -- prepared corpora ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_prepared_corpus_gives_the_raw_windows(tmp_path, tiny_tokenizer, tiny_encoder, workers):
    from dualner.data.prepare import prepare
    from dualner.data.prepared import PreparedCorpus
    plain = tmp_path / "de.txt"
    words = [" ".join(f"wort{j}" for j in range(1 + (i * 7) % 40)) for i in range(120)]
    plain.write_text("\n".join(words) + "\n\n")
    packed = tmp_path / "de2.jsonl.xz"
    with lzma.open(packed, "wt") as handle:
        handle.writelines(json.dumps({"tokens": w.split(), "src_id": i}) + "\n" for i, w in enumerate(words))
    manifest = prepare([str(plain), str(packed)], str(tmp_path / "prep"), tiny_encoder, 32, "de", workers=workers,
                       shard_bytes=1500, log=lambda *_: None)
    assert manifest["sentences"] == 240 and len(manifest["shards"]) > 4
    corpus = PreparedCorpus.open(tmp_path / "prep")
    encoder = WindowTokenizer(tiny_tokenizer, LABELS, 32)
    prepared = {}
    for sentence in range(corpus.sentences):
        windows = corpus.windows_of(sentence)
        prepared[windows[0]["sample_id"].rsplit("/", 1)[1]] = windows
    for path in (plain, packed):
        raw = list(iter_sentences(describe_file(path, "k"), "de", False))
        encoded = encoder.encode_batch({"words": [s["words"] for s in raw], "tags": [[] for _ in raw],
                                        "sample_id": [s["sample_id"] for s in raw]})
        for row in range(len(encoded["input_ids"])):
            key = encoded["sample_id"][row].rsplit("/", 1)[1]
            stored = [w for w in prepared[key] if w["word_offset"] == encoded["word_offset"][row]][0]
            for column in ("input_ids", "word_index", "word_offset", "num_words"):
                assert stored[column] == encoded[column][row], (key, column)
    assert prepared["de2.jsonl.xz@0"][0]["src_id"] == "0"


def test_prepared_corpus_streams_once_per_pass_and_prepare_resumes(tmp_path, tiny_tokenizer, tiny_encoder):
    from dualner.data.prepare import prepare
    from dualner.data.prepared import MANIFEST
    plain = tmp_path / "c.txt"
    plain.write_text("".join(f"satz {i} hier\n" for i in range(300)))
    prepare([str(plain)], str(tmp_path / "prep"), tiny_encoder, 32, "xx", workers=1, shard_bytes=1000,
            log=lambda *_: None)
    # an interrupted preparation: the manifest and one shard gone; the rest is reused
    (tmp_path / "prep" / MANIFEST).unlink()
    (tmp_path / "prep" / "0000-000001.done.json").unlink()
    done_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "prep").glob("*.done.json")}
    prepare([str(plain)], str(tmp_path / "prep"), tiny_encoder, 32, "xx", workers=1, shard_bytes=1000,
            log=lambda *_: None)
    assert all((tmp_path / "prep" / name).stat().st_mtime_ns == mtime for name, mtime in done_before.items())
    assert (tmp_path / "prep" / "0000-000001.done.json").is_file()
    files = expand_files(str(tmp_path / "prep"), "k")
    first, states = run_world(tiny_tokenizer, files, 2, 0, batches=6)
    second, _ = run_world(tiny_tokenizer, files, 3, 0, states=states)
    everything = [s for rank in first + second for s in rank]
    assert len(everything) == 300 == len(set(everything))


def read_skipping_bad(file, language, labeled=False) -> tuple[list[dict], list[BadRecord]]:
    """Every sentence of a corpus file, and its bad records (as a stream skips them)."""
    sentences, bad = [], []
    for record in RecordReader(file, 0, file.end):
        try:
            sentence = parse_record(record, file, language, labeled)
        except BadRecord as error:
            bad.append(error)
            continue
        if sentence is not None:
            sentences.append(sentence)
    return sentences, bad


def test_real_world_anomalies_in_stage2_corpora(tmp_path):
    """What real corpora carry: a byte-order mark, CRLF, -DOCSTART- markers, zero-width-only
    tokens and lines, space-separated CoNLL columns, IOBES / lower-case tags, null fields, NUL bytes
    and a pretty-printed JSON document; each read as meant or skipped as a bad record that says why."""
    text = tmp_path / "t.txt"
    text.write_bytes("\ufeffEins zwei\r\n-DOCSTART-\r\n\u200b\r\ndrei \u200b vier\r\nbin\x00är\n".encode())
    sentences, bad = read_skipping_bad(describe_file(text, "k"), "de")
    assert [sentence["words"] for sentence in sentences] == [["Eins", "zwei"], ["drei", "vier"]]
    assert len(bad) == 1 and "NUL byte" in bad[0].reason
    conll = tmp_path / "c.tsv"
    conll.write_text("-DOCSTART- O\n\nParis s-loc\nist o\n\u200b\nNew b-org\nYork E-ORG\n")
    labeled = list(iter_sentences(describe_file(conll, "k"), "fr", True))
    assert [(s["words"], s["tags"]) for s in labeled] == [(["Paris", "ist"], ["B-loc", "O"]),
                                                           (["New", "York"], ["B-org", "I-ORG"])]
    jsonl = tmp_path / "j.jsonl"
    jsonl.write_text(json.dumps({"tokens": ["Ana", "vive"], "tags": ["s-per", "o"], "src_id": None, "lang": None}) + "\n")
    record = next(iter_sentences(describe_file(jsonl, "k"), "es", True))
    assert record["tags"] == ["B-per", "O"] and record["src_id"] == "" and record["language"] == "es"
    pretty = tmp_path / "p.json"
    pretty.write_text('[\n  {"tokens": ["a"]}\n]\n')
    with pytest.raises(BadRecord, match="one JSON object per line"):
        list(iter_sentences(describe_file(pretty, "k"), "xx", False))
