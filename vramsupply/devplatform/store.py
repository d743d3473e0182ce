"""The reference platform's in-memory state: accounts, provider instances, buyer traffic, challenges.

Pure bookkeeping with no HTTP in it, so the routing and demand rules are easy to read in one place.
"""

from __future__ import annotations

import secrets
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from vramsupply.platform import api

DAY_SECONDS = 24 * 3600
ANSWERED_KEYS = 64
"""Heartbeat ``Idempotency-Key``s remembered per instance: an agent sends one again at its next beat."""
Rail = Literal["stripe", "tempo"]
ProviderStatus = Literal["online", "offline", "draining"]


@dataclass
class Account:
    """A provider (and buyer) account. Dev accounts have both rail prerequisites met."""

    api_key: str
    accepts_stripe: bool = True
    accepts_tempo: bool = True
    stripe_onboarded: bool = True
    tempo_wallet: str | None = "0x000000000000000000000000000000000000dEaD"

    def accepts(self, rail: Rail) -> bool:
        return self.accepts_stripe if rail == "stripe" else self.accepts_tempo


@dataclass
class Provider:
    id: str
    account: Account
    offer: api.RegisterRequest
    registered_at: float
    status: ProviderStatus = "online"
    last_seen_at: float = 0.0
    last_routed_at: float = 0.0
    slots_total: int = 0
    slots_busy: int = 0
    queue_depth: int = 0
    reported_prompt_tokens: int = 0
    reported_completion_tokens: int = 0
    routed_requests: int = 0
    routed_prompt_tokens: int = 0
    routed_completion_tokens: int = 0
    capacity: api.Capacity | None = None
    answered: dict[str, tuple[api.HeartbeatRequest, api.HeartbeatResponse]] = field(default_factory=dict)
    """The latest heartbeats taken with an ``Idempotency-Key``, by key: the heartbeat and its answer."""

    @property
    def model(self) -> str:
        return self.offer.model.lower()


@dataclass
class BuyerRequest:
    at: float
    model: str
    rail: Rail
    provider_id: str | None = None
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Challenge:
    id: str
    model: str
    amount: int
    expires_at: float


class RailError(ValueError):
    """A rails change the platform refuses; the message is shown to the provider."""


