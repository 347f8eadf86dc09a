import torch
import torch.nn.functional as F

from dualner.data.conll import read_conll
from dualner.data.encoding import IGNORE_INDEX, SentenceEncoder, collate
from dualner.evaluate import EvalSet, evaluate_sets
from dualner.labels import LabelSet
from dualner.model import HeadOutputs
from tests.conftest import SAMPLE

LABELS = LabelSet(("LOC", "ORG", "PER"))


def oracle_forward(rows, pad_id, corrupt_every=0):
    """A 'model' that returns the gold labels as logits (optionally wrong on some sentences).

    Each row's first token is replaced by a unique marker so that the oracle can tell apart
    windows whose subwords are identical."""
    table = {}
    for number, row in enumerate(rows):
        row["input_ids"][0] = 10_000 + number
        table[row["input_ids"][0]] = (row["sentence_id"], collate([row], pad_id))

    def forward(input_ids, attention_mask):
        outputs = {"seq": [], "start": [], "end": []}
        for ids, mask in zip(input_ids, attention_mask):
            sentence_id, batch = table[int(ids[0])]
            width = ids.shape[0]
            for name, classes in (("seq", 7), ("start", 4), ("end", 4)):
                labels = batch[f"{name}_labels"][0].clone()
                labels[labels == IGNORE_INDEX] = 0
                if corrupt_every and sentence_id % corrupt_every == 0:
                    labels[:] = 0
                padded = torch.zeros(width, dtype=torch.long)
                padded[:labels.shape[0]] = labels
                outputs[name].append(F.one_hot(padded, classes).float())
        stacked = {k: torch.stack(v) for k, v in outputs.items()}
        return HeadOutputs(stacked["seq"], stacked["start"], stacked["end"], stacked["seq"])
    return forward


def test_gold_predictions_score_100_on_both_heads(tiny_tokenizer):
    sentences = read_conll(SAMPLE / "de" / "dev.tsv", "de", max_sentences=80)
    # a short max length forces windows, which must be stitched back together
    rows = SentenceEncoder(tiny_tokenizer, LABELS, max_length=12).encode(sentences).to_list()
    assert len(rows) > len(sentences)
    eval_set = EvalSet("de", sentences, rows)
    forward = oracle_forward(rows, tiny_tokenizer.pad_token_id)
    for head in ("span", "seq"):
        results = evaluate_sets(forward, [eval_set], LABELS, head, 16, tiny_tokenizer.pad_token_id,
                                torch.device("cpu"))
        assert results["per_language"]["de"] == 100.0


def test_wrong_predictions_lower_f1(tiny_tokenizer):
    sentences = read_conll(SAMPLE / "en" / "dev.tsv", "en", max_sentences=60)
    rows = SentenceEncoder(tiny_tokenizer, LABELS, max_length=64).encode(sentences).to_list()
    forward = oracle_forward(rows, tiny_tokenizer.pad_token_id, corrupt_every=2)
    results = evaluate_sets(forward, [EvalSet("en", sentences, rows)], LABELS, "span", 16,
                            tiny_tokenizer.pad_token_id, torch.device("cpu"))
    assert 40.0 < results["per_language"]["en"] < 90.0
    assert results["average"] == results["per_language"]["en"]
