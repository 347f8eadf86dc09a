"""Fidelity to the method (SPEC): each head variant is evaluated with the head it trains; stage 2
splits the labeled source as its stage-1 run did and keeps that run's encoder dropout; and the
documented config choices (stream mix by corpus size with a length in epochs, one loss denominator,
the MSE's reduction and pool) do what they say."""

import json
import math

import pytest
import torch

from dualner.config import Config, ConfigError, evaluation_head, load_config, save_config
from dualner.losses import centroid_mse, parallel_mse, token_cross_entropy
from tests.conftest import REPO

STAGE1 = REPO / "configs" / "tiny.yaml"
STAGE2 = REPO / "configs" / "tiny_stage2.yaml"
QUICK = ["train.max_steps=2", "train.eval_every=2", "data.max_eval_sentences=8",
         f"engine.config={REPO / 'ds_configs' / 'zero0_fp32.json'}"]


@pytest.fixture(scope="module")
def stage1_half(tmp_path_factory, tiny_encoder):
    """A stage-1 run on half of the labeled English (seed 7) with encoder dropout 0.05."""
    from dualner.stage1 import run_stage1
    run = tmp_path_factory.mktemp("method") / "stage1"
    run_stage1(load_config(STAGE1, [f"run.output_dir={run}", "run.seed=7", "data.train_fraction=0.5",
                                    "model.encoder_dropout=0.05", *QUICK]))
    return run


def stage2_config(run, init_from, *overrides):
    return load_config(STAGE2, [f"run.output_dir={run}", f"stage2.init_from={init_from}", "run.seed=7",
                                "data.train_fraction=0.5", *QUICK, *overrides])


# -- 1: the head a variant is evaluated with ------------------------------------------------------------

def test_each_variant_is_evaluated_with_a_head_it_trains():
    assert load_config(STAGE1, ["model.variant=cla"]).eval.head == "auto"
    assert evaluation_head("cla") == "seq" and evaluation_head("span") == "span" and evaluation_head("mlt") == "span"
    assert evaluation_head("mlt", "seq") == "seq"
    with pytest.raises(ConfigError, match=r"eval.head=span reads a head that model.variant=cla never trains"):
        load_config(STAGE1, ["model.variant=cla", "eval.head=span"])
    with pytest.raises(ConfigError, match=r"eval.head=seq .* model.variant=span"):
        load_config(STAGE1, ["model.variant=span", "eval.head=seq"])


def test_a_cla_run_reports_its_sequence_head(tmp_path, tiny_encoder, monkeypatch):
    """Dev selection and test F1 of a CLA run, and `evaluate --head auto` on its checkpoint, read the
    BIO head (its span heads stay random)."""
    import dualner.evaluate_checkpoint
    import dualner.train
    from dualner.evaluate import evaluate_sets
    from dualner.stage1 import run_stage1
    heads = []

    def recording(*args, **kwargs):
        heads.append(args[3])
        return evaluate_sets(*args, **kwargs)
    monkeypatch.setattr(dualner.train, "evaluate_sets", recording)
    monkeypatch.setattr(dualner.evaluate_checkpoint, "evaluate_sets", recording)
    run = tmp_path / "cla"
    run_stage1(load_config(STAGE1, [f"run.output_dir={run}", "model.variant=cla", "data.max_train_sentences=64",
                                    *QUICK]))
    assert heads == ["seq", "seq"]  # dev at step 2, test of the best checkpoint
    data = {"de": str(REPO / "data" / "panx-sample" / "de" / "test.tsv")}
    dualner.evaluate_checkpoint.evaluate_checkpoint(run / "checkpoints", data, None, head="auto", max_sentences=8)
    assert heads[-1] == "seq"


# -- 6 and 8: stage 2 follows its stage-1 run --------------------------------------------------------------

def test_stage2_refuses_a_source_split_unlike_stage1s(stage1_half, tmp_path):
    from dualner.stage2 import build_stage2
    for override, key in (("run.seed=8", "run.seed"), ("data.train_fraction=0.2", "data.train_fraction"),
                          ("data.max_train_sentences=400", "data.max_train_sentences")):
        output = tmp_path / key
        with pytest.raises(ConfigError, match=rf"{key}=.* differs from the stage-1 run's .*split the labeled source"):
            build_stage2(stage2_config(output, stage1_half, override))
        assert not output.exists()  # refused before anything is written


