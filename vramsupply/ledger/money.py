"""Money in the ledger: whole nanocents (10⁻⁹ ¢) in integers, shown as exact decimals, never floats.

Prices are integer cents per million tokens, so a request's gross is ``tokens × price`` millionths
of a cent. Counted in nanocents that is ``× 1000``, and the provider's 95 % of it (``× 950``) is a
whole number too: every sum in the ledger is exact, however many requests it adds up.
"""

from __future__ import annotations

from decimal import Decimal

NANOCENTS_PER_CENT = 10**9
NANOCENTS_PER_MICROCENT = 1000
"""One token at a price of 1 ¢ per million is a micro-cent (10⁻⁶ ¢)."""
PROVIDER_SHARE_PERCENT = 95
"""Providers earn 95 % of revenue; the platform keeps 5 % (the Providing page)."""


def gross_nanocents(prompt_tokens: int, completion_tokens: int, input_price: int, output_price: int) -> int:
    """What the buyer pays for a request at prices in cents per million tokens (cached prompt tokens included)."""
    return (prompt_tokens * input_price + completion_tokens * output_price) * NANOCENTS_PER_MICROCENT


def earned_nanocents(gross: int) -> int:
    """The provider's share of ``gross``; exact because gross is a multiple of 1000 nanocents."""
    return gross * PROVIDER_SHARE_PERCENT // 100


def cents(nanocents: int) -> Decimal:
    """Nanocents as an exact decimal number of cents, without trailing zeros: 214600000 → 0.2146."""
    value = Decimal(nanocents).scaleb(-9)
    return value.quantize(Decimal(1)) if value == value.to_integral_value() else value.normalize()


def dollars_text(nanocents: int, places: int = 2) -> str:
    """For tables: ``$1,234.57``, or two significant digits below a cent (``$0.0019``)."""
    value = Decimal(nanocents).scaleb(-11)
    if value and abs(value) < Decimal("0.01"):
        places = min(11, 1 - value.adjusted())
    return f"${value:,.{places}f}"
