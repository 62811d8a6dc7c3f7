"""The rollout state of one engine as a small pure state machine, and its start-up rule.

    none ──(config names a canary)──▶ canary ──promote──▶ promoted
                                        │  ▲ share
                                        └──rollback (admin or judge)──▶ rolled_back

``stable`` is the replica set serving the engine's traffic outside the canary's share; after a
promotion it is the former canary. Every transition returns a new state with ``rev`` + 1 (a
replica of the proxy fleet applies a state from Redis when its ``rev`` is newer).

Start-up rule (``resolve_at_startup``): a persisted state remembers the configuration it was
made from (``basis``). If the config's stable part (version, urls, model) is unchanged, the
persisted state wins, so a restart with the old config keeps a promotion, a rollback or an
admin-set share; a share edited in the config applies to a running canary (the edit is newer
than an admin's share). If the config now names another stable, the config wins and the rollout
starts over. If only the canary part changed (another canary version or replica set), the config's
new canary starts on top of the persisted stable (a previous promotion is kept); a canary removed
from the config is removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import orjson

Status = Literal["none", "canary", "promoted", "rolled_back"]
STATUSES: tuple[Status, ...] = ("none", "canary", "promoted", "rolled_back")


class RolloutConflict(Exception):
    """A transition that does not apply to the current state (e.g. promote with no canary)."""


@dataclass(frozen=True, slots=True)
class ReplicaSet:
    """A set of replicas serving one version of an engine."""

    version: str  # "auto" for a stable whose version is discovered from the engine
    urls: tuple[str, ...]
    model: str  # the model name the replicas serve (sent upstream)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "urls": list(self.urls), "model": self.model}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ReplicaSet:
        return cls(
            version=str(raw["version"]),
            urls=tuple(str(u) for u in raw["urls"]),
            model=str(raw["model"]),
        )


@dataclass(frozen=True, slots=True)
class ConfiguredRollout:
    """What the config file says about one engine."""

    engine: str
    stable: ReplicaSet
    canary: ReplicaSet | None
    share: float

    def stable_basis(self) -> str:
        return _fingerprint(self.stable.to_json())

    def canary_basis(self) -> str:
        return _fingerprint(self.canary.to_json() if self.canary else None)


@dataclass(frozen=True, slots=True)
class RolloutState:
    engine: str
    stable: ReplicaSet
    canary: ReplicaSet | None = None
    share: float = 0.0
    status: Status = "none"
    reason: str = ""
    changed_at: float = 0.0  # unix seconds of the last transition
    previous: str | None = None  # the version the last promote or rollback took out of service
    rev: int = 0
    stable_basis: str = ""  # fingerprints of the config this state was derived from
    canary_basis: str = ""
    share_basis: float | None = None  # the config's canary share (None: from an older file)

    # -- transitions (pure) ------------------------------------------------------------------

    def promote(self, *, now: float, reason: str = "admin") -> RolloutState:
        if self.canary is None or self.status != "canary":
            raise RolloutConflict(f"engine {self.engine!r} has no canary to promote")
        return dataclasses.replace(
            self,
            stable=self.canary,
            canary=None,
            share=0.0,
            status="promoted",
            reason=reason,
            changed_at=now,
            previous=self.stable.version,
            rev=self.rev + 1,
        )

    def rollback(self, *, now: float, reason: str = "admin") -> RolloutState:
        if self.canary is None or self.status != "canary":
            raise RolloutConflict(f"engine {self.engine!r} has no canary to roll back")
        return dataclasses.replace(
            self,
            canary=None,
            share=0.0,
            status="rolled_back",
            reason=reason,
            changed_at=now,
            previous=self.canary.version,
            rev=self.rev + 1,
        )

    def with_share(self, share: float, *, now: float) -> RolloutState:
        if self.canary is None or self.status != "canary":
            raise RolloutConflict(f"engine {self.engine!r} has no canary whose share to set")
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {share}")
        return dataclasses.replace(
            self, share=share, reason=f"share set to {share:g}", changed_at=now, rev=self.rev + 1
        )

    # -- reading -----------------------------------------------------------------------------

    def served_versions(self) -> set[str]:
        versions = {self.stable.version}
        if self.canary is not None:
            versions.add(self.canary.version)
        return versions

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "stable": self.stable.to_json(),
            "canary": self.canary.to_json() if self.canary else None,
            "share": self.share,
            "status": self.status,
            "reason": self.reason,
            "changed_at": self.changed_at,
            "previous": self.previous,
            "rev": self.rev,
            "stable_basis": self.stable_basis,
            "canary_basis": self.canary_basis,
            "share_basis": self.share_basis,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RolloutState:
        status = raw.get("status", "none")
        if status not in STATUSES:
            raise ValueError(f"unknown rollout status {status!r}")
        canary = raw.get("canary")
        share = float(raw.get("share", 0.0))
        # (a hand-edited file: nothing the transitions could have made goes into service)
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {share}")
        if status == "canary" and not canary:
            raise ValueError("status canary with no canary replica set")
        return cls(
            engine=str(raw["engine"]),
            stable=ReplicaSet.from_json(raw["stable"]),
            canary=ReplicaSet.from_json(canary) if canary else None,
            share=share,
            status=status,
            reason=str(raw.get("reason", "")),
            changed_at=float(raw.get("changed_at", 0.0)),
            previous=raw.get("previous"),
            rev=int(raw.get("rev", 0)),
            stable_basis=str(raw.get("stable_basis", "")),
            canary_basis=str(raw.get("canary_basis", "")),
            share_basis=float(raw["share_basis"]) if raw.get("share_basis") is not None else None,
        )


def from_config(config: ConfiguredRollout, *, now: float, rev: int = 0) -> RolloutState:
    """The state a configuration alone describes."""
    return RolloutState(
        engine=config.engine,
        stable=config.stable,
        canary=config.canary,
        share=config.share if config.canary else 0.0,
        status="canary" if config.canary else "none",
        reason="configured",
        changed_at=now,
        rev=rev,
        stable_basis=config.stable_basis(),
        canary_basis=config.canary_basis(),
        share_basis=config.share,
    )


def resolve_at_startup(
    config: ConfiguredRollout, persisted: RolloutState | None, *, now: float
) -> RolloutState:
    """The state to serve with at start-up (the rule is in the module docstring)."""
    if persisted is None or persisted.engine != config.engine:
        return from_config(config, now=now)
    if persisted.stable_basis != config.stable_basis():
        return from_config(config, now=now, rev=persisted.rev + 1)
    if persisted.canary_basis == config.canary_basis():
        return _follow_config_share(config, persisted, now=now)
    if config.canary is None:
        if persisted.status != "canary":
            return dataclasses.replace(persisted, canary_basis=config.canary_basis())
        return dataclasses.replace(
            persisted,
            canary=None,
            share=0.0,
            status="none",
            reason="canary removed from the config",
            changed_at=now,
            previous=persisted.canary.version if persisted.canary else None,
            rev=persisted.rev + 1,
            canary_basis=config.canary_basis(),
            share_basis=config.share,
        )
    canary = config.canary
    if canary.version == persisted.stable.version:
        # The configured canary is the version already promoted: nothing left to roll out.
        return dataclasses.replace(
            persisted, canary_basis=config.canary_basis(), share_basis=config.share
        )
    return dataclasses.replace(
        persisted,
        canary=canary,
        share=config.share,
        status="canary",
        reason="configured",
        changed_at=now,
        rev=persisted.rev + 1,
        canary_basis=config.canary_basis(),
        share_basis=config.share,
    )


def _follow_config_share(
    config: ConfiguredRollout, persisted: RolloutState, *, now: float
) -> RolloutState:
    """A share edited in the config applies to the running canary (the edit is newer than any
    admin-set share); an unchanged one leaves the persisted share, admin-set or not."""
    if persisted.share_basis == config.share:
        return persisted
    if persisted.share_basis is None or persisted.status != "canary":
        # (a file from before the basis was kept, or no canary to apply it to: just remember it)
        return dataclasses.replace(persisted, share_basis=config.share)
    return dataclasses.replace(
        persisted,
        share=config.share,
        reason=f"share set to {config.share:g} by the config",
        changed_at=now,
        rev=persisted.rev + 1,
        share_basis=config.share,
    )


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
