"""The one way in: `python -m dualner <command>` (or the `dualner` console script), and the thin
launchers the DeepSpeed launcher needs (`deepspeed launchers/stage2.py ...`), which call the same
functions.

    python -m dualner stage1   --config configs/tiny.yaml [key=value ...]
    python -m dualner stage2   --config configs/tiny_stage2.yaml [key=value ...]
    python -m dualner prepare  corpus/de/*.txt.xz --tokenizer runs/x --max-length 128 --output prepared/de
    python -m dualner index    corpus/de/*.txt.gz
    python -m dualner evaluate --checkpoint runs/x --data de=de/test.tsv [--head seq] [--output f1.json]
    python -m dualner export   --checkpoint runs/x --output exported/
    python -m dualner predict  --model exported/ --input sentences.txt --output entities.jsonl
    python -m dualner report   runs/a runs/b [--split test]
    python -m dualner config   --config configs/tiny.yaml [key=value ...] [--get run.output_dir]
    python -m dualner config   --check --stage 2 --world-size 16 --config configs/tiny_stage2.yaml

Every command reports a user error (a mistake in the config, a data file, a path, a checkpoint, the
machine's disk) as one line and exits 2 (`--debug` for the traceback). Training also exits 3 when a
non-finite loss stopped it (train.nonfinite_loss=stop, reported the same way) and 75 when it stopped
before its last step, resumable (a signal, run.max_steps_per_job). A bug of ours keeps its traceback
and exits 1. The codes: dualner.errors.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Callable

from dualner.errors import EXIT_STOPPED, ConfigError, run_entry_point


class Once(argparse.Action):
    """An option given at most once: a second `--config` would replace the first silently (configs are
    not merged; overrides are how one changes another's keys)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)}, {values}); one config "
                         f"file, changed by key=value overrides")
        setattr(namespace, self.dest, values)


def _training_parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"dualner {command}", description=description)
    parser.add_argument("--config", required=True, action=Once, help="YAML experiment file (configs/*.yaml)")
    # The `deepspeed` launcher appends --local_rank; LOCAL_RANK in the environment is what we use.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-5")
    return parser


def _positive(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a whole number, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be at least 1, got {value}")
        return value
    return parse


def parse_training_args(description: str, argv: list[str] | None = None, command: str = "train"):
    """The command line of a training stage: its config, loaded (keys, types and ranges; the stage's
    build validates it for its stage and world size, once). Parsed before anything heavy is imported
    (`--help` answers at once)."""
    args = _training_parser(command, description).parse_intermixed_args(argv)  # overrides on both sides of a flag
    from dualner import backend
    from dualner.config import load_config
    return load_config(args.config, args.overrides, engine=backend.ConfigRules(parser=False))


def stage1(argv: list[str]) -> int:
    cfg = parse_training_args("Stage 1: both heads on labeled source data.", argv, "stage1")
    from dualner.stage1 import run_stage1
    return EXIT_STOPPED if run_stage1(cfg).get("stopped_early") else 0


def stage2(argv: list[str]) -> int:
    cfg = parse_training_args("Stage 2: dual teaching from a stage-1 model.", argv, "stage2")
    from dualner.stage2 import run_stage2
    return EXIT_STOPPED if run_stage2(cfg).get("stopped_early") else 0


def evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dualner evaluate",
                                     description="Test F1 per language of a trained model (any engine).")
    parser.add_argument("--checkpoint", required=True,
                        help="a step-N folder, a run/checkpoints folder (its best checkpoint) or an exported folder")
    parser.add_argument("--data", nargs="+", required=True, metavar="LANG=PATH")
    parser.add_argument("--output", help="JSON file for {per_language, average}")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output that is not an earlier evaluation's results")
    parser.add_argument("--head", choices=["auto", "span", "seq"], default="auto",
                        help="auto: the span head, or the sequence head of a cla model")
    parser.add_argument("--batch-size", type=_positive("--batch-size"), default=64)
    parser.add_argument("--max-sentences", type=_positive("--max-sentences"), default=None,
                        help="first N sentences per file")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    data = {}
    for item in args.data:
        language, separator, path = item.partition("=")
        if not separator or not language or not path:
            raise ConfigError(f"--data {item!r}: expected LANG=PATH")
        if language in data:
            raise ConfigError(f"--data: language {language!r} given twice ({data[language]}, {path}); one file "
                              f"per language")
        data[language] = path
    from dualner.evaluate_checkpoint import evaluate_checkpoint
    evaluate_checkpoint(args.checkpoint, data, args.output, args.head, args.batch_size, args.max_sentences,
                        args.overwrite)
    return 0


