"""A command imports what it uses: the packages' names load from their modules on first use.

Before, importing any one module of a package ran the package's ``__init__``, which imported all of
it: `vramsupply service status` (a wrapper of systemctl) imported llama.cpp, numpy, jsonschema,
aiohttp and prometheus-client, and `vramsupply plan` the engine's grammar converter. Each child
process of the CLI paid for that, a user's and each of the test suite's hundreds.

Each check runs in a fresh interpreter, as a command would, and looks at what it imported.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

PACKAGES = ["engine", "hub", "ledger", "platform", "serve", "server", "upstream"]


def imported_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``statement``."""
    script = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("package", PACKAGES)
def test_importing_a_package_imports_none_of_its_modules(package: str) -> None:
    modules = imported_after(f"import vramsupply.{package}")
    assert sorted(m for m in modules if m.startswith(f"vramsupply.{package}.")) == []


def test_a_small_module_does_not_bring_its_packages_heavy_neighbours() -> None:
    modules = imported_after("import vramsupply.engine.trained_context, vramsupply.platform.backoff, vramsupply.ledger.money")
    assert {"llama_cpp.llama_grammar", "jsonschema", "aiohttp", "prometheus_client"}.isdisjoint(modules)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_a_package_offers_is_found_and_listed(package: str) -> None:
    module = importlib.import_module(f"vramsupply.{package}")
    for name in module.__all__:
        assert getattr(module, name) is not None
        assert name in dir(module)
    with pytest.raises(AttributeError, match=f"module 'vramsupply.{package}' has no attribute 'Nothing'"):
        module.Nothing  # noqa: B018 (the lookup is the test)


def test_names_are_imported_as_before() -> None:
    from vramsupply.engine import Engine, SamplingParams
    from vramsupply.engine.engine import Engine as EngineItself
    from vramsupply.platform import Phase, ProviderLifecycle
    from vramsupply.platform.lifecycle import ProviderLifecycle as LifecycleItself

    assert Engine is EngineItself and ProviderLifecycle is LifecycleItself
    assert SamplingParams.__module__ == "vramsupply.engine.types" and Phase.__module__ == "vramsupply.platform.state"
