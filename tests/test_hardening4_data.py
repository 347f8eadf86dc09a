"""Hardening, round 4 (issue 25), the data side: real PAN-X files read whole, every damaged,
truncated or misnamed corpus one clear line (no traceback, nothing accepted silently), `prepare`
leaving no half-made folder. Each test is a row of the README's fault table.

In-process where the behaviour is the library's (fast), through `python -m dualner` where the
user-visible line matters."""

import bz2
import gzip
import json
import lzma
import random
import re
import time

import pytest
import zstandard

from dualner.data.conll import iter_conll, read_conll
from dualner.data.corpus import describe_file
from dualner.data.file_source import estimate_records, iter_sentences
from dualner.data.formats import DecompressionError, checked_stream, open_decompressed
from dualner.data.source_kinds import check_corpus, expand_files, open_sources
from dualner.data.stream_spec import KIND_TARGET
from dualner.errors import ConfigError, DataFormatError, MissingPathError, UserError
from tests.conftest import REPO
# the helpers of earlier rounds: the tiny run's config, `python -m dualner`, one-line errors, a finished
# stage-1 run (`populated`, a module fixture) and stage 2 from it, a stream over corpus files
from tests.test_hardening import cli, config, one_line_error
from tests.test_hardening3 import populated, stage2  # noqa: F401  (populated: a fixture)
from tests.test_streaming import make_stream, read_skipping_bad

PANX = REPO.parent / "shared" / "data" / "panx"  # the real WikiANN files, where the checkout has them
INVISIBLE_WORDS = ["\ufeff", "\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u200f\u200f"]


# -- item 5: real PAN-X files, invisible tokens --------------------------------------------------------
def plain_count(data: bytes) -> tuple[int, int]:
    """(sentences, words) of a CoNLL file counted without the reader: blocks of non-blank lines."""
    words = len(re.findall(rb"^[ \t\r\f\v]*\S", data, re.M))
    sentences = len(re.findall(rb"(?:\A|\n[ \t\r\f\v]*\n)[ \t\r\f\v]*\S", data))
    return sentences, words


@pytest.mark.skipif(not PANX.is_dir(), reason="the real PAN-X files are not in this checkout (../shared/data)")
def test_every_real_panx_file_reads_whole():
    files = sorted(PANX.glob("*/*.tsv"))
    assert len(files) >= 3 * 20
    for path in files:
        sentences = list(iter_conll(path, path.parent.name))
        expected = plain_count(path.read_bytes())
        assert (len(sentences), sum(len(s.words) for s in sentences)) == expected, path


def test_a_byte_order_mark_is_taken_off_only_at_the_file_start(tmp_path):
    path = tmp_path / "he.tsv"
    path.write_text("\ufeffParis\tB-LOC\n\ufeff\tO\nis\tO\n\n\u200f\u200f\tO\nBob\tB-PER\n", encoding="utf-8")
    sentences = read_conll(path, "he")
    assert [s.words for s in sentences] == [["Paris", "\ufeff", "is"], ["\u200f\u200f", "Bob"]]
    assert [s.tags for s in sentences] == [["B-LOC", "O", "O"], ["O", "B-PER"]]
    # the stage-2 reader of the same file as a corpus keeps them too
    corpus = describe_file(path, "stage2.target.he")
    assert [s["words"] for s in iter_sentences(corpus, "he", labeled=True)] == [s.words for s in sentences]


def test_a_word_the_tokenizer_turns_into_nothing_gets_the_unknown_token(tiny_tokenizer):
    """XLM-R's SentencePiece gives invisible characters no piece; the tiny tokenizer, given the same
    normalizer, does the same: each such word keeps a position (the unknown token), labels aligned."""
    import copy

    from tokenizers import Regex, normalizers

    from dualner.data.conll import Sentence
    from dualner.data.encoding import WindowTokenizer
    from dualner.labels import LabelSet
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace(Regex("[\u200b-\u200f\ufeff]"), "")
    assert all(tokenizer.tokenize(word) == [] for word in INVISIBLE_WORDS)
    words = ["Paris", *INVISIBLE_WORDS, "Bob"]
    tags = ["B-LOC", *["O"] * len(INVISIBLE_WORDS), "B-PER"]
    labels = LabelSet.from_tags(tags)
    (row,) = WindowTokenizer(tokenizer, labels, 64).encode([Sentence(words, tags, "he")]).to_list()
    firsts = [p for p, w in enumerate(row["word_index"]) if w >= 0]
    assert [row["word_index"][p] for p in firsts] == list(range(len(words)))
    assert [row["input_ids"][p] for p in firsts[1:-1]] == [tokenizer.unk_token_id] * len(INVISIBLE_WORDS)
    assert row["tag_ids"] == [labels.tag_id(tag) for tag in tags]


