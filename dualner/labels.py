"""Label sets and the conversions between BIO tags, entities and start/end tags (SPEC "Conversions").

All conversions are pure functions over word-level sequences. Start/end tags use class 0 for "no
entity boundary here" and class k+1 for entity type k of the label set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

OUTSIDE = "O"
IGNORE_INDEX = -100  # label of positions no loss reads (non-first subwords, special tokens, padding)


class Entity(NamedTuple):
    first_word: int
    last_word: int  # inclusive
    entity_type: str


@dataclass(frozen=True)
class LabelSet:
    """Entity types (sorted) and the derived BIO tag vocabulary: O, B-T1, I-T1, B-T2, I-T2, ..."""

    entity_types: tuple[str, ...]

    @classmethod
    def from_tags(cls, tags: Sequence[str]) -> "LabelSet":
        types = {tag[2:] for tag in tags if tag != OUTSIDE}
        return cls(tuple(sorted(types)))

    @property
    def bio_tags(self) -> list[str]:
        tags = [OUTSIDE]
        for entity_type in self.entity_types:
            tags += [f"B-{entity_type}", f"I-{entity_type}"]
        return tags

    def tag_id(self, tag: str) -> int:
        return self.bio_tags.index(tag)

    def span_class(self, entity_type: str) -> int:
        return self.entity_types.index(entity_type) + 1

    def span_type(self, span_class: int) -> str:
        return self.entity_types[span_class - 1]


def is_valid_tag(tag: str) -> bool:
    return tag == OUTSIDE or (len(tag) > 2 and tag[:2] in ("B-", "I-"))


def extract_entities(tags: Sequence[str]) -> list[Entity]:
    """BIO tags -> entities, reading chunks as conlleval/seqeval do: an `I-X` after `O` or after
    another type opens a new chunk."""
    entities: list[Entity] = []
    open_start, open_type = -1, None
    for index, tag in enumerate(tags):
        prefix, entity_type = (tag[0], tag[2:]) if tag != OUTSIDE else ("O", None)
        continues = prefix == "I" and entity_type == open_type
        if open_type is not None and not continues:
            entities.append(Entity(open_start, index - 1, open_type))
            open_type = None
        if prefix in ("B", "I") and not continues:
            open_start, open_type = index, entity_type
    if open_type is not None:
        entities.append(Entity(open_start, len(tags) - 1, open_type))
    return entities


def entities_to_start_end(entities: Sequence[Entity], length: int,
                          label_set: LabelSet) -> tuple[list[int], list[int]]:
    starts, ends = [0] * length, [0] * length
    for entity in entities:
        span_class = label_set.span_class(entity.entity_type)
        starts[entity.first_word] = span_class
        ends[entity.last_word] = span_class
    return starts, ends


def extract_span(tags: Sequence[str], label_set: LabelSet) -> tuple[list[int], list[int]]:
    """ExtractSpan: BIO tags -> (start tags, end tags)."""
    return entities_to_start_end(extract_entities(tags), len(tags), label_set)


def decode_spans(starts: Sequence[int], ends: Sequence[int], label_set: LabelSet) -> list[Entity]:
    """Start/end tags -> non-overlapping entities.

    Left to right: a start of type k at word i is closed by the nearest end of type k at a word
    j >= i that comes before the next predicted start (of any type); starts with no such end are
    dropped. The next entity cannot begin before the next start, so entities never overlap.
    """
    start_positions = [index for index, tag in enumerate(starts) if tag != 0]
    entities: list[Entity] = []
    for position_index, first in enumerate(start_positions):
        span_class = starts[first]
        limit = (start_positions[position_index + 1] if position_index + 1 < len(start_positions)
                 else len(starts))
        for last in range(first, limit):
            if ends[last] == span_class:
                entities.append(Entity(first, last, label_set.span_type(span_class)))
                break
    return entities


def sequential(entities: Sequence[Entity], length: int) -> list[str]:
    """Sequential: entities -> BIO tags (B- on the first word, I- on the rest, O elsewhere)."""
    tags = [OUTSIDE] * length
    for entity in entities:
        tags[entity.first_word] = f"B-{entity.entity_type}"
        for index in range(entity.first_word + 1, entity.last_word + 1):
            tags[index] = f"I-{entity.entity_type}"
    return tags
