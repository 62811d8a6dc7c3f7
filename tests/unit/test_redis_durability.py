"""The warning about budgets kept in a Redis that forgets them on a restart."""

from __future__ import annotations

from proxy.policy.redis_limits import Persistence, durability_warning


def test_persistence_from_config_get() -> None:
    assert Persistence.from_config({"appendonly": "no", "save": ""}) == Persistence(False, False)
    assert Persistence.from_config({"appendonly": "yes", "save": ""}) == Persistence(True, False)
    assert Persistence.from_config({"appendonly": "no", "save": "3600 1 300 100"}) == Persistence(
        False, True
    )
    assert Persistence.from_config({}) == Persistence(None, None)  # CONFIG refused


def test_warned_only_when_budgets_would_be_forgotten() -> None:
    forgets = Persistence(aof=False, rdb=False)
    warning = durability_warning(forgets, ["pro", "free"])
    assert warning is not None and "free, pro" in warning and "appendonly" in warning
    assert durability_warning(forgets, []) is None  # no budget: rate counters may reset
    assert durability_warning(Persistence(aof=True, rdb=False), ["pro"]) is None
    assert durability_warning(Persistence(aof=False, rdb=True), ["pro"]) is None


def test_unknown_settings_are_said_to_be_unknown() -> None:
    warning = durability_warning(Persistence(aof=None, rdb=None), ["pro"])
    assert warning is not None and "could not read" in warning
    # one setting readable and on is enough
    assert durability_warning(Persistence(aof=None, rdb=True), ["pro"]) is None
