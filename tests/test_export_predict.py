"""Export from a ZeRO-3 checkpoint written by 2 ranks, then predict: the same entities as evaluation
from the checkpoint itself; the export loads with transformers alone."""

import json

import pytest
import torch
from transformers import AutoModelForTokenClassification

from dualner.data.conll import read_conll
from dualner.data.encoding import WindowTokenizer
from dualner.evaluate import predict_tags
from dualner.model_io import export_model, inference_collator, load_exported, load_trained_model
from dualner.labels import Entity, sequential
from dualner.predict import predict_file
from tests.conftest import REPO, SAMPLE, launch


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tiny_encoder):
    run = tmp_path_factory.mktemp("export") / "run"
    launch("launchers/stage1.py", ["--config", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={run}",
                                   f"engine.config={REPO / 'ds_configs' / 'zero3_fp32.json'}",
                                   "train.max_steps=30", "train.eval_every=15", "train.lr=3.0e-3",
                                   "data.max_eval_sentences=20", "data.max_train_sentences=2000"], nproc=2)
    return run


def test_export_predict_matches_checkpoint_evaluation(zero3_run, tmp_path):
    exported = tmp_path / "exported"
    launch("launchers/export.py", ["--checkpoint", str(zero3_run), "--output", str(exported)])
    sentences = read_conll(SAMPLE / "de" / "dev.tsv", "de", max_sentences=60)
    source = tmp_path / "input.jsonl"
    source.write_text("".join(json.dumps({"tokens": s.words}) + "\n" for s in sentences))
    output = tmp_path / "entities.jsonl"
    for head in ("span", "seq"):
        launch("launchers/predict.py", ["--model", str(exported), "--input", str(source),
                                        "--output", str(output), "--head", head])
        predicted = [json.loads(line) for line in output.read_text().splitlines()]
        assert [p["tokens"] for p in predicted] == [s.words for s in sentences]
        from_export = [sequential([Entity(e["start"], e["end"] - 1, e["type"]) for e in p["entities"]],
                                  len(p["tokens"])) for p in predicted]
        loaded = load_trained_model(zero3_run)
        rows = WindowTokenizer(loaded.tokenizer, loaded.label_set, loaded.max_length).encode(sentences).to_list()
        from_checkpoint = predict_tags(loaded.model, rows, loaded.label_set, head, 16,
                                       inference_collator(loaded, torch.device("cpu")), torch.device("cpu"))
        if head == "seq":  # evaluation reads raw BIO argmax; entities re-read as chunks are the same
            from dualner.labels import extract_entities
            from_checkpoint = {i: sequential(extract_entities(t), len(t)) for i, t in from_checkpoint.items()}
        assert from_export == [from_checkpoint[i] for i in range(len(sentences))], head
        for p in predicted:
            for entity in p["entities"]:
                assert 0.0 < entity["score"] <= 1.0 and entity["text"]


def test_export_loads_with_transformers_alone(zero3_run, tmp_path):
    exported = export_model(zero3_run, tmp_path / "exported")
    hf_model = AutoModelForTokenClassification.from_pretrained(exported).eval()
    assert hf_model.config.id2label[0] == "O" and len(hf_model.config.id2label) == 7
    ours = load_exported(exported).model
    ids = torch.randint(5, 200, (2, 9))
    with torch.no_grad():
        assert torch.allclose(hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits,
                              ours(ids, torch.ones_like(ids)).seq_logits, atol=1e-5)
    reference = load_trained_model(zero3_run).model
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[name]), name  # encoder and all three heads


def test_plain_text_and_conll_inputs(zero3_run, tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("Angela Merkel besuchte Paris .\n\nBerlin\n")
    conll = tmp_path / "input.tsv"
    conll.write_text("Angela\nMerkel\tB-PER\n\nBerlin\n")
    for path, expected in ((text, [["Angela", "Merkel", "besuchte", "Paris", "."], ["Berlin"]]),
                           (conll, [["Angela", "Merkel"], ["Berlin"]])):
        output = tmp_path / f"{path.suffix}.jsonl"
        assert predict_file(zero3_run, path, output) == len(expected)
        assert [json.loads(line)["tokens"] for line in output.read_text().splitlines()] == expected
