"""One error tree under VramsupplyError, drawn in errors.py, and one CLI boundary that prints it."""

from __future__ import annotations

import errno
import importlib
import pkgutil

import vramsupply
from conftest import TINY_MODEL, run_cli
from vramsupply import errors
from vramsupply.config import ConfigError
from vramsupply.engine import EngineError
from vramsupply.errors import Interrupted, ListenError, VramsupplyError
from vramsupply.hub import HubError
from vramsupply.platform import OfferError, PlatformError
from vramsupply.service.installer import ServiceError


def all_error_classes() -> set[type[VramsupplyError]]:
    for module in pkgutil.walk_packages(vramsupply.__path__, "vramsupply."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: set[type[VramsupplyError]] = set()
    todo = [VramsupplyError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_concern_raises_under_the_one_root_with_its_exit_code() -> None:
    for base in (ConfigError, OfferError, HubError, PlatformError, EngineError, ServiceError):
        assert issubclass(base, VramsupplyError)
    assert (VramsupplyError.exit_code, HubError.exit_code, PlatformError.exit_code, EngineError.exit_code) == (1, 1, 1, 1)
    assert (ConfigError.exit_code, OfferError.exit_code, Interrupted.exit_code) == (2, 2, 130)


def test_the_tree_drawn_in_the_module_docstring_names_every_error_class() -> None:
    undrawn = sorted(cls.__name__ for cls in all_error_classes() if cls.__name__ not in (errors.__doc__ or ""))
    assert undrawn == []


def test_engine_settings_valid_alone_but_not_together_exit_2_naming_both_flags() -> None:
    result = run_cli("serve", "--model", str(TINY_MODEL), "--parallel", "8", "--n-batch", "4", "--no-register")

    assert result.returncode == 2
    assert result.stderr.startswith("error: n_batch = 4 (from flag --n-batch) is smaller than parallel = 8 (from flag --parallel)")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_setting_from_the_environment_is_named_by_its_variable() -> None:
    result = run_cli("serve", "--model", str(TINY_MODEL), "--n-batch", "2", "--no-register", env={"VRAM_SUPPLY_PARALLEL": "3"})

    assert result.returncode == 2
    assert "parallel = 3 (from env VRAM_SUPPLY_PARALLEL)" in result.stderr


def test_a_message_with_brackets_is_printed_as_written() -> None:
    result = run_cli("models", "pull", "[not-a-model]")

    assert result.returncode == 2  # a malformed model argument is a usage error
    assert "[not-a-model]" in result.stderr and "Traceback" not in result.stderr


def test_an_ipv6_address_that_cannot_be_listened_on_is_written_as_in_a_url() -> None:
    """`:::8080` read as a typo; `[::]:8080` is how a provider would write it."""
    in_use = OSError(errno.EADDRINUSE, "Address already in use")
    hint = "; another program listens there: choose another --port (0: any free one)"  # README: the demo beside an agent
    assert str(ListenError("::", 8080, in_use)) == f"cannot listen on [::]:8080: Address already in use{hint}"
    assert str(ListenError("127.0.0.1", 8080, in_use)) == f"cannot listen on 127.0.0.1:8080: Address already in use{hint}"
    assert str(ListenError("127.0.0.1", 80, OSError(errno.EACCES, "Permission denied"))) == "cannot listen on 127.0.0.1:80: Permission denied"
