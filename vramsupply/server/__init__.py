"""The OpenAI-compatible HTTP API (aiohttp) in front of the engine; knows nothing of the platform."""

from vramsupply.server.app import ApiServer, create_app
from vramsupply.server.errors import ApiError
from vramsupply.server.state import SERVER_STATE, ServerState

__all__ = ["SERVER_STATE", "ApiError", "ApiServer", "ServerState", "create_app"]
