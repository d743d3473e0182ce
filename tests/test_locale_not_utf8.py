"""A provider whose locale is no UTF-8 one (``LC_ALL=C``, and Python told not to switch to UTF-8 by
itself, ``PYTHONCOERCECLOCALE=0``) serves a model whose file name is not ASCII.

Python then read the command line as ASCII: `modèle.gguf` became a string with lone surrogates, the
model loaded, and `serve` died with a traceback writing its state file (a JSON file, which must be
UTF-8). Every command now runs itself again in Python's UTF-8 mode (``vramsupply/__main__.py``)."""

from __future__ import annotations

import json
import shutil
import signal
import urllib.request
from pathlib import Path

from agent_process import AgentProcess
from conftest import TINY_MODEL

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