# -- item 6: damaged, truncated and misnamed corpora -------------------------------------------------
CODECS = {".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress,
          ".zst": lambda data: zstandard.ZstdCompressor().compress(data)}
PROGRAMS = {".gz": "gzip", ".xz": "xz", ".bz2": "bzip2", ".zst": "zstd"}
CODEC_NAMES = {".gz": "gzip", ".xz": "xz", ".bz2": "bz2", ".zst": "zstd"}


def corpus_text(sentences=4000) -> bytes:
    """Sentences of random words (compressed to several blocks of every codec)."""
    draw = random.Random(0)
    return "".join(" ".join(f"w{draw.randrange(10**6)}ö" for _ in range(1 + i % 9)) + "\n"
                   for i in range(sentences)).encode()


def damaged(data: bytes, damage: str) -> bytes:
    if damage == "truncated":
        return data[:len(data) // 2]
    middle = len(data) // 2
    return data[:middle] + bytes(64) + data[middle + 64:]


@pytest.mark.parametrize("suffix", list(CODECS))
@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_a_damaged_compressed_corpus_ends_in_one_bad_record_naming_codec_byte_and_remedy(tmp_path, suffix, damage):
    """The sentences before the damage are read; then one bad record (the stream counts it, a run
    stops with a checkpoint) naming the file, the codec, the bytes reached and the remedy. A
    truncated .zst used to end silently, as if the file ended there."""
    path = tmp_path / f"de.txt{suffix}"
    path.write_bytes(damaged(CODECS[suffix](corpus_text()), damage))
    file = describe_file(path, "stage2.target.de")
    read, bad = read_skipping_bad(file, "de")
    assert len(bad) >= 1 and len(read) < 4000
    last = bad[-1]
    pattern = (rf"damaged {CODEC_NAMES[suffix]} data: .*at decompressed byte \d+, compressed byte \d+ of "
               rf"{path.stat().st_size}; re-download or recompress it \(`{PROGRAMS[suffix]} -t .*de.txt{suffix}` "
               rf"tests it\) \(the rest of the file is not read\)")
    assert re.search(pattern, last.reason), last.reason
    if damage == "truncated":
        assert "(truncated)" in last.reason
        # stage2.mix=size counts what is there (it used to raise the codec's error at start-up)
        assert len(read) <= estimate_records(file)[0] <= len(read) + 1
    assert str(last).startswith(f"{path}:{last.line} (byte {last.byte}):")


def test_a_truncated_zstd_corpus_is_a_bad_record_in_the_stream_not_its_end(tmp_path, tiny_tokenizer):
    path = tmp_path / "de.txt.zst"
    path.write_bytes(damaged(CODECS[".zst"](corpus_text(8000)), "truncated"))  # zstd blocks: 128 KiB
    stream = make_stream(tiny_tokenizer, [str(path)], pool=256, micro=64)
    seen = {sample for batch in stream for sample in batch["meta"]["sample_id"]}  # sentences (of windows)
    (report,) = stream.take_bad_records()
    assert 0 < len(seen) < 8000 and "damaged zstd data: the file ends inside the compressed stream" in report["reason"]
    assert report["line"] == len(seen) + 1  # the first sentence not read whole


@pytest.mark.parametrize("name, content, message", [
    ("de.txt", gzip.compress(b"eins zwei\n", mtime=0), r"de.txt: gzip data in a .txt file; rename it to de.txt.gz"),
    ("de.jsonl", lzma.compress(b"{}\n"), r"de.jsonl: xz data in a .jsonl file; rename it to de.jsonl.xz"),
    ("de.txt.xz", gzip.compress(b"eins zwei\n", mtime=0), r"de.txt.xz: gzip data in a .xz file; rename it to de.txt.gz"),
    ("de.txt.gz", CODECS[".zst"](b"eins zwei\n"), r"de.txt.gz: zstd data in a .gz file; rename it to de.txt.zst"),
    ("de.txt.zst", bz2.compress(b"eins zwei\n"), r"de.txt.zst: bz2 data in a .zst file; rename it to de.txt.bz2"),
    ("de.txt.bz2", b"eins zwei\n", r"de.txt.bz2: not bz2 data \(it starts with b'eins zwe'\): if it is plain text, "
                                   r"remove the .bz2 ending; .*\(`bzip2 -t de.txt.bz2` tests it\)"),
])
def test_a_corpus_whose_content_is_not_what_its_name_says_is_refused_at_start_up(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DecompressionError, match=rf"^stage2.target.de: .*{message}"):
        check_corpus(open_sources([str(path)], "stage2.target.de"), "de", KIND_TARGET, "stage2.target.de")


@pytest.mark.parametrize("name, message", [
    ("train.tsv", r"train.tsv: gzip data in a .tsv file; this reader takes plain text: decompress it "
                  r"\(`gzip -dc train.tsv > train.plain.tsv`\)"),
    ("in.jsonl", r"in.jsonl: gzip data in a .jsonl file; this reader takes plain text"),
    ("in.txt.gz", r"in.txt.gz: a gzip file; this reader takes plain text: decompress it \(`gzip -dc in.txt.gz > "
                  r"in.txt`\)"),
])
def test_compressed_data_where_plain_text_is_read_says_so(tmp_path, name, message):
    """Labeled CoNLL and prediction input are plain text: gzip data there is called gzip data (it
    used to be "a NUL byte")."""
    from dualner.predict import read_input
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"Paris\tB-LOC\n"))
    with pytest.raises(DecompressionError, match=message):
        list(read_input(path))
    if name.endswith(".tsv"):
        with pytest.raises(DecompressionError, match=message):
            read_conll(path)


