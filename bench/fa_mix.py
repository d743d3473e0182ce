"""Raw llama_decode (a measurement, not a server bench): does mixing many sequences' generating rows into a tiled step slow the prompt rows?
12 resident sequences of DEPTH tokens (interleaved or in blocks), a 13th prefilling at its depth.

    .venv/bin/python bench/fa_mix.py [streams] [depth] [blocks|interleave] [--flash-attention on|off]

Results: bench/results/2026-12-03-fa-mix.json (docs/performance.md, "Why overload is still lost"), and with
the two-decode cases at 8,192 cells bench/results/2026-12-05-fa-mix-apart.txt (engine/tiles.py, "Apart");
both attention kinds on the Intel Xeon VM, bench/results/2026-12-06-fa-mix-xeon.txt (docs/performance.md)."""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import llama_cpp
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from vramsupply.engine.batch import Batch
MODEL = str(REPO / "bench" / ".cache" / "bench-llama-768x12-q8_0.gguf").encode()
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("streams", type=int, nargs="?", default=12, help="resident sequences generating (default 12)")
parser.add_argument("depth", type=int, nargs="?", default=280, help="tokens each holds (default 280)")
parser.add_argument("layout", nargs="?", choices=("blocks", "interleave"), default="blocks", help="their cells in blocks (default) or interleaved")
parser.add_argument("--flash-attention", choices=("on", "off"), default="on",
                    help="off: plain attention, V stored transposed, as vramsupply's default on an Intel CPU with AMX (default on)")
args = parser.parse_args()
N_CTX = 8192  # vramsupply's default since 2026-12-05 (the 2026-12-03 results were measured at 4096)
if not 1 <= args.streams <= 15 or args.depth < 1 or (args.streams + 1) * (args.depth + 129) > N_CTX:
    parser.error(f"streams must be 1-15 (the prompt takes the 16th sequence), depth at least 1, and (streams + 1) x (depth + 129) within {N_CTX} cells")
STREAMS, DEPTH = args.streams, args.depth
INTERLEAVE = args.layout == "interleave"
llama_cpp.llama_backend_init()
mp = llama_cpp.llama_model_default_params()
model = llama_cpp.llama_model_load_from_file(MODEL, mp)
cp = llama_cpp.llama_context_default_params()
cp.n_ctx, cp.n_seq_max, cp.n_batch, cp.n_ubatch, cp.kv_unified = N_CTX, 16, 2048, 512, True
cp.n_threads = cp.n_threads_batch = 2
cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if args.flash_attention == "on" else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
ctx = llama_cpp.llama_init_from_model(model, cp)
mem = llama_cpp.llama_get_memory(ctx)
rng = np.random.default_rng(0)
batch = Batch(2048)
def decode():
    rc = llama_cpp.llama_decode(ctx, batch.for_decode()); assert rc == 0, rc
P = STREAMS  # the prompt's sequence id
if INTERLEAVE:  # cells interleaved: one token of every sequence per step, as streams generate
    for pos in range(DEPTH):
        batch.clear()
        for s in range(STREAMS + 1):
            batch.add(int(rng.integers(100, 30000)), pos, s)
        decode()
else:
    for s in range(STREAMS + 1):
        batch.clear(); batch.add_chunk(rng.integers(100, 30000, DEPTH).astype(np.int32), 0, s, True); decode()
def step(gen: int, prompt: int, prompt_first: bool) -> float:
    batch.clear()
    def add_gen():
        for s in range(gen): batch.add(7, DEPTH, s)
    def add_prompt():
        if prompt: batch.add_chunk(rng.integers(100, 30000, prompt).astype(np.int32), DEPTH, P, True)
    (add_prompt(), add_gen()) if prompt_first else (add_gen(), add_prompt())
    t = time.perf_counter(); decode(); dt = time.perf_counter() - t
    for s in list(range(gen)) + ([P] if prompt else []):
        llama_cpp.llama_memory_seq_rm(mem, s, DEPTH, -1)
    return dt
def apart(gen: int, prompt: int) -> float:
    """The generating rows, then the prompt rows, in two llama_decode calls (engine/tiles.py, "Apart")."""
    batch.clear()
    for s in range(gen): batch.add(7, DEPTH, s)
    t = time.perf_counter(); decode()
    batch.clear(); batch.add_chunk(rng.integers(100, 30000, prompt).astype(np.int32), DEPTH, P, True); decode()
    dt = time.perf_counter() - t
    for s in list(range(gen)) + [P]:
        llama_cpp.llama_memory_seq_rm(mem, s, DEPTH, -1)
    return dt
cases = [("gen only", STREAMS, 0, False), ("gen + 16 prompt (row by row)", STREAMS, 16, False),
         (f"gen + {64-STREAMS} prompt, gen first (one tile)", STREAMS, 64 - STREAMS, False),
         (f"{64-STREAMS} prompt + gen, prompt first (one tile)", STREAMS, 64 - STREAMS, True),
         ("gen + 64 prompt, gen first", STREAMS, 64, False), ("64 prompt + gen, prompt first", STREAMS, 64, True),
         ("gen + 128 prompt, gen first", STREAMS, 128, False), ("128 prompt + gen, prompt first", STREAMS, 128, True),
         ("64 prompt alone", 0, 64, False), ("128 prompt alone", 0, 128, False), ("16 prompt alone", 0, 16, False)]
for _ in range(2): step(STREAMS, 64, False)
print(f"{STREAMS} streams at depth {DEPTH}, cells {'interleaved' if INTERLEAVE else 'in blocks'}, flash attention {args.flash_attention}")
cases += [("gen, then 64 prompt: two decodes", STREAMS, 64, "apart"), ("gen, then 128 prompt: two decodes", STREAMS, 128, "apart")]
for name, g, p, first in cases:
    ts = [apart(g, p) if first == "apart" else step(g, p, first) for _ in range(5)]
    print(f"  {name:40s} {statistics.median(ts)*1000:7.1f} ms")
