"""What config and policy files share of reading YAML: duplicate keys (PyYAML keeps the last of
two equal keys silently, and a file with one says something it does not mean), and where a
parse error is."""

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


def yaml_problem(exc: yaml.YAMLError) -> tuple[int | None, str]:
    """(1-based line or None, what is wrong) of a parse error, without PyYAML's own text, which
    names the file "<unicode string>"."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    return (mark.line + 1 if mark is not None else None), problem + (
        f" ({context})" if context else ""
    )
