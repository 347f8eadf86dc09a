"""Hardening, round 4 (issue 25), the data side: real PAN-X files read whole, every damaged,
truncated or misnamed corpus one clear line (no traceback, nothing accepted silently), `prepare`
leaving no half-made folder. Each test is a row of the README's fault table.

In-process where the behaviour is the library's (fast), through `python -m dualner` where the
user-visible line matters."""

import bz2
import gzip
import lzma
import random
import re

import pytest
import zstandard

from dualner.data.conll import iter_conll, read_conll
from dualner.data.corpus import BadRecord, RecordReader, describe_file, parse_record
from dualner.data.formats import DecompressionError, checked_stream, open_decompressed
from dualner.data.streaming import KIND_TARGET, check_corpus, iter_sentences, open_sources
from dualner.errors import DataFormatError
from tests.conftest import REPO
from tests.test_streaming import make_stream

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
    read, bad = [], []
    for record in RecordReader(file, 0, file.end):
        try:
            sentence = parse_record(record, file, "de", False)
        except BadRecord as error:
            bad.append(error)
            continue
        read.append(sentence)
    assert len(bad) >= 1 and len(read) < 4000
    last = bad[-1]
    pattern = (rf"damaged {CODEC_NAMES[suffix]} data: .*at decompressed byte \d+, compressed byte \d+ of "
               rf"{path.stat().st_size}; re-download or recompress it \(`{PROGRAMS[suffix]} -t .*de.txt{suffix}` "
               rf"tests it\) \(the rest of the file is not read\)")
    assert re.search(pattern, last.reason), last.reason
    if damage == "truncated":
        assert "(truncated)" in last.reason
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
    ("de.txt", gzip.compress(b"eins zwei\n"), r"de.txt: gzip data in a .txt file; rename it to de.txt.gz"),
    ("de.jsonl", lzma.compress(b"{}\n"), r"de.jsonl: xz data in a .jsonl file; rename it to de.jsonl.xz"),
    ("de.txt.xz", gzip.compress(b"eins zwei\n"), r"de.txt.xz: gzip data in a .xz file; rename it to de.txt.gz"),
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


@pytest.mark.parametrize("name", ["train.tsv", "in.txt", "in.jsonl"])
def test_compressed_data_where_plain_text_is_read_says_so(tmp_path, name):
    """Labeled CoNLL and prediction input are plain text: gzip data there is called gzip data (it
    used to be "a NUL byte")."""
    from dualner.predict import read_input
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"Paris\tB-LOC\n"))
    pattern = rf"{name}: gzip data in a \.\w+ file; this reader takes plain text: decompress it \(`gzip -dc {name} >"
    with pytest.raises(DecompressionError, match=pattern):
        list(read_input(path))
    if name.endswith(".tsv"):
        with pytest.raises(DecompressionError, match=pattern):
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
