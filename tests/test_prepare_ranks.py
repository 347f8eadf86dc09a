"""`prepare` on several ranks (issue 24, item 4): under a launcher's RANK / WORLD_SIZE every rank
tokenizes its share of the pieces (byte ranges of plain files, block ranges of bgzip / multi-block
files, whole single-block compressed files), the last to finish writes the manifest, and the output
is byte-identical to one rank's, for any number of ranks and workers; a rerun skips finished shards."""

import hashlib
import lzma
import re
import subprocess
import sys

from dualner.data.prepare import prepare
from tests.conftest import REPO, child_env
from tests.test_blocks import bgzf

SHARD_MB = 0.004


def run_prepare(inputs, output, tokenizer, rank: int, world: int, workers: int) -> subprocess.Popen:
    env = child_env(PYTHONPATH=str(REPO), RANK=str(rank), WORLD_SIZE=str(world))
    command = [sys.executable, "-m", "dualner", "prepare", *map(str, inputs), "--output", str(output),
               "--tokenizer", tokenizer, "--max-length", "32", "--language", "de", "--shard-mb", str(SHARD_MB),
               "--workers", str(workers)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def digests(folder) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())
            if not path.name.startswith(".")}


def test_prepare_on_two_ranks_writes_the_shards_of_one(tmp_path, tiny_encoder):
    sentences = [" ".join(f"wort{(i * 7 + j) % 97}" for j in range(1 + i % 23)) for i in range(900)]
    text = "".join(s + "\n" for s in sentences).encode()
    (tmp_path / "a.txt").write_bytes(text[: len(text) // 2])
    (tmp_path / "b.txt.gz").write_bytes(bgzf(text, 3000))  # splittable: pieces entered at their blocks
    (tmp_path / "c.txt.xz").write_bytes(lzma.compress(text[len(text) // 3:]))  # one block: one rank reads it whole
    inputs = [str(tmp_path / name) for name in ("a.txt", "b.txt.gz", "c.txt.xz")]
    shard_bytes = int(SHARD_MB * (1 << 20))
    prepare(inputs, str(tmp_path / "one"), tiny_encoder, 32, "de", workers=1, shard_bytes=shard_bytes,
            log=lambda *_: None)
    # two ranks at once, as torchrun / srun start them (one with two tokenizing workers)
    ranks = [run_prepare(inputs, tmp_path / "two", tiny_encoder, rank, 2, 1 + rank) for rank in range(2)]
    outputs = []
    for process in ranks:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, out + err
        outputs.append(out)
    shares = [int(re.search(r"rank \d of 2: its (\d+) shard", out).group(1)) for out in outputs]
    one, two = digests(tmp_path / "one"), digests(tmp_path / "two")
    tokens = len([name for name in one if name.endswith(".tokens.npy")])
    assert tokens > 10 and all(shares) and sum(shares) == tokens
    assert sum("prepared 1" in out for out in outputs) >= 1  # the last to finish wrote the manifest
    assert one == two
    # three ranks after two shards were lost: only those are redone, and the output is the same again
    for name in ("0000-000001", "0001-000003"):
        (tmp_path / "two" / f"{name}.done.json").unlink()
    kept = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "two").glob("*.tokens.npy")}
    written = [prepare(inputs, str(tmp_path / "two"), tiny_encoder, 32, "de", workers=1, shard_bytes=shard_bytes,
                       log=lambda *_: None, rank=rank, world_size=3) for rank in range(3)]
    assert written[:2] == [None, None] and written[2]["sentences"] > 0  # the manifest comes with the last
    assert digests(tmp_path / "two") == one
    redone = {name for name, mtime in kept.items() if (tmp_path / "two" / name).stat().st_mtime_ns != mtime}
    assert redone == {"0000-000001.tokens.npy", "0001-000003.tokens.npy"}
