"""Packed rows compute exactly what one window per row computes (fp32, 1e-5): encoder outputs of
both families, stage-1 losses and gradients, stage-2 teacher outputs, pseudo labels, student losses
and the MSE term, evaluation; and the launchers' losses with packing on and off."""

import json
import random

import pytest
import torch
from transformers import AutoModel, BertConfig, XLMRobertaConfig

from dualner.data.conll import read_conll
from dualner.data.encoding import WindowTokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from dualner.data.packing import (Collator, cut_micro_batches, first_fit, first_fit_decreasing, model_inputs,
                                  pack_rows)
from dualner.evaluate import EvalSet, evaluate_sets
from dualner.labels import LabelSet
from dualner.losses import centroid_mse, entity_representations
from dualner.model import DualNERModel
from dualner.teacher import build_pseudo_labels
from tests.conftest import REPO, SAMPLE, launch, stage1_losses

LABELS = LabelSet(("LOC", "ORG", "PER"))
TOLERANCE = 1e-5


def test_first_fit_decreasing_places_every_window_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(3, 64) for _ in range(300)]
    rows = first_fit_decreasing(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert sum(lengths) / (64 * len(rows)) > 0.9  # little left empty
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([65], 64)


def token_budget_micro_batches(lengths, row_length, rows):
    """Stage 1's token budgets: every window a unit of its own."""
    return cut_micro_batches([[i] for i in range(len(lengths))], lengths, 0, rows, row_length)


def test_token_budget_micro_batches_fill_a_fixed_shape():
    rng = random.Random(1)
    lengths = [rng.randint(3, 32) for _ in range(500)]
    batches = token_budget_micro_batches(lengths, row_length=32, rows=8)
    assert [i for batch in batches for i in batch] == list(range(500))  # order kept, none lost
    for batch in batches:
        assert len(pack_rows([lengths[i] for i in batch], 32, rows=8)[0]) == 8
    with pytest.raises(ValueError, match="does not fit"):
        token_budget_micro_batches([3, 33], row_length=32, rows=8)


def assert_packs(lengths, rows, row_length=10):
    packed, width = pack_rows(lengths, row_length, rows=rows)
    assert width == row_length and len(packed) == rows
    assert sorted(i for row in packed for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= row_length for row in packed)


def test_a_batch_first_fit_decreasing_cannot_pack_still_packs():
    """10,2,5,3,2,6,2 fill three rows of 10 in arrival order (how token budgets are cut) but first
    fit decreasing needs four; the padding bench crashed on such a batch."""
    lengths = [10, 2, 5, 3, 2, 6, 2]
    assert len(token_budget_micro_batches(lengths, row_length=10, rows=3)) == 1
    assert len(first_fit_decreasing(lengths, 10)) == 4
    assert_packs(lengths, rows=3)


def reference_first_fit(lengths, capacity, order):
    """First fit as the three packers before the single one wrote it: scan the rows for room."""
    rows, room = [], []
    for index in order:
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def reference_cut(units, lengths, rows, row_length):
    """The stream's cut before the single packer (a row scan per window, a copy per unit)."""
    def placed(room, unit):
        room = list(room)
        for window in unit:
            row = next((r for r, free in enumerate(room) if free >= lengths[window]), None)
            if row is None:
                return None
            room[row] -= lengths[window]
        return room

    batches, current, room = [], [], [row_length] * rows
    for unit in units:
        after = placed(room, unit)
        if current and after is None:
            batches.append(current)
            current, room = [], [row_length] * rows
            after = placed(room, unit)
        current = current + list(unit)
        room = after if after is not None else [0] * rows
    return batches + [current] if current else batches


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=1, max_size=60))
def test_the_single_packer_places_as_first_fit_always_did(lengths):
    order = list(range(len(lengths)))
    assert first_fit(lengths, 10) == reference_first_fit(lengths, 10, order)
    decreasing = sorted(order, key=lambda i: (-lengths[i], i))
    assert first_fit_decreasing(lengths, 10) == reference_first_fit(lengths, 10, decreasing)


units_strategy = st.lists(st.lists(st.integers(min_value=1, max_value=32), min_size=1, max_size=3), min_size=1,
                          max_size=60)


def windows_of_units(units):
    lengths, unit_windows = [], []
    for unit in units:
        unit_windows.append(list(range(len(lengths), len(lengths) + len(unit))))
        lengths += unit
    return lengths, unit_windows


