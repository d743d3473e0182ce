"""doctor's port check says what ``serve`` will meet on its host and port: it binds as serve binds
(every address of the name, IPv6 ones IPv6-only), so the two agree.

Before, doctor bound only the name's first address, dual-stack: it passed where serve then failed
(another program on the name's other address) and failed where serve worked (another program on
0.0.0.0 when serving on ``::``; IPv6 switched off while /etc/hosts maps ``::1`` to localhost).
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from test_gpu_doctor import doctor
from test_listen import DUAL_STACK_HOSTS, NOT_HERE, in_a_network_of_its_own, name_of, refusal
from vramsupply.config import Settings
from vramsupply.gpu.checkup import Context, Result
from vramsupply.gpu.doctor import port_free_or_ours
from vramsupply.server import ApiServer, create_app


def serve_meets(host: str, port: int) -> OSError | None:
    """What serve's listening step meets on host:port: None where it listens, else its error."""

    async def start() -> OSError | None:
        server = ApiServer(create_app("stories260k"), host, port)
        try:
            await server.start()
        except OSError as exc:
            return exc
        await server.stop()
        return None

    return asyncio.run(start())


def port_check(host: str, port: int) -> Result:
    return port_free_or_ours(Context(Settings(host=host, port=port)))


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextmanager
def another_web_server(address: str) -> Iterator[int]:
    """A program that is not vramsupply answering HTTP on ``address``, on a port of its own."""

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    with ThreadingHTTPServer((address, 0), NotFound) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            thread.join(10)


def test_a_port_another_program_holds_on_the_names_second_address_fails_the_check_as_it_fails_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """``localhost`` as 127.0.0.1 and ::1, another program on one of them: here 127.0.0.1 and 127.0.0.2."""
    monkeypatch.setattr(socket, "getaddrinfo", name_of((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "127.0.0.2")))
    with another_web_server("127.0.0.2") as port:
        check = port_check("dualstack.test", port)
        serve = serve_meets("dualstack.test", port)

    assert serve is not None and serve.errno == errno.EADDRINUSE and f"on 127.0.0.2, port {port}" in serve.strerror
    assert check == Result(False, f"dualstack.test:{port} is taken by another program", "stop it or serve on another port (--port, VRAM_SUPPLY_PORT)")


def test_a_name_one_of_whose_addresses_is_not_on_this_machine_passes_the_check_as_serve_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    refusal(socket.AF_INET, NOT_HERE[0])
    monkeypatch.setattr(socket, "getaddrinfo", name_of((socket.AF_INET, NOT_HERE[0]), (socket.AF_INET, "127.0.0.1")))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    assert port_check("partly.test", port) == Result(True, f"partly.test:{port} is free")
    assert serve_meets("partly.test", port) is None


def test_serving_on_all_ipv6_addresses_beside_a_program_on_all_ipv4_ones_passes_as_serve_listens() -> None:
    """serve's ``::`` socket is IPv6-only: a program on 0.0.0.0 and the same port is no obstacle."""
    if not has_ipv6():
        pytest.skip("no IPv6 on this machine")
    with socket.socket() as other:
        other.bind(("0.0.0.0", 0))
        other.listen()
        port = other.getsockname()[1]
        serve = serve_meets("::", port)
        _, checks, _ = doctor(VRAM_SUPPLY_HOST="::", VRAM_SUPPLY_PORT=str(port))

    assert serve is None
    assert checks["port"] == {"name": "port", "ok": True, "detail": f"[::]:{port} is free", "fix": ""}


def doctor_in_a_network_of_its_own(tmp_path: Path, port: int, *, before: tuple[str, ...] = (), ipv6: bool = True) -> dict[str, object]:
    """The port check of ``doctor --json`` serving on localhost:``port``, where /etc/hosts maps
    localhost to 127.0.0.1 and ::1 (a network namespace of its own: every port free)."""
    env = ("env", "VRAM_SUPPLY_HOST=localhost", f"VRAM_SUPPLY_PORT={port}", "VRAM_SUPPLY_PLATFORM_URL=http://127.0.0.1:9")
    result = in_a_network_of_its_own(tmp_path, DUAL_STACK_HOSTS, *before, *env, sys.executable, "-m", "vramsupply", "doctor", "--json", ipv6=ipv6)
    assert result.stdout, result.stderr
    return next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "port")


# Holds 127.0.0.1:argv[1] with a web server that is not vramsupply (it answers 501), then runs argv[2:].
ANOTHER_PROGRAM_ON_127_0_0_1 = """
import subprocess, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), BaseHTTPRequestHandler)
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.exit(subprocess.run(sys.argv[2:]).returncode)
"""


def test_localhost_whose_ipv4_address_another_program_holds_fails_the_check_as_it_fails_serve(tmp_path: Path) -> None:
    """Before, doctor bound ::1 only (localhost's first address) and passed; serve then stopped with
    "address in use" on 127.0.0.1 (serve's side: test_listen, a port taken on one address)."""
    port = 47377
    before = (sys.executable, "-c", ANOTHER_PROGRAM_ON_127_0_0_1, str(port))

    check = doctor_in_a_network_of_its_own(tmp_path, port, before=before)

    assert check == {"name": "port", "ok": False, "detail": f"localhost:{port} is taken by another program", "fix": "stop it or serve on another port (--port, VRAM_SUPPLY_PORT)"}


def test_localhost_where_ipv6_is_switched_off_passes_the_check_as_serve_listens(tmp_path: Path) -> None:
    """A container with IPv6 off whose /etc/hosts still maps ::1 to localhost (serve's side: test_listen)."""
    check = doctor_in_a_network_of_its_own(tmp_path, 47377, ipv6=False)

    assert check == {"name": "port", "ok": True, "detail": "localhost:47377 is free", "fix": ""}
