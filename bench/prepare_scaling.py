"""`prepare` at cluster scale, simulated on one machine (issue 24, item 4): sentences tokenized per
CPU-second against the tokenizer's single-process ceiling, and 2 ranks x 2 workers against one
worker on the same input.

- in process: prepare's tokenizing path alone (the whole corpus as one shard: read, parse, tokenize,
  cut windows, write) in this process, no process start-up;
- fixed cost: one `prepare --workers 1` process on 20 sentences (imports, tokenizer load, ...);
- ceiling: the tokenizer alone (`tokenizer(words, is_split_into_words=True)` in batches of 512) over
  the corpus's sentences, in this process: sentences per CPU-second;
- one worker: `python -m dualner prepare --workers 1` (tokenizing in its main process);
- 2 ranks x 2 workers: two `python -m dualner prepare --workers 2` started together with RANK /
  WORLD_SIZE set (as torchrun starts them), each with its pool of two tokenizing processes.
CPU-seconds are the children's user + system time (getrusage); the start-up of a process (imports,
tokenizer load) is measured alone and reported, and the rates are given with and without it. Wall
time is the elapsed time of the whole preparation. The output of both layouts is checked identical.
Medians of --repeats interleaved repetitions.

    python bench/prepare_scaling.py --output bench/results/prepare_scaling.json
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import random
import resource
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process, as in prepare's workers

from bench.common import REPO, write_result  # noqa: E402


def write_corpus(path: Path, sentences: int) -> None:
    """Sentences of words from a Zipf-like vocabulary of 50,000 made-up words (several subwords each)."""
    rng = random.Random(0)
    vocabulary = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 11)))
                  for _ in range(50_000)]
    # the cumulative weights once (random.choices would add up 50,000 weights for every sentence)
    cumulative = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(vocabulary))))
    with path.open("w") as handle:
        for _ in range(sentences):
            handle.write(" ".join(rng.choices(vocabulary, cum_weights=cumulative, k=rng.randint(5, 30))) + " .\n")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def environment(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def run_layout(corpus: Path, output: Path, tokenizer: str, ranks: int, workers: int, shard_mb: float
               ) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one preparation on `ranks` ranks of `workers` workers each."""
    shutil.rmtree(output, ignore_errors=True)
    cpu, began = children_cpu(), time.perf_counter()
    command = [sys.executable, "-m", "dualner", "prepare", str(corpus), "--output", str(output), "--tokenizer",
               tokenizer, "--max-length", "128", "--language", "xx", "--workers", str(workers),
               "--shard-mb", str(shard_mb)]
    processes = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env=environment(**({"RANK": str(rank), "WORLD_SIZE": str(ranks),
                                                      "LOCAL_WORLD_SIZE": str(ranks)} if ranks > 1 else {})))
                 for rank in range(ranks)]
    for process in processes:
        _, err = process.communicate()
        if process.returncode:
            raise SystemExit(f"prepare failed: {err[-3000:]}")
    return time.perf_counter() - began, children_cpu() - cpu


def startup_cpu(tokenizer: str) -> float:
    """CPU-seconds of one process's imports and tokenizer load (what every rank and worker pays once)."""
    cpu = children_cpu()
    subprocess.run([sys.executable, "-c", "import dualner.data.prepare, transformers; "
                    f"transformers.AutoTokenizer.from_pretrained({tokenizer!r})"], cwd=REPO, env=environment(),
                   check=True)
    return children_cpu() - cpu


def ceiling(corpus: Path, tokenizer_path: str) -> float:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    sentences = [line.split() for line in corpus.read_text().splitlines()]
    began = time.process_time()
    for start in range(0, len(sentences), 512):
        tokenizer(sentences[start:start + 512], is_split_into_words=True, add_special_tokens=False, verbose=False)
    return len(sentences) / (time.process_time() - began)


def in_process(corpus: Path, tokenizer_path: str, folder: Path) -> float:
    """prepare's tokenizing path alone, in this process: the whole corpus as one shard (read, parse,
    tokenize, cut windows, write), no process start-up: sentences per CPU-second."""
    from dualner.data import prepare_shards
    from dualner.data.corpus import describe_file
    file = describe_file(corpus, "bench")
    folder.mkdir(exist_ok=True)
    prepare_shards.init_worker(tokenizer_path, 128, "xx", str(folder))
    began = time.process_time()
    counts = prepare_shards.write_shard((file, prepare_shards.Piece(0, 0, 0, file.size), None))
    return counts["sentences"] / (time.process_time() - began)