@settings(max_examples=300, deadline=None)
@given(units=units_strategy, rows=st.integers(min_value=1, max_value=4))
def test_every_micro_batch_the_cutter_forms_fits_the_collators_rows(units, rows):
    """The agreement between the cutters (stage 1's token budgets, the stream's pools) and the
    collator: every micro batch keeps its units whole, fits the fixed rows x length shape, and the
    collator's rows are the ones the cutter placed. Single-window units are stage 1's case."""
    lengths, unit_windows = windows_of_units(units)
    batches = cut_micro_batches(unit_windows, lengths, 0, rows, 32)
    assert batches == reference_cut(unit_windows, lengths, rows, 32)  # the same batches as before
    assert [w for batch in batches for w in batch] == list(range(len(lengths)))
    owner = {w: index for index, unit in enumerate(unit_windows) for w in unit}
    for batch in batches:
        members = {owner[w] for w in batch}
        assert sum(len(unit_windows[m]) for m in members) == len(batch)  # whole units only
        if len(members) > 1:  # a unit too large for the shape alone gets its own micro batch
            assert_packs([lengths[w] for w in batch], rows, row_length=32)
    single = cut_micro_batches([[w] for w in range(len(lengths))], lengths, 0, rows, 32)
    for batch in single:
        assert_packs([lengths[w] for w in batch], rows, row_length=32)


@settings(max_examples=100, deadline=None)
@given(units=units_strategy, size=st.integers(min_value=1, max_value=8))
def test_sentence_micro_batches_hold_whole_units_up_to_their_size(units, size):
    lengths, unit_windows = windows_of_units(units)
    batches = cut_micro_batches(unit_windows, lengths, size)
    assert [w for batch in batches for w in batch] == list(range(len(lengths)))
    owner = {w: index for index, unit in enumerate(unit_windows) for w in unit}
    for batch in batches:  # more windows than the size only when one unit alone has more
        assert len(batch) <= size or len({owner[w] for w in batch}) == 1


def windows_of(encoder_tokenizer, language="de", count=40, max_length=24):
    sentences = read_conll(SAMPLE / language / "dev.tsv", language, max_sentences=count)
    return WindowTokenizer(encoder_tokenizer, LABELS, max_length).encode(sentences).to_list(), sentences


def by_window(batch, values):
    """{sentence id + word offset: the window's values at its tokens}."""
    segments = batch["segment_ids"]
    return {(batch["meta"]["sentence_id"][s], batch["meta"]["word_offset"][s]): values[segments == s]
            for s in range(batch["num_segments"])}


def test_collated_layout_positions_restart_and_lengths_cover_every_token(tiny_tokenizer):
    windows, _ = windows_of(tiny_tokenizer)
    batch = Collator(tiny_tokenizer.pad_token_id, row_length=48, position_offset=2)(windows)
    assert batch["num_segments"] == len(windows) and batch["input_ids"].shape[1] <= 48
    assert batch["input_ids"].shape[0] == len(first_fit_decreasing([len(w["input_ids"]) for w in windows], 48))
    assert batch["real_tokens"] / batch["input_ids"].numel() > 0.95  # filled evenly, cut to the fullest row
    for segment in range(batch["num_segments"]):
        positions = batch["position_ids"][batch["segment_ids"] == segment]
        assert positions.tolist() == list(range(2, 2 + len(positions)))
    assert batch["cu_seqlens"][-1].item() == batch["input_ids"].numel()
    assert batch["max_seqlen"] == int(batch["cu_seqlens"].diff().max())
    assert batch["real_tokens"] == sum(len(w["input_ids"]) for w in windows)
    fixed = Collator(tiny_tokenizer.pad_token_id, row_length=48, rows=60)(windows)
    assert fixed["input_ids"].shape == (60, 48) and fixed["cu_seqlens"][-1].item() == 60 * 48
    with pytest.raises(ValueError, match="need .* rows"):
        Collator(tiny_tokenizer.pad_token_id, row_length=48, rows=10)(windows)


def tiny_model(family: str, vocab_size: int = 4000) -> DualNERModel:
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, pad_token_id=1, max_position_embeddings=130)
    config = XLMRobertaConfig(**common) if family == "xlm-roberta" else BertConfig(**common)
    return DualNERModel(AutoModel.from_config(config, add_pooling_layer=False), 3).eval()


