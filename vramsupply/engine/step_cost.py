"""What a prompt chunk costs in a decode step, learned from the steps themselves, knowing its depth.

A prompt token costs its pass through the weights, the same wherever it sits, plus attention over
every token before it in its sequence, which grows with depth. On the 2-core bench machine a
96-token chunk next to one stream took about 1.3 ms a token at depth 0 and 2.2 ms at depth 1000.
One learned seconds-per-token figure therefore lags behind a prompt as it goes deeper: chunks sized
from it overshoot the step's time target more and more (a 2048-token prompt put a 264 ms gap in a
stream at a 0.15 s target that way), and the target had to be set well below the stall bound to
leave room for that error, which makes prompts beside streams prefill in small, slow chunks.

So the cost of a chunk of ``c`` tokens starting at depth ``d`` is modelled as
``c * (per_token + per_depth * (d + c / 2))`` (``d + c / 2``: the mean depth of its tokens),
fitted by least squares over the last ``WINDOW`` observed steps, the older weighing less (by
``DECAY`` a step), so it follows the machine as its load changes: the same figures on the bench
machine drifted by half between runs, and sometimes within a prompt. Replayed over four traces of
prompts beside a stream, a step's time came within 16 % of the prediction nine times in ten this
way (p90 1.16x), against 1.28x with equal weights. A step carries its generating rows too; their
part is learned apart by the pacer, from steps that carry no prompt, and taken off before
fitting. Until the depth term
can be told apart (all steps so far at about the same depth), or when a fit comes out negative, a
flat seconds-per-token is used, as before.

A line fitted at one range of depths says little outside it: fitted deep in one prompt, it put the
next prompt's first token, at depth 0, at a third of its real cost, and sized a 0.39 s step from
that. A line is also wrong where the cost bends: on the bench machine a step's cost jumps by a third
somewhere past depth 1500 (memory, not arithmetic), and the fit needs several steps to follow.
So the ratio of each step's time to the fitted line is kept as a moving average and applies to
the next predictions: replayed over seven traces, 97 % of steps came within 1.39x of the
prediction (1.58x without).

And no prediction is cheaper per token than the cheapest step in the window, and no chunk is more
than ``GROWTH`` times the largest in it: a new range of depths or sizes is entered in steps, and
the fit learns it from them. (Right after start-up, one 16-token step with the generating rows'
part taken off sized a 400-token chunk that way, and put a 268 ms gap in a stream.)

**Whole tiles** (``StepCost``). ggml's CPU flash attention takes a micro-batch of ``TILE_ROWS`` rows
or more through a tiled path built on matrix products, in tiles of that many rows (``GGML_FA_TILE_Q``),
and a smaller one row by row, each row reading every cell before it. At depth the row-by-row path
costs about twice as much a token: beside one stream on the bench CPU a step of 62 prompt rows at
depth 1500 took 352 ms and one of 63 (64 rows with the stream's) 168 ms; 63 rows at depth 800, 213
ms against 139. Past 64 a partial tile costs nearly a whole one (151 rows took 333 ms where 128
took 245). One line cannot fit that, and the paced chunks of 30-60 tokens it sized were the slow
kind. So steps below and from ``TILE_ROWS`` rows are learned apart, and a step that reaches the
tiled path is cut at a whole number of tiles. Before a tiled step has been seen, the row-by-row
cost bounds it from above, and one tile is tried when that bound is within ``EXPLORE`` times the
time left (and the tile within ``GROWTH`` times the largest chunk seen). The tiled fit learns only
from tiled steps, so once it came out too dear (a few slow deep tiles in its window, flat across
depths), no tile was tried again, and the steps it turned down went row by row, below a tile, at
the dearer cost, with nothing to correct it: in a marketplace run at 0.2 conv/s (wave 2's 52nd
session), 206 steps beside streams carried 8,502 prompt rows that way, 63 rows at a time where a
tile was predicted at 0.151 s whatever the depth, at about 2.7 ms a row against 1.5 in whole tiles
(a tile of 64 at depth 400 took 92 ms, 63 rows beside it 119). So where the tiled fit says no tile
fits, the row-by-row fit, an upper bound on a tile, still takes one when it predicts it within the
time left, and the tile's time corrects the tiled fit. Row-by-row steps are then rare (the first
chunk of a prompt, the end of one), so their fit rarely knows the depth it is asked about:
deeper than ``DEPTH_TRUST`` and than it has seen, one takes at most ``UNSEEN_DEPTH_TOKENS``, and
learns from that. Better still, the end of a prompt shorter than a tile (the rest of a deep
prompt, or a follow-up question behind a cached history) is padded to a whole tile with cached
tokens before it, decoded again (``pays_to_pad``, ``sharing.rewind_for_tile``).
Where the two paths cost the same (other backends), both fits agree and the only change is chunks
cut at multiples of 64 rows.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

WINDOW = 16
"""Steps a fit looks back over: a few seconds of steps beside a stream on the bench machine."""
GROWTH = 2
"""A chunk is at most this many times the largest in the window."""
DECAY = 0.7
"""Weight of a step relative to the one after it."""
MIN_DEPTH_SPREAD = 64.0
"""The depth term is fitted only once the observed steps' mean depths differ by this many tokens."""
SMOOTHING = 0.3
BIAS_SMOOTHING = 0.3
MIN_BIAS, MAX_BIAS = 0.5, 2.0
TILE_ROWS = 64
"""Rows from which a micro-batch's attention runs tiled, in tiles of this many (ggml-cpu's GGML_FA_TILE_Q)."""
DEPTH_TRUST = 256
"""How much deeper than any step seen a row-by-row step is still sized by its fit."""
UNSEEN_DEPTH_TOKENS = 16
"""A row-by-row step deeper than that takes at most this many prompt tokens: at depth its cost per
token grows about four times as fast as a tiled step's (1.5 ms a token at depth 8, 5.7 at 1775 on
the bench CPU), so a fit from the first chunks of prompts, or from tiled steps, undersizes it (a
52-token end of a prompt sized at 70 ms took 297 ms)."""
EXPLORE = 1.25
"""A first tiled step may take up to this many times the time left, as the row-by-row fit predicts it:
that fit overestimates a tiled step (about twice, at depth, on the bench CPU). Where it does not,
the one step overshoots by at most this much (a 0.14 s prompt share to 0.175 s)."""


