"""Raw llama_decode (a measurement, not a server bench): what other sequences' cells resident in the
shared KV cache cost a prompt chunk decoded alone in its call.

Sequence 0 holds DEPTH prompt tokens; a chunk of ROWS more is decoded and removed again, seven times
(the median is kept), first with nothing else in the cache, then beside 1, 2, 4 and 8 other
sequences of CELLS tokens each, then alone again. The chunk's own attention reads only its own
cells, but ggml's tiled CPU flash attention converts each 64x64 block of the mask, for every head,
before it skips a block masked out for the whole tile, so the chunk's cost grows with every cell in
use (docs/performance.md, "Marketplace workload").

    .venv/bin/python bench/resident_cells.py [--rows 128] [--depth 512] [--cells 1500] [--others 1,2,4,8]

Results: bench/results/2026-12-07-resident-cells.txt.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from vramsupply.engine.batch import Batch  # noqa: E402

MODEL = str(REPO / "bench" / ".cache" / "bench-llama-768x12-q8_0.gguf").encode()
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--rows", type=int, default=128, help="the prompt chunk timed (default 128: two 64-row tiles)")
parser.add_argument("--depth", type=int, default=512, help="tokens sequence 0 holds before the chunk (default 512)")
parser.add_argument("--cells", type=int, default=1500, help="tokens each other sequence holds (default 1500)")
parser.add_argument("--others", default="1,2,4,8", help="how many other sequences, in turn (default 1,2,4,8)")
args = parser.parse_args()
others = [int(n) for n in args.others.split(",")]
n_ctx = args.depth + args.rows + max(others) * args.cells + 512
llama_cpp.llama_backend_init()
model = llama_cpp.llama_model_load_from_file(MODEL, llama_cpp.llama_model_default_params())
vocab = llama_cpp.llama_model_get_vocab(model)
cp = llama_cpp.llama_context_default_params()
cp.n_ctx, cp.n_seq_max, cp.n_batch, cp.n_ubatch, cp.kv_unified = n_ctx, max(others) + 1, 2048, 512, True
cp.n_threads = cp.n_threads_batch = 2
cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
ctx = llama_cpp.llama_init_from_model(model, cp)
memory = llama_cpp.llama_get_memory(ctx)
rng = np.random.default_rng(0)
n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
batch = Batch(2048)


def decode(seq: int, start: int, n: int) -> float:
    batch.clear()
    batch.add_chunk(rng.integers(100, n_vocab - 100, n).astype(np.int32), start, seq, True)
    started = time.perf_counter()
    assert llama_cpp.llama_decode(ctx, batch.for_decode()) == 0
    return time.perf_counter() - started


def fill(seq: int, n: int) -> None:
    for start in range(0, n, 512):
        decode(seq, start, min(512, n - start))


def chunk_ms(reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        times.append(decode(0, args.depth, args.rows))
        llama_cpp.llama_memory_seq_rm(memory, 0, args.depth, -1)
    return statistics.median(times) * 1000


def report(label: str, ms: float) -> None:
    print(f"  {label:34s} {ms:7.1f} ms  ({ms / args.rows:.3f} ms a row)", flush=True)


print(f"# a {args.rows}-row chunk of sequence 0 at depth {args.depth}, {n_ctx}-cell shared cache, flash attention on, "
      f"2 threads; median of 7 decodes each")
fill(0, args.depth)
chunk_ms(2)  # warm-up
report("alone", chunk_ms())
resident = 0
for n in others:
    while resident < n:
        resident += 1
        fill(resident, args.cells)
    report(f"beside {n} x {args.cells} resident cells", chunk_ms())
for seq in range(1, resident + 1):
    llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
report("alone again", chunk_ms())