def export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dualner export",
                                     description="Export a trained model to one Hugging Face model folder.")
    parser.add_argument("--checkpoint", required=True, help="a run folder (its best) or a step-N folder")
    parser.add_argument("--output", required=True, help="a new or empty folder (outside the run folder)")
    parser.add_argument("--overwrite", action="store_true",
                        help="export into a non-empty --output: its files are moved to <output>.old-<time> first")
    args = parser.parse_args(argv)
    from dualner.checkpoint import checkpoint_choice
    from dualner.logging import get_logger
    from dualner.model_io import export_model
    output = export_model(args.checkpoint, args.output, args.overwrite, get_logger())
    print(f"exported {checkpoint_choice(args.checkpoint)} -> {output}")
    return 0


def predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dualner predict",
                                     description="Entities for new text (plain text, CoNLL or JSONL in; JSONL out).")
    parser.add_argument("--model", required=True, help="an exported folder, or a run / step-N folder")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--head", choices=["auto", "span", "seq"], default="auto",
                        help="auto: the span head, or the sequence head of a cla model")
    parser.add_argument("--batch-size", type=_positive("--batch-size"), default=64)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output that is not an earlier prediction")
    args = parser.parse_args(argv)
    from dualner.predict import predict_file
    count = predict_file(args.model, args.input, args.output, args.head, args.batch_size, args.device,
                         args.overwrite)
    print(f"{count} sentences -> {args.output}")
    return 0


def prepare(argv: list[str]) -> int:
    from dualner.data.prepare import main as prepare_main

    def launch_ranks() -> dict[str, str]:  # after parsing: --help imports no torch
        from dualner.backend.comm import launch_ranks as ranks
        return ranks()
    prepare_main(argv, launch_ranks)  # under torchrun/srun every rank takes its share
    return 0


def index(argv: list[str]) -> int:
    from dualner.data.blocks import main as index_main
    index_main(argv)
    return 0


def report(argv: list[str]) -> int:
    from dualner.report import main as report_main
    report_main(argv)
    return 0


def config(argv: list[str]) -> int:
    """Check a config and print it resolved (or one key, or only "ok"): what job scripts use to find
    the run folder and to refuse a config before any rank starts."""
    parser = argparse.ArgumentParser(prog="dualner config", description=config.__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, action=Once)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--get", metavar="KEY", help="print only this dotted key")
    action.add_argument("--check", action="store_true",
                        help="only validate: print one 'ok' line, or the error (exit 2)")
    parser.add_argument("--stage", type=int, choices=(1, 2),
                        help="also the rules of training this stage (batch, packing, the engine's config, ...); "
                             "--check without it: the stage the config is for (2 where it sets stage2.init_from, "
                             "target or translations)")
    parser.add_argument("--world-size", type=int, metavar="N",
                        help="also the rules that depend on the number of ranks (batch divisibility); "
                             "--check without it: the ranks a launch from here has (1 for plain python)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides on both sides of a flag
    if args.world_size is not None and args.world_size < 1:
        parser.error(f"--world-size must be at least 1, got {args.world_size}")
    import yaml
    from dualner.config import config_to_dict
    from dualner.config_check import check_as_the_job, load_checked
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the answer (job scripts read it); chatter to stderr
        cfg = load_checked(args.config, args.overrides, args.stage, args.world_size)
        scope = check_as_the_job(cfg, args.config, args.overrides, args.stage, args.world_size) if args.check else ""
    if args.check:
        print(f"ok: {args.config} ({scope}) passes every config rule")
        return 0
    tree: Any = config_to_dict(cfg)
    for part in (args.get.split(".") if args.get else []):
        if not isinstance(tree, dict) or part not in tree:
            raise ConfigError(f"--get {args.get}: no key '{part}'")
        tree = tree[part]
    if isinstance(tree, (dict, list)):
        print(yaml.safe_dump(tree, sort_keys=False), end="")
    else:
        print(tree)
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "stage1": stage1, "stage2": stage2, "evaluate": evaluate, "export": export, "predict": predict,
    "report": report, "config": config, "prepare": prepare,
    "index": index}


def dispatch(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        raise ConfigError(f"expected a command, one of {', '.join(COMMANDS)}"
                          + (f"; got {argv[0]!r}" if argv else ""))
    return COMMANDS[argv[0]](argv[1:])


def main(argv: list[str] | None = None) -> None:
    """`python -m dualner` and the `dualner` console script."""
    # read after run_entry_point has taken --debug out of sys.argv
    run_entry_point(lambda: dispatch(sys.argv[1:] if argv is None else [a for a in argv if a != "--debug"]))


def launch(command: str) -> None:
    """The body of `launchers/<command>.py`."""
    run_entry_point(lambda: COMMANDS[command](sys.argv[1:]))
