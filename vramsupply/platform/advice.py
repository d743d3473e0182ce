"""Pricing advice for `vramsupply demand`: where your price sits in the market, and what it earns per hour.

For each model the provider can serve: the market's band of output prices (low, median, high over
the online providers), where the provider's own price sits in it, and the dollars per hour this
machine would earn at its measured throughput (`vramsupply bench`, all slots busy) at the band's
low, median and high. Output tokens only: prompt tokens are paid on top, but how many depends on
the buyers.

On the Tempo rail (MPP) a buyer's 402 challenge quotes one per-token amount in whole base units of
a 6-decimal stablecoin: 1 unit per token is $1.00 per million (100 ¢/M). The 5 % fee is read as inside
the price, on every rail (buyers pay the provider's price, the provider earns 95 % of it; the docs
also call the fee a markup, which would raise the quote: docs/platform-api.md), and the
quote is rounded up to a whole unit: a price of 200 ¢/M is quoted as 2 units, 250 ¢/M as 3, and
every price from 201 to 300 ¢/M as the same 3 units. The one amount is the dearer of the provider's
two prices (usually the output price), so a quote is never below what a token costs. (The reference
platform's receipts charge a request's tokens at the provider's prices, rounded up once a request:
README, Earnings.)
Arithmetic is exact (integers and ``Decimal``).

The band is what other providers ask, so anyone can put anything in it: an offer above the highest
price this agent accepts (``config.MAX_PRICE``, $10,000 per million) counts as that price, and the
advice says the band was capped. One troll's 10²⁶ ¢/M must not turn everyone's advice into
nonsense, or into a crash. A band whose numbers are not in order (a low above the high, a median
outside them) is a platform bug: which of its numbers is wrong cannot be known, so no advice is
built on it (sorting them would make up a median); the advice says what was sent and why it is
not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, localcontext

from vramsupply.config import MAX_PRICE
from vramsupply.platform import api
from vramsupply.display import plain
from vramsupply.platform.offer import format_cents

PROVIDER_SHARE = Decimal(95) / 100
CENTS_PER_MILLION_PER_UNIT = 100
"""One base unit (10⁻⁶ of a stablecoin dollar) per token is 100 ¢ per million tokens."""
SECONDS_PER_HOUR = 3600
MAX_COUNT = 10**12
"""More requests or providers than any market has (10 million a second for a day): shown as a bound."""


def asked_price(cents: int) -> str:
    """A price another provider asks; past the bounds any agent accepts, only which side (10⁴⁰⁰ is no float)."""
    if cents > MAX_PRICE:
        return f"over {format_cents(MAX_PRICE)}"
    return format_cents(cents) if cents >= 0 else "below $0.00"


def count_text(number: int) -> str:
    """A count the platform sent; one no market can have (below 0, over ``MAX_COUNT``) only as which side."""
    if number < 0:
        return "below 0"
    return f"{number:,}" if number <= MAX_COUNT else f"over {MAX_COUNT:,}"


def consistent(prices: api.PriceRange) -> bool:
    """Whether the platform's band is one: low ≤ median ≤ high."""
    return prices.min <= prices.max and (prices.median is None or prices.min <= prices.median <= prices.max)


@dataclass(frozen=True)
class Band:
    low: int
    median: int
    high: int
    median_estimated: bool  # the platform sent no median: the middle of low and high stands in
    capped: bool = False  # an offer was above MAX_PRICE (or below 0) and counts as that bound

    @classmethod
    def of(cls, prices: api.PriceRange) -> Band:
        """The band of ``prices``, capped; they must be ``consistent`` (advise leaves out any other)."""
        if not consistent(prices):
            raise ValueError(f"not a band: min {prices.min}, median {prices.median}, max {prices.max}")
        median = prices.median if prices.median is not None else (prices.min + prices.max) // 2
        sent = (prices.min, median, prices.max)
        low, middle, high = (min(max(price, 0), MAX_PRICE) for price in sent)
        return cls(low, middle, high, prices.median is None, (low, middle, high) != sent)

    def position(self, price: int) -> str:
        """Where ``price`` sits: below or above the band, or how far from low to high (0 % = the cheapest)."""
        if price < self.low:
            return "below the band: the cheapest offer"
        if price > self.high:
            return "above the band: the most expensive offer"
        if self.high == self.low:
            return "at the band's only price"
        percent = (price - self.low) * 100 // (self.high - self.low)
        side = "below" if price < self.median else "above" if price > self.median else "at"
        return f"{percent} % of the way from low to high, {side} the median"