def test_a_matching_split_is_accepted(tmp_path):
    from dualner.data.sources import check_same_split
    first = load_config(STAGE1, ["data.train_fraction=0.5", "run.seed=3"])
    save_config(first, tmp_path / "config.yaml")
    check_same_split(load_config(STAGE2, ["data.train_fraction=0.5", "run.seed=3"]), tmp_path / "config.yaml")
    absolute = REPO / "data" / "panx-sample" / "en" / "train.tsv"  # the same file written another way
    check_same_split(load_config(STAGE2, ["data.train_fraction=0.5", "run.seed=3", f"data.train.en={absolute}"]),
                     tmp_path / "config.yaml")
    # all of the source in both stages: nothing to leak, whatever the seeds
    save_config(load_config(STAGE1, ["run.seed=3"]), tmp_path / "config.yaml")
    check_same_split(load_config(STAGE2, ["run.seed=4"]), tmp_path / "config.yaml")


def test_stage2_keeps_stage1s_encoder_dropout(stage1_half, tmp_path):
    """model.encoder_dropout of the stage-1 run is the student's and the teacher's unless stage 2 sets its own."""
    from dualner.stage2 import build_stage2

    trainer = build_stage2(stage2_config(tmp_path / "kept", stage1_half))
    try:
        encoder_config = trainer.engine.module.encoder.config
        assert encoder_config.hidden_dropout_prob == 0.05 and encoder_config.attention_probs_dropout_prob == 0.05
        assert trainer.recipe.teacher.module.encoder.config.hidden_dropout_prob == 0.05
        dropout_layers = {m.p for m in trainer.engine.module.encoder.modules() if isinstance(m, torch.nn.Dropout)}
        assert dropout_layers == {0.05}
    finally:
        trainer.metrics.close()
        trainer.folder.close()
    trainer = build_stage2(stage2_config(tmp_path / "own", stage1_half, "model.encoder_dropout=0.2"))
    trainer.metrics.close()
    trainer.folder.close()
    assert trainer.engine.module.encoder.config.hidden_dropout_prob == 0.2


# -- 2: the stream mix and stage 2's length ---------------------------------------------------------------

def test_mix_by_size_draws_every_sentence_equally_and_epochs_set_the_length(stage1_half, tmp_path):
    from dualner.stage2 import build_stage2
    sample = REPO / "data" / "panx-sample"
    trainer = build_stage2(stage2_config(tmp_path / "size", stage1_half, "train.max_steps=null", "stage2.epochs=2"))
    trainer.metrics.close()
    trainer.folder.close()
    sizes = {"source/en": 256, "target/en-remainder": 256,  # the 512 capped English sentences, halved
             "target/de": sentences_in(sample / "de" / "train.tsv"),
             "target/zh": sentences_in(sample / "zh" / "train.tsv")}
    assert trainer.recipe.stream.mix == pytest.approx({name: n / sum(sizes.values()) for name, n in sizes.items()})
    assert trainer.total_steps == math.ceil(2 * sum(sizes.values()) / 16)

    trainer = build_stage2(stage2_config(tmp_path / "equal", stage1_half, "stage2.mix=equal"))
    trainer.metrics.close()
    trainer.folder.close()
    # the labeled English 1, the three unlabeled streams 1/3 each
    assert trainer.recipe.stream.mix == pytest.approx({"source/en": 0.5, "target/de": 1 / 6, "target/zh": 1 / 6,
                                               "target/en-remainder": 1 / 6})


@pytest.mark.parametrize("overrides, message", [
    (["stage2.epochs=2"], "set train.max_steps .* or stage2.epochs .*, one of them"),
    (["train.max_steps=null"], "set train.max_steps .* or stage2.epochs .*, one of them"),
    (["train.max_steps=null", "stage2.epochs=2", "stage2.mix=equal"], "needs stage2.mix=size"),
])
def test_stage2_length_is_steps_or_epochs(stage1_half, tmp_path, overrides, message):
    from dualner.stage2 import build_stage2
    with pytest.raises(ConfigError, match=message):
        build_stage2(stage2_config(tmp_path / "run", stage1_half, *overrides))


