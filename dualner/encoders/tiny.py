"""A tiny random XLM-R encoder with a tokenizer learned from the embedded data sample (for tests).

Built deterministically, so every rank and every machine gets the same weights and vocabulary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "panx-sample"
COMPLETE_MARKER = "dualner_tiny.json"
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _sample_words() -> list[str]:
    words = []
    for path in sorted(SAMPLE_DIR.glob("*/train.tsv")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                words.append(line.split("\t")[0])
    if not words:
        raise FileNotFoundError(f"tiny-random needs the embedded data sample under {SAMPLE_DIR}")
    return words


def build_tokenizer(vocab_size: int = 3000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="<unk>", max_input_chars_per_word=100))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                        show_progress=False)
    tokenizer.train_from_iterator(_sample_words(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", cls_token="<s>",
                                   eos_token="</s>", sep_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>", model_max_length=512)


def build_tiny_encoder(output: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    output = Path(output)
    if (output / COMPLETE_MARKER).exists():
        return output
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = build_tokenizer()
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=2, intermediate_size=2 * hidden,
                              max_position_embeddings=514, pad_token_id=1, bos_token_id=0,
                              eos_token_id=2, hidden_dropout_prob=0.1,
                              attention_probs_dropout_prob=0.1)
    torch.manual_seed(seed)
    model = XLMRobertaModel(config, add_pooling_layer=False)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / COMPLETE_MARKER).write_text(json.dumps({"hidden": hidden, "layers": layers, "seed": seed}))
    shutil.rmtree(output, ignore_errors=True)
    staging.rename(output)
    return output
