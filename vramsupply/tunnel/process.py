"""The tunnel tool's processes: started in a session of their own, watched, and ended all together.

- Its own session (so its own process group): a terminal's Ctrl-C goes to the whole foreground
  process group, and the tool died of it within milliseconds, taking the public URL away while
  the agent was still draining in-flight requests and deregistering. Outside the terminal's
  group, only the agent hears Ctrl-C; the supervisor stops the tool itself once that is done.
- Its exit, seen when it happens: asyncio's ``Process.wait()`` (before Python 3.12) returns only
  once the output pipe has closed too, and a child the tool left behind (a wrapper script's
  background job) holds it open: the tool was never seen to exit. ``ToolProcess.wait`` follows
  the exit itself.
- Ended as a group: such children go with the tool. SIGTERM goes to the whole group, then SIGKILL
  after a grace period, and SIGKILL at once when the wait is cancelled (a second Ctrl-C, "stop
  now"): a tool that ignores SIGTERM must never outlive the agent.
- Killed with the agent: its parent-death signal is SIGKILL, not the SIGTERM of
  ``children.die_with_parent``, which a stuck tool ignores and so outlived a killed agent. A
  tunnel to a dead agent has nothing to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass

from vramsupply.children import killed_with_parent
from vramsupply.timeouts import within

READER_LIMIT = 2**16
"""asyncio's own line limit; ``output_lines`` skips a longer line."""


class _ExitWatch(asyncio.subprocess.SubprocessStreamProtocol):
    """The stream protocol asyncio uses, telling also when the process itself has exited."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


@dataclass
class ToolProcess:
    process: asyncio.subprocess.Process
    exited: asyncio.Future[None]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def output(self) -> asyncio.StreamReader:
        assert self.process.stdout is not None
        return self.process.stdout

    async def wait(self) -> int | None:
        """Its exit status, as soon as it has exited, whoever still holds its output open."""
        await asyncio.shield(self.exited)  # a cancelled wait must not cancel the exit itself
        return self.process.returncode


async def spawn(command: list[str]) -> ToolProcess:
    """Start ``command`` as the leader of a new session, its stdout and stderr on one pipe; OSError when it cannot start."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        lambda: _ExitWatch(READER_LIMIT, loop),
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # a terminal's Ctrl-C does not reach it: the agent stops it after draining
        preexec_fn=killed_with_parent,  # a killed agent takes its tunnel down with it
    )
    return ToolProcess(asyncio.subprocess.Process(transport, protocol, loop), protocol.exited)


def signal_group(tool: ToolProcess, sig: signal.Signals) -> None:
    """``sig`` to every process left in the tool's group (its id is the leader's pid); none left is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(tool.pid, sig)


async def end_group(tool: ToolProcess, grace: float) -> None:
    """SIGTERM to the group, up to ``grace`` seconds for the leader to exit, then SIGKILL to what is left.

    The SIGKILL is sent whatever ends the wait, cancellation included, before that propagates."""
    signal_group(tool, signal.SIGTERM)
    try:
        await within(tool.wait(), grace)
    except asyncio.TimeoutError:
        pass
    finally:
        signal_group(tool, signal.SIGKILL)  # children that ignored SIGTERM or outlived the leader
    await tool.wait()
