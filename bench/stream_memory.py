"""Memory stays flat while the stage-2 loader streams a generated corpus (default: a million
sentences in 8 files), tokenizing, length-pooling and batching as in training.

Reports the loader's rate (sentences/s) and the process's resident memory (RSS) along the pass; the
claim is the ratio of the RSS at the end to the RSS after the first tenth, which a loader that keeps
what it read would drive up with the corpus size.

    python bench/stream_memory.py --sentences 1000000 [--workers 0] [--output bench/results/stream_memory.json]
"""

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoTokenizer  # noqa: E402

from dualner.data.encoding import WindowTokenizer  # noqa: E402
from dualner.data.packing import Collator  # noqa: E402
from dualner.data.source_kinds import open_sources  # noqa: E402
from dualner.data.stream_spec import KIND_TARGET, STREAM_META, StreamSpec  # noqa: E402
from dualner.data.streaming import Stage2Stream  # noqa: E402
from dualner.encoders import resolve_encoder  # noqa: E402
from dualner.labels import LabelSet  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "panx-sample"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate_corpus(folder: Path, sentences: int, files: int) -> list[str]:
    """Plain pre-tokenized text assembled from words of the embedded sample."""
    words = [line.split("\t")[0] for path in SAMPLE.glob("*/train.tsv")
             for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(0)
    paths = []
    per_file = -(-sentences // files)
    for index in range(files):
        path = folder / f"part{index:02d}.txt"
        with path.open("w", encoding="utf-8") as handle:
            for _ in range(min(per_file, sentences - index * per_file)):
                handle.write(" ".join(rng.choices(words, k=rng.randint(4, 30))) + "\n")
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sentences", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--encoder", default="tiny-random")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder(args.encoder))
    encoder = WindowTokenizer(tokenizer, LabelSet(("LOC", "ORG", "PER")), 128)
    with tempfile.TemporaryDirectory() as folder:
        files = generate_corpus(Path(folder), args.sentences, args.files)
        corpus_mb = sum(Path(f).stat().st_size for f in files) / 2**20
        stream = Stage2Stream([StreamSpec("target/xx", KIND_TARGET, "xx", open_sources(files, "xx"), 1.0)], encoder,
                              args.micro_batch, seed=0, rank=0, world_size=1,
                              collate=Collator(tokenizer.pad_token_id, meta_columns=STREAM_META), pool=512,
                              workers=args.workers, repeat=False)
        samples, checkpoints, started = 0, [], time.perf_counter()
        marks = {int(args.sentences * f / 10) for f in range(1, 11)}
        for batch in stream:
            before = samples
            samples += batch["meta"]["word_offset"].count(0)  # a sentence's first window
            if any(before < m <= samples for m in marks):
                checkpoints.append({"sentences": samples, "rss_mb": round(rss_mb(), 1),
                                    "seconds": round(time.perf_counter() - started, 1)})
                print(checkpoints[-1], flush=True)
        elapsed = time.perf_counter() - started
    result = {
        "sentences": samples, "files": args.files, "corpus_mb": round(corpus_mb, 1),
        "workers": args.workers, "sentences_per_s": round(samples / elapsed),
        "rss_after_first_tenth_mb": checkpoints[0]["rss_mb"], "rss_at_end_mb": checkpoints[-1]["rss_mb"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "end_over_first_tenth": round(checkpoints[-1]["rss_mb"] / checkpoints[0]["rss_mb"], 3),
        "trace": checkpoints,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "trace"}, indent=1))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
