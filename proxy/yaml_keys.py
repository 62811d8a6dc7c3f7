"""Duplicate keys in a YAML document: PyYAML keeps the last of two equal keys silently, and a
config or policy file with one says something it does not mean."""

from __future__ import annotations

from collections.abc import Iterator

import yaml


def duplicate_keys(node: yaml.Node, path: str = "") -> Iterator[tuple[int, str]]:
    """(1-based line, dotted field) of every key repeated in its mapping, at any depth."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            field = f"{path}.{name}" if path else name
            if name in seen:
                yield key.start_mark.line + 1, field
            seen.add(name)
            yield from duplicate_keys(value, field)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from duplicate_keys(item, f"{path}.{i}")
