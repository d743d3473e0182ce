"""Model files whose names are not ASCII.

A provider whose locale is no UTF-8 one (``LC_ALL=C``, and Python told not to switch to UTF-8 by
itself, ``PYTHONCOERCECLOCALE=0``) serves `modèle.gguf`: Python read the command line as ASCII, the
name became a string with lone surrogates, and `serve` died with a traceback writing its state file
(a JSON file, which must be UTF-8). Every command now runs itself again in Python's UTF-8 mode
(``vramsupply/__main__.py``). A name whose bytes are no UTF-8 at all is refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.request
from pathlib import Path

from agent_process import AgentProcess
from conftest import TINY_MODEL

from vramsupply.hub.local import local_model_id

NOT_UTF8 = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


def test_a_model_file_with_a_non_ascii_name_is_served_and_named_as_it_is(isolated_env: Path, tmp_path: Path) -> None:
    model = tmp_path / "modèle.gguf"
    shutil.copyfile(TINY_MODEL, model)
    with AgentProcess("--no-register", "--port", "0", "--model", str(model), env=NOT_UTF8) as agent:
        agent.wait_ready()
        assert agent.model_id == "modèle"
        with urllib.request.urlopen(agent.base_url + "/models", timeout=10) as response:
            assert json.loads(response.read())["data"][0]["id"] == "modèle"
        assert agent.stop(signal.SIGINT) == 0
    assert "Traceback" not in agent.output



def test_a_model_file_whose_name_is_not_utf8_is_refused_in_one_line(isolated_env: Path, tmp_path: Path) -> None:
    """A Latin-1 name (`mod\\xe8le.gguf`, bytes no UTF-8 decoder takes), whatever the locale: llama.cpp
    is given paths as UTF-8, so it cannot be opened; before, `serve` died with a traceback writing the
    name into its JSON state file, and without that, was told "not a GGUF model it supports?"."""
    model = Path(os.fsdecode(os.fsencode(tmp_path) + b"/mod\xe8le.gguf"))
    shutil.copyfile(TINY_MODEL, model)
    assert local_model_id(model) == "mod\ufffdle", "an id JSON can carry"
    with AgentProcess("--no-register", "--port", "0", "--model", str(model)) as agent:
        assert agent.wait(60) == 1
    assert "Traceback" not in agent.output
    assert agent.stderr[-1] == f"error: llama.cpp cannot open {tmp_path}/mod\\udce8le.gguf: its name is not UTF-8 text; rename the file"
