"""Random-weight encoder folders with the XLM-R SentencePiece tokenizer (250,002 pieces), for speed
measurements where the weights do not matter (the GPU check; no hub is reachable there).

    python bench/random_encoder.py --tokenizer tokenizer.json.gz --out /tmp/enc --shapes xlmr-base,mini

- xlmr-base: xlm-roberta-base's shape (the documented default encoder): hidden 768, 12 layers,
  12 heads, FF 3072, vocab 250,002, 514 positions; 278M parameters, 85M outside the embeddings.
- mini: the same layout at hidden 64, 2 layers (dry runs on a CPU).
Each folder holds config.json + model.safetensors + tokenizer files, loadable as `model.encoder`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

SHAPES = {"xlmr-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
          "mini": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)}
VOCAB = 250002
TOKENIZER_CONFIG = {"backend": "tokenizers", "add_prefix_space": True, "bos_token": "<s>", "cls_token": "<s>",
                    "eos_token": "</s>", "mask_token": "<mask>", "model_max_length": 512, "pad_token": "<pad>",
                    "sep_token": "</s>", "tokenizer_class": "XLMRobertaTokenizer", "unk_token": "<unk>"}


def build(name: str, out: Path, tokenizer: Path) -> Path:
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel
    folder = out / name
    if (folder / "model.safetensors").is_file():
        return folder
    staging = out / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    config = XLMRobertaConfig(vocab_size=VOCAB, **SHAPES[name], pad_token_id=1, bos_token_id=0, eos_token_id=2,
                              max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
    torch.manual_seed(0)
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(staging)
    opener = gzip.open if tokenizer.suffix == ".gz" else open
    with opener(tokenizer, "rb") as source, open(staging / "tokenizer.json", "wb") as target:
        shutil.copyfileobj(source, target)
    (staging / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="an XLM-R tokenizer.json (or .json.gz)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/enc"))
    parser.add_argument("--shapes", default="xlmr-base")
    args = parser.parse_args()
    for name in args.shapes.split(","):
        print(f"{name}: {build(name, args.out, args.tokenizer)}")


if __name__ == "__main__":
    main()