def test_an_empty_compressed_corpus_is_called_empty(tmp_path):
    for suffix in CODECS:
        path = tmp_path / f"de{suffix.replace('.', '_')}.txt{suffix}"
        path.write_bytes(b"")
        with pytest.raises(DataFormatError, match=rf"stage2.target.de: .*{path.name}: file is empty"):
            check_corpus(open_sources([str(path)], "stage2.target.de"), "de", KIND_TARGET, "stage2.target.de")


def test_one_opener_for_every_codec_wraps_any_decompressed_stream(tmp_path):
    """formats.open_decompressed is the one way to a compressed file's bytes; a reader of its own
    (a block-splittable one) wraps its stream with formats.checked_stream for the same errors."""
    data = corpus_text(2000)
    for suffix, compress in CODECS.items():
        path = tmp_path / f"c.txt{suffix}"
        path.write_bytes(compress(data) + compress(data))  # two members / streams / frames
        with open_decompressed(path, CODEC_NAMES[suffix]) as handle:
            assert handle.read() == data + data
    truncated = tmp_path / "t.txt.gz"
    truncated.write_bytes(gzip.compress(data)[:-20])
    with open(truncated, "rb") as raw:
        stream = checked_stream(gzip.GzipFile(fileobj=raw), truncated, "gzip", raw)
        with pytest.raises(DecompressionError, match=r"t.txt.gz: damaged gzip data: the file ends inside the "
                                                      r"compressed stream \(truncated\), at decompressed byte \d+, "
                                                      r"compressed byte \d+ of \d+; re-download"):
            stream.read()


def test_a_record_naming_another_language_than_its_key_is_a_bad_record(tmp_path, tiny_tokenizer):
    """`"lang": "fr"` under stage2.target.de used to end the run in KeyError: 'fr'."""
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps({"tokens": ["Paris"], "lang": "fr"}) + "\n")
    with pytest.raises(DataFormatError, match=r"stage2.target.de: .*first.jsonl:1 \(byte 0\): the record's language "
                                              r"is 'fr' \('lang'\), but the file is read as 'de' \(its config key\)"):
        check_corpus(open_sources([str(first)], "stage2.target.de"), "de", KIND_TARGET, "stage2.target.de")
    deep = tmp_path / "deep.jsonl"
    lines = [json.dumps({"tokens": [f"Wort{i}"], "lang": "xx"}) for i in range(40)]  # make_stream: language xx
    lines[25] = json.dumps({"tokens": ["Paris"], "lang": "fr"})
    deep.write_text("\n".join(lines) + "\n")
    stream = make_stream(tiny_tokenizer, [str(deep)])
    seen = {sample for batch in stream for sample in batch["meta"]["sample_id"]}
    (report,) = stream.take_bad_records()
    assert len(seen) == 39 and report["line"] == 26 and "language is 'fr'" in report["reason"]


