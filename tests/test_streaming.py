import json

import pytest

from dualner.data.conll import DataFormatError
from dualner.data.encoding import WindowTokenizer
from dualner.data.packing import Collator
from dualner.data.streaming import (KIND_TARGET, STREAM_META, Stage2Stream, expand_files, make_shards,
                                    rank_shards, shard_stream)
from dualner.labels import LabelSet

LABELS = LabelSet(("LOC", "ORG", "PER"))


def stream_collator(tokenizer, **extra):
    return Collator(tokenizer.pad_token_id, row_length=32, meta_columns=STREAM_META, **extra)


def write_text_corpus(folder, files, sentences_per_file):
    folder.mkdir(parents=True, exist_ok=True)
    expected = set()
    for f in range(files):
        path = folder / f"part{f}.txt"
        lines = [f"file{f} sentence {i} words" for i in range(sentences_per_file)]
        path.write_text("\n".join(lines) + "\n")
        expected |= {f"{path}:{i + 1}" for i in range(sentences_per_file)}
    return expected


def one_pass_sample_ids(tokenizer, pattern, world, workers):
    """What each of `world` ranks reads in one pass, each through `workers` loader processes."""
    encoder = WindowTokenizer(tokenizer, LABELS, 32)
    shards = make_shards(expand_files(pattern, "stage2.target.xx"), "xx", KIND_TARGET, world, workers)
    per_rank = []
    for rank in range(world):
        stream = Stage2Stream([(rank_shards(shards, rank, world), 1.0)], encoder, micro_batch_size=4,
                              seed=0, rank=rank, collate=stream_collator(tokenizer), pool=16,
                              workers=workers, repeat=False)
        per_rank.append([sample for batch in stream for sample in batch["meta"]["sample_id"]])
    return per_rank


@pytest.mark.parametrize("files, workers", [(6, 2), (1, 2), (3, 2)],
                         ids=["more-files-than-ranks-x-workers", "one-file", "fewer-files"])
def test_ranks_and_workers_cover_the_corpus_once(tmp_path, tiny_tokenizer, files, workers):
    expected = write_text_corpus(tmp_path / "corpus", files, 23)
    per_rank = one_pass_sample_ids(tiny_tokenizer, str(tmp_path / "corpus" / "*.txt"), 2, workers)
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == len(set(everything))  # no sentence twice, within or across ranks
    assert set(everything) == expected  # and none left out
    assert not set(per_rank[0]) & set(per_rank[1])
    assert min(len(r) for r in per_rank) > 0.3 * len(expected)  # both ranks share the work


def test_resume_mid_stream_with_workers(tmp_path, tiny_tokenizer):
    write_text_corpus(tmp_path / "c", 2, 40)
    encoder = WindowTokenizer(tiny_tokenizer, LABELS, 32)
    shards = make_shards(expand_files(str(tmp_path / "c" / "*.txt"), "k"), "xx", KIND_TARGET, 1, 2)

    def stream():
        return Stage2Stream([(shards, 1.0)], encoder, 4, seed=0, rank=0, collate=stream_collator(tiny_tokenizer),
                            pool=8, workers=2)
    first = stream()
    before = [first.next_batch()["meta"]["sample_id"] for _ in range(7)]
    state = first.state_dict()
    after = [first.next_batch()["meta"]["sample_id"] for _ in range(9)]
    resumed = stream()
    resumed.load_state_dict(state)
    assert [resumed.next_batch()["meta"]["sample_id"] for _ in range(9)] == after
    assert not set(sum(before, [])) & set(sum(after[:3], []))


def test_formats_and_labels(tmp_path, tiny_tokenizer):
    (tmp_path / "t.jsonl").write_text(
        json.dumps({"tokens": ["Paris", "est"], "lang": "fr", "src_id": "7"}) + "\n\n"
        + json.dumps({"tokens": ["Bob"], "tags": ["B-PER"]}) + "\n")
    (tmp_path / "t.tsv").write_text("Berlin\tB-LOC\nist\n\nda\tO\n")
    rows = list(shard_stream(make_shards([str(tmp_path / "t.jsonl")], "xx", KIND_TARGET, 1, 1), False))
    assert [r["words"] for r in rows] == [["Paris", "est"], ["Bob"]]
    assert rows[0]["language"] == "fr" and rows[0]["src_id"] == "7"
    assert rows[1]["tags"] == []  # target text is unlabeled whatever the file says
    source = list(shard_stream(make_shards([str(tmp_path / "t.jsonl")], "en", "source", 1, 1), False))
    assert source[1]["tags"] == ["B-PER"]
    conll = list(shard_stream(make_shards([str(tmp_path / "t.tsv")], "de", KIND_TARGET, 1, 1), False))
    assert [r["words"] for r in conll] == [["Berlin", "ist"], ["da"]] and conll[0]["language"] == "de"