class ChunkCost:
    """Seconds of prompt rows in a step, as a function of chunk size and depth."""

    def __init__(self) -> None:
        self._seen: deque[tuple[float, float, float]] = deque(maxlen=WINDOW)
        """(tokens, tokens x mean depth, seconds) of recent steps' prompt rows."""
        self._per_token = 0.0
        self._per_depth = 0.0
        self._cheapest = 0.0
        """Seconds a token in the cheapest step of the window: no prediction goes below it."""
        self._bias = 1.0
        """How far the latest steps came out from the fitted line (a moving ratio), applied to it."""

    @property
    def known(self) -> bool:
        return bool(self._seen)

    def covers(self, depth: int) -> bool:
        """Whether a step in the window started within ``DEPTH_TRUST`` tokens of ``depth`` or deeper."""
        return any(depth_tokens / tokens - tokens / 2 >= depth - DEPTH_TRUST for tokens, depth_tokens, _ in self._seen)

    def observe(self, tokens: int, depth_tokens: float, seconds: float) -> None:
        """A step's prompt rows: ``tokens`` of them, ``depth_tokens`` the sum of their depths
        (``work`` below), took ``seconds``."""
        if tokens <= 0:
            return
        seconds = max(seconds, 0.0)
        self._seen.append((float(tokens), depth_tokens, seconds))
        self._fit()
        fitted = self._fitted(tokens, depth_tokens)
        if fitted > 0:
            residual = min(max(seconds / fitted, MIN_BIAS), MAX_BIAS)
            self._bias += BIAS_SMOOTHING * (residual - self._bias)

    def seconds(self, tokens: int, depth: int) -> float:
        """Predicted seconds of ``tokens`` prompt tokens starting at ``depth`` (0 before any step)."""
        return self.predict(tokens, work(tokens, depth))

    def predict(self, tokens: int, depth_tokens: float) -> float:
        """Predicted seconds of a step's prompt rows, given as ``observe`` takes them."""
        return self._bias * self._fitted(tokens, depth_tokens)

    def _fitted(self, tokens: int, depth_tokens: float) -> float:
        return max(self._per_token * tokens + self._per_depth * depth_tokens, self._cheapest * tokens)

    def tokens_within(self, seconds: float, depth: int, headroom: int = 0) -> int:
        """The most prompt tokens starting at ``depth`` that fit in ``seconds``; ``headroom``: tokens
        allowed beyond ``GROWTH`` times the largest chunk seen (room to reach the next whole tile)."""
        if seconds <= 0 or not self._seen:
            return 0
        seconds /= self._bias
        largest = GROWTH * int(max(tokens for tokens, _, _ in self._seen)) + headroom
        if self._cheapest > 0:
            largest = min(largest, int(seconds / self._cheapest))
        linear = self._per_token + self._per_depth * depth  # seconds = half * c^2 + linear * c
        half = self._per_depth / 2
        if linear <= 0:
            return largest
        # The quadratic's root in the form that stays exact as ``half`` goes to 0 (the textbook
        # form subtracts two nearly equal numbers, and a depth term of 1e-22 gave 0 tokens).
        return min(largest, int(2 * seconds / (linear + math.sqrt(linear * linear + 4 * half * seconds))))

    def _fit(self) -> None:
        seen = np.array(self._seen)
        tokens, depth_tokens, seconds = seen[:, 0], seen[:, 1], seen[:, 2]
        weights = DECAY ** np.arange(len(seen) - 1, -1, -1)
        self._cheapest = float((seconds / tokens).min())
        flat = float((weights * seconds).sum() / (weights * tokens).sum())
        mean_depth = depth_tokens / tokens
        if mean_depth.max() - mean_depth.min() >= MIN_DEPTH_SPREAD:
            scale = np.sqrt(weights)
            features = np.column_stack([tokens, depth_tokens]) * scale[:, None]
            (per_token, per_depth), *_ = np.linalg.lstsq(features, seconds * scale, rcond=None)
            if per_token > 0 and per_depth >= 0:
                self._per_token, self._per_depth = float(per_token), float(per_depth)
                return
        self._per_token, self._per_depth = flat, 0.0