def test_one_file_under_two_training_keys_is_refused_naming_both(tmp_path):
    """The same file under two languages (or through a symlink, or a hard link) would be trained
    twice; data.train and the stage-2 corpora are compared as one set."""
    from dualner.data.sources import read_source, refuse_shared_files
    source = REPO / "data" / "panx-sample" / "de" / "train.tsv"
    link = tmp_path / "link.tsv"
    link.symlink_to(source)
    with pytest.raises(ConfigError, match=rf"data.train.en and data.train.de name one file \({source} and {link} "
                                          rf"are the same file\): its sentences would be trained twice"):
        read_source(config(tmp_path / "run", f"data.train={{en: {source}, de: {link}}}"))
    corpus = tmp_path / "de.txt"
    corpus.write_text("eins zwei\n")
    hard = tmp_path / "hard.txt"
    hard.hardlink_to(corpus)
    with pytest.raises(ConfigError, match=r"stage2.target.de and stage2.translations.fr name one file"):
        refuse_shared_files({"data.train.en": [str(source)], "stage2.target.de": [str(corpus)],
                             "stage2.translations.fr": [str(hard)]})
    with pytest.raises(ConfigError, match=r"stage2.target.de names one file twice"):
        refuse_shared_files({"stage2.target.de": [str(corpus), str(hard)]})
    refuse_shared_files({"data.train.en": [str(source)], "stage2.target.de": [str(corpus)],
                         "stage2.target.hub": ["hf:some/dataset@train"]})  # distinct files pass


def test_stage2_refuses_one_file_under_two_languages_before_writing(populated, tmp_path):
    corpus = tmp_path / "de.txt"
    corpus.write_text("eins zwei\n")
    link = tmp_path / "fr.txt"
    link.symlink_to(corpus)
    output = tmp_path / "stage2"
    with pytest.raises(ConfigError, match=r"stage2.target.de and stage2.target.fr name one file"):
        stage2(output, f"stage2.target={{de: {corpus}, fr: {link}}}", init_from=populated)
    assert not output.exists()


# -- item 9: prepare ------------------------------------------------------------------------------------
def test_prepare_builds_aside_and_leaves_nothing_on_a_refusal(tmp_path, tiny_encoder):
    from dualner.data.prepare import prepare
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"".join(b"satz %d hier\n" % i for i in range(300)))
    output = tmp_path / "prep"
    with pytest.raises(ConfigError, match=r"prepare --tokenizer .*: no tokenizer can be loaded from .* \(Couldn't"):
        prepare([str(corpus)], str(output), str(tmp_path), 32)  # a folder without a tokenizer
    assert not output.exists() and not (tmp_path / "prep.partial").exists()
    output.mkdir()  # an empty folder made beforehand is fine
    manifest = prepare([str(corpus)], str(output), tiny_encoder, 32, "de", workers=1, log=lambda *_: None)
    assert manifest["sentences"] == 300 and not (tmp_path / "prep.partial").exists()
    again = prepare([str(corpus)], str(output), tiny_encoder, 32, "de", workers=1, log=lambda *_: None)
    assert again == manifest  # nothing to do
    with pytest.raises(ConfigError, match=r"prepare --output .*prep: holds something else"):
        prepare([str(corpus)], str(output), tiny_encoder, 16, "de", workers=1, log=lambda *_: None)


def test_prepare_names_a_bad_record_by_its_real_line_and_keeps_the_shards_done(tmp_path, tiny_encoder):
    """A bad byte in a shard that starts mid-file used to be reported at line `?`."""
    from dualner.data.prepare import prepare
    lines = [b"satz %d hier\n" % i for i in range(300)]
    lines[250] = b"kaputt \xff hier\n"
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"".join(lines))
    output = tmp_path / "prep"
    with pytest.raises(DataFormatError, match=rf"c.txt:251 \(byte {sum(map(len, lines[:250]))}\): not UTF-8 .*the "
                                              rf"shards done are kept in .*prep.partial: run prepare again"):
        prepare([str(corpus)], str(output), tiny_encoder, 32, workers=1, shard_bytes=1000, log=lambda *_: None)
    assert not output.exists() and list((tmp_path / "prep.partial").glob("*.done.json"))
    with pytest.raises(MissingPathError, match=r"prep' matches no file; .*prep.partial holds an unfinished `prepare`"):
        expand_files(str(output), "stage2.target.de")
    logged = []
    manifest = prepare([str(corpus)], str(output), tiny_encoder, 32, workers=1, shard_bytes=1000, max_bad_records=1,
                       log=logged.append)
    assert manifest["sentences"] == 299 and output.is_dir() and not (tmp_path / "prep.partial").exists()
    assert any("c.txt:251" in line for line in logged)


