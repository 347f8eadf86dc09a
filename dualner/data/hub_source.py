"""`hf:NAME[:CONFIG]@SPLIT`: a `datasets` dataset (a hub name, or a local folder) with a `tokens`
column, streamed rather than downloaded whole. Each dataset shard is a piece that cannot be entered
in the middle: a position is a record index in the shard, and resuming skips that many records
(hub streams replay)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from dualner.data.corpus import BadRecord
from dualner.data.source import Source
from dualner.errors import ConfigError, DataFormatError

HUB_PREFIX = "hf:"


class HubSource(Source):
    kind = "hf"
    position_unit = "records"

    def __init__(self, spec: str):
        self.path = spec
        rest = spec[len(HUB_PREFIX):]
        name, _, split = rest.rpartition("@")
        if not name:
            raise DataFormatError(f"{spec}: expected hf:NAME[:CONFIG]@SPLIT")
        self.name, self.split = name, split

    @classmethod
    def open(cls, path: str, key: str) -> HubSource:
        return cls(path)

    def identity(self) -> list:
        return [self.path]

    def _stream(self):
        import datasets
        name, config = (self.name, "") if Path(self.name).exists() else self.name.partition(":")[::2]
        return datasets.load_dataset(name, config or None, split=self.split, streaming=True)

    def unsplit_pieces(self) -> list[tuple[int, int]]:
        """One piece per dataset shard: (shard index, shards)."""
        shards = max(1, self._stream().num_shards)
        return [(index, shards) for index in range(shards)]

    def records(self, start: int, end: int, pass_: int, cursor: int, seed_key: int
                ) -> Iterator[tuple[int, int, dict | BadRecord]]:
        stream = self._stream()
        if end > 1:
            stream = stream.shard(num_shards=end, index=start)
        for index, record in enumerate(stream.skip(max(0, cursor)) if cursor > 0 else stream):
            position = max(0, cursor) + index
            if "tokens" not in record:
                yield position, position + 1, BadRecord(self.path, position, None,
                                                        f"record has no 'tokens' column (columns: {sorted(record)})")
                continue
            yield position, position + 1, {
                "words": list(record["tokens"]), "tags": [], "language": record.get("lang") or "",
                "src_id": str(record.get("src_id") or ""), "sample_id": f"{self.path}#{start}.{position}"}

    def unit(self, record: dict | BadRecord, language: str, kind: str, pass_: int, labeled: bool
             ) -> list | BadRecord:
        if isinstance(record, BadRecord):
            return record
        record["language"] = record["language"] or language
        record["kind"], record["pass"] = kind, pass_
        return [record]

    # pairing_id stays '': a hub translation is not paired with its source (nor checked for src_ids)

    def reads_before(self, position: int) -> bool:
        return position > 0

    def count(self, key: str) -> tuple[int, bool]:
        raise ConfigError(f"{key}: stage2.mix=size counts every corpus's sentences, which a hub dataset "
                          f"({self.path}) does not tell in advance; use stage2.mix=equal")
