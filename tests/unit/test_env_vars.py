"""``${NAME}`` references in config values: filled from the environment, errors named."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.env_vars import Unfilled, fill, fill_tree
from proxy.settings import ConfigError, parse_settings

NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True)
PLAIN = st.text(st.characters(blacklist_characters="$"), max_size=20)


def test_references_defaults_and_escapes() -> None:
    env = {"HOST": "10.0.0.5", "EMPTY": ""}
    assert fill("http://${HOST}:8101", env) == "http://10.0.0.5:8101"
    assert fill("${PORT:-8000}", env) == "8000"
    assert fill("${EMPTY:-fallback}", env) == "fallback"  # as the shell: empty takes the default
    assert fill("${HOST:-other}", env) == "10.0.0.5"
    assert fill("${EMPTY}", env) == ""  # set but empty, no default: the empty value
    assert fill("$${HOST} costs $5", env) == "${HOST} costs $5"
    assert fill("no references", env) == "no references"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("${MISSING}", "MISSING is not set"),
        ("redis://:${MISSING}@host", "MISSING is not set"),
        ("${}", "write ${NAME}"),
        ("${1ABC}", "write ${NAME}"),
        ("${UNCLOSED", "write ${NAME}"),
        ("${A B}", "write ${NAME}"),
    ],
)
def test_bad_references_are_named(text: str, says: str) -> None:
    with pytest.raises(Unfilled, match=says.replace("$", r"\$").replace("{", r"\{")):
        fill(text, {"A": "x"})


@given(prefix=PLAIN, name=NAMES, value=PLAIN, suffix=PLAIN)
def test_a_reference_is_replaced_by_exactly_its_value(
    prefix: str, name: str, value: str, suffix: str
) -> None:
    assert fill(prefix + "${" + name + "}" + suffix, {name: value}) == prefix + value + suffix


@given(text=PLAIN)
def test_text_without_references_is_unchanged(text: str) -> None:
    assert fill(text, {}) == text


@given(value=st.text(max_size=30))
def test_a_value_is_never_filled_again(value: str) -> None:
    # A variable holding "${OTHER}" or "$${" is taken as is: one pass, no recursion.
    assert fill("${V}", {"V": value, "OTHER": "no"}) == value


def test_the_tree_fills_values_not_keys_and_names_every_failure() -> None:
    raw = {"${K}": "a", "list": ["${V}", 3, {"deep": "${GONE}"}], "other": "${ALSO_GONE:-ok}"}
    filled, errors = fill_tree(raw, {"K": "key", "V": "value"})
    assert filled == {"${K}": "a", "list": ["value", 3, {"deep": "${GONE}"}], "other": "ok"}
    assert errors == [(("list", 2, "deep"), "${GONE}: GONE is not set in the environment")]


CONFIG = """\
server: {host: 127.0.0.1, port: "${PORT:-8000}"}
engines:
  - name: small
    model: m
    urls: ["${SMALL_URL}"]
    api_key: ${VLLM_KEY}
cache: {backend: redis}
redis: {url: "redis://:${REDIS_PASSWORD}@10.0.0.9:6379/0"}
"""


def test_a_config_takes_urls_ports_and_secrets_from_the_environment() -> None:
    env = {
        "SMALL_URL": "http://10.0.0.7:8101",
        "VLLM_KEY": "sk-engine",
        "REDIS_PASSWORD": "hunter2",
        "PORT": "9000",
    }
    settings = parse_settings(CONFIG, source="frugal.yaml", env=env)
    assert settings.server.port == 9000  # the text "9000", read as the port number
    assert settings.engines[0].urls == ["http://10.0.0.7:8101"]
    assert settings.engines[0].api_key == "sk-engine"
    assert settings.redis is not None
    assert settings.redis.url == "redis://:hunter2@10.0.0.9:6379/0"
    assert parse_settings(CONFIG, env={**env, "PORT": ""}).server.port == 8000


def test_an_unset_variable_names_the_file_line_field_and_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(CONFIG, source="frugal.yaml", env={"SMALL_URL": "http://h:1"})
    message = str(caught.value)
    assert "frugal.yaml:6: engines.0.api_key: ${VLLM_KEY}: VLLM_KEY is not set" in message
    assert "frugal.yaml:8: redis.url: ${REDIS_PASSWORD}" in message
    assert "SMALL_URL" not in message


def test_a_filled_value_is_checked_like_one_written_in_the_file() -> None:
    env = {"SMALL_URL": "ftp://h", "VLLM_KEY": "k", "REDIS_PASSWORD": "p"}
    with pytest.raises(ConfigError, match=r"frugal.yaml:5: engines.0.urls"):
        parse_settings(CONFIG, source="frugal.yaml", env=env)