def test_prepare_a_truncated_zstd_corpus_is_not_silently_short(tmp_path, tiny_encoder):
    """It used to report 18,688 of 40,000 sentences prepared, exit 0. Refused before anything is
    made (tests/test_hardening4_corpus2.py: the damage found later, in a larger file)."""
    from dualner.data.prepare import prepare
    corpus = tmp_path / "c.txt.zst"
    corpus.write_bytes(damaged(CODECS[".zst"](corpus_text(8000)), "truncated"))  # cut after its first blocks
    with pytest.raises(DecompressionError, match=r"^prepare: .*c.txt.zst: damaged zstd data: "
                                                 r"the file ends inside the compressed stream \(truncated\)"):
        prepare([str(corpus)], str(tmp_path / "prep"), tiny_encoder, 32, workers=1, log=lambda *_: None)
    assert not (tmp_path / "prep").exists()


def test_prepare_command_line_alias_offline_and_damage_are_one_line(tmp_path):
    whole = tmp_path / "w.txt.xz"
    whole.write_bytes(CODECS[".xz"](corpus_text(3000)))
    corpus = tmp_path / "c.txt.xz"
    corpus.write_bytes(damaged(CODECS[".xz"](corpus_text(3000)), "truncated"))
    started = time.time()
    line = one_line_error(cli("prepare", str(whole), "--tokenizer", "no-such-tokenizer", "--max-length", "32",
                              "--output", str(tmp_path / "a"), env={"HF_HUB_OFFLINE": "1"}))
    assert "prepare --tokenizer: 'no-such-tokenizer' is not a folder, not a built-in alias" in line
    assert time.time() - started < 40 and not list(tmp_path.glob("a*"))  # no minute of hub retries
    line = one_line_error(cli("prepare", str(corpus), "--tokenizer", "tiny-random", "--max-length", "32",
                              "--output", str(tmp_path / "b"), "--workers", "1"))
    assert re.search(r"prepare: .*c.txt.xz: damaged xz data: the file ends inside the compressed stream "
                     r"\(truncated\), at decompressed byte \d+, compressed byte \d+ of \d+; re-download", line), line
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("content, flags, message", [
    (b"", [], r"prepare: .*c.txt: file is empty"),
    (b"\n \n\n", [], r"prepare: .*c.txt: holds no sentence"),
    (b"bin\x00\xff\n" * 3, [], r"prepare: .*c.txt:1 \(byte 0\): a NUL byte"),
    (b"eins\n", ["--workers", "-1"], r"--workers must be >= 1"),
    (b"eins\n", ["--max-bad-records", "-1"], r"--max-bad-records >= 0"),
])
def test_prepare_refuses_what_holds_no_sentence_before_making_anything(tmp_path, content, flags, message):
    """An empty, blank or binary input used to give an empty prepared corpus (exit 0) or a half-made
    folder; a negative --workers a ValueError traceback, --max-bad-records -1 an IndexError."""
    from dualner.data.prepare import main
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(content)
    with pytest.raises(UserError, match=message):
        main([str(corpus), "--tokenizer", "tiny-random", "--max-length", "32", "--output", str(tmp_path / "p"),
              *flags])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c.txt"]
    with pytest.raises(MissingPathError, match=r"prepare: .* is a folder; name its corpus files"):
        main([str(tmp_path), "--tokenizer", "tiny-random", "--max-length", "32", "--output", str(tmp_path / "p")])


def test_prepare_refuses_one_file_named_twice(tmp_path):
    from dualner.data.prepare import main
    corpus = tmp_path / "c.txt"
    corpus.write_text("eins zwei\n")
    (tmp_path / "link.txt").symlink_to(corpus)
    with pytest.raises(ConfigError, match=r"prepare names one file twice \(.*c.txt and .*link.txt are the same file\)"):
        main([str(corpus), str(tmp_path / "link.txt"), "--tokenizer", "tiny-random", "--max-length", "32",
              "--output", str(tmp_path / "p")])
    assert not (tmp_path / "p").exists()


def test_jsonl_given_as_labeled_conll_says_what_it_is(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"tokens": ["Paris"], "tags": ["B-LOC"]}) + "\n")
    with pytest.raises(DataFormatError, match=r"train.jsonl: a JSONL file; labeled data is CoNLL"):
        read_conll(path)