def sentences_in(path):
    """A small raw file's sentences as stage2.mix=size counts them (dualner.data.stage2_inputs.corpus_sizes):
    exactly, as the stage-2 reader cuts them."""
    from dualner.data.corpus import describe_file
    from dualner.data.file_source import estimate_records
    count, exact = estimate_records(describe_file(path, str(path)))
    assert exact, path
    return count


def test_small_raw_files_are_counted_exactly(tmp_path):
    conll = tmp_path / "a.tsv"
    conll.write_text("\n\nx\tO\ny\tO\n\n\nz\tB-PER\n")  # leading and doubled blank lines
    text = tmp_path / "a.txt"
    text.write_text("one two\n\nthree\n")
    assert sentences_in(conll) == 2 and sentences_in(text) == 2


# -- 3: one denominator for the gold and pseudo terms ----------------------------------------------------

def test_shared_normalization_weighs_gold_and_pseudo_words_alike():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3)
    gold = torch.full((2, 5), -100)
    gold[0, :2] = torch.tensor([1, 2])  # 2 English words labeled of 10 words
    pseudo = torch.randint(0, 3, (2, 5))
    words = torch.tensor(10)
    per_term = token_cross_entropy(logits, gold) + token_cross_entropy(logits, pseudo)
    shared = token_cross_entropy(logits, gold, words) + token_cross_entropy(logits, pseudo, words)
    # per_term: a gold word weighs 1/2, a pseudo word 1/10; shared: both 1/10
    summed = torch.nn.functional.cross_entropy(logits.reshape(-1, 3), gold.reshape(-1), reduction="sum")
    assert per_term == pytest.approx((summed / 2 + token_cross_entropy(logits, pseudo)).item())
    assert shared == pytest.approx((summed / 10 + token_cross_entropy(logits, pseudo)).item())
    assert token_cross_entropy(logits, torch.full((2, 5), -100), words) == 0


# -- 4 and 5: the MSE term's reduction and pool ---------------------------------------------------------

def test_mse_reduction_sum_is_the_squared_distance():
    torch.manual_seed(0)
    representations = torch.randn(6, 2, 8)  # (windows, types, 2 x hidden)
    present = torch.rand(6, 2) > 0.3
    present[:2] = True
    mean = centroid_mse(representations, present)
    assert centroid_mse(representations, present, "sum") == pytest.approx(8 * mean.item(), rel=1e-6)
    pairs = torch.tensor([[0, 1], [2, 3]])
    assert parallel_mse(representations, present, pairs, "sum") == pytest.approx(
        8 * parallel_mse(representations, present, pairs).item(), rel=1e-6)


def test_mse_pooled_over_the_step():
    """One PER entity in each of two micro batches: per micro batch no type has two entities (no
    term); pooled over the step, the second is pulled to the centroid of both, the first's
    representation a constant."""
    first = torch.tensor([[[0.0, 0.0]]])
    second = torch.tensor([[[2.0, 4.0]]], requires_grad=True)
    present = torch.ones(1, 1, dtype=torch.bool)
    assert centroid_mse(first, present) == 0 and centroid_mse(second, present) == 0
    carried = (torch.zeros(1, 2), torch.zeros(1))
    loss, carried = centroid_mse(first, present, "mean", carried)
    assert loss == 0 and carried[1].item() == 1
    loss, carried = centroid_mse(second, present, "mean", carried)
    assert loss.item() == pytest.approx(((1 ** 2) + (2 ** 2)) / 2)  # distance to the centroid (1, 2)
    loss.backward()
    assert second.grad is not None and carried[1].item() == 2 and not carried[0].requires_grad


def test_stage2_logs_the_mse_terms_share(stage1_half, tmp_path):
    from dualner.stage2 import run_stage2
    output = tmp_path / "run"
    run_stage2(stage2_config(output, stage1_half, "train.log_every=1",
                             "train.micro_batch_size=4"))
    rows = [json.loads(line) for line in (output / "losses.jsonl").read_text().splitlines()]
    assert rows and all(0 <= row["loss/mse_share"] <= 1 for row in rows)
    for row in rows:
        assert row["loss/mse_share"] == pytest.approx(0.5 * row["loss/mse"] / row["loss/total"], rel=1e-4)


def test_config_choices_are_documented_defaults():
    settings = Config().stage2
    assert (settings.mix, settings.loss_normalization, settings.mse_reduction, settings.mse_pool) == (
        "size", "per_term", "mean", "step")