class StepCost:
    """Prompt rows' cost in one kind of step (beside streams, or alone), learned apart for steps of
    fewer than ``TILE_ROWS`` rows and of more (module docstring)."""

    def __init__(self) -> None:
        self.small = ChunkCost()
        self.tiled = ChunkCost()
        self._every = ChunkCost()
        """Every step, of either kind: what a whole prompt is judged to cost (``whole_seconds``)."""

    @property
    def known(self) -> bool:
        return self._every.known

    def observe(self, rows: int, tokens: int, depth_tokens: float, seconds: float) -> None:
        """A step of ``rows`` rows in all, ``tokens`` of them prompt rows (``ChunkCost.observe``)."""
        (self.tiled if rows >= TILE_ROWS else self.small).observe(tokens, depth_tokens, seconds)
        self._every.observe(tokens, depth_tokens, seconds)

    def seconds(self, tokens: int, depth: int, rows_before: int = 0) -> float:
        """Predicted seconds of ``tokens`` prompt tokens from ``depth`` in a step that already has
        ``rows_before`` rows; the row-by-row fit, an upper bound, while no tiled step is known."""
        return self._model(rows_before + tokens).seconds(tokens, depth)

    def predict(self, rows: int, tokens: int, depth_tokens: float) -> float:
        """Predicted seconds of a step's prompt rows, given as ``observe`` takes them."""
        return self._model(rows).predict(tokens, depth_tokens)

    def whole_seconds(self, tokens: int, depth: int) -> float:
        """Predicted seconds of prefilling ``tokens`` from ``depth`` in chunks of both kinds (0 while
        nothing is known): whether a prompt can still answer in time (``pacing.py``), what a saved
        prompt spares (``save_policy.py``)."""
        return self._every.seconds(tokens, depth)

    def _model(self, rows: int) -> ChunkCost:
        if rows >= TILE_ROWS:
            return self.tiled if self.tiled.known else self.small
        return self.small if self.small.known else self.tiled

    def tokens_within(self, seconds: float, depth: int, rows_before: int, limit: int) -> int:
        """The most prompt tokens from ``depth``, at most ``limit``, for a step with ``rows_before``
        rows so far to stay within ``seconds``: a step that reaches the tiled path ends at a whole
        tile, unless that cuts off the ``limit`` whole, and once a tiled step is known, its fit
        alone says whether one fits. (The row-by-row fit, learned near the start of prompts,
        allowed a tile at depth 3,600 where the tiled fit said 0.21 s for a 0.15 s share.)"""
        small = min(limit, self._model(0).tokens_within(seconds, depth))
        if rows_before + small >= TILE_ROWS and self.tiled.known:
            small = TILE_ROWS - 1 - rows_before  # it reaches the tiled path, whose own fit sizes tiles
        elif rows_before + small >= TILE_ROWS and small < limit:
            small = _whole_tiles(rows_before, small)  # only whole tiles pay; none seen yet: an upper bound
        if rows_before + small < TILE_ROWS and not self._row_by_row_known(depth):
            small = min(small, UNSEEN_DEPTH_TOKENS)
        return max(small, self._tiles_within(seconds, depth, rows_before, limit))

    def pays_to_pad(self, tokens: int, pad: int, depth: int, seconds: float) -> bool:
        """Whether the last ``tokens`` of a prompt, from ``depth``, prefill sooner with the ``pad``
        cached tokens before them decoded again, so that the step fills a whole tile: when a tiled
        step is known to fit ``seconds``, and a row-by-row one is known to cost more there (short
        ends cost less row by row: 27 tokens at depth 1000 took 95 ms so, 133 ms padded)."""
        if not self.tiled.known:
            return False
        padded = self.tiled.seconds(tokens + pad, depth - pad)
        if padded > seconds:
            return False
        return self._row_by_row_known(depth) and self.small.seconds(tokens, depth) > padded

    def _row_by_row_known(self, depth: int) -> bool:
        """Whether a row-by-row step from ``depth`` can be sized by a fit: shallow, where the two
        paths cost about the same a token, or no deeper than such steps have been seen."""
        return depth <= DEPTH_TRUST or self.small.covers(depth)

    def _tiles_within(self, seconds: float, depth: int, rows_before: int, limit: int) -> int:
        """The most tokens ending the step at a whole tile within ``seconds``; 0 when not one fits.
        Where the tiled fit says none fits, or knows nothing yet, the row-by-row fit bounds one tile
        from above (module docstring, "Whole tiles")."""
        bound = EXPLORE * seconds
        if self.tiled.known:
            fits = min(limit, self.tiled.tokens_within(seconds, depth, headroom=TILE_ROWS))
            tiles = limit if fits >= limit and rows_before + limit >= TILE_ROWS else _whole_tiles(rows_before, fits)
            if tiles:
                return tiles
            bound = seconds  # a stale tiled fit: the row-by-row one, an upper bound, may still fit a tile
        one_tile = _whole_tiles(rows_before, TILE_ROWS)  # the rows that fill the step's next tile
        if self._row_by_row_known(depth) and 0 < one_tile <= min(limit, self.small.tokens_within(bound, depth)):
            return one_tile  # (grown at most GROWTH-fold too)
        return 0


def _whole_tiles(rows_before: int, tokens: int) -> int:
    """``tokens`` cut so that the step's rows end at a whole tile (0 when it would not reach one)."""
    return max(0, (rows_before + tokens) // TILE_ROWS * TILE_ROWS - rows_before)


def work(tokens: int, depth: int) -> float:
    """Tokens times their mean depth: the attention work of a chunk, in token-depth units."""
    return tokens * (depth + tokens / 2)


class Smoothed:
    """A moving average of one quantity, unknown (None) until first observed."""

    def __init__(self) -> None:
        self.value: float | None = None

    def observe(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + SMOOTHING * (sample - self.value)
