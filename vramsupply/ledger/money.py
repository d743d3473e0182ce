"""Money in the ledger: whole nanocents (10⁻⁹ ¢) in integers, shown as exact decimals, never floats.

Prices are integer cents per million tokens, so a request's gross is ``tokens × price`` millionths
of a cent. Counted in nanocents that is ``× 1000``, and the provider's 95 % of it (``× 950``) is a
whole number too: every sum in the ledger is exact, however many requests it adds up.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

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


SIGNIFICANT_DIGITS = 4
"""Amounts in tables keep at least this many digits: a small one is never read as a whole cent."""


def dollars_text(nanocents: int) -> str:
    """For tables: ``$1,234.57``, and at least four significant digits below $100 (``$0.01501``,
    ``$0.0019``): rounding each cell to the cent showed 1.500696 ¢ gross as $0.02 and its 95 %,
    1.4256612 ¢, as $0.01. Zeros past the cents are left off. A half rounds up, as on an invoice
    (``format`` alone rounds it to even: $0.010005 was $0.01, not $0.01001)."""
    value = Decimal(nanocents).scaleb(-11)
    places = max(2, min(11, SIGNIFICANT_DIGITS - 1 - value.adjusted())) if value else 2
    text = f"{value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP):,.{places}f}"
    if places > 2:
        text = text.rstrip("0").ljust(text.index(".") + 3, "0")
    return f"${text}"
