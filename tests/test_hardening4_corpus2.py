"""Hardening, round 4 (issue 25), stage-2 corpora and `prepare` as a probe of main still found them:
a damaged compressed corpus refused at start-up whatever its size and codec (it used to be counted
to the damage without a word when under 4 MiB), `prepare`'s codec failure reported as such (not as
the garbage a corrupted stream decompresses to first), a `prepare` rerun with a higher
--max-bad-records using the shards done, and a folder without manifest.json named as an unfinished
prepare output. Each test is a row of the README's fault table."""

import gzip
import json
import re
import shutil

import pytest

import dualner.data.corpus as corpus_module
from dualner.data.blocks import bgzf_compress
from dualner.data.formats import DecompressionError, open_decompressed
from dualner.data.prepare import prepare
from dualner.data.source_kinds import check_corpus, expand_files, open_sources
from dualner.data.stream_spec import KIND_TARGET
from dualner.errors import DataFormatError, MissingPathError
from tests.conftest import REPO
from tests.test_hardening import cli, one_line_error
from tests.test_hardening3 import populated  # noqa: F401  (a finished stage-1 run: a module fixture)
from tests.test_hardening4_data import CODEC_NAMES, CODECS, PROGRAMS, corpus_text, damaged

# every kind of compressed file stage 2 reads: the four codecs, bgzip, and plain gzip members one after another
KINDS = {**{suffix: (suffix, compress) for suffix, compress in CODECS.items()},
         "bgzip": (".gz", bgzf_compress),
         "members": (".gz", lambda data: gzip.compress(data[:len(data) // 3]) + gzip.compress(data[len(data) // 3:]))}
KEY = "stage2.target.de"
NO_WHOLE_CHECK = dict.fromkeys(CODEC_NAMES.values(), 0)  # small files standing for large ones


def write_kind(tmp_path, kind: str, data: bytes, damage: str = "") -> tuple:
    suffix, compress = KINDS[kind]
    path = tmp_path / f"de-{kind.strip('.')}.txt{suffix}"
    content = compress(data)
    path.write_bytes(damaged(content, damage) if damage else content)
    return path, suffix


def start_up_check(path):
    check_corpus(open_sources([str(path)], KEY), "de", KIND_TARGET, KEY)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_a_small_damaged_compressed_corpus_is_refused_at_start_up(tmp_path, kind, damage):
    """Truncated halfway (mid-member for bgzip and multi-member gzip) or 64 bytes zeroed in the
    middle: refused before anything is written, naming the key, file, codec, byte and remedy."""
    path, suffix = write_kind(tmp_path, kind, corpus_text(), damage)
    with pytest.raises(DecompressionError) as refused:
        start_up_check(path)
    message = str(refused.value)
    pattern = (rf"^{KEY}: {re.escape(str(path))}: damaged {CODEC_NAMES[suffix]} data: .*at decompressed byte \d+, "
               rf"compressed byte \d+ of {path.stat().st_size}; re-download or recompress it "
               rf"\(`{PROGRAMS[suffix]} -t .*{path.name}` tests it\)$")
    assert re.search(pattern, message), message
    if damage == "truncated":
        assert "the file ends inside the compressed stream (truncated)" in message
    path.write_bytes(KINDS[kind][1](corpus_text()))  # the same file whole passes
    start_up_check(path)


@pytest.mark.parametrize("kind", [".xz", ".bz2", ".zst", "bgzip"])
def test_a_large_truncated_corpus_is_refused_from_its_structure(tmp_path, monkeypatch, kind):
    """A larger file (WHOLE_CHECK_BYTES) is not decompressed at start-up: its end is checked from the codec's
    structure (xz's index, bzip2's end-of-stream marker, zstd's and bgzip's block headers)."""
    monkeypatch.setattr(corpus_module, "WHOLE_CHECK_BYTES", NO_WHOLE_CHECK)  # these small files stand for large ones
    path, suffix = write_kind(tmp_path, kind, corpus_text(), "truncated")
    size = path.stat().st_size
    with pytest.raises(DecompressionError, match=rf"^{KEY}: .*{path.name}: damaged {CODEC_NAMES[suffix]} data: the "
                                                 rf"file does not end as a complete {CODEC_NAMES[suffix]} stream "
                                                 rf"\(truncated, or its end is damaged\), at compressed byte {size} "
                                                 rf"of {size}; re-download"):
        start_up_check(path)
    path.write_bytes(KINDS[kind][1](corpus_text()))
    start_up_check(path)


def test_a_large_single_stream_gzip_is_checked_where_it_is_read(tmp_path, monkeypatch):
    """A gzip stream records nothing at its end to check without decompressing: above 4 MiB its
    damage is found when stage 2 reads it (one bad record, tests/test_hardening4_data.py)."""
    monkeypatch.setattr(corpus_module, "WHOLE_CHECK_BYTES", NO_WHOLE_CHECK)
    path, _ = write_kind(tmp_path, ".gz", corpus_text(), "truncated")
    start_up_check(path)


def test_stage2_refuses_a_small_truncated_gzip_target_at_start_up_writing_nothing(populated, tmp_path):
    """The probe's case end to end: it used to be counted to the truncation (stage2.mix=size) and
    trained. (A truncated .zst here used to end in a bad record and a checkpoint mid-run; damage
    found mid-run is tested on the stream, tests/test_hardening4_data.py.)"""
    target = tmp_path / "de.txt.gz"
    target.write_bytes(damaged(gzip.compress(corpus_text(2000)), "truncated"))
    run = tmp_path / "run"
    line = one_line_error(cli("stage2", "--config", str(REPO / "configs" / "tiny_stage2.yaml"), f"run.output_dir={run}",
                              f"stage2.init_from={populated}", f"stage2.target={{de: {target}}}", "stage2.mix=size",
                              f"engine.config={REPO / 'ds_configs' / 'zero0_fp32.json'}"))
    assert re.search(rf"{KEY}: {target}: damaged gzip data: the file ends inside the compressed stream \(truncated\), "
                     rf"at decompressed byte \d+, compressed byte \d+ of {target.stat().st_size}", line), line
    assert not run.exists()


# -- prepare --------------------------------------------------------------------------------------------
def write_flipped_gzip(path, data: bytes) -> None:
    """gzip of `data` with one bit flipped in the middle, where the stream then decompresses to
    non-UTF-8 garbage before its CRC fails at the end (the first such bit from the middle)."""
    packed = gzip.compress(data, mtime=0)
    for at in range(len(packed) // 2, len(packed) // 2 + 600):
        flipped = bytearray(packed)
        flipped[at] ^= 0x10
        path.write_bytes(flipped)
        garbage = b""
        with open_decompressed(path, "gzip") as handle:
            try:
                while chunk := handle.read1(1 << 16):
                    garbage += chunk
                continue  # decompressed whole: the flip changed nothing the codec checks
            except DecompressionError:
                pass
        try:
            garbage.decode()
        except UnicodeDecodeError:
            return
    raise AssertionError("no flipped bit gives non-UTF-8 garbage")


@pytest.mark.parametrize("whole_check", [True, False])
def test_prepare_reports_the_codec_failure_not_the_garbage_before_it(tmp_path, tiny_encoder, monkeypatch, whole_check):
    """A corrupted gzip used to be reported as UTF-8 bad records. A file up to 4 MiB of gzip is refused
    before anything is made; a larger one (WHOLE_CHECK_BYTES 0 here) when its damage is read, the
    codec's failure first whatever --max-bad-records allows."""
    if not whole_check:
        monkeypatch.setattr(corpus_module, "WHOLE_CHECK_BYTES", NO_WHOLE_CHECK)
    source = tmp_path / "c.txt.gz"
    write_flipped_gzip(source, corpus_text(4000))
    output = tmp_path / "prep"
    with pytest.raises(DecompressionError) as refused:
        prepare([str(source)], str(output), tiny_encoder, 32, workers=1, max_bad_records=10**6, log=lambda *_: None)
    message = str(refused.value)
    assert re.search(r"^prepare: .*c.txt.gz(:\d+ \(byte \d+\))?: damaged gzip data: corrupt data \(CRC check failed "
                     r".*\), at decompressed byte \d+, compressed byte \d+ of \d+; re-download", message), message
    assert "not UTF-8" not in message and not output.exists()
    if whole_check:
        assert not (tmp_path / "prep.partial").exists()  # refused before anything was made
    else:  # the garbage was there, and bad records, but the codec's failure is what is reported
        assert re.search(r"; the \d+ other bad record\(s\) may come from the same damage$", message), message


def test_a_prepare_rerun_with_a_higher_bad_record_limit_uses_the_shard_done(tmp_path, tiny_encoder):
    """A compressed input read whole, stopped at --max-bad-records 0: the rerun with 5 said "no
    sentence" (the finished shard was skipped and not counted). It now finishes with it and says so."""
    lines = [b"satz %d hier\n" % i for i in range(300)]
    lines[100] = lines[250] = b"kaputt \xff hier\n"
    source = tmp_path / "c.txt.gz"
    source.write_bytes(gzip.compress(b"".join(lines)))
    output = tmp_path / "prep"
    with pytest.raises(DataFormatError, match=r"2 bad record\(s\), more than --max-bad-records=0"):
        prepare([str(source)], str(output), tiny_encoder, 32, workers=1, log=lambda *_: None)
    assert list((tmp_path / "prep.partial").glob("*.done.json"))
    logged = []
    with pytest.raises(DataFormatError, match=r"2 bad record\(s\), more than --max-bad-records=1"):
        prepare([str(source)], str(output), tiny_encoder, 32, workers=1, max_bad_records=1, log=logged.append)
    manifest = prepare([str(source)], str(output), tiny_encoder, 32, workers=1, max_bad_records=5, log=logged.append)
    assert manifest["sentences"] == 298 and manifest["bad_records"] == 2 and not (tmp_path / "prep.partial").exists()
    assert any(re.search(r"continued the preparation in .*prep.partial: 1 shard\(s\) finished by an earlier run kept "
                         r"\(2 bad record\(s\) in them, checked against --max-bad-records=5 below\), 0 made now", line)
               for line in logged), logged


def test_a_folder_without_manifest_is_named_as_an_unfinished_prepare_output(tmp_path, tiny_encoder):
    source = tmp_path / "c.txt"
    source.write_text("".join(f"satz {i} hier\n" for i in range(100)))
    folder = tmp_path / "prep"
    prepare([str(source)], str(folder), tiny_encoder, 32, "de", workers=1, log=lambda *_: None)
    (folder / "manifest.json").unlink()  # shards without their manifest
    with pytest.raises(DataFormatError, match=rf"^{KEY}: {folder} looks like an unfinished or damaged `prepare` output "
                                              r"\(no manifest.json, which prepare writes last, when the corpus is "
                                              r"complete; prepare.json is there; 1 finished shard\(s\) \(4 .npy "
                                              rf"file\(s\)\)\): run prepare again with the same inputs and --output "
                                              rf"{folder} .*`prepare --verify {folder}`"):
        expand_files(str(folder), KEY)
    manifest = prepare([str(source)], str(folder), tiny_encoder, 32, "de", workers=1, log=lambda *_: None)
    assert manifest["sentences"] == 100 and expand_files(str(folder), KEY) == [str(folder)]  # the remedy works
    # the output named while an unfinished preparation is in .partial, and the .partial folder itself
    shutil.rmtree(folder)
    folder.mkdir()
    partial = tmp_path / "prep.partial"
    partial.mkdir()
    (partial / "prepare.json").write_text(json.dumps({}))
    with pytest.raises(DataFormatError, match=rf"{folder} looks like .*{partial} holds an unfinished preparation"):
        expand_files(str(folder), KEY)
    with pytest.raises(DataFormatError, match=rf"{partial} is where `prepare` builds {folder} .*run prepare again "
                                              rf"with the same inputs and --output {folder} to finish it"):
        expand_files(str(partial), KEY)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingPathError, match=r"is a folder; name a file, a glob"):  # nothing of a prepare: as before
        expand_files(str(empty), KEY)


@pytest.mark.parametrize("damage, message", [
    ('{"format": "dualner-prepared", "version": 2', r"manifest.json: unreadable \(Expecting"),
    ("no files", r"manifest.json: damaged manifest \(KeyError: 'files'\)"),
    ("no sentences", r"manifest.json: damaged manifest \(KeyError: 'sentences'\)"),
])
def test_a_damaged_manifest_is_one_line_and_prepare_again_mends_it(tmp_path, tiny_encoder, damage, message):
    """A manifest edited by hand or cut short used to end in KeyError / AttributeError tracebacks."""
    from dualner.data.prepared import PreparedCorpus
    source = tmp_path / "c.txt"
    source.write_text("".join(f"satz {i} hier\n" for i in range(100)))
    folder = tmp_path / "prep"
    prepare([str(source)], str(folder), tiny_encoder, 32, "de", workers=1, log=lambda *_: None)
    manifest = json.loads((folder / "manifest.json").read_text())
    if damage == "no files":
        del manifest["shards"][0]["files"]
    elif damage == "no sentences":
        del manifest["sentences"]
    (folder / "manifest.json").write_text(damage if damage.startswith("{") else json.dumps(manifest))
    with pytest.raises(DataFormatError, match=rf"^{KEY}: .*{message}.*run prepare again with the same inputs and "
                                              rf"--output {folder}"):
        PreparedCorpus.open(folder, KEY)
    assert prepare([str(source)], str(folder), tiny_encoder, 32, "de", workers=1, log=lambda *_: None)["sentences"] == 100
    assert PreparedCorpus.open(folder, KEY).sentences == 100


def test_damaged_progress_records_of_an_unfinished_prepare_are_redone(tmp_path, tiny_encoder):
    """A shard's done.json or a file's pieces.json cut short (half-copied) used to be a JSONDecodeError
    traceback on the rerun; the work they record is done again."""
    lines = [b"satz %d hier\n" % i for i in range(300)]
    lines[100] = b"kaputt \xff hier\n"
    source = tmp_path / "c.txt.gz"
    source.write_bytes(gzip.compress(b"".join(lines)))
    output = tmp_path / "prep"
    with pytest.raises(DataFormatError, match=r"1 bad record\(s\)"):
        prepare([str(source)], str(output), tiny_encoder, 32, workers=1, log=lambda *_: None)
    partial = tmp_path / "prep.partial"
    (partial / "0000-000000.done.json").write_text('{"name": ')
    (partial / "0000.pieces.json").write_text("garbage")
    manifest = prepare([str(source)], str(output), tiny_encoder, 32, workers=1, max_bad_records=1, log=lambda *_: None)
    assert manifest["sentences"] == 299 and manifest["bad_records"] == 1


def test_verify_of_a_folder_without_manifest_names_what_is_missing(tmp_path, tiny_encoder):
    from dualner.data.prepare import main
    source = tmp_path / "c.txt"
    source.write_text("".join(f"satz {i} hier\n" for i in range(100)))
    folder = tmp_path / "prep"
    prepare([str(source)], str(folder), tiny_encoder, 32, "de", workers=1, log=lambda *_: None)
    (folder / "manifest.json").unlink()
    with pytest.raises(MissingPathError, match=rf"prepare --verify: {folder} looks like an unfinished or damaged "
                                               r"`prepare` output \(no manifest.json"):
        main(["--verify", str(folder)])
    with pytest.raises(MissingPathError, match=r"prepare --verify: .*elsewhere is not a prepared corpus"):
        main(["--verify", str(tmp_path / "elsewhere")])
