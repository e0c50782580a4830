"""The ``fleet.toml`` models: what the daemon, ``check`` and the plan consume.

All durations are float seconds and all sizes int bytes once parsed (see
:mod:`supervisor.config.units`). Models are frozen and reject unknown keys. Loading a
file (TOML, environment overrides, cross-agent checks, one-line errors) lives
in :mod:`supervisor.config.load`; these models only validate what one section
can know on its own.

Validation context (``model_validate(..., context=...)``) used by the loader:
``config_dir`` (Path: resolves relative paths, default working dir and state
dir) and ``namespace`` (str: default agent streams and dead-letter keys).

One job in one file (over ~400 lines on purpose): the models reference each
other (``[defaults]`` into ``[[agents]]`` into the fleet) and are read as one
schema (docs/CONFIG.md is checked against them).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core_bus.keys import DEFAULT_NAMESPACE, StreamKeyBuilder
from core_bus.settings import redact_url
from core_bus.streams.patterns import is_pattern, pattern_problem
from supervisor.config.listen import parse_listen
from supervisor.config.units import parse_duration, parse_size

#: Longest duration any setting accepts: 30 days (a typo like "1000000000h" is refused).
MAX_DURATION = 30 * 86400.0
#: Longest stop/drain timeout: an hour (a stop must end; 1e300 s would hang forever).
MAX_STOP_TIMEOUT = 3600.0
#: Fleet-wide and per-agent worker limits (defaults of ``max_workers``/``max_replicas``).
DEFAULT_MAX_WORKERS = 1024
DEFAULT_MAX_REPLICAS = 64
#: Longest agent or supervisor name, consumer group and stream name.
MAX_NAME = 64
MAX_KEY = 512


def _bounded_duration(seconds: float) -> float:
    if seconds > MAX_DURATION:
        raise ValueError(
            f"duration {seconds:g}s is too long: at most 30 days ({MAX_DURATION:.0f}s)"
        )
    return seconds


def _not_bool(value: Any) -> Any:
    """TOML ``true`` is no number: pydantic would read it as 1."""
    if isinstance(value, bool):
        raise ValueError(f"must be an integer, not {str(value).lower()}")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_bounded_duration)]
"""Seconds; from ``"250ms"``/``"30s"``/``"5m"`` or a TOML number of seconds (<= 30 days)."""

Size = Annotated[int, BeforeValidator(parse_size)]
"""Bytes; from ``"512MiB"``/``"100MB"`` or a TOML integer of bytes."""

Int = Annotated[int, BeforeValidator(_not_bool)]
"""An integer that refuses booleans (``replicas = true`` is an error, not 1)."""


def _reject_nul(value: Any, path: str = "") -> None:
    """No NUL (or other control character but tab) anywhere in a string: argv, env,
    paths and Redis key names reach the kernel or a child, which cannot carry them."""
    if isinstance(value, str):
        bad = next((ch for ch in value if ord(ch) < 32 and ch != "\t"), None)
        if bad is not None:
            where = f" in {path}" if path else ""
            what = "a NUL byte" if bad == "\x00" else f"control character {bad!r}"
            raise ValueError(f"contains {what}{where}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _reject_nul(key, f"key {str(key)!r}")
            _reject_nul(item, f"{key!s}" if not path else f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _reject_nul(item, f"item {index}" if not path else f"{path}[{index}]")


RestartPolicy = Literal["always", "on-failure", "never"]
LogFormat = Literal["auto", "json", "console"]

EMBEDDED = "embedded"
AGENT_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]+$")
HANDLER_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SUPERVISOR_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
REDIS_SCHEMES = ("redis", "rediss", "unix")


def _no_spaces(value: str) -> str:
    """A non-empty name without white space (namespace, consumer group)."""
    if not value or re.search(r"\s", value):
        raise ValueError("must be a non-empty string without spaces")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_control_characters(cls, value: Any) -> Any:
        _reject_nul(value)
        return value


def _context_dir(info: ValidationInfo) -> Path | None:
    ctx = info.context if isinstance(info.context, dict) else {}
    value = ctx.get("config_dir")
    return Path(value) if value is not None else None


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = _context_dir(info)
    path = path.expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return path


# -- [supervisor] --------------------------------------------------------------------------


class SupervisorConfig(_Model):
    """``[supervisor]``: identity of this supervisor and its own timings."""

    name: str = Field(default_factory=socket.gethostname, max_length=MAX_NAME)
    state_dir: Path = Path(".ag1")
    stop_timeout: Duration = Field(default=10.0, gt=0, le=MAX_STOP_TIMEOUT)
    sweep_interval: Duration = Field(default=5.0, gt=0)
    log_format: LogFormat = "auto"
    #: Most workers the whole fleet may run (the sum of every agent's replicas).
    max_workers: Int = Field(default=DEFAULT_MAX_WORKERS, ge=1, le=100_000)
    #: Fleet membership lease in Redis, renewed every third of it; a supervisor not
    #: renewing for this long is dead to the others (its entries are reclaimed).
    lease_ttl: Duration = Field(default=3.0, ge=1.0, le=60.0)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not SUPERVISOR_NAME_RE.fullmatch(value):
            raise ValueError(
                f"invalid name {value!r}: use letters, digits, '.', '_' or '-' "
                "(it becomes part of consumer names)"
            )
        return value

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)


# -- [redis] -------------------------------------------------------------------------------


class RedisConfig(_Model):
    """``[redis]``: where the bus lives. The password only ever comes from the environment."""

    url: str = "redis://127.0.0.1:6379/0"
    namespace: str = DEFAULT_NAMESPACE
    embedded_port: Int = Field(default=0, ge=0, le=65535)
    password: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value == EMBEDDED:
            return value
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ValueError(f"invalid Redis URL {redact_url(value)!r}: {exc}") from None
        if parts.scheme not in REDIS_SCHEMES:
            raise ValueError(
                f"invalid Redis URL {redact_url(value)!r}: scheme must be redis://, "
                'rediss:// or unix:// (or the word "embedded")'
            )
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError(f"invalid Redis URL {redact_url(value)!r}: no host")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return _no_spaces(value)

    @property
    def embedded(self) -> bool:
        """True when the supervisor must start its bundled redis-server."""
        return self.url == EMBEDDED

    def effective_url(self, embedded_url: str | None = None) -> str:
        """The URL to connect to, with the password inserted (never log it).

        For ``url = "embedded"`` pass the running server's URL as ``embedded_url``:
        it already carries the server's own generated password.

        :raises ValueError: for an embedded Redis when ``embedded_url`` is missing.
        """
        url = self.url
        if self.embedded:
            if embedded_url is None:
                raise ValueError("embedded Redis: pass the running server's URL")
            return embedded_url
        if self.password is None:
            return url
        return with_password(url, self.password.get_secret_value())

    def redacted_url(self) -> str:
        """The URL as it may be logged or printed."""
        return self.url if self.embedded else redact_url(self.effective_url())

    # -- connection modes and durability (issue 16) --------------------------------------
    #: ``standalone`` (default), ``sentinel`` (``sentinels`` + ``master_name``; ``url``
    #: then only gives credentials, db and TLS) or ``cluster`` (``url`` = any seed node).
    mode: Literal["standalone", "sentinel", "cluster"] = "standalone"
    sentinels: list[str] = Field(default_factory=list)
    master_name: str | None = None
    #: The sentinels' own password: only from AG1_REDIS__SENTINEL_PASSWORD or
    #: REDIS_SENTINEL_PASSWORD.
    sentinel_password: SecretStr | None = None
    #: ``replicated``: WAIT for ``replicas_to_wait`` replicas (up to ``wait_timeout``)
    #: after publishes, acks and dead-letter writes (docs/DELIVERY.md).
    durability: Literal["none", "replicated"] = "none"
    replicas_to_wait: Int = Field(default=1, ge=1, le=100)
    wait_timeout: Duration = Field(default=1.0, gt=0, le=60.0)

    @field_validator("sentinels")
    @classmethod
    def _sentinels(cls, value: list[str]) -> list[str]:
        from core_bus.connection import ConnectionConfigError, parse_sentinels

        for item in value:
            try:
                parse_sentinels([item])
            except ConnectionConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    def mode_problems(self) -> list[tuple[tuple[str, ...], str]]:
        """What the chosen mode still needs or contradicts, one ``(loc, message)`` each."""
        out: list[tuple[tuple[str, ...], str]] = []
        if self.mode == "standalone":
            return out
        if self.embedded:
            out.append(
                (
                    ("redis", "mode"),
                    f'the embedded Redis is standalone; mode = "{self.mode}" '
                    'needs url (cluster: a seed node) or mode = "standalone"',
                )
            )
            return out
        if self.url.startswith("unix:"):
            out.append((("redis", "url"), f"a unix socket cannot be used with mode {self.mode}"))
        if self.mode == "sentinel":
            if not self.sentinels:
                out.append(
                    (
                        ("redis", "sentinels"),
                        'mode = "sentinel" needs sentinels = ["host:port", ...]',
                    )
                )
            if not self.master_name:
                out.append((("redis", "master_name"), 'mode = "sentinel" needs master_name'))
        elif self.sentinels or self.master_name:
            field = "sentinels" if self.sentinels else "master_name"
            out.append((("redis", field), f'only used with mode = "sentinel", not "{self.mode}"'))
        if self.mode == "cluster" and self.durability == "replicated":
            out.append(
                (
                    ("redis", "durability"),
                    'durability = "replicated" is not supported with mode = "cluster" '
                    "(WAIT has no key to route it to the node of the write); "
                    'use mode = "sentinel" for it, or durability = "none"',
                )
            )
        return out

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        from core_bus.connection import parse_sentinels

        return parse_sentinels(self.sentinels)

    def describe(self) -> str:
        """The Redis as ``check`` and the logs name it (no secrets)."""
        from core_bus.connection import describe_target

        if self.embedded:
            return "embedded redis-server"
        return describe_target(
            self.redacted_url(), self.mode, self.sentinel_addresses(), self.master_name
        )


def with_password(url: str, password: str) -> str:
    """``url`` with its password replaced by ``password`` (username kept)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        # unix:///path?password=...: redis-py reads credentials from the query.
        query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("password="))
        query = (query + "&" if query else "") + "password=" + quote(password, safe="")
        return f"unix://{parts.netloc}{parts.path}?{query}"  # urlunsplit would drop "//"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = quote(parts.username or "", safe="") if parts.username else ""
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# -- [http] --------------------------------------------------------------------------------


