"""The agent's configuration: a YAML file whose every key is optional (the defaults below are the agent
a person gets with no file), read strictly: an unknown key, a wrong type or a bad value is one line
naming the file and the key, never a traceback.

    listen: 127.0.0.1:7464        # UI, API and /metrics; off loopback a bearer token is required
    store: {path: /var/lib/bpfscope/store, flush: 10s, keep: 7d, max_size: 2GB}
    collectors:
      health: {interval: 10s}
      profile: {frequency: 19}
      security: {policies: [/etc/bpfscope/policies/escape.yaml]}
    exporters:
      otlp: {enabled: true, endpoint: http://otel-collector:4318}

Sections are frozen dataclasses: a reload compares them to restart only what changed.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bpfscope.errors import BpfscopeError
from bpfscope.sinks.store import parse_age, parse_size

DEFAULT_LISTEN = "127.0.0.1:7464"
DEFAULT_STORE = "/var/lib/bpfscope/store"


def _setting(default: Any, kind: str, **limits: Any) -> Any:
    """A configuration key: its default and how its YAML value is read (``kind``, with ``low``/``high``
    or ``choices``)."""
    return field(default=default, metadata={"kind": kind, **limits})


@dataclass(frozen=True)
class StoreSection:
    path: str = _setting(DEFAULT_STORE, "str")
    # kill -9 loses at most this much; each flush is a file per table, merged by the hour.
    flush: float = _setting(10.0, "duration", low=1.0, high=3600.0)
    keep: float = _setting(7 * 86400.0, "duration", low=3600.0)
    max_size: int = _setting(2 << 30, "size", low=1 << 20)


@dataclass(frozen=True)
class HealthSection:
    enabled: bool = _setting(True, "bool")
    interval: float = _setting(10.0, "duration", low=1.0, high=3600.0)


@dataclass(frozen=True)
class ProfileSection:
    enabled: bool = _setting(True, "bool")
    # 19 Hz: a prime, so it does not beat with periodic work, and the cheapest useful rate.
    frequency: int = _setting(19, "int", low=1, high=1000)
    interval: float = _setting(10.0, "duration", low=1.0, high=3600.0)
    # Frame pointers, stacks counted in the kernel: always on under the network-analysis mesh's load,
    # 0.96% of the machine and 156 MB, where copying stacks for DWARF unwinding here costs 3.1% and
    # 288 MB (docs/benchmarks.md). Code built without frame pointers loses its callers, and Python's
    # functions are named only from copied stacks: "dwarf" for those.
    unwind: str = _setting("fp", "choice", choices=("dwarf", "fp"))


@dataclass(frozen=True)
class OffcpuSection:
    enabled: bool = _setting(False, "bool")  # every context switch: off unless asked for
    interval: float = _setting(10.0, "duration", low=1.0, high=3600.0)


@dataclass(frozen=True)
class SecuritySection:
    enabled: bool = _setting(True, "bool")
    default_policy: bool = _setting(True, "bool")
    policies: tuple[str, ...] = _setting((), "paths")
    exec_events: bool = _setting(True, "bool")
    # The lifecycle ring (a power of two; the hits' ring gets half): 8 MiB overflowed when 30,000
    # processes ended at once (counted); a host with such storms gives it more.
    ring_size: int = _setting(8 << 20, "size", low=1 << 20, high=1 << 30, power_of_two=True)


@dataclass(frozen=True)
class RequestsSection:
    enabled: bool = _setting(True, "bool")
    # Payloads and secret header values are redacted unless this says otherwise.
    redact: bool = _setting(True, "bool")
    capture_bytes: int = _setting(4096, "int", low=64, high=16384)
    tls: bool = _setting(True, "bool")


@dataclass(frozen=True)
class Collectors:
    health: HealthSection = field(default_factory=HealthSection)
    profile: ProfileSection = field(default_factory=ProfileSection)
    offcpu: OffcpuSection = field(default_factory=OffcpuSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    requests: RequestsSection = field(default_factory=RequestsSection)


@dataclass(frozen=True)
class PrometheusSection:
    enabled: bool = _setting(True, "bool")
    # Label sets per metric: past this, new ones are counted under "_other" (a scrape stays bounded).
    max_series: int = _setting(2000, "int", low=10, high=1_000_000)


@dataclass(frozen=True)
class OtlpSection:
    enabled: bool = _setting(False, "bool")
    endpoint: str = _setting("http://127.0.0.1:4318", "url")
    headers: tuple[tuple[str, str], ...] = _setting((), "headers")
    interval: float = _setting(10.0, "duration", low=1.0, high=3600.0)


@dataclass(frozen=True)
class ProfilesSection:
    """pprof pushed to a Pyroscope or Parca ingest endpoint after each profile window."""

    enabled: bool = _setting(False, "bool")
    endpoint: str = _setting("http://127.0.0.1:4040", "url")
    kind: str = _setting("pyroscope", "choice", choices=("pyroscope", "parca"))
    headers: tuple[tuple[str, str], ...] = _setting((), "headers")


@dataclass(frozen=True)
class Exporters:
    prometheus: PrometheusSection = field(default_factory=PrometheusSection)
    otlp: OtlpSection = field(default_factory=OtlpSection)
    profiles: ProfilesSection = field(default_factory=ProfilesSection)


@dataclass(frozen=True)
class UiSection:
    enabled: bool = _setting(True, "bool")


@dataclass(frozen=True)
class AgentConfig:
    listen: str = _setting(DEFAULT_LISTEN, "listen")
    # A file holding the bearer token clients must send (required when listen is not loopback).
    token_file: str | None = _setting(None, "path")
    node: str | None = _setting(None, "str")  # the node's name (default: the host name)
    store: StoreSection = field(default_factory=StoreSection)
    collectors: Collectors = field(default_factory=Collectors)
    exporters: Exporters = field(default_factory=Exporters)
    ui: UiSection = field(default_factory=UiSection)

    @property
    def node_name(self) -> str:
        """``node``, else $NODE_NAME (a Kubernetes pod's spec.nodeName), else the host name."""
        import socket

        return self.node or os.environ.get("NODE_NAME") or socket.gethostname()

    @property
    def host_port(self) -> tuple[str, int]:
        return split_listen(self.listen)

    @property
    def loopback(self) -> bool:
        host, _ = self.host_port
        return host == "localhost" or ipaddress.ip_address(host).is_loopback

    def token(self) -> str | None:
        """The bearer token (None on loopback without a token file); an error where one is needed and
        missing."""
        if self.token_file is None:
            if not self.loopback:
                raise BpfscopeError(
                    f"listening on {self.listen} needs a bearer token",
                    "set token_file in the config, or listen on 127.0.0.1",
                )
            return None
        try:
            token = Path(self.token_file).read_text().strip()
        except OSError as exc:
            raise BpfscopeError(f"cannot read token_file {self.token_file}: {exc.strerror}") from None
        if len(token) < 16:
            raise BpfscopeError(f"token_file {self.token_file}: the token must be at least 16 characters")
        return token


def split_listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:7464``, ``[::1]:7464``, ``0.0.0.0:7464``, ``localhost:7464`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("not HOST:PORT")
    if host != "localhost":
        ipaddress.ip_address(host)  # ValueError for a name: the agent binds addresses, it resolves none
    return host, int(port)


def _read(kind: str, value: Any, meta: dict[str, Any]) -> Any:
    """A YAML value as the key's kind wants it; ValueError says why not."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if kind in ("int", "duration", "size"):
        if isinstance(value, bool):
            raise ValueError("must be a number")
        if kind == "int":
            if not isinstance(value, int):
                raise ValueError("must be a whole number")
            number: float = value
        elif isinstance(value, int | float):
            number = float(value) if kind == "duration" else int(value)
        else:
            try:
                number = parse_age(str(value)) if kind == "duration" else parse_size(str(value))
            except BpfscopeError as exc:
                raise ValueError(str(exc)) from None
        if ("low" in meta and number < meta["low"]) or ("high" in meta and number > meta["high"]):
            raise ValueError(f"must be between {meta.get('low', 0):g} and {meta.get('high', float('inf')):g}")
        if meta.get("power_of_two") and int(number) & (int(number) - 1):
            raise ValueError("must be a power of two (say 16MB)")
        return number
    if kind == "choice":
        if value not in meta["choices"]:
            raise ValueError(f"must be one of {', '.join(meta['choices'])}")
        return value
    if kind == "paths":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("must be a list of paths")
        return tuple(value)
    if kind == "headers":
        if not isinstance(value, dict) or not all(isinstance(v, str | int) for v in value.values()):
            raise ValueError("must be a mapping of header names to values")
        return tuple((str(k), str(v)) for k, v in value.items())
    if not isinstance(value, str) or not value:
        raise ValueError("must be a string")
    if kind == "listen":
        try:
            split_listen(value)
        except ValueError:
            raise ValueError("must be ADDRESS:PORT with an IP address (say 127.0.0.1:7464)") from None
    if kind == "url" and not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return value


def _section(cls: type, node: Any, where: str, source: str) -> Any:
    if node is None:
        return cls()
    if not isinstance(node, dict):
        raise BpfscopeError(f"{source}: {where or 'the file'} must be a mapping of keys to values")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in node.items():
        name = str(key).replace("-", "_")
        path = f"{where}.{key}" if where else str(key)
        spec = known.get(name)
        if spec is None:
            raise BpfscopeError(f"{source}: {path}: unknown key (known here: {', '.join(known)})")
        if "kind" not in spec.metadata:  # a nested section
            values[name] = _section(spec.default_factory, value, path, source)  # type: ignore[misc]
            continue
        if value is None and spec.default is None:  # null where the default is null
            values[name] = None
            continue
        try:
            values[name] = _read(spec.metadata["kind"], value, spec.metadata)
        except ValueError as exc:
            raise BpfscopeError(f"{source}: {path}: {exc} (got {value!r})") from None
    return cls(**values)


def parse_config(text: str, source: str = "<config>") -> AgentConfig:
    import yaml

    try:
        node = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise BpfscopeError(f"{source}: {problem}{where}") from None
    config = _section(AgentConfig, node, "", source)
    for path in config.collectors.security.policies:
        if not os.path.isfile(path):
            raise BpfscopeError(f"{source}: collectors.security.policies: no such file {path}")
    return config


def load_config(path: str | None, store: str | None = None, listen: str | None = None) -> AgentConfig:
    """The file's configuration (defaults without one), with the command line's --store and --listen."""
    if path is None:
        config = AgentConfig()
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise BpfscopeError(f"cannot read config {path}: {exc.strerror}") from None
        config = parse_config(text, path)
    if store is not None:
        config = replace(config, store=replace(config.store, path=store))
    if listen is not None:
        try:
            split_listen(listen)
        except ValueError:
            raise BpfscopeError(f"--listen {listen}: not HOST:PORT (say 127.0.0.1:7464)") from None
        config = replace(config, listen=listen)
    config.token()  # a token where one is needed, before anything starts
    return config
