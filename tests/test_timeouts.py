"""A loop cancelled in the very moment what it waits for arrives ends cancelled: no timeout in the
agent swallows a cancellation (``vramsupply.timeouts``).

``asyncio.wait_for`` before Python 3.12 lost one: when the task waiting in it was cancelled in the
same turn of the event loop as the awaited thing finished, it returned the result, the loop went
on, and the shutdown that awaited its end waited forever. Each test here makes both happen in one
synchronous step, through the agent's own loops (the status log, the platform lifecycle): no
timing is involved, the outcome is the same on every run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from test_platform_hostile import HostilePlatform, lifecycle_with
from test_platform_lifecycle import EngineCounters

from vramsupply.platform import Phase
from vramsupply.serve.status import LogStatus
from vramsupply.signals import StopSignals, wait_for_stop
from vramsupply.timeouts import event_within, within

SAFETY_SECONDS = 30
"""Only a bound on a test that fails: a loop that lost its cancellation would run on for good."""
NEW = "https://new-url.trycloudflare.com"


@dataclass
class Counters(EngineCounters):
    requests_total: int = 0


async def ended(task: asyncio.Future[object]) -> bool:
    done, _ = await asyncio.wait({task}, timeout=SAFETY_SECONDS)
    return task in done


async def test_the_status_log_cancelled_as_the_stop_arrives_ends_cancelled() -> None:
    stop = StopSignals()  # no handlers installed: the test plays the signals
    looked = asyncio.Event()

    def stats() -> Counters:
        looked.set()
        return Counters()

    status = asyncio.create_task(LogStatus().run(stats, stop))
    await looked.wait()  # it has read the counters and waits for the stop (a minute between lines)
    stop.event.set()  # the stop request, and "stop now", in one step
    status.cancel()
    assert await ended(status), "the status log did not end"
    assert status.cancelled(), "the cancellation was lost: the status log ended as if only asked to stop"


async def test_a_shutdown_while_the_endpoint_moves_ends_and_registers_nothing_new() -> None:
    """The lifecycle waits between heartbeats; a tunnel restart (``move_endpoint``) wakes it in the
    same step as the shutdown cancels it: the shutdown must end, and the new URL never register."""
    with HostilePlatform() as platform:
        lifecycle = lifecycle_with(platform, EngineCounters(), heartbeat_interval=3600)
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        [listed] = platform.listed
        stopping = asyncio.create_task(lifecycle.stop(timeout=5))  # its first step cancels the loop...
        lifecycle.move_endpoint(NEW)  # ...in the same turn as this wakes it
        assert await ended(stopping), "the shutdown waits forever for the lifecycle's loop"
        assert stopping.result() is True
        assert platform.listed == {}, "nothing is left listed"
        assert len(platform.requests("register")) == 1, "the moved endpoint is not registered during shutdown"
        assert lifecycle.phase is Phase.deregistered and listed in lifecycle.message


async def test_wait_for_stop_says_whether_the_stop_came_within_the_time() -> None:
    stop = StopSignals()
    assert await wait_for_stop(stop, 0.01) is False
    stop.event.set()
    assert await wait_for_stop(stop, 3600) is True


async def test_a_wait_that_runs_out_of_time_raises_timeout_error_as_wait_for_did() -> None:
    never = asyncio.Event()
    with pytest.raises(asyncio.TimeoutError):
        await within(never.wait(), 0.01)
    assert await event_within(never, 0.01) is False
    assert await within(asyncio.sleep(0, "ready"), 3600) == "ready"


async def test_a_shielded_future_runs_on_after_its_wait_runs_out() -> None:
    closing: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    with pytest.raises(asyncio.TimeoutError):
        await within(asyncio.shield(closing), 0.01)
    assert not closing.done(), "the wait's timeout cancelled what it waited for"
    closing.set_result("closed")
    assert await within(asyncio.shield(closing), 3600) == "closed"
