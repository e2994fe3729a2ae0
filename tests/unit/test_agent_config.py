"""The agent's configuration: defaults without a file, every key read strictly, and each mistake one
line naming the file and the key (the command exits 2 with it, never a traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bpfscope.agent.agent import DEFAULT_CONFIG
from bpfscope.agent.config import AgentConfig, load_config, parse_config
from bpfscope.errors import BpfscopeError


def test_the_printed_defaults_are_the_defaults() -> None:
    assert parse_config(DEFAULT_CONFIG) == AgentConfig()
    # Every section of the dataclasses is in the printed file, and the file names no other.
    printed = yaml.safe_load(DEFAULT_CONFIG)
    assert set(printed["collectors"]) == {"health", "profile", "offcpu", "security", "requests"}
    assert set(printed["exporters"]) == {"prometheus", "otlp", "profiles"}


def test_values_are_read_in_their_units() -> None:
    config = parse_config(
        """
        listen: "[::1]:9000"
        store: {path: /tmp/s, flush: 2s, keep: 12h, max_size: 500MB}
        collectors:
          profile: {frequency: 49, unwind: fp}
          security: {enabled: false}
        exporters:
          otlp: {enabled: true, endpoint: "http://127.0.0.1:4318", headers: {x-tenant: a}}
        """
    )
    assert config.host_port == ("::1", 9000) and config.loopback
    assert (config.store.flush, config.store.keep, config.store.max_size) == (2.0, 43200.0, 500 << 20)
    assert config.collectors.profile.frequency == 49 and config.collectors.profile.unwind == "fp"
    assert not config.collectors.security.enabled
    assert parse_config("collectors: {security: {ring_size: 64MB}}").collectors.security.ring_size == 64 << 20
    assert config.exporters.otlp.headers == (("x-tenant", "a"),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("collectors: {profil: {}}", "collectors.profil: unknown key"),
        ("store: {flush: soon}", "store.flush: not an age"),
        ("store: {flush: 0.1}", "store.flush: must be between 1 and 3600"),
        ("collectors: {profile: {frequency: 19.5}}", "collectors.profile.frequency: must be a whole number"),
        ("collectors: {profile: {unwind: lbr}}", "collectors.profile.unwind: must be one of dwarf, fp"),
        ("collectors: {health: {enabled: yes please}}", "collectors.health.enabled: must be true or false"),
        ("listen: example.com:80", "listen: must be ADDRESS:PORT with an IP address"),
        ("exporters: {otlp: {endpoint: collector:4318}}", "exporters.otlp.endpoint: must be an http"),
        ("collectors: [health]", "collectors must be a mapping"),
        ("collectors: {security: {policies: [/no/such/policy.yaml]}}", "no such file /no/such/policy.yaml"),
        ("store: {path: [", "at line 1"),
        ("collectors: {security: {ring_size: 12MB}}", "security.ring_size: must be a power of two"),
        ("collectors: {security: {ring_size: 64KB}}", "collectors.security.ring_size: must be between"),
    ],
)
def test_a_mistake_is_one_line_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(BpfscopeError) as caught:
        parse_config(text, "agent.yaml")
    assert str(caught.value).startswith("agent.yaml: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_off_loopback_a_token_is_required(tmp_path: Path) -> None:
    with pytest.raises(BpfscopeError, match="needs a bearer token"):
        load_config(None, listen="0.0.0.0:7464")
    short = tmp_path / "short"
    short.write_text("abc\n")
    config = tmp_path / "agent.yaml"
    config.write_text(f"listen: 0.0.0.0:7464\ntoken_file: {short}\n")
    with pytest.raises(BpfscopeError, match="at least 16 characters"):
        load_config(str(config))
    short.write_text("s3cret-s3cret-s3cret\n")
    assert load_config(str(config)).token() == "s3cret-s3cret-s3cret"
    # On loopback none is needed, and one given is still required of clients.
    assert load_config(None).token() is None


def test_the_command_line_wins_over_the_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("listen: 127.0.0.1:1\nstore: {path: /a}\n")
    loaded = load_config(str(config), store="/b", listen="127.0.0.1:2")
    assert (loaded.store.path, loaded.listen) == ("/b", "127.0.0.1:2")


@pytest.mark.parametrize(
    "args",
    [
        ["--config", "/no/such/agent.yaml"],
        ["--listen", "nowhere"],
        ["--listen", "0.0.0.0:7464"],
        ["--duration", "-1"],
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bpfscope", "agent", "--store", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("bpfscope: error: ")
