"""``${NAME}`` in a config file's string values, filled from the environment. Pure.

Container deployments keep secrets (an engine's ``api_key``, a Redis URL with its password) and
per-host values (URLs, ports) in the environment, not in a file baked into an image. Values are
filled after YAML parsing and only inside string values, never in keys, so a variable cannot
change the file's structure whatever it holds.

- ``${NAME}``: NAME's value. An unset NAME is an error naming the field, never an empty string
  that would surface later as a confusing failure (an empty api_key, a URL without a host).
- ``${NAME:-default}``: the default when NAME is unset or empty, as in the shell.
- ``$${``: a literal ``${``.

A value that is all one reference (``port: ${PORT}``) becomes the variable's text; the config's
model then reads it as it would the same text in the file (``"8080"`` as a port number).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

# $${ (escape) | ${NAME} | ${NAME:-default} | a "${" that is none of these (malformed)
_REFERENCE: Final = re.compile(
    r"\$\$\{|\$\{(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<default>:-[^}]*)?\})?"
)

Location = tuple[str | int, ...]


class Unfilled(ValueError):
    """A reference that cannot be filled: its variable is unset, or it is not well-formed."""


def fill(text: str, env: Mapping[str, str]) -> str:
    """``text`` with every reference replaced; raises :class:`Unfilled` naming the first bad one."""
    if "${" not in text:
        return text

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "$${":
            return "${"
        name = match.group("name")
        if name is None:
            rest = text[match.start() : match.start() + 24]
            raise Unfilled(f"{rest!r}: write ${{NAME}} or ${{NAME:-default}}, or $${{ for a '${{'")
        value = env.get(name)
        default = match.group("default")
        if default is not None:
            return value if value else default[2:]
        if value is None:
            raise Unfilled(f"${{{name}}}: {name} is not set in the environment")
        return value

    return _REFERENCE.sub(replace, text)


def fill_tree(raw: Any, env: Mapping[str, str]) -> tuple[Any, list[tuple[Location, str]]]:
    """``raw`` (parsed YAML) with every string value filled, and each failure's location and
    message (all of them, so one run names every unset variable)."""
    errors: list[tuple[Location, str]] = []

    def walk(node: Any, loc: Location) -> Any:
        if isinstance(node, str):
            try:
                return fill(node, env)
            except Unfilled as exc:
                errors.append((loc, str(exc)))
                return node
        if isinstance(node, dict):
            return {key: walk(value, (*loc, str(key))) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(item, (*loc, i)) for i, item in enumerate(node)]
        return node

    return walk(raw, ()), errors
