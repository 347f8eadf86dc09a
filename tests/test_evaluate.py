import torch
import torch.nn.functional as F

from dualner.data.conll import read_conll
from dualner.data.encoding import WindowTokenizer
from dualner.data.packing import Collator
from dualner.evaluate import EvalSet, evaluate_sets
from dualner.labels import LabelSet
from dualner.model import HeadOutputs
from tests.conftest import SAMPLE

LABELS = LabelSet(("LOC", "ORG", "PER"))


def oracle_forward(rows, corrupt_every=0):
    """A 'model' that returns the gold labels as logits (optionally wrong on some sentences), for
    either batch layout.

    Each window's first token is replaced by a unique marker, so the oracle finds every window in a
    row (packed rows hold several) and tells apart windows whose subwords are identical."""
    table = {}
    for number, row in enumerate(rows):
        row["input_ids"][0] = 10_000 + number
        per_position = {}
        for name, column in (("seq", "tag_ids"), ("start", "start_ids"), ("end", "end_ids")):
            values = [row[column][w] if w >= 0 else 0 for w in row["word_index"]]
            if corrupt_every and row["sentence_id"] % corrupt_every == 0:
                values = [0] * len(values)
            per_position[name] = values
        table[row["input_ids"][0]] = per_position

    def forward(input_ids, **_layout):
        outputs = {}
        for name, classes in (("seq", 7), ("start", 4), ("end", 4)):
            labels = torch.zeros(input_ids.shape, dtype=torch.long)
            for r, ids in enumerate(input_ids.tolist()):
                window, offset = None, 0
                for p, token in enumerate(ids):
                    if token >= 10_000:
                        window, offset = table[token], 0
                    if window is not None and offset < len(window[name]):
                        labels[r, p] = window[name][offset]
                        offset += 1
            outputs[name] = F.one_hot(labels, classes).float()
        return HeadOutputs(outputs["seq"], outputs["start"], outputs["end"], outputs["seq"])
    return forward


def test_gold_predictions_score_100_on_both_heads(tiny_tokenizer):
    sentences = read_conll(SAMPLE / "de" / "dev.tsv", "de", max_sentences=80)
    # a short max length forces windows, which must be stitched back together
    rows = WindowTokenizer(tiny_tokenizer, LABELS, max_length=12).encode(sentences).to_list()
    assert len(rows) > len(sentences)
    eval_set = EvalSet("de", sentences, rows)
    forward = oracle_forward(rows)
    for packed in (True, False):
        collate = Collator(tiny_tokenizer.pad_token_id, packed=packed, row_length=24)
        for head in ("span", "seq"):
            results = evaluate_sets(forward, [eval_set], LABELS, head, 16, collate, torch.device("cpu"))
            assert results["per_language"]["de"] == 100.0, (packed, head)


def test_wrong_predictions_lower_f1(tiny_tokenizer):
    sentences = read_conll(SAMPLE / "en" / "dev.tsv", "en", max_sentences=60)
    rows = WindowTokenizer(tiny_tokenizer, LABELS, max_length=64).encode(sentences).to_list()
    forward = oracle_forward(rows, corrupt_every=2)
    results = evaluate_sets(forward, [EvalSet("en", sentences, rows)], LABELS, "span", 16,
                            Collator(tiny_tokenizer.pad_token_id, row_length=64), torch.device("cpu"))
    assert 40.0 < results["per_language"]["en"] < 90.0
    assert results["average"] == results["per_language"]["en"]