class HttpConfig(_Model):
    """``[http]``: health, metrics and control API. ``token`` only from the environment."""

    enabled: bool = True
    listen: str = "127.0.0.1:8765"
    request_timeout: Duration = Field(default=5.0, gt=0)
    max_body: Size = Field(default=64 * 1024, gt=0)
    #: Host names (besides loopback and the listen address) clients may send in ``Host``.
    allowed_hosts: list[str] = Field(default_factory=list)
    token: SecretStr | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]

    @property
    def loopback_only(self) -> bool:
        """True when only this machine can reach the API (no token needed then)."""
        host = self.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


# -- [defaults] and [[agents]] -----------------------------------------------------------


class AgentSettings(_Model):
    """Keys valid both in ``[defaults]`` and in each ``[[agents]]`` table."""

    restart: RestartPolicy = "always"
    backoff_initial: Duration = Field(default=0.5, gt=0)
    backoff_max: Duration = Field(default=30.0, gt=0)
    backoff_reset_after: Duration = Field(default=30.0, ge=0)
    start_limit: Int = Field(default=5, ge=1, le=10_000)
    start_limit_window: Duration = Field(default=60.0, gt=0)
    start_timeout: Duration = Field(default=30.0, gt=0)
    start_seconds: Duration = Field(default=1.0, ge=0)
    success_exit_codes: list[Int] = Field(default_factory=lambda: [0])
    stop_timeout: Duration = Field(default=10.0, gt=0, le=MAX_STOP_TIMEOUT)
    memory_limit: Size | None = Field(default=None, gt=0)
    watchdog: Duration | None = Field(default=None, gt=0)
    concurrency: Int = Field(default=16, ge=1, le=10_000)
    count: Int = Field(default=100, ge=1, le=10_000)
    max_deliveries: Int = Field(default=5, ge=1, le=10_000)
    claim_idle: Duration = Field(default=15.0, gt=0)
    sweep_interval: Duration | None = Field(default=None, gt=0)
    #: 0 turns the limit off; a handler past it is cancelled (a failed attempt)
    handler_timeout: Duration = Field(default=900.0, ge=0)
    #: a cancelled handler still running after this is stuck: the worker is replaced
    handler_timeout_grace: Duration = Field(default=10.0, gt=0)
    #: a worker that dies within this long after READY restarted unstably (start_limit)
    min_uptime: Duration = Field(default=10.0, ge=0)
    #: dead letters kept per group (approximate trim; 0 keeps all)
    dead_letter_maxlen: Int = Field(default=100_000, ge=0, le=1_000_000_000)
    discovery_interval: Duration = Field(default=5.0, gt=0)
    max_surge: Int = Field(default=1, ge=0, le=10_000)
    max_unavailable: Int = Field(default=0, ge=0, le=10_000)
    #: Most replicas this agent may be scaled to (config, reload and the control API).
    max_replicas: Int = Field(default=DEFAULT_MAX_REPLICAS, ge=1, le=10_000)
    env: dict[str, str] = Field(default_factory=dict)
    working_dir: Path | None = None

    @field_validator("success_exit_codes")
    @classmethod
    def _exit_codes(cls, value: list[int]) -> list[int]:
        for code in value:
            if not 0 <= code <= 255:
                raise ValueError(f"exit code {code} out of range 0..255")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not ENV_NAME_RE.fullmatch(key):
                raise ValueError(f"invalid environment variable name {key!r}")
        return value

    @field_validator("working_dir")
    @classmethod
    def _working_dir(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve(value, info)

    @model_validator(mode="after")
    def _cross_fields(self) -> AgentSettings:
        if self.backoff_max < self.backoff_initial:
            raise ValueError(
                f"backoff_max ({self.backoff_max:g}s) must be >= "
                f"backoff_initial ({self.backoff_initial:g}s)"
            )
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("max_surge and max_unavailable cannot both be 0")
        return self


class AgentDefaults(AgentSettings):
    """``[defaults]``: inherited by every agent; an agent's own value wins."""


class AgentConfig(AgentSettings):
    """One ``[[agents]]`` table, fully resolved (defaults applied) by the loader.

    Built directly (tests), ``group`` defaults to the name and ``streams`` to the
    agent inbox in the context's namespace (``"AG1"`` without context).
    ``working_dir`` is always an absolute path after :func:`load_config`.
    """

    name: str = Field(max_length=MAX_NAME)
    handler: str | None = Field(default=None, max_length=MAX_KEY)
    command: list[str] | None = None
    group: str = Field(default="", max_length=MAX_KEY)
    streams: list[str] = Field(default_factory=list, min_length=1, max_length=1000)
    replicas: Int = Field(default=1, ge=0)
    shards: Int = Field(default=0, ge=0, le=1024)
    ordered: bool = False
    after: list[str] = Field(default_factory=list)
    #: Whether the workers read the agent's group (see :attr:`uses_bus`).
    bus: bool | None = None

    _namespace: str = PrivateAttr(default=DEFAULT_NAMESPACE)
    _cluster: bool = PrivateAttr(default=False)

    @model_validator(mode="before")
    @classmethod
    def _fill_derived(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        # An invalid or missing name is reported once; derive the rest from a clean form.
        given = data.get("name")
        name = re.sub(r"[^a-zA-Z0-9_-]", "_", given) if isinstance(given, str) else ""
        name = name or "_"
        if data.get("group") is None:
            data["group"] = name
        if data.get("streams") is None:
            keys = StreamKeyBuilder(_context_namespace(info), cluster=_context_cluster(info))
            data["streams"] = [keys.agent_inbox(name)]
        if data.get("working_dir") is None:
            base = _context_dir(info)
            if base is not None:
                data["working_dir"] = base
        return data

    def model_post_init(self, context: Any) -> None:
        if isinstance(context, dict) and isinstance(context.get("namespace"), str):
            self._namespace = context["namespace"]
        if isinstance(context, dict):
            self._cluster = context.get("cluster") is True

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not AGENT_NAME_RE.fullmatch(value):
            raise ValueError(f"invalid name {value!r}: use letters, digits, '_' or '-'")
        return value

    @field_validator("handler")
    @classmethod
    def _handler(cls, value: str | None) -> str | None:
        if value is not None and not HANDLER_RE.fullmatch(value):
            raise ValueError(f"invalid handler {value!r}: expected 'package.module:function'")
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not value[0]):
            raise ValueError("must be a non-empty list whose first element is the program")
        return value

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        return _no_spaces(value)

    @field_validator("streams")
    @classmethod
    def _streams(cls, value: list[str], info: ValidationInfo) -> list[str]:
        seen: set[str] = set()
        keys = StreamKeyBuilder(_context_namespace(info))
        for stream in value:
            if not stream or re.search(r"[\s,]", stream):
                raise ValueError(f"invalid stream name {stream!r} (no spaces or commas)")
            if len(stream) > MAX_KEY:
                raise ValueError(f"stream name {stream[:40]!r}... is longer than {MAX_KEY}")
            if stream in seen:
                raise ValueError(f"stream {stream!r} listed twice")
            seen.add(stream)
            if is_pattern(stream):
                problem = pattern_problem(stream, keys)
                if problem:
                    raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _agent_rules(self) -> AgentConfig:
        if (self.handler is None) == (self.command is None):
            both = "both given" if self.handler is not None else "neither given"
            raise ValueError(f"set exactly one of handler or command ({both})")
        if self.ordered and self.shards <= 1:
            raise ValueError("ordered = true requires shards > 1")
        if self.shards > 1 and self.stream_patterns:
            raise ValueError(
                f"stream pattern {self.stream_patterns[0]!r} cannot be sharded: shards split "
                "streams known in advance, a pattern's streams appear at run time "
                "(list plain stream names, or drop shards/ordered)"
            )
        if self.handler is not None and self.bus is False:
            raise ValueError("bus = false is only for command agents (a handler always reads)")
        if self.replicas > self.max_replicas:
            raise ValueError(
                f"replicas ({self.replicas}) is more than max_replicas ({self.max_replicas}); "
                "raise max_replicas if you mean it"
            )
        return self

    @property
    def uses_bus(self) -> bool:
        """The workers read the group as ``AG1_CONSUMER``: reclaim, sweep and nudges apply.

        Handler agents always do; a command agent only when it says so with
        ``bus = true`` (otherwise nothing is claimed to its consumer name and it
        is never sent SIGUSR1, which would kill a program that does not handle it).
        """
        return self.kind == "handler" if self.bus is None else self.bus

    @property
    def kind(self) -> Literal["handler", "command"]:
        return "handler" if self.handler is not None else "command"

    @property
    def namespace(self) -> str:
        """The Redis key namespace this agent's keys were built with."""
        return self._namespace

    @property
    def keys(self) -> StreamKeyBuilder:
        return StreamKeyBuilder(self._namespace, cluster=self._cluster)

    @property
    def stream_patterns(self) -> list[str]:
        """The entries of ``streams`` that are glob patterns (followed as streams appear)."""
        return [s for s in self.streams if is_pattern(s)]

    @property
    def read_streams(self) -> list[str]:
        """What the workers read: each of ``streams`` (patterns as written), expanded into
        its shards. The streams a pattern matches are found at run time."""
        if self.shards <= 1:
            return list(self.streams)
        keys = self.keys
        out: list[str] = []
        for stream in self.streams:
            out.extend(keys.shard_streams(stream, self.shards))
        return out

    @property
    def dlq_stream(self) -> str:
        return self.keys.dead_letter(self.group)

    def worker_names(self) -> list[str]:
        """``["echo/0", "echo/1", ...]`` for the configured replicas."""
        return [f"{self.name}/{i}" for i in range(self.replicas)]


def _context_cluster(info: ValidationInfo) -> bool:
    ctx = info.context if isinstance(info.context, dict) else {}
    return ctx.get("cluster") is True


def _context_namespace(info: ValidationInfo) -> str:
    ctx = info.context if isinstance(info.context, dict) else {}
    value = ctx.get("namespace")
    return value if isinstance(value, str) else DEFAULT_NAMESPACE


# -- the whole file -------------------------------------------------------------------------


class FleetConfig(_Model):
    """A loaded ``fleet.toml``: every section validated, every agent resolved."""

    path: Path
    config_dir: Path
    hash: str
    supervisor: SupervisorConfig
    redis: RedisConfig
    http: HttpConfig
    defaults: AgentDefaults
    agents: list[AgentConfig]
    #: Legal but probably unintended settings, one line each (never fatal).
    warnings: list[str] = Field(default_factory=list)

    def agent(self, name: str) -> AgentConfig:
        """The agent called ``name``.

        :raises KeyError: when there is none.
        """
        for agent in self.agents:
            if agent.name == name:
                return agent
        raise KeyError(name)

    @property
    def agent_names(self) -> list[str]:
        return [agent.name for agent in self.agents]


SECTION_MODELS: dict[str, type[BaseModel]] = {
    "supervisor": SupervisorConfig,
    "redis": RedisConfig,
    "http": HttpConfig,
    "defaults": AgentDefaults,
}
"""Top-level tables of fleet.toml (besides ``[[agents]]``) and their models."""

TOP_LEVEL_KEYS: tuple[str, ...] = (*SECTION_MODELS, "agents")
"""Every key allowed at the top of fleet.toml, in the order problems are reported."""

SECRET_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "redis": {
        "password": ("AG1_REDIS__PASSWORD", "REDIS_PASSWORD"),
        "sentinel_password": ("AG1_REDIS__SENTINEL_PASSWORD", "REDIS_SENTINEL_PASSWORD"),
    },
    "http": {"token": ("AG1_HTTP__TOKEN", "AG1_CONTROL_TOKEN")},
}
"""Fields that may only come from the environment: the variables to read, first wins."""