def both_layouts(tokenizer, windows, model, row_length=48):
    packed = Collator(tokenizer.pad_token_id, row_length=row_length, position_offset=model.position_offset)(windows)
    padded = Collator(tokenizer.pad_token_id, packed=False)(windows)
    return packed, padded


def assert_windows_equal(packed, padded, packed_values, padded_values):
    expected, actual = by_window(padded, padded_values), by_window(packed, packed_values)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("family", ["xlm-roberta", "bert"])
def test_encoder_outputs_equal_unpacked(tiny_tokenizer, family):
    model = tiny_model(family)
    windows, _ = windows_of(tiny_tokenizer)
    packed, padded = both_layouts(tiny_tokenizer, windows, model)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    with torch.no_grad():
        outputs = model(**model_inputs(packed)), model(**model_inputs(padded))
    for field in ("seq_logits", "start_logits", "end_logits", "hidden_states"):
        assert_windows_equal(packed, padded, getattr(outputs[0], field), getattr(outputs[1], field))


def test_stage1_losses_and_gradients_equal_unpacked(tiny_tokenizer):
    model = tiny_model("xlm-roberta")
    windows, _ = windows_of(tiny_tokenizer, "en")
    results = []
    for batch in both_layouts(tiny_tokenizer, windows, model):
        model.zero_grad()
        losses = stage1_losses(model(**model_inputs(batch)), batch)
        losses["total"].backward()
        results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (packed_losses, packed_grads), (padded_losses, padded_grads) = results
    for name in ("total", "seq", "start", "end"):
        assert packed_losses[name].item() == pytest.approx(padded_losses[name].item(), abs=TOLERANCE)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=TOLERANCE, rtol=1e-4)


def test_stage2_teacher_pseudo_labels_student_losses_and_mse_equal_unpacked(tiny_tokenizer):
    teacher, student = tiny_model("xlm-roberta"), tiny_model("xlm-roberta")
    torch.manual_seed(1)
    with torch.no_grad():  # a teacher that predicts entities (random heads rarely do)
        for head in (teacher.seq_head, teacher.start_head, teacher.end_head):
            head.weight.normal_(std=2.0)
    windows, _ = windows_of(tiny_tokenizer, "de", count=60)
    for window in windows:  # unlabeled target text
        window["tag_ids"], window["start_ids"], window["end_ids"] = [], [], []
    packed, padded = both_layouts(tiny_tokenizer, windows, teacher)
    computed = []
    for batch in (packed, padded):
        with torch.no_grad():
            teacher_out = teacher(**model_inputs(batch))
        pseudo = build_pseudo_labels(teacher_out, batch["word_index"], batch["segment_ids"],
                                     batch["num_segments"], LABELS)
        student_out = student(**model_inputs(batch))
        losses = stage1_losses(student_out, {"seq_labels": pseudo.seq_labels,
                                             "start_labels": pseudo.start_labels,
                                             "end_labels": pseudo.end_labels})
        representations, present = entity_representations(student_out, pseudo.start_labels, batch["word_index"],
                                                           batch["segment_ids"], batch["num_segments"])
        losses["mse"] = centroid_mse(representations, present)
        computed.append((teacher_out, pseudo, losses, representations, present))
    (t_p, pseudo_p, losses_p, reps_p, present_p), (t_u, pseudo_u, losses_u, reps_u, present_u) = computed
    assert_windows_equal(packed, padded, t_p.start_logits, t_u.start_logits)
    for field in ("seq_labels", "start_labels", "end_labels"):
        assert_windows_equal(packed, padded, getattr(pseudo_p, field), getattr(pseudo_u, field))
    assert pseudo_p.words.item() == pseudo_u.words.item()
    assert pseudo_p.agreement_words.item() == pseudo_u.agreement_words.item()
    assert present_u.any(), "the teacher should predict some entities"
    for name in ("total", "seq", "start", "end", "mse"):
        assert losses_p[name].item() == pytest.approx(losses_u[name].item(), abs=TOLERANCE), name
    # per-window quantities come in segment order: compare them by window
    order_p = [(packed["meta"]["sentence_id"][s], packed["meta"]["word_offset"][s]) for s in range(packed["num_segments"])]
    order_u = [(padded["meta"]["sentence_id"][s], padded["meta"]["word_offset"][s]) for s in range(padded["num_segments"])]
    permutation = [order_p.index(key) for key in order_u]
    torch.testing.assert_close(reps_p[permutation], reps_u, atol=TOLERANCE, rtol=0)
    assert torch.equal(present_p[permutation], present_u)
    assert torch.equal(pseudo_p.entities_per_segment[permutation], pseudo_u.entities_per_segment)


