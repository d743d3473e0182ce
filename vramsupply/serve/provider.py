"""What serve adds for the provider around the HTTP server: a tunnel, the earnings ledger, capacity.

- ``--tunnel``: the tool is looked up before anything downloads or loads (a missing one is refused
  with how to install it), started once the server listens, and each public URL it announces is
  printed and handed to the marketplace session, which registers it. It is stopped last, after the
  agent has drained and deregistered, because in-flight requests arrive through it.
- A tunnel puts the endpoint on the internet even with ``--no-register``: it then requires the
  endpoint token all the same (the configured one, or the stored or generated one that registering
  uses), and says where to find it, never the token itself.
- The ledger recorder is plugged into the server state once it listens; after the drain, the
  records of abandoned requests are awaited and the ledger is closed.
- The throughput `vramsupply bench` stored for the served model is offered as capacity, and
  followed: a result saved while the agent serves goes with the next heartbeat.
"""

from __future__ import annotations

import asyncio
import logging

from vramsupply.config import Settings
from vramsupply.ledger import LedgerRecorder, UnopenedLedger, default_ledger_path, open_recorder
from vramsupply.output import say
from vramsupply.platform import MarketplaceSession, resolve_endpoint_token
from vramsupply.platform.offer import ModelIdentity, local_base_url
from vramsupply.platform.state import record_public_url
from vramsupply.platform.token import default_token_path
from vramsupply.serve.options import ServeError
from vramsupply.server import ApiServer
from vramsupply.server.state import ServerState
from vramsupply.throughput.store import Capacity, capacity_for, default_bench_path, measured_otherwise
from vramsupply.tunnel import TunnelError, TunnelSupervisor, TunnelTool, tunnel_tool

log = logging.getLogger("vramsupply.serve")


class ProviderSide:
    def __init__(self, settings: Settings, market: MarketplaceSession | None, *, local_platform: bool) -> None:
        self.settings = settings
        self.market = market
        self.selling = market is not None and not local_platform  # a local stand-in platform (the demo) earns nothing
        self.tool = find_tunnel_tool(settings)
        self.tunnel_token = tunnel_token(settings) if self.tool is not None and market is None else None
        self.tunnel: TunnelSupervisor | None = None
        self.recorder: LedgerRecorder | UnopenedLedger | None = None
        self._warned_of: float | None = None  # the bench result last warned of (its time)

    def model_known(self, model: ModelIdentity) -> None:
        if self.market is not None:
            path = default_bench_path()
            self.market.watch_capacity(path, lambda: self._measured_here(capacity_for(path, model.model_id, model.quant)))

    def _measured_here(self, capacity: Capacity | None) -> Capacity | None:
        """``capacity``, offered as it is; a result measured with other settings than this agent
        serves with (another slot count, a KV cache per slot...) is said once, in a warning."""
        differing = measured_otherwise(capacity, self.settings) if capacity is not None else []
        if differing and capacity is not None and capacity.measured_at != self._warned_of:
            self._warned_of = capacity.measured_at
            log.warning(
                "the `vramsupply bench` result offered as this agent's capacity was measured with other settings: %s; "
                "run `vramsupply bench` with the settings serve uses for a figure of what it serves", "; ".join(differing),
            )
        return capacity

    def listening(self, server: ApiServer) -> None:
        """Start the tunnel (requiring the endpoint token first) and plug the ledger into the server."""
        if self.tunnel_token is not None:
            server.state.endpoint_token = self.tunnel_token
            say(f"the {self.settings.tunnel} tunnel makes this agent public: requests need `Authorization: Bearer <{token_source(self.settings)}>`")
        self.tunnel = start_tunnel(self.tool, local_base_url(self.settings.host, server.port), self.market, server.state)
        s = self.settings
        self.recorder = open_recorder(default_ledger_path(), input_price=s.input_price, output_price=s.output_price, selling=self.selling)
        server.state.accounts.recorder = self.recorder

    async def drained(self, server: ApiServer) -> None:
        """The server and engine have stopped: record what was abandoned, close the ledger."""
        if self.recorder is not None:
            await server.state.accounts.flush(self.settings.drain_timeout)
            await asyncio.to_thread(self.recorder.close)

    async def stop(self) -> None:
        if self.tunnel is not None:
            await self.tunnel.stop()


def find_tunnel_tool(settings: Settings) -> TunnelTool | None:
    """Refuse a missing tunnel tool (saying how to install it) before any download or load."""
    if settings.tunnel is None:
        return None
    try:
        tool = tunnel_tool(settings.tunnel)
        tool.command("")
    except TunnelError as exc:
        raise ServeError(str(exc)) from None
    return tool


def tunnel_token(settings: Settings) -> str:
    """The token a tunnelled agent requires without registering: the one registering would use.
    Resolved before anything downloads, so that an unwritable token file is refused at once."""
    configured = settings.endpoint_token.get_secret_value() if settings.endpoint_token else None
    return resolve_endpoint_token(configured)


def token_source(settings: Settings) -> str:
    """Where the provider finds the endpoint token (named, never shown)."""
    if settings.endpoint_token:
        return "the endpoint_token you configured"
    return f"the token in {default_token_path()}"


def start_tunnel(
    tool: TunnelTool | None, local_url: str, market: MarketplaceSession | None, server: ServerState | None = None
) -> TunnelSupervisor | None:
    """Run the tunnel tool as a supervised child; each public URL it announces is printed and
    registered (without registering, recorded for `status`), and what goes wrong with it is a
    /health warning until it announces one again."""
    if market is not None:
        market.local_url = local_url
    if tool is None:
        return None

    def use(url: str) -> None:
        say(f"public URL ({tool.name} tunnel): {url}/v1")
        if market is not None:
            market.use_endpoint_url(url)
        else:
            record_public_url(url, tool.name)

    def trouble(words: str | None) -> None:
        if server is not None:
            server.tunnel_trouble = words

    try:
        supervisor = TunnelSupervisor(tool, local_url, use, on_trouble=trouble)
    except TunnelError as exc:
        raise ServeError(str(exc)) from None
    supervisor.start()
    return supervisor
