"""Machine Payments Protocol (MPP) pieces of the reference platform: 402 challenges and credentials.

A buyer without an Authorization header gets ``402`` with ``WWW-Authenticate: Payment …``; it retries
with ``Authorization: Payment <base64url credential>`` naming that challenge. Vouchers cannot be
verified on-chain here, so a credential is accepted when it is well formed and answers a live
challenge this platform issued.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vramsupply.devplatform.store import Challenge

REALM = "vram.supply"
PATH_USD = "0x20c0000000000000000000000000000000000000"
PLATFORM_WALLET = "0x848A000000000000000000000000000000000000"
SUGGESTED_DEPOSIT = "1000000"
CHALLENGE_TTL_SECONDS = 300.0


class CredentialError(ValueError):
    """An ``Authorization: Payment`` value this platform cannot accept; the message says why."""


class _ChallengeRef(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str


class _Voucher(BaseModel):
    action: str
    channelId: str = Field(min_length=1)
    cumulativeAmount: str = Field(pattern=r"^[0-9]{1,30}$")  # whole base units, as the seeds' example "50000"
    signature: str = Field(min_length=1)


class Credential(BaseModel):
    challenge: _ChallengeRef
    source: str = Field(min_length=1)
    payload: _Voucher


def per_token_amount(price_cents_per_million: int) -> int:
    """USDC base units (6 decimals) per token at a price in cents per million, rounded up.

    Cents per million tokens is 1/100 of a base unit per token: 200 ¢/M → 2, 250 ¢/M → 3. The
    platform fee is inside the price, not added to it: the provider earns ``1 - platform.api.PLATFORM_FEE`` of
    what the buyer pays, as the agent's ledger and startup summary say. One amount per token is
    advertised, the dearer of the provider's two prices (usually the output price), so the quote
    seen before paying is never below what a token costs; the receipt charges each at its own price.
    """
    return -(-price_cents_per_million // 100)


def charge(prompt_tokens: int, completion_tokens: int, input_cents: int, output_cents: int) -> int:
    """What a finished request costs in USDC base units at the provider's prices (the platform's
    fee is inside them), rounded up to a whole unit."""
    return -(-(prompt_tokens * input_cents + completion_tokens * output_cents) // 100)


def b64url(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).rstrip(b"=").decode()


def challenge_header(challenge: Challenge) -> str:
    expires = datetime.fromtimestamp(challenge.expires_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    request = b64url(
        {
            "amount": str(challenge.amount),
            "currency": PATH_USD,
            "recipient": PLATFORM_WALLET,
            "suggestedDeposit": SUGGESTED_DEPOSIT,
            "unitType": "llm_token",
        }
    )
    params = {"id": challenge.id, "realm": REALM, "method": "tempo", "intent": "session", "expires": expires, "request": request}
    return "Payment " + ", ".join(f'{name}="{value}"' for name, value in params.items())


def parse_credential(encoded: str) -> Credential:
    try:
        text = encoded.strip()
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)  # not skipping stray characters
        credential = Credential.model_validate_json(raw)
    except (ValueError, ValidationError) as exc:
        raise CredentialError(f"malformed Payment credential: {_first_error(exc)}") from None
    if credential.payload.action != "voucher":
        raise CredentialError(f"unsupported Payment credential action {credential.payload.action!r} (expected 'voucher')")
    return credential


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError) and exc.errors()[0]["type"] != "json_invalid":
        err = exc.errors()[0]
        return f"{'.'.join(str(p) for p in err['loc']) or 'credential'}: {err['msg']}"
    return "not base64url-encoded JSON"