def test_bad_corpora_name_the_file_line_or_key(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"tokens": ["a"]}\n{"words": ["b"]}\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: expected a JSON object with a 'tokens'"):
        list(shard_stream(make_shards([str(tmp_path / "bad.jsonl")], "xx", KIND_TARGET, 1, 1), False))
    with pytest.raises(FileNotFoundError, match=r"stage2.target.de: .*matches no file"):
        expand_files(str(tmp_path / "nothing-*.txt"), "stage2.target.de")


def test_datasets_name_is_streamed_and_sharded(tmp_path):
    """`hf:NAME@SPLIT` goes through datasets.load_dataset(streaming=True), the same call as a hub
    name; here NAME is a local folder, so no network is needed."""
    folder = tmp_path / "hubby"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(
        json.dumps({"tokens": [f"w{i}", "x"], "lang": "sw"}) + "\n" for i in range(10)))
    spec = f"hf:{folder}@train"
    assert expand_files(spec, "k") == [spec]
    shards = make_shards([spec], "sw", KIND_TARGET, 2, 1)
    parts = [[r["words"][0] for r in shard_stream(rank_shards(shards, rank, 2), False)] for rank in (0, 1)]
    assert sorted(parts[0] + parts[1]) == sorted(f"w{i}" for i in range(10))
    assert not set(parts[0]) & set(parts[1])


def test_parallel_pairs_a_translation_with_its_source(tmp_path):
    source = tmp_path / "source.jsonl"
    source.write_text(json.dumps({"tokens": ["Paris"], "tags": ["B-LOC"], "src_id": "3"}) + "\n")
    translations = tmp_path / "fr.jsonl"
    translations.write_text(json.dumps({"tokens": ["Paris", "!"], "src_id": "3"}) + "\n"
                            + json.dumps({"tokens": ["rien"], "src_id": "99"}) + "\n")
    shards = make_shards([str(translations)], "fr", "translation", 1, 1, pair_with=str(source))
    rows = list(shard_stream(shards, False))
    # the source travels inside its translation's record: one unit of the stream
    assert [(r["kind"], r["words"], r["src_id"], r["pair_words"]) for r in rows] == [
        ("translation", ["Paris", "!"], "3", ["Paris"]), ("translation", ["rien"], "99", [])]
    assert rows[0]["pair_tags"] == ["B-LOC"] and rows[0]["tags"] == []


def test_a_translation_and_its_source_always_share_a_micro_batch(tmp_path, tiny_tokenizer):
    """Pairs are units: however the pool is cut and shuffled, no pair is split between micro batches
    (a translation and its source used to be neighbours that a micro-batch boundary could separate)."""
    source = tmp_path / "source.jsonl"
    source.write_text("".join(json.dumps({"tokens": [f"w{i}", "x"], "tags": ["B-LOC", "O"], "src_id": str(i)}) + "\n"
                              for i in range(40)))
    translations = tmp_path / "fr.jsonl"
    translations.write_text("".join(json.dumps({"tokens": [f"v{i}"] * (1 + i % 5), "src_id": str(i)}) + "\n"
                                    for i in range(40)))
    encoder = WindowTokenizer(tiny_tokenizer, LABELS, 32)
    shards = make_shards([str(translations)], "fr", "translation", 1, 1, pair_with=str(source))
    stream = Stage2Stream([(shards, 1.0)], encoder, 5, seed=0, rank=0, collate=stream_collator(tiny_tokenizer, pair_translations=True),
                          pool=16, workers=0, repeat=False)
    paired = 0
    for batch in stream:
        kinds, ids = batch["meta"]["kind"], batch["meta"]["src_id"]
        translated = {i for k, i in zip(kinds, ids) if k == "translation"}
        assert translated == {i for k, i in zip(kinds, ids) if k == "source"}
        paired += batch["pairs"].shape[0]
    assert paired == 40