def test_evaluation_equals_unpacked(tiny_tokenizer):
    model = tiny_model("xlm-roberta")
    with torch.no_grad():
        model.start_head.weight.normal_(std=2.0)
        model.end_head.weight.normal_(std=2.0)
    windows, sentences = windows_of(tiny_tokenizer, "de", count=80, max_length=16)
    eval_set = EvalSet("de", sentences, windows)
    results = []
    for packed in (True, False):
        collate = Collator(tiny_tokenizer.pad_token_id, packed=packed, row_length=48,
                           position_offset=model.position_offset)
        for head in ("span", "seq"):
            results.append(evaluate_sets(model, [eval_set], LABELS, head, 16, collate, torch.device("cpu")))
    assert results[0] == results[2] and results[1] == results[3]


def read_losses(run_dir):
    return {entry["step"]: entry for entry in map(json.loads, (run_dir / "losses.jsonl").read_text().splitlines())}


NO_DROPOUT = ["model.dropout=0.0", "model.encoder_dropout=0.0"]


def test_launchers_train_the_same_with_and_without_packing(tmp_path, tiny_encoder):
    """Same micro batches (no length bucketing, stream order), no dropout: both stages log the same
    losses packed and unpacked."""
    common = ["--config", str(REPO / "configs" / "tiny.yaml"), "train.max_steps=4", "train.eval_every=4",
              "train.log_every=1", "train.bucket_multiplier=1", "data.max_train_sentences=128",
              "data.max_eval_sentences=16", f"engine.config={REPO / 'ds_configs' / 'zero0_fp32.json'}",
              *NO_DROPOUT]
    stage2 = ["--config", str(REPO / "configs" / "tiny_stage2.yaml"), "train.max_steps=3", "train.eval_every=3",
              "train.log_every=1", "stage2.bucket_pool=0", "data.max_train_sentences=64",
              "data.max_eval_sentences=16", f"engine.config={REPO / 'ds_configs' / 'zero0_fp32.json'}",
              *NO_DROPOUT]
    runs = {}
    for packing in ("true", "false"):
        first, second = tmp_path / f"s1_{packing}", tmp_path / f"s2_{packing}"
        launch("launchers/stage1.py", [*common, f"run.output_dir={first}", f"data.packing={packing}"])
        launch("launchers/stage2.py", [*stage2, f"run.output_dir={second}", f"stage2.init_from={first}",
                                       f"data.packing={packing}"])
        runs[packing] = (read_losses(first), read_losses(second))
    for stage in (0, 1):
        packed, padded = runs["true"][stage], runs["false"][stage]
        assert packed.keys() == padded.keys()
        for step in packed:
            assert packed[step]["data/packing_efficiency"] > padded[step]["data/packing_efficiency"]
            for name, value in padded[step].items():
                if name.startswith("loss/"):
                    assert packed[step][name] == pytest.approx(value, abs=1e-4), (stage, step, name)


@pytest.mark.parametrize("setting, device, unit, packed", [
    ("auto", "cpu", "sentences", False), ("auto", "cuda", "sentences", True), ("auto", "cpu", "tokens", True),
    (True, "cpu", "sentences", True), (False, "cuda", "sentences", False)])
def test_packing_auto_packs_on_accelerators_and_for_token_budgets(setting, device, unit, packed):
    """data.packing=auto: packed rows on GPUs, padded length buckets on CPU (packing measured slower
    there), packed whenever token budgets need the fixed shape; true/false are obeyed."""

    from dualner.config import Config
    from dualner.data.packing import packs_by_default
    from dualner.errors import ConfigError
    from dualner.job import training_collator
    cfg = Config()
    cfg.data.packing, cfg.train.batch_unit, cfg.train.micro_batch_size = setting, unit, 256
    assert training_collator(cfg, torch.device(device), pad_id=1, position_offset=2).packed is packed
    if unit == "sentences":  # a family whose position ids are unknown is never packed
        assert training_collator(cfg, torch.device(device), pad_id=1, position_offset=None).packed is False
    else:
        with pytest.raises(ConfigError, match="needs packed rows"):
            training_collator(cfg, torch.device(device), pad_id=1, position_offset=None)
    assert packs_by_default(torch.device(device)) is (device != "cpu")
