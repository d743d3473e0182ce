"""An offline `plan` names the cached copy serve would use, in the cache the settings name.

The hint read VRAM_SUPPLY_CACHE_DIR from the environment only: a provider whose config file set
cache_dir (as `service install` writes it) was told nothing of the copy serve then used.
"""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli
from fakehub import FakeHub, standard_repos
from test_hub_cli import env_for

from vramsupply.config import write_config_values


def test_offline_plan_names_the_cached_quant_in_the_config_files_cache_dir(tmp_path: Path, config_file: Path) -> None:
    models = tmp_path / "models"
    with FakeHub(standard_repos()) as hub:
        pulled = run_cli("models", "pull", "acme/Widget-7B", "--quant", "Q4_K_M", "--cache-dir", str(models), env=env_for(hub, tmp_path / "hf-home"))
        assert pulled.returncode == 0, pulled.stderr
        write_config_values(config_file, {"cache_dir": str(models)})
        offline = env_for(hub, tmp_path / "elsewhere", HF_HUB_OFFLINE="1")
        planned = run_cli("plan", "--model", "acme/Widget-7B", env=offline)

    assert planned.returncode == 1
    assert "unset HF_HUB_OFFLINE and run this command again while online" in planned.stderr, planned.stderr
    assert f"offline, serve --model acme/Widget-7B uses the cached Q4_K_M in {models}" in planned.stderr, planned.stderr


def test_offline_plan_says_nothing_of_a_copy_in_a_cache_serve_would_not_read(tmp_path: Path, config_file: Path) -> None:
    """The hint follows the setting: a copy in the shared HF cache is not what serve would load
    when the config file points serve at another cache."""
    hf_home = tmp_path / "hf-home"
    with FakeHub(standard_repos()) as hub:
        pulled = run_cli("models", "pull", "acme/Widget-7B", "--quant", "Q4_K_M", env=env_for(hub, hf_home))
        assert pulled.returncode == 0, pulled.stderr
        write_config_values(config_file, {"cache_dir": str(tmp_path / "empty-cache")})
        planned = run_cli("plan", "--model", "acme/Widget-7B", env=env_for(hub, hf_home, HF_HUB_OFFLINE="1"))

    assert planned.returncode == 1
    assert "unset HF_HUB_OFFLINE" in planned.stderr and "uses the cached" not in planned.stderr, planned.stderr