def fixed_cpu(tokenizer: str, folder: Path) -> float:
    """CPU-seconds of one `prepare --workers 1` process on a corpus of 20 sentences: what a process
    pays whatever its input (imports, torch included; tokenizer load; fingerprint; output)."""
    tiny = folder / "tiny.txt"
    write_corpus(tiny, 20)
    output = folder / "tiny_prepared"
    shutil.rmtree(output, ignore_errors=True)
    return run_layout(tiny, output, tokenizer, 1, 1, 0.5)[1]


def digest(folder: Path) -> str:
    hashed = hashlib.sha256()
    for path in sorted(folder.glob("*.npy")):
        hashed.update(path.name.encode() + path.read_bytes())
    return hashed.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--encoder", default="multilingual-e5-small")
    parser.add_argument("--sentences", type=int, default=60_000)
    parser.add_argument("--shard-mb", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from dualner.encoders import resolve_encoder
    tokenizer = resolve_encoder(args.encoder)
    layouts = {"1 rank x 1 worker": (1, 1), "2 ranks x 2 workers": (2, 2)}
    processes = {"1 rank x 1 worker": 1, "2 ranks x 2 workers": 2 + 2 * 2}  # parents + pool workers
    with tempfile.TemporaryDirectory() as folder:
        corpus = Path(folder) / "corpus.txt"
        write_corpus(corpus, args.sentences)
        ceilings, startups, shards, fixed = [], [], [], []
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in layouts}
        digests = {}
        for _ in range(args.repeats):
            ceilings.append(ceiling(corpus, tokenizer))
            shards.append(in_process(corpus, tokenizer, Path(folder) / "in_process"))
            startups.append(startup_cpu(tokenizer))
            fixed.append(fixed_cpu(tokenizer, Path(folder)))
            for name, (ranks, workers) in layouts.items():
                output = Path(folder) / name.replace(" ", "_")
                runs[name].append(run_layout(corpus, output, tokenizer, ranks, workers, args.shard_mb))
                digests[name] = digest(output)
    start_cpu = statistics.median(startups)
    result = {"sentences": args.sentences, "encoder": args.encoder, "repeats": args.repeats, "cpus": os.cpu_count(),
              "tokenizer_ceiling_sentences_per_cpu_s": statistics.median(ceilings),
              "startup_cpu_s_per_process": start_cpu, "identical_output": len(set(digests.values())) == 1,
              "in_process_sentences_per_cpu_s": statistics.median(shards),
              "in_process_of_ceiling": statistics.median(shards) / statistics.median(ceilings),
              "prepare_process_fixed_cpu_s": statistics.median(fixed),
              "layouts": {}}
    for name, measured in runs.items():
        wall = statistics.median(w for w, _ in measured)
        cpu = statistics.median(c for _, c in measured)
        net = max(1e-9, cpu - start_cpu * processes[name])
        result["layouts"][name] = {
            "wall_s": wall, "cpu_s": cpu, "wall_range_s": [min(w for w, _ in measured), max(w for w, _ in measured)],
            "sentences_per_cpu_s": args.sentences / cpu, "sentences_per_cpu_s_without_startup": args.sentences / net,
            "of_ceiling_without_startup": args.sentences / net / result["tokenizer_ceiling_sentences_per_cpu_s"],
            "sentences_per_wall_s": args.sentences / wall}
    one, many = result["layouts"]["1 rank x 1 worker"], result["layouts"]["2 ranks x 2 workers"]
    result["wall_speedup_2x2_vs_1"] = one["wall_s"] / many["wall_s"]
    print(f"tokenizer ceiling: {result['tokenizer_ceiling_sentences_per_cpu_s']:.0f} sentences/CPU-s; "
          f"start-up {start_cpu:.2f} CPU-s per process; identical output: {result['identical_output']}")
    print(f"tokenizing path in one process: {result['in_process_sentences_per_cpu_s']:.0f} sentences/CPU-s "
          f"({result['in_process_of_ceiling']:.2f}x the ceiling); a prepare process's fixed cost "
          f"{result['prepare_process_fixed_cpu_s']:.1f} CPU-s")
    for name, row in result["layouts"].items():
        print(f"{name:22s} wall {row['wall_s']:7.1f} s  CPU {row['cpu_s']:7.1f} s  "
              f"{row['sentences_per_cpu_s']:6.0f} sentences/CPU-s ({row['sentences_per_cpu_s_without_startup']:6.0f} "
              f"without start-up: {row['of_ceiling_without_startup']:.2f}x the ceiling)  "
              f"{row['sentences_per_wall_s']:6.0f} sentences/s")
    print(f"2 ranks x 2 workers vs 1 worker, wall: {result['wall_speedup_2x2_vs_1']:.2f}x on {os.cpu_count()} cores")
    write_result(args.output, result)


if __name__ == "__main__":
    main()
