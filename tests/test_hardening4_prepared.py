"""A prepared corpus that cannot be used as it is, refused before training with the shard (or the
key) named and the remedy (issue 25, item 6): truncated, deleted or corrupted shards (sizes checked
at open, a shard's ends when first read, whole files by `prepare --verify`), an empty corpus, one
prepared for another language, token ids beyond the model's vocabulary, a `--max-length` longer than
the encoder's positions; an input changed since it was prepared is warned about."""

import json
import logging
import os

import pytest

from dualner.cli import dispatch
from dualner.data.prepare import main as prepare_main, prepare
from dualner.data.prepared import MANIFEST, PreparedCorpus
import dualner.data.prepared as prepared_module
from dualner.errors import ConfigError, DataFormatError


@pytest.fixture
def prepared(tmp_path, tiny_encoder):
    plain = tmp_path / "de.txt"
    plain.write_text("".join(f"satz {i} hier und da\n" for i in range(200)))
    folder = tmp_path / "prep"
    prepare([str(plain)], str(folder), tiny_encoder, 32, "de", workers=1, shard_bytes=1500, log=lambda *_: None)
    return plain, folder


def redo(plain, folder, tiny_encoder):
    return prepare([str(plain)], str(folder), tiny_encoder, 32, "de", workers=1, shard_bytes=1500,
                   log=lambda *_: None)


def test_a_truncated_or_deleted_shard_is_named_at_open_and_prepare_redoes_it(prepared, tiny_encoder):
    plain, folder = prepared
    tokens = folder / "0000-000002.tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-40])
    with pytest.raises(DataFormatError, match=r"0000-000002\.tokens\.npy: damaged prepared shard .*bytes, the "
                                              r"manifest says .*run prepare again"):
        PreparedCorpus.open(folder, "stage2.target.de")
    redo(plain, folder, tiny_encoder)  # the done marker stays; the damaged shard is redone anyway
    assert PreparedCorpus.open(folder).sentences == 200
    (folder / "0000-000001.windows.npy").unlink()
    with pytest.raises(DataFormatError, match=r"0000-000001\.windows\.npy: damaged prepared shard \(missing\)"):
        PreparedCorpus.open(folder, "stage2.target.de")
    redo(plain, folder, tiny_encoder)
    corpus = PreparedCorpus.open(folder)
    assert [len(corpus.windows_of(i)) for i in range(corpus.sentences)] == [1] * 200


def test_corrupted_bytes_are_found_at_open_when_the_shard_is_read_and_by_verify(prepared, tiny_encoder, capsys,
                                                                              monkeypatch):
    plain, folder = prepared
    assert dispatch(["prepare", "--verify", str(folder)]) == 0
    assert "every shard file matches" in capsys.readouterr().out
    sentences = folder / "0000-000000.sentences.npy"
    data = bytearray(sentences.read_bytes())
    data[-3] ^= 0xFF  # same size: only a checksum sees it
    sentences.write_bytes(bytes(data))
    # a small corpus is checksummed whole at open: refused at start-up, before a run folder is made
    with pytest.raises(DataFormatError, match=r"stage2.target.de: .*0000-000000\.sentences\.npy: damaged prepared "
                                              r"shard \(its checksum differs"):
        PreparedCorpus.open(folder, "stage2.target.de")
    monkeypatch.setattr(prepared_module, "WHOLE_CHECK_BYTES", 0)  # a large one: sizes at open, ends when read
    corpus = PreparedCorpus.open(folder)  # sizes hold
    monkeypatch.undo()
    with pytest.raises(DataFormatError, match=r"0000-000000\.sentences\.npy: damaged prepared shard \(its checksum"):
        corpus.windows_of(0)
    with pytest.raises(DataFormatError, match=r"1 damaged shard file.*0000-000000\.sentences\.npy"):
        prepare_main(["--verify", str(folder)])
    redo(plain, folder, tiny_encoder)
    assert PreparedCorpus.open(folder).windows_of(0)[0]["input_ids"]


def test_an_empty_corpus_is_refused_by_prepare_and_at_open(tmp_path, prepared, tiny_encoder):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataFormatError, match="empty.txt: holds no sentence"):  # refused before a folder is made
        prepare([str(empty)], str(tmp_path / "none"), tiny_encoder, 32, "de", workers=1, log=lambda *_: None)
    assert not (tmp_path / "none").exists() and not (tmp_path / "none.partial").exists()
    _, folder = prepared
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.update(sentences=0, shards=[])
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataFormatError, match=r"stage2.target.de: .*prep: the prepared corpus holds no sentence"):
        PreparedCorpus.open(folder, "stage2.target.de")


def test_another_language_and_ids_beyond_the_vocabulary_are_refused(prepared, tiny_tokenizer):
    _, folder = prepared
    corpus = PreparedCorpus.open(folder)
    log = logging.getLogger("test")
    corpus.check_use("de", len(tiny_tokenizer), "stage2.target.de", log)
    with pytest.raises(ConfigError, match=r"stage2.target.zh: .* prepared as language 'de' .* used here as 'zh'"):
        corpus.check_use("zh", len(tiny_tokenizer), "stage2.target.zh", log)
    largest = corpus.manifest["max_token_id"]
    assert 0 < largest < len(tiny_tokenizer)
    with pytest.raises(ConfigError, match=rf"holds token id {largest}, beyond this run's model \({largest} token"):
        corpus.check_use("de", largest, "stage2.target.de", log)


def test_an_input_changed_since_preparing_is_warned_about(prepared, tiny_tokenizer, caplog):
    plain, folder = prepared
    corpus = PreparedCorpus.open(folder)
    with caplog.at_level(logging.WARNING):
        corpus.check_use("de", len(tiny_tokenizer), "stage2.target.de", logging.getLogger("test"))
    assert not caplog.records
    with plain.open("a") as handle:
        handle.write("ein neuer satz\n")
    os.utime(plain, ns=(plain.stat().st_mtime_ns + 10**9,) * 2)
    with caplog.at_level(logging.WARNING):
        corpus.check_use("de", len(tiny_tokenizer), "stage2.target.de", logging.getLogger("test"))
    assert "de.txt changed (size or modification time) since" in caplog.text and "run prepare again" in caplog.text


def test_a_max_length_beyond_the_encoders_positions_is_refused(tmp_path, tiny_encoder):
    plain = tmp_path / "de.txt"
    plain.write_text("ein satz\n")
    with pytest.raises(ConfigError, match=r"--max-length 1000 is more than the encoder .* at most 512 tokens"):
        prepare_main([str(plain), "--output", str(tmp_path / "out"), "--tokenizer", tiny_encoder,
                      "--max-length", "1000"])
    assert not (tmp_path / "out").exists()
