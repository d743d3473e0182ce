"""Private files (the config file with its API key, the registration record): written whole or not
at all, 0600, through a link the user made, never onto what is no regular file, in UTF-8 whatever
the locale, and a link loop reported in one line by the commands that write them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from vramsupply.config import make_private_dirs, write_private_file


def test_a_private_file_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    write_private_file(path, 'api_key = "first"\n')
    with pytest.raises(UnicodeEncodeError):  # fails mid-write, as a full disk would
        write_private_file(path, 'api_key = "sec\ud800ond"\n')
    assert path.read_text() == 'api_key = "first"\n', "the old file is whole"
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"], "and nothing is left beside it"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_private_file_follows_a_link_and_refuses_what_is_no_file(tmp_path: Path) -> None:
    kept = tmp_path / "dotfiles" / "vramsupply.toml"
    kept.parent.mkdir()
    kept.write_text("")
    link = tmp_path / "config.toml"
    link.symlink_to(kept)
    write_private_file(link, 'api_key = "k"\n')
    assert link.is_symlink() and kept.read_text() == 'api_key = "k"\n'
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # as /dev/null: before, it was opened, written and made 0600
    with pytest.raises(OSError, match="not a regular file"):
        write_private_file(fifo, "x")
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_link_loop_where_a_private_file_goes_is_an_oserror_the_callers_report(tmp_path: Path) -> None:
    """Python 3.11 says a loop with a RuntimeError, which no caller caught: serve died with a traceback
    once listening (the registration record), and login too (the config file)."""
    loop = tmp_path / "registration.json"
    loop.symlink_to(loop.name)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        write_private_file(loop, "{}")
    config = tmp_path / "config.toml"
    config.symlink_to(config.name)
    for args in (["login", "--api-key", "sk-k"], ["config", "show"]):
        result = run_cli(*args, env={"VRAM_SUPPLY_CONFIG": str(config)})
        assert result.returncode != 0 and "Traceback" not in result.stderr, args
        assert f"{config}: Too many levels of symbolic links" in result.stderr, result.stderr


def test_a_private_file_is_utf8_whatever_the_locale(tmp_path: Path) -> None:
    """Under a locale that is no UTF-8 one (and Python told not to switch to UTF-8 by itself), a
    registration record naming a model file with a non-ASCII name could not be written."""
    path = tmp_path / "registration.json"
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = f"from vramsupply.config import write_private_file; write_private_file(__import__('pathlib').Path({str(path)!r}), 'stories \\u00fc')"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    assert path.read_bytes() == "stories ü".encode()


def test_the_folders_made_for_them_are_0700_whatever_the_umask(isolated_env: Path, tmp_path: Path) -> None:
    """Under `umask 000` the config and data folders were world-writable: anyone on the machine could
    have swapped the provider's config.toml (its platform URL, and so its API key) or ledger."""
    script = "umask 000; exec \"$0\" -m vramsupply login --api-key sk-private-1234"
    result = subprocess.run(["sh", "-c", script, sys.executable], env={**os.environ}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for folder in (isolated_env / ".config", isolated_env / ".config" / "vramsupply"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    existing = tmp_path / "shared"
    existing.mkdir(mode=0o755)
    old = os.umask(0)
    try:
        make_private_dirs(existing / "vramsupply" / "ledger")
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in (existing, existing / "vramsupply", existing / "vramsupply" / "ledger")] == [0o755, 0o700, 0o700]
