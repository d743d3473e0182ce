"""The vram.supply provider API as we speak it: routes, request and response bodies, error bodies.

Everything that depends on the live API's wire format lives in this one module, shared by the
client (``platform.client``) and the reference platform (``devplatform``). Fields the public docs
name are spelled as documented; the shapes the docs leave open are our contract, described in
``docs/platform-api.md``. Adapting to the live API should touch only this file.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

REGISTER_PATH = "/v1/providers/register"
HEARTBEAT_PATH = "/v1/providers/heartbeat"
PROVIDER_PATH = "/v1/providers/{provider_id}"
DEMAND_PATH = "/v1/providers/demand"
RAILS_PATH = "/v1/settings/provider/rails"
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
"""On a heartbeat: the same for each send of one heartbeat, so that a platform counts its tokens once."""

PLATFORM_FEE = 0.05
"""The platform keeps 5% of revenue; providers earn 95%."""

_HTTP_URL = TypeAdapter(AnyHttpUrl)

MESSAGE_CHARS = 300
"""The most of a platform-provided text (an error message, a status) that reaches a log line or the state file."""
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
"""C0, DEL, C1 (a terminal's escape sequences) and the bidirectional overrides that reorder a line."""
PROVIDER_ID_CHARS = 128
_PROVIDER_ID = re.compile(r"[!-~]{1,%d}" % PROVIDER_ID_CHARS)


def printable(text: str, limit: int = MESSAGE_CHARS) -> str:
    """Text the platform sent, made safe for one log line: whitespace runs (newlines too) become one
    space, control characters are escaped as ``\\xNN``, and past ``limit`` characters it is cut with
    a visible mark, so a hostile platform can neither drive the terminal nor flood the log."""
    shown = _CONTROLS.sub(_escaped, " ".join(text.split()))
    return shown if len(shown) <= limit else f"{shown[:limit]}… (cut, {len(shown)} characters)"


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _provider_id(value: str) -> str:
    """The id goes into a DELETE URL, the heartbeats and the logs: a short run of printable ASCII."""
    if not _PROVIDER_ID.fullmatch(value) or value in (".", ".."):
        raise PydanticCustomError("provider_id", f"not a usable provider id: 1 to {PROVIDER_ID_CHARS} printable ASCII characters, no spaces")
    return value


ProviderId = Annotated[StrictStr, AfterValidator(_provider_id)]


def _finite_or_none(value: Any) -> Any:
    """An optional figure the platform sends only for display: one that is no finite number ≥ 0
    (NaN, ±inf, 1e400, "nan", a word) is dropped to ``None``, and the rest of the answer is shown."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


class _Body(BaseModel):
    """Request bodies: unknown fields are an error on our side of the wire, strict JSON types."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _Reply(BaseModel):
    """Response bodies: tolerate fields the platform adds later."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Capacity(_Body):
    """Our addition: this machine's measured decode speed for the offered model (`vramsupply bench`)."""

    model_config = ConfigDict(allow_inf_nan=False)  # JSON has no Infinity or NaN

    single_stream_tokens_per_second: StrictFloat | StrictInt = Field(ge=0, description="Completion tokens/s of one request alone")
    all_slots_tokens_per_second: StrictFloat | StrictInt = Field(ge=0, description="Completion tokens/s summed over `slots` concurrent requests")
    slots: StrictInt = Field(ge=1, description="Concurrent requests the all-slots figure was measured with")
    measured_at: StrictStr = Field(description="When it was measured (ISO 8601, UTC)")


class RegisterRequest(_Body):
    """POST /v1/providers/register. The first six fields are the documented ones."""

    provider_type: Literal["agent", "browser"] = "agent"
    endpoint_url: StrictStr | None = Field(
        None, validate_default=True, description="Public base URL; the platform calls {endpoint_url}/v1/... and {endpoint_url}/health"
    )
    model: StrictStr = Field(min_length=1)
    input_price_per_million: StrictInt = Field(ge=0, description="Cents per million input tokens")
    output_price_per_million: StrictInt = Field(ge=0, description="Cents per million output tokens")
    context_length_offered: StrictInt | None = Field(None, ge=1, validate_default=True)
    gguf_repo: StrictStr | None = None
    gguf_file: StrictStr | None = None
    gguf_sha256: StrictStr | None = None
    quant: StrictStr | None = None
    agent_version: StrictStr | None = None
    endpoint_token: StrictStr | None = Field(None, description="Bearer token the platform sends on requests it routes to us")
    capacity: Capacity | None = None
    hardware: dict[str, Any] | None = Field(None, description="Where the model runs: backend, devices, layers on the GPU, threads, warnings")

    @field_validator("endpoint_url", "context_length_offered")
    @classmethod
    def _required_for_agents(cls, value: Any, info: ValidationInfo) -> Any:
        """The docs make endpoint_url and context_length_offered required for agent providers."""
        if value is None and info.data.get("provider_type", "agent") == "agent":
            raise PydanticCustomError("missing", "Field required for agent providers")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            _HTTP_URL.validate_python(value)
        return value


class RegisterResponse(_Reply):
    provider_id: ProviderId = Field(validation_alias=AliasChoices("provider_id", "id"))
    status: str = "online"


class HeartbeatRequest(_Body):
    """POST /v1/providers/heartbeat. Token counts are since the last acknowledged heartbeat."""

    provider_id: StrictStr
    status: Literal["online", "offline", "draining"] = "online"
    slots_total: StrictInt = Field(ge=0)
    slots_busy: StrictInt = Field(ge=0)
    queue_depth: StrictInt = Field(ge=0)
    prompt_tokens: StrictInt = Field(ge=0)
    completion_tokens: StrictInt = Field(ge=0)
    capacity: Capacity | None = None


class HeartbeatResponse(_Reply):
    """The platform's view of the instance: ``online``, ``offline`` or ``draining`` (any other
    status, or another provider's id, means it no longer lists us as we think: register again)."""

    provider_id: ProviderId = Field(validation_alias=AliasChoices("provider_id", "id"))
    status: StrictStr


class DeregisterResponse(_Reply):
    provider_id: ProviderId = Field(validation_alias=AliasChoices("provider_id", "id"))
    status: StrictStr = "deregistered"


class PriceRange(_Reply):
    min: int
    max: int
    median: int | None = None  # our addition: the lower median of the online providers' prices


class ModelDemand(_Reply):
    model: str
    requests_24h: int
    online_providers: int
    input_price_per_million: PriceRange | None = None
    output_price_per_million: PriceRange | None = None
    # Our addition: summed over online providers that report one; an unusable figure is dropped.
    capacity_tokens_per_second: Annotated[float | None, BeforeValidator(_finite_or_none)] = None


class DemandResponse(_Reply):
    models: list[ModelDemand]


class RailsUpdate(_Body):
    """PATCH /v1/settings/provider/rails: only the rails given change."""

    accepts_stripe: StrictBool | None = None
    accepts_tempo: StrictBool | None = None


class Rails(_Reply):
    """GET and PATCH /v1/settings/provider/rails answer with the account's current rails."""

    accepts_stripe: bool
    accepts_tempo: bool


class FieldError(_Reply):
    field: str
    message: str


def error_body(message: str, *, type_: str, code: str | None = None, fields: list[FieldError] | None = None) -> dict[str, Any]:
    """The error JSON both platforms send: OpenAI's shape, plus per-field errors on 422."""
    error: dict[str, Any] = {"message": message, "type": type_, "code": code}
    if fields:
        error["fields"] = [f.model_dump() for f in fields]
        error["param"] = fields[0].field
    return {"error": error}


def error_message(body: Any) -> str | None:
    """One line out of whatever error body the platform sent (ours, FastAPI's or a bare message),
    made ``printable``: escaped control characters, cut at ``MESSAGE_CHARS``."""
    message = _error_text(body)
    return printable(message) if message else None


def _error_text(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    error = body.get("error", body)
    if isinstance(error, str):
        return error
    if isinstance(error, dict):
        fields = error.get("fields")
        if isinstance(fields, list) and fields and isinstance(fields[0], dict):
            return "; ".join(f"{f.get('field')}: {f.get('message')}" for f in fields if isinstance(f, dict))
        message = error.get("message")
        if isinstance(message, str):
            return message
    detail = body.get("detail")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        return "; ".join(_detail_line(d) for d in detail if isinstance(d, dict))
    if isinstance(detail, str):
        return detail
    return None


def _detail_line(detail: dict[str, Any]) -> str:
    """FastAPI's ``{"loc": ["body", "field"], "msg": "..."}``; a ``loc`` of another shape names no field."""
    loc = detail.get("loc")
    where = ".".join(str(part) for part in loc[1:]) if isinstance(loc, list) else ""
    return f"{where or '?'}: {detail.get('msg')}"


def net_cents(price_cents: int) -> float:
    """What the provider earns of a price after the platform fee."""
    return price_cents * (1 - PLATFORM_FEE)
