"""Stage-2 start-up against corpus size: the real launcher (tiny random encoder, one step) with a
1 GB and a 10 GB synthetic target corpus, command to exit, interleaved repetitions (issue: stage 2
at cluster scale, "start-up independent of corpus size"). Beside it, what the replaced start-up
read before step 1 on every rank: a full count of every corpus's sentences (timed here on the same
files, page cache warm, so the file system's cost is not even in it).

    python bench/stage2_startup.py --output bench/results/stage2_startup.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_result  # noqa: E402


def write_corpus(path: Path, gigabytes: float) -> None:
    block = "".join(f"Berlin ist die Hauptstadt , Satz {i} mit einigen Wörtern mehr .\n" for i in range(16_000))
    data = block.encode()
    with path.open("wb") as handle:
        for _ in range(int(gigabytes * 2**30 / len(data))):
            handle.write(data)


def timed_stage2(stage1: Path, corpus: Path, output: Path) -> float:
    command = [sys.executable, str(REPO / "launchers" / "stage2.py"), "--config", str(REPO / "configs" / "tiny_stage2.yaml"),
               f"run.output_dir={output}", f"stage2.init_from={stage1}", f"stage2.target={{xx: {corpus}}}",
               "train.max_steps=1", "train.eval_every=100", "data.max_eval_sentences=8", "data.test={}",
               "logging.tensorboard=false", f"engine.config={REPO / 'ds_configs' / 'zero0_fp32.json'}"]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0, 10.0], help="corpus sizes in GB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None, help="where the corpora go (default: a temporary folder)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    from dualner.data.corpus import RecordReader, describe_file
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        folder = Path(folder)
        stage1 = folder / "stage1"
        subprocess.run([sys.executable, str(REPO / "launchers" / "stage1.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
                        f"run.output_dir={stage1}", "train.max_steps=1", "train.eval_every=1",
                        "data.max_eval_sentences=8", "data.test={}"],
                       cwd=REPO, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        corpora = {}
        for size in args.sizes:
            corpora[size] = folder / f"corpus-{size:g}GB.txt"
            write_corpus(corpora[size], size)
        seconds = {size: [] for size in args.sizes}
        for repeat in range(args.repeats):
            for size, corpus in corpora.items():
                seconds[size].append(timed_stage2(stage1, corpus, folder / f"run-{size:g}-{repeat}"))
                print(f"{size:g} GB: {seconds[size][-1]:.2f} s", flush=True)
        full_count = {}
        for size, corpus in corpora.items():
            started = time.perf_counter()
            file = describe_file(corpus, str(corpus))  # the replaced start-up: every sentence counted
            sum(1 for _ in RecordReader(file, 0, file.end))
            full_count[size] = round(time.perf_counter() - started, 2)
    smallest, largest = min(args.sizes), max(args.sizes)
    result = {"command": "python bench/stage2_startup.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "seconds_command_to_exit": {f"{size:g}GB": {"median": round(statistics.median(v), 2), "min": round(min(v), 2),
                                                          "max": round(max(v), 2), "runs": len(v)}
                                          for size, v in seconds.items()},
              "ratio_largest_to_smallest": round(statistics.median(seconds[largest]) / statistics.median(seconds[smallest]), 3),
              "replaced_startup_full_count_seconds_per_rank": {f"{size:g}GB": v for size, v in full_count.items()}}
    print(result)
    if args.output:
        write_result(args.output, result)


if __name__ == "__main__":
    main()
