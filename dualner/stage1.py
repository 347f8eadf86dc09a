"""Stage 1 (SPEC "Stage 1: multitask learning"): both heads trained on labeled source data under a
DeepSpeed engine, evaluated on every configured dev set, checkpointed and resumable."""

from __future__ import annotations

from transformers import AutoConfig, AutoTokenizer

from dualner import checkpoint as ckpt
from dualner.attention import position_offset
from dualner.config import Config, ConfigError
from dualner.data.batching import BatchPlan
from dualner.data.encoding import SentenceEncoder
from dualner.data.loader import PlannedMicroBatches, micro_batch_loader
from dualner.data.packing import model_inputs
from dualner.data.sources import read_labeled, split_source_fraction
from dualner.encoders import resolve_encoder
from dualner.inference import save_model_assets
from dualner.labels import LabelSet
from dualner.losses import VARIANT_TERMS, supervised_losses
from dualner.model import DualNERModel
from dualner.trainer import Trainer, make_collator


class Stage1Trainer(Trainer):
    stage_name = "stage 1"

    def __init__(self, cfg: Config):
        if not cfg.data.train:
            raise ConfigError("data.train: no labeled training file given (language: path)")
        super().__init__(cfg)
        encoder_path = resolve_encoder(cfg.model.encoder)
        tokenizer_path = resolve_encoder(cfg.model.tokenizer, "model.tokenizer") if cfg.model.tokenizer else encoder_path
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        encoder_config = AutoConfig.from_pretrained(encoder_path)
        if len(self.tokenizer) > encoder_config.vocab_size:
            raise ConfigError(
                f"model.tokenizer: {tokenizer_path} has {len(self.tokenizer)} tokens but the encoder "
                f"{encoder_path} has {encoder_config.vocab_size} embeddings; they do not belong together")
        train_sentences = read_labeled(cfg.data.train, "data.train", cfg.data.max_train_sentences)
        train_sentences, _ = split_source_fraction(train_sentences, cfg.data.train_fraction, cfg.run.seed)
        self.label_set = LabelSet.from_tags([t for s in train_sentences for t in s.tags])
        self.encoder = SentenceEncoder(self.tokenizer, self.label_set, cfg.data.max_length)
        self.train_rows = self.encoder.encode(train_sentences).to_list()
        self.load_eval_data()
        self.collator = make_collator(cfg, self.tokenizer.pad_token_id, position_offset(encoder_config))
        self.plan = BatchPlan([len(row["input_ids"]) for row in self.train_rows],
                              self.layout.micro_batch_size, self.layout.accumulation_steps,
                              self.info.world_size, cfg.run.seed,
                              # packed rows carry no padding: plain random micro batches
                              1 if self.collator.packed else cfg.train.bucket_multiplier,
                              self.collator.row_length if cfg.train.batch_unit == "tokens" else None)
        self.steps_per_epoch = self.plan.steps_per_epoch()
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.log.info("stage 1: %d training windows from %d sentences, %d steps per epoch",
                      len(self.train_rows), len(train_sentences), self.steps_per_epoch)

        model = DualNERModel.from_pretrained_encoder(encoder_path, len(self.label_set.entity_types),
                                                     cfg.model.dropout, cfg.model.encoder_dropout,
                                                     cfg.model.attention)
        if cfg.model.freeze_word_embeddings:
            model.freeze_word_embeddings()
        self.wrap_model(model)
        self.open_run_dir()
        if self.info.is_main:
            # the encoder's config as trained (model.encoder_dropout included): stage 2 builds from it
            save_model_assets(self.run_dir / ckpt.MODEL_ASSETS, self.tokenizer, model.encoder.config,
                              self.label_set, cfg.model.variant, cfg.data.max_length)

    def loss_names(self) -> tuple[str, ...]:
        return ("total", *VARIANT_TERMS[self.cfg.model.variant])

    def on_train_start(self) -> None:
        dataset = PlannedMicroBatches(self.train_rows, self.plan, self.info.rank, self.collator,
                                      self.steps_per_epoch, self.state.step, self.total_steps)
        self.batches = iter(micro_batch_loader(dataset, self.loader_workers, self.pin_memory,
                                               self.cfg.run.seed + self.info.rank))

    def next_micro_batch(self) -> dict:
        return next(self.batches)

    def micro_batch_losses(self, batch: dict) -> dict:
        outputs = self.engine(**model_inputs(batch))
        return supervised_losses(outputs, batch, self.cfg.model.variant)

    def client_state(self) -> dict:
        epoch, in_epoch = divmod(self.state.step, self.steps_per_epoch)
        return {"data_position": {"epoch": epoch, "step_in_epoch": in_epoch,
                                  "steps_per_epoch": self.steps_per_epoch,
                                  "world_size": self.info.world_size}}


def run_stage1(cfg: Config) -> dict:
    return Stage1Trainer(cfg).train()
