"""What the bench scripts share about the agent they start: a free port, and waiting for /health."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from typing import Any

import aiohttp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_healthy(http: aiohttp.ClientSession, url: str, process: subprocess.Popen[bytes], what: str = "vramsupply") -> dict[str, Any]:
    """``url``'s /health once it answers 200; raises if ``process`` exits first."""
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before it was ready")
        try:
            async with http.get(url + "/health") as response:
                if response.status == 200:
                    return await response.json()
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
