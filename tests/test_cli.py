"""The `loop-sync` command as an operator meets it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import typer
from cryptography.fernet import Fernet
from typer.testing import CliRunner

from loop_sync.cli import app

runner = CliRunner()


def _commands(group: typer.Typer, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for command in group.registered_commands:
        assert command.callback is not None
        yield (*prefix, command.name or command.callback.__name__.replace("_", "-"))
    for sub in group.registered_groups:
        assert sub.typer_instance is not None
        assert sub.name is not None
        yield from _commands(sub.typer_instance, (*prefix, sub.name))


@pytest.mark.parametrize("command", list(_commands(app)), ids=" ".join)
def test_every_command_has_help_with_an_example(command: tuple[str, ...]) -> None:
    """`--help` of each command explains it and shows a runnable example."""
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    example = next(line for line in result.output.splitlines() if "Example:" in line)
    assert f"loop-sync {' '.join(command)}" in example


def test_keys_generate_prints_a_usable_fernet_key() -> None:
    """The printed key encrypts and decrypts, and two calls give different keys."""
    first = runner.invoke(app, ["keys", "generate"]).output.strip()
    second = runner.invoke(app, ["keys", "generate"]).output.strip()
    assert first != second
    token = Fernet(first.encode()).encrypt(b"x")
    assert Fernet(first.encode()).decrypt(token) == b"x"


def test_config_shows_settings_with_secrets_masked(
    monkeypatch: pytest.MonkeyPatch, fernet_key: str
) -> None:
    """An operator can check the configuration without exposing the client secret."""
    monkeypatch.setenv("LOOP_CLIENT_ID", "my-app")
    monkeypatch.setenv("LOOP_CLIENT_SECRET", "very-secret-999")
    monkeypatch.setenv("LOOP_REDIRECT_URI", "http://localhost:8000/callback")
    monkeypatch.setenv("LOOP_SYNC_ENCRYPTION_KEYS", fernet_key)
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    assert "my-app" in result.output
    assert "very-secret-999" not in result.output
    assert fernet_key not in result.output


def test_sandbox_command_serves_discovery_and_says_how_to_use_it() -> None:
    """`loop-sync sandbox --port P --auto-approve` serves discovery and prints the env to set."""
    port = 18765 + os.getpid() % 1000
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "loop_sync", "sandbox", "--port", str(port), "--auto-approve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/.well-known/openid-configuration"
    try:
        while True:
            try:
                response = httpx.get(url, timeout=0.5)
                break
            except httpx.TransportError:
                if time.monotonic() - started > 10 or process.poll() is not None:
                    raise
                time.sleep(0.05)
    finally:
        process.terminate()
        output = process.communicate(timeout=10)[0].decode()
    assert response.json()["issuer"] == f"http://127.0.0.1:{port}"
    assert f"LOOP_ISSUER=http://127.0.0.1:{port}" in output