def earned_cents_per_hour(tokens_per_second: float, price_cents_per_million: int) -> Decimal:
    """What the provider keeps per hour (95 %) selling ``tokens_per_second`` output tokens at the price."""
    tokens_per_hour = Decimal(str(tokens_per_second)) * SECONDS_PER_HOUR
    return tokens_per_hour * price_cents_per_million / 1_000_000 * PROVIDER_SHARE


def tempo_units(price_cents_per_million: int) -> int:
    """Base units per token a Tempo buyer pays: the price (the fee is inside it), rounded up to a whole unit."""
    return -(-price_cents_per_million // CENTS_PER_MILLION_PER_UNIT)


def tempo_price_range(units: int) -> tuple[int, int]:
    """The lowest and highest prices (¢/M) that a Tempo buyer pays ``units`` per token for."""
    step = CENTS_PER_MILLION_PER_UNIT
    return ((units - 1) * step + 1 if units > 0 else 0, units * step)


@dataclass(frozen=True)
class Advice:
    model: str
    price: int
    band: Band | None
    online_providers: int
    tokens_per_second: float | None
    slots: int | None
    inconsistent_band: api.PriceRange | None = None  # what the platform sent instead of a band (not used)
    price_from: str = ""  # where ``price`` came from, when not the settings (the running agent's record, a flag)
    yours_in_band: bool = False  # the agent running here offers this model: its own price is one of the band's
    input_price: int | None = None  # the input price in force, when known: a Tempo quote is the dearer price's

    @property
    def per_hour(self) -> tuple[Decimal, Decimal, Decimal] | None:
        """Earned cents per hour at the band's low, median and high, at the measured throughput."""
        if self.band is None or self.tokens_per_second is None:
            return None
        return (
            earned_cents_per_hour(self.tokens_per_second, self.band.low),
            earned_cents_per_hour(self.tokens_per_second, self.band.median),
            earned_cents_per_hour(self.tokens_per_second, self.band.high),
        )

    @property
    def quoted_price(self) -> int:
        """The price a Tempo challenge quotes: one amount for every token, so the dearer of the two."""
        return max(self.price, self.input_price or 0)

    @property
    def tempo(self) -> tuple[int, int, int]:
        """(units per token, lowest and highest price in ¢/M with the same units)."""
        units = tempo_units(self.quoted_price)
        return (units, *tempo_price_range(units))

    def as_json(self) -> dict[str, object]:
        per_hour = self.per_hour
        units, same_from, same_to = self.tempo
        rejected = {} if self.inconsistent_band is None else {"inconsistent_band": self.inconsistent_band.model_dump()}
        return {
            "model": self.model,
            "your_output_price_per_million": self.price,
            "your_price_from": self.price_from or "settings",
            "band_includes_yours": self.yours_in_band,
            "band": None if self.band is None else self.band_json(self.band),
            "position": None if self.band is None else self.band.position(self.price),
            "tokens_per_second": self.tokens_per_second,
            "earned_cents_per_hour": None if per_hour is None else dict(zip(("low", "median", "high"), (str(_cents(c)) for c in per_hour))),
            "tempo": {
                "units_per_token": units, "cents_per_million": units * CENTS_PER_MILLION_PER_UNIT,
                "for_price": self.quoted_price, "same_units_from": same_from, "same_units_to": same_to,
            },
            **rejected,
        }


    @staticmethod
    def band_json(band: Band) -> dict[str, object]:
        shown: dict[str, object] = {"low": band.low, "median": band.median, "high": band.high, "median_estimated": band.median_estimated}
        return {**shown, "capped": True} if band.capped else shown


def _cents(value: Decimal) -> Decimal:
    with localcontext() as context:  # every digit: quantize fails on a result longer than the context's precision
        context.prec = max(context.prec, value.adjusted() + 3)
        return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def advise(
    demand: api.DemandResponse,
    servable: set[str],
    price: int,
    tokens_per_second: dict[str, tuple[float, int]],
    price_from: str = "",
    offering: str | None = None,
    input_price: int | None = None,
) -> list[Advice]:
    """Advice for every model in the market you could serve; throughput per model from `vramsupply bench`.
    ``offering``: the model the agent running here offers, whose band holds its own price."""
    advice = []
    for entry in sorted(demand.models, key=lambda m: m.model):
        if entry.model.lower() not in servable:
            continue
        measured = tokens_per_second.get(entry.model.lower())
        prices = entry.output_price_per_million
        usable = prices if prices is not None and consistent(prices) else None
        advice.append(
            Advice(
                model=entry.model,
                price=price,
                band=None if usable is None else Band.of(usable),
                online_providers=entry.online_providers,
                tokens_per_second=None if measured is None else measured[0],
                slots=None if measured is None else measured[1],
                inconsistent_band=prices if usable is None else None,
                price_from=price_from,
                yours_in_band=offering is not None and entry.model.lower() == offering.lower(),
                input_price=input_price,
            )
        )
    return advice


def _dollars(cents: int | Decimal) -> str:
    return f"${Decimal(cents) / 100:,.2f}"


def _band_lines(advice: Advice) -> list[str]:
    band, sent = advice.band, advice.inconsistent_band
    if sent is not None:
        median = "" if sent.median is None else f", median {asked_price(sent.median)}"
        return [
            f"  market band: not used, the platform sent low {asked_price(sent.min)}{median}, high {asked_price(sent.max)}, "
            "which is no band (low ≤ median ≤ high does not hold)"
        ]
    if band is None:
        return ["  market band: no provider is online for it, so there is no market price yet"]
    median = f"median {_dollars(band.median)}" + (" (est.)" if band.median_estimated else "")
    yours = ", your running agent among them" if advice.yours_in_band else ""
    lines = [f"  market band: low {_dollars(band.low)}, {median}, high {_dollars(band.high)} ({count_text(advice.online_providers)} online{yours})"]
    if band.capped:
        lines.append(f"  (capped: an offer outside $0.00–{_dollars(MAX_PRICE)}, the prices an agent can ask, counts as the nearer bound)")
    source = f" ({advice.price_from})" if advice.price_from else ""
    lines.append(f"  your price: {_dollars(advice.price)}{source}, {band.position(advice.price)}")
    return lines


def advice_lines(advice: Advice) -> list[str]:
    """The advice for one model, a line per point, for the terminal."""
    lines = [f"Pricing advice for {plain(advice.model)} (output price per million tokens)", *_band_lines(advice)]
    per_hour = advice.per_hour
    if per_hour is not None:
        low, median_h, high = (_dollars(_cents(c)) for c in per_hour)
        lines.append(
            f"  at your measured {advice.tokens_per_second:,.1f} tok/s ({advice.slots} slots busy) you would earn "
            f"{low}/h at low, {median_h}/h at median, {high}/h at high (95 %, output tokens only)"
        )
    elif advice.tokens_per_second is None:
        lines.append("  run `vramsupply bench` to see what this machine would earn per hour at these prices")
    lines.append(_tempo_line(advice))
    return lines


def _tempo_line(advice: Advice) -> str:
    units, same_from, same_to = advice.tempo
    quoted = advice.quoted_price
    yours = f"input price {_dollars(quoted)}/M, the dearer of your two" if quoted > advice.price else f"{_dollars(quoted)}/M"
    return (
        f"  Tempo (MPP): buyers are quoted {units} unit(s)/token = {_dollars(units * CENTS_PER_MILLION_PER_UNIT)}/M for your "
        f"{yours} (the 5 % fee read as inside the price; rounded up to a whole unit); every price from "
        f"{_dollars(same_from)} to {_dollars(same_to)} is quoted the same"
    )
