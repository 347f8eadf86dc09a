"""Stage 2's sources (dualner.data.source): each config entry opened as the class of its kind through
SOURCE_KINDS, and each kind answering the loader's questions (ranges, counting, identity, checks)."""

import gzip
import json

import pytest

from dualner.data.blocks import bgzf_compress
from dualner.data.file_source import CompressedFileSource, RawFileSource
from dualner.data.hub_source import HubSource
from dualner.data.prepare import prepare
from dualner.data.prepared_source import PreparedSource
from dualner.data.source import Source
from dualner.data.source_kinds import SOURCE_KINDS, check_corpus, kind_of, open_source
from dualner.data.stream_spec import KIND_TARGET
from dualner.errors import ConfigError, DataFormatError

LINES = "".join(f"sentence {i} of the corpus\n" for i in range(50))


@pytest.fixture
def corpora(tmp_path, tiny_encoder):
    plain = tmp_path / "plain.txt"
    plain.write_text(LINES)
    single = tmp_path / "single.txt.gz"
    single.write_bytes(gzip.compress(LINES.encode()))
    blocks = tmp_path / "blocks.txt.gz"
    blocks.write_bytes(bgzf_compress(LINES.encode(), block=300))
    prepare([str(plain)], str(tmp_path / "prep"), tiny_encoder, 32, "xx", workers=1, log=lambda *_: None)
    hub = tmp_path / "hubby"
    hub.mkdir()
    (hub / "train-0.jsonl").write_text("".join(json.dumps({"tokens": [f"w{i}", "x"]}) + "\n" for i in range(5)))
    return {"plain": str(plain), "single": str(single), "blocks": str(blocks), "prepared": str(tmp_path / "prep"),
            "hub": f"hf:{hub}@train"}


def test_every_kind_is_one_class_of_the_registry(corpora):
    assert all(issubclass(cls, Source) and cls.kind == kind for kind, cls in SOURCE_KINDS.items())
    expected = {"plain": RawFileSource, "single": CompressedFileSource, "blocks": CompressedFileSource,
                "prepared": PreparedSource, "hub": HubSource}
    for name, path in corpora.items():
        assert SOURCE_KINDS[kind_of(path)] is expected[name]
        assert type(open_source(path, "k")) is expected[name]


def test_each_kind_says_how_it_is_cut_counted_and_entered(corpora):
    plain, single, blocks, prepared, hub = (open_source(corpora[name], "k") for name in
                                            ("plain", "single", "blocks", "prepared", "hub"))
    # ranges: contiguous positions, or pieces that cannot be split (one per hub shard)
    assert plain.contiguous and plain.extent == len(LINES) and plain.unsplit_pieces() == []
    assert blocks.contiguous and blocks.extent == len(LINES) and blocks.unsplit_pieces() == []
    assert not single.contiguous and len(single.unsplit_pieces()) == 1
    assert prepared.contiguous and prepared.extent == 50 and prepared.position_unit == "sentences"
    assert not hub.contiguous and hub.unsplit_pieces() == [(0, 1)]
    # entering in the middle: a seek, except into a compressed file of one block or a hub shard
    assert single.entry_cost(1000) == 1000 and single.reads_before(1000) and single.entry_seconds(190e6) > 0
    assert blocks.entry_cost(1000) == 0 and not blocks.reads_before(1000) and not plain.reads_before(1000)
    assert hub.reads_before(3) and not hub.reads_before(0)
    # counting for stage2.mix=size: exact where small or prepared; a hub dataset cannot tell
    assert plain.count("k") == single.count("k") == blocks.count("k") == (50, True)
    assert prepared.count("k") == (50, True)
    with pytest.raises(ConfigError, match=r"stage2.target.sw: .*stage2.mix=equal"):
        hub.count("stage2.target.sw")
    # identity: what a checkpoint compares on a resume
    assert plain.identity()[0] == corpora["plain"] and hub.identity() == [corpora["hub"]]
    assert prepared.identity()[1:] == [50, prepared.corpus.fingerprint]


def test_each_kind_reads_a_range_from_a_cursor(corpora):
    plain = open_source(corpora["plain"], "k")
    first = list(plain.records(0, plain.extent, 0, -1, 0))
    assert len(first) == 50
    position, after, _ = first[10]
    resumed = list(plain.records(0, plain.extent, 0, position, 0))
    assert [p for p, _, _ in resumed] == [p for p, _, _ in first[10:]] and resumed[0][1] == after
    unit = plain.unit(first[3][2], "xx", KIND_TARGET, 2, False)
    assert unit[0]["words"] == ["sentence", "3", "of", "the", "corpus"] and unit[0]["pass"] == 2
    prepared = open_source(corpora["prepared"], "k")
    windows = [record for _, _, record in prepared.records(0, 50, 0, 20, 7)]
    assert len(windows) == 30
    assert prepared.unit(windows[0], "xx", KIND_TARGET, 0, False)[0][0]["kind"] == KIND_TARGET
    hub = open_source(corpora["hub"], "k")
    assert [p for p, _, _ in hub.records(0, 1, 0, 2, 0)] == [2, 3, 4]


def test_checks_run_where_the_kind_has_them(corpora, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataFormatError, match="stage2.target.xx: .*empty.txt: file is empty"):
        check_corpus([open_source(str(empty), "k")], "xx", KIND_TARGET, "stage2.target.xx")
    check_corpus([open_source(path, "k") for path in corpora.values()], "xx", KIND_TARGET, "stage2.target.xx")
    with pytest.raises(ConfigError, match="only JSONL records carry"):
        open_source(corpora["plain"], "k").translation_records(10, "stage2.translations.xx")
    assert open_source(corpora["hub"], "k").translation_records(10, "k") is None
    records = list(open_source(corpora["prepared"], "k").translation_records(10, "k"))
    assert len(records) == 10 and all(record["src_id"] == "" for record in records)
