"""Where a step's rows meet ggml-cpu flash attention's 64-row tiles (``step_cost.TILE_ROWS``).

On a CPU, prompt rows cost about half as much a row in whole tiles as in smaller chunks, and a tile
shared by several sequences' rows computes every cell in use. The pacer (``pacing.py``) sizes a
step's prompt chunks; this module holds what it asks about tiles: whether a whole tile goes in place
of a smaller chunk, how a step is cut into ``llama_decode`` calls, and whether a prompt's end may
be padded to a tile.

**Whole tiles beside streams.** A chunk below a tile attends row by row over every cell in use,
at about twice a tile's cost a row at depth (``step_cost.py``), and more beside many streams, whose
sequences fill the cache: in a marketplace run at 0.4 conv/s (wave 2's 52nd session) 758 steps
beside streams carried chunks below a tile, 26 rows on average, at 4.8 ms a row (the streams' rows
included) against 2.1 in whole tiles; at 0.2 conv/s, 177 such steps carried late prompts' chunks.
Where the step's target leaves room for less than a tile, a whole tile goes instead when the step
is predicted within ``STEP_LIMIT_SECONDS``, still under the gap bound; a late prompt takes one
only within what the streams on track spare too, and where that is less, it takes nothing and
waits: a step of the streams' rows alone adds to what they spare (their mean per token drops). The
end of a prompt, shorter than a tile, goes as it can, or padded to a whole tile by decoding its
last cached tokens again (``PrefillPacer._pad_to_tile``).

**Apart** (``decode_parts``). ggml's CPU flash attention runs a micro-batch of 64 rows or more in
64-row tiles (``step_cost.py``), and skips a tile of KV cells only when every row of the tile is
masked from all of them. In one decode the generating rows of several sequences share such a tile,
which then computes every cell in use, padded rows and all. So when a step's generating rows and
prompt rows together reach a tile, they are decoded in two calls: the generating rows (each row on
its own, reading only its own cells), then the prompt rows, tiled among themselves. Raw decodes on
the 2-core bench CPU (``bench/fa_mix.py``, 8,192-cell cache, each sequence's cells together): 4 / 6 /
12 streams' rows and 64 prompt rows took 184 / 248 / 274 ms in one decode, 108 / 126 / 127 ms in
two; with 128 prompt rows 272 / 334 / 373 ms against 188 / 200 / 209. So the prompt rows of a step
are counted alone when it is cut at a whole tile. Two calls read the weights twice, which a step
below a tile does not pay for: it stays one decode. Where a sequence's cells lie among other
sequences' (generated side by side), a tile of its prompt rows skips none and costs more than rows
on their own: the learned costs of the two kinds of step (``step_cost.py``) choose between them.
Only where attention runs in ggml-cpu's flash attention (``model.tiled_cpu_attention``): with
layers on a GPU, or flash attention off, a step stays one decode (not measured on a GPU).
"""

from __future__ import annotations

import llama_cpp

from .model import Model
from .slots import Plan
from .step_cost import TILE_ROWS, StepCost

STEP_LIMIT_SECONDS = 0.18
"""How long a step may be predicted to take to carry a whole tile in place of a chunk below one
(module docstring, "Whole tiles beside streams"): the 250 ms bound on a stream's gap, less the
prediction's usual error (p90 1.16x, ``step_cost.py``) and the token's write."""


def decode_parts(plan: Plan) -> list[Plan]:
    """The ``llama_decode`` calls a step is made of: one, or, when generating rows and prompt rows
    together reach a tile (``TILE_ROWS``), the generating rows and then the prompt rows (module
    docstring, "Apart")."""
    generating = [item for item in plan if item[1] is None]
    prompts = [item for item in plan if item[1] is not None]
    rows = len(generating) + sum(len(chunk) for _, chunk in prompts)  # type: ignore[arg-type]
    if not generating or not prompts or rows < TILE_ROWS:
        return [plan]
    return [generating, prompts]


def tile_budget(step: float, late: bool, allowance: float | None) -> tuple[float, float | None]:
    """The seconds a whole tile may take in a step whose generating rows take ``step``: within
    ``STEP_LIMIT_SECONDS``, and for a late prompt within what the streams on track spare
    (``allowance``) too, then the step's limit alone as the second (what it waits for)."""
    limit = STEP_LIMIT_SECONDS - step
    if not late:
        return limit, None
    return (limit if allowance is None else min(limit, allowance - step)), limit


def tile_in_place(cost: StepCost, size: int, most: int, rows: int, depth: int, budget: tuple[float, float | None]) -> int:
    """``size`` prompt rows from ``depth``, or in place of a chunk below a tile (the step's first
    prompt rows, at most ``most``) a whole tile where one fits ``budget``'s first seconds, or none
    where one fits only its second (a late prompt waiting for the streams to spare one): module
    docstring, "Whole tiles beside streams"."""
    if rows or size >= TILE_ROWS or most < TILE_ROWS or not cost.tiled.known:  # (no exploring past the target)
        return size
    this_step, waiting = budget
    if cost.tokens_within(this_step, depth, 0, TILE_ROWS) >= TILE_ROWS:
        return TILE_ROWS
    if waiting is not None and cost.tokens_within(waiting, depth, 0, TILE_ROWS) >= TILE_ROWS:
        return 0
    return size


def rewinds_for_tiles(model: Model, kv_per_slot: bool) -> bool:
    """Whether the pacer may decode a prompt's last cached tokens again to fill a tile
    (``PrefillPacer._pad_to_tile``): attention KV in one shared cache, without a sliding window (whose cache may have dropped cells
    that the tokens decoded again attend to)."""
    return model.copies_prefixes and not kv_per_slot and llama_cpp.llama_model_n_swa(model.llama_model.model) == 0