@dataclass
class Store:
    accounts: dict[str, Account] = field(default_factory=dict)
    providers: dict[str, Provider] = field(default_factory=dict)
    requests: deque[BuyerRequest] = field(default_factory=deque)
    challenges: dict[str, Challenge] = field(default_factory=dict)

    def add_account(self, api_key: str | None = None) -> Account:
        """An account with a generated ``sk-dev-…`` key unless one is given (to survive restarts)."""
        account = Account(api_key or "sk-dev-" + secrets.token_urlsafe(24))
        self.accounts[account.api_key] = account
        return account

    def register(self, account: Account, offer: api.RegisterRequest, now: float) -> Provider:
        """A new instance; an earlier one of the same account at the same endpoint is replaced."""
        for stale in [p.id for p in self.providers.values() if p.account is account and p.offer.endpoint_url == offer.endpoint_url]:
            del self.providers[stale]
        provider = Provider(
            id="prov_" + secrets.token_hex(8), account=account, offer=offer, registered_at=now, last_seen_at=now, capacity=offer.capacity
        )
        self.providers[provider.id] = provider
        return provider

    def owned(self, account: Account, provider_id: str) -> Provider | None:
        provider = self.providers.get(provider_id)
        return provider if provider is not None and provider.account is account else None

    def heartbeat(self, provider: Provider, beat: api.HeartbeatRequest, now: float) -> None:
        """Record the agent's load and tokens. The agent may take itself off the market (``offline``
        while its engine is down, ``draining`` before it stops); only a passing health check lists an
        instance ``online`` again, and a draining one is never checked again."""
        provider.last_seen_at = now
        provider.slots_total, provider.slots_busy, provider.queue_depth = beat.slots_total, beat.slots_busy, beat.queue_depth
        provider.reported_prompt_tokens += beat.prompt_tokens
        provider.reported_completion_tokens += beat.completion_tokens
        if beat.capacity is not None:
            provider.capacity = beat.capacity
        if beat.status in ("draining", "offline"):
            provider.status = beat.status

    def remember(self, provider: Provider, key: str, beat: api.HeartbeatRequest, answer: api.HeartbeatResponse) -> None:
        """A heartbeat sent again with this key is answered the same, and counted no more."""
        provider.answered[key] = (beat, answer)
        while len(provider.answered) > ANSWERED_KEYS:
            del provider.answered[next(iter(provider.answered))]

    def set_rails(self, account: Account, update: api.RailsUpdate) -> api.Rails:
        stripe = account.accepts_stripe if update.accepts_stripe is None else update.accepts_stripe
        tempo = account.accepts_tempo if update.accepts_tempo is None else update.accepts_tempo
        if not (stripe or tempo):
            raise RailError("at least one payment rail must remain enabled")
        if stripe and not account.accepts_stripe and not account.stripe_onboarded:
            raise RailError("accepts_stripe needs Stripe Connect onboarding to be complete")
        if tempo and not account.accepts_tempo and not account.tempo_wallet:
            raise RailError("accepts_tempo needs a verified Tempo wallet address")
        account.accepts_stripe, account.accepts_tempo = stripe, tempo
        return rails_of(account)

    def candidates(self, model: str, rail: Rail) -> list[Provider]:
        """Online providers of ``model`` accepting ``rail``: cheapest first, least recently used on ties."""
        wanted = model.lower()
        eligible = [p for p in self.providers.values() if p.status == "online" and p.model == wanted and p.account.accepts(rail)]
        return sorted(eligible, key=lambda p: (p.offer.output_price_per_million, p.offer.input_price_per_million, p.last_routed_at))

    def knows_model(self, model: str) -> bool:
        return any(p.model == model.lower() for p in self.providers.values())

    def record_request(self, model: str, rail: Rail, now: float) -> BuyerRequest:
        self._forget_before(now - DAY_SECONDS)
        entry = BuyerRequest(at=now, model=model.lower(), rail=rail)
        self.requests.append(entry)
        return entry

    def record_usage(self, entry: BuyerRequest, provider: Provider, status: int, prompt_tokens: int, completion_tokens: int, now: float) -> None:
        entry.provider_id, entry.status = provider.id, status
        entry.prompt_tokens, entry.completion_tokens = prompt_tokens, completion_tokens
        provider.last_routed_at = now
        provider.routed_requests += 1
        provider.routed_prompt_tokens += prompt_tokens
        provider.routed_completion_tokens += completion_tokens

    def demand(self, now: float) -> api.DemandResponse:
        """Per model: buyer requests in the last 24 h, online providers and their price ranges."""
        self._forget_before(now - DAY_SECONDS)
        models = sorted({r.model for r in self.requests} | {p.model for p in self.providers.values()})
        return api.DemandResponse(models=[self._model_demand(model) for model in models])

    def _model_demand(self, model: str) -> api.ModelDemand:
        online = [p for p in self.providers.values() if p.model == model and p.status == "online"]
        return api.ModelDemand(
            model=model,
            requests_24h=sum(1 for r in self.requests if r.model == model),
            online_providers=len(online),
            input_price_per_million=_price_range([p.offer.input_price_per_million for p in online]),
            output_price_per_million=_price_range([p.offer.output_price_per_million for p in online]),
            capacity_tokens_per_second=_capacity([p.capacity for p in online]),
        )

    def _forget_before(self, cutoff: float) -> None:
        while self.requests and self.requests[0].at < cutoff:
            self.requests.popleft()

    def issue_challenge(self, model: str, amount: int, ttl: float, now: float) -> Challenge:
        for expired in [c.id for c in self.challenges.values() if c.expires_at < now]:
            del self.challenges[expired]
        challenge = Challenge(id="ch_" + secrets.token_hex(8), model=model, amount=amount, expires_at=now + ttl)
        self.challenges[challenge.id] = challenge
        return challenge

    def live_challenge(self, challenge_id: str, now: float) -> Challenge | None:
        challenge = self.challenges.get(challenge_id)
        return challenge if challenge is not None and challenge.expires_at >= now else None


def rails_of(account: Account) -> api.Rails:
    return api.Rails(accepts_stripe=account.accepts_stripe, accepts_tempo=account.accepts_tempo)


def _price_range(prices: list[int]) -> api.PriceRange | None:
    return api.PriceRange(min=min(prices), max=max(prices), median=statistics.median_low(prices)) if prices else None


def _capacity(reported: list[api.Capacity | None]) -> float | None:
    """Tokens per second the online providers say they can decode together (None when none reports it)."""
    known = [c.all_slots_tokens_per_second for c in reported if c is not None]
    return round(float(sum(known)), 1) if known else None
