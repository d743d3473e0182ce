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

    def tokens_within(self, seconds: float, depth: int) -> int:
        """The most prompt tokens starting at ``depth`` that fit in ``seconds``."""
        if seconds <= 0 or not self._seen:
            return 0
        seconds /= self._bias
        largest = GROWTH * int(max(tokens for tokens, _, _ in self._seen))
        if self._cheapest > 0:
            largest = min(largest, int(seconds / self._cheapest))
        linear = self._per_token + self._per_depth * depth  # seconds = half * c^2 + linear * c
        half = self._per_depth / 2
        if half > 0:
            return min(largest, int((-linear + math.sqrt(linear * linear + 4 * half * seconds)) / (2 * half)))
        return min(largest, int(seconds / linear)) if linear > 0 else largest

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


def work(tokens: int, depth: int) -> float:
    """Tokens times their mean depth: the attention work of a chunk, in token-depth units."""
    return tokens * (depth + tokens / 2)


class Smoothed:
    """A moving average of one quantity, unknown (None) until first observed."""

    def __init__(self) -> None:
        self.value: float | None = None

    def observe(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + SMOOTHING * (sample - self.value)
