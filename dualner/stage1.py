"""Stage 1 (SPEC "Stage 1: multitask learning"): both heads trained on labeled source data, as a
recipe for the loop in dualner.train. Its loss terms: `seq`, `start`, `end` (token cross-entropy of
each head); the variant picks the default weights (mlt: all three, cla: seq, span: start and end)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from dualner.attention import position_offset
from dualner.build import Engines, TrainSpec, build
from dualner.config import Config
from dualner.data.batching import BatchPlan
from dualner.data.encoding import WindowTokenizer
from dualner.data.loader import PlannedMicroBatches, micro_batch_loader
from dualner.data.packing import Collator, model_inputs
from dualner.data.sources import read_source
from dualner.encoders import load_encoder_pair, load_pretrained_encoder, resolve_encoder
from dualner.errors import ConfigError
from dualner.evaluate import load_eval_sets
from dualner.limits import check_max_length, check_vocabulary
from dualner.labels import LabelSet
from dualner.losses import VARIANT_TERMS, token_cross_entropy
from dualner.model import DualNERModel, HeadOutputs
from dualner.job import Job
from dualner.recipe import Recipe, resolve_weights
from dualner.run_folder import RunFolder
from dualner.train import Trainer, train


class Forward(NamedTuple):
    outputs: HeadOutputs
    batch: dict


class Stage1Recipe(Recipe):
    TERMS = {
        "seq": lambda f: token_cross_entropy(f.outputs.seq_logits, f.batch["seq_labels"]),
        "start": lambda f: token_cross_entropy(f.outputs.start_logits, f.batch["start_labels"]),
        "end": lambda f: token_cross_entropy(f.outputs.end_logits, f.batch["end_labels"]),
    }

    def __init__(self, engine, windows: list[dict], plan: BatchPlan, collate: Collator, weights: dict[str, float],
                 dev_sets: list, test_sets: list, rank: int, loader_workers: int, pin_memory: bool, seed: int,
                 total_steps: int):
        super().__init__(weights, dev_sets, test_sets)
        self.engine, self.windows, self.plan, self.collate = engine, windows, plan, collate
        self.total_steps = total_steps
        self.steps_per_epoch = plan.steps_per_epoch()
        self.rank, self.loader_workers, self.pin_memory, self.seed = rank, loader_workers, pin_memory, seed

    def batches(self, start_step: int):
        """The plan's micro batches from `start_step` to the run's last step: a pure function of the
        step, so a resumed run reads on exactly (collated and pinned in loader workers)."""
        dataset = PlannedMicroBatches(self.windows, self.plan, self.rank, self.collate, self.steps_per_epoch,
                                      start_step, self.total_steps)
        return iter(micro_batch_loader(dataset, self.loader_workers, self.pin_memory, self.seed + self.rank))

    def forward(self, batch: dict) -> Forward:
        return Forward(self.engine(**model_inputs(batch)), batch)

    def state_dict(self) -> dict:
        """For the reader of a checkpoint: the position itself is the step (`batches`)."""
        return {"data_position": {"steps_per_epoch": self.steps_per_epoch, "world_size": self.plan.world_size}}


def check_batch_fits(cfg: Config, lengths: list[int], sentences: int) -> None:
    """One optimizer step must not need more than the training data holds (it would repeat windows
    within the step and still report the asked-for global batch)."""
    unit = cfg.train.batch_unit
    available = len(lengths) if unit == "sentences" else sum(lengths)
    if cfg.train.global_batch_size > available:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} {unit} is more than the "
                          f"training data holds ({available} {unit if unit == 'tokens' else 'windows'} from "
                          f"{sentences} sentences of data.train); lower it or give more data")


@dataclass(frozen=True)
class Stage1Inputs:
    """Stage 1's inputs, read and checked: the encoder's folder and tokenizer, the labeled windows
    and their batch plan, the evaluation sets, the loss weights."""
    encoder_path: str
    tokenizer: Any
    label_set: LabelSet
    windows: list[dict]
    plan: BatchPlan
    collate: Collator
    dev_sets: list
    test_sets: list
    weights: dict[str, float]
    total_steps: int


def read_inputs(job: Job) -> Stage1Inputs:
    cfg = job.cfg
    encoder_path = resolve_encoder(cfg.model.encoder)
    tokenizer_path = resolve_encoder(cfg.model.tokenizer, "model.tokenizer") if cfg.model.tokenizer else encoder_path
    tokenizer, encoder_config = load_encoder_pair(encoder_path, tokenizer_path,
                                                  "model.tokenizer" if cfg.model.tokenizer else "model.encoder")
    check_vocabulary(tokenizer, encoder_config, tokenizer_path, encoder_path)
    check_max_length(cfg.data.max_length, encoder_config, f"model.encoder={cfg.model.encoder}")
    sentences, _ = read_source(cfg)
    label_set = LabelSet.from_tags([t for s in sentences for t in s.tags])
    windows_of = WindowTokenizer(tokenizer, label_set, cfg.data.max_length)
    windows = windows_of.encode(sentences).to_list()
    check_batch_fits(cfg, [len(w["input_ids"]) for w in windows], len(sentences))
    dev_sets = load_eval_sets(cfg.data.dev, "data.dev", windows_of, label_set, cfg.data.max_eval_sentences)
    test_sets = load_eval_sets(cfg.data.test, "data.test", windows_of, label_set, cfg.data.test_sentence_cap)
    collate = job.collator(tokenizer.pad_token_id, position_offset(encoder_config))
    plan = BatchPlan([len(w["input_ids"]) for w in windows], job.layout.micro_batch_size,
                     job.layout.accumulation_steps, job.info.world_size, cfg.run.seed,
                     # packed rows carry no padding: plain random micro batches
                     1 if collate.packed else cfg.train.bucket_multiplier,
                     collate.row_length if cfg.train.batch_unit == "tokens" else None)
    steps_per_epoch = plan.steps_per_epoch()
    job.log.info("stage 1: %d training windows from %d sentences, %d steps per epoch, labels %s",
                 len(windows), len(sentences), steps_per_epoch, label_set.bio_tags)
    weights = resolve_weights(Stage1Recipe.TERMS, {name: 1.0 for name in VARIANT_TERMS[cfg.model.variant]},
                              cfg.train.loss_weights)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    return Stage1Inputs(encoder_path, tokenizer, label_set, windows, plan, collate, dev_sets, test_sets, weights,
                        total_steps)


def build_model(job: Job, inputs: Stage1Inputs) -> DualNERModel:
    cfg = job.cfg
    model = load_pretrained_encoder(inputs.encoder_path, lambda path: DualNERModel.from_pretrained_encoder(
        path, len(inputs.label_set.entity_types), cfg.model.dropout, cfg.model.encoder_dropout, cfg.model.attention))
    if cfg.model.freeze_word_embeddings:
        model.freeze_word_embeddings()
    return model


def training_windows(job: Job, inputs: Stage1Inputs, folder: RunFolder) -> list[dict]:
    """Stage 1 reads its windows in the order of their batch plan: a pure function of the step, so
    the run folder holds no data position of its own."""
    return inputs.windows


def build_recipe(job: Job, inputs: Stage1Inputs, engines: Engines, folder: RunFolder,
                 windows: list[dict]) -> Stage1Recipe:
    return Stage1Recipe(engines.student, windows, inputs.plan, inputs.collate, inputs.weights, inputs.dev_sets,
                        inputs.test_sets, job.info.rank, job.loader_workers, job.pin_memory, job.cfg.run.seed,
                        inputs.total_steps)


STAGE1 = TrainSpec(stage=1, read_inputs=read_inputs, build_model=build_model, build_data=training_windows,
                   build_recipe=build_recipe)


def build_stage1(cfg: Config) -> Trainer:
    """Read and check every input, build the model and engine, then open the run folder."""
    return build(STAGE1, cfg)


def run_stage1(cfg: Config) -> dict:
    return train(build_stage1(cfg))
