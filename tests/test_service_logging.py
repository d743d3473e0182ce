"""Daemon logs: one plain line per event, the configured level, and never a secret."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

API_KEY = "sk-live-9f8e7d6c5b4a"
TOKEN = "endpoint-token-0123456789"

SCRIPT = textwrap.dedent(
    f"""
    import logging
    from pydantic import SecretStr
    from vramsupply.config import load_settings
    from vramsupply.logging import configure_logging, register_secret

    settings = load_settings().settings
    configure_logging(settings.log_level, [settings.api_key, settings.endpoint_token])
    log = logging.getLogger("vramsupply.test")
    log.debug("debug line")
    log.info("registering with key %s", "{API_KEY}")
    log.warning("token in message {TOKEN}")
    try:
        raise RuntimeError("platform said: bad key {API_KEY}\\nsecond line")
    except RuntimeError:
        log.exception("register failed")
    register_secret(SecretStr("generated-later-token"))
    logging.getLogger("aiohttp.access").info("GET /v1/models?t=generated-later-token 200")
    """
)


def run_logging(level: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VRAM_SUPPLY_API_KEY": API_KEY, "VRAM_SUPPLY_ENDPOINT_TOKEN": TOKEN, "VRAM_SUPPLY_LOG_LEVEL": level}
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=60)


def test_log_lines_mask_secrets_and_fold_tracebacks_onto_one_line() -> None:
    result = run_logging("info")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 4, lines
    assert "registering with key ****" in lines[0]
    assert "token in message ****" in lines[1]
    assert "register failed | Traceback" in lines[2] and "RuntimeError: platform said: bad key **** | second line" in lines[2]
    assert "GET /v1/models?t=**** 200" in lines[3]
    for secret in (API_KEY, TOKEN, "generated-later-token"):
        assert secret not in result.stderr
    assert "\x1b[" not in result.stderr  # not a terminal: no colour


def test_log_level_comes_from_the_environment() -> None:
    assert "debug line" in run_logging("DEBUG").stderr
    quiet = run_logging("ERROR").stderr.splitlines()
    assert len(quiet) == 1 and "register failed" in quiet[0]
