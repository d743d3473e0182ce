#!/usr/bin/env python3
"""Both servers at their defaults on a machine that is busy with something else.

A provider's CPU box may run other work. Each server is started at its defaults on the bench
model, then measured at c = 1 and 4 (2 x c requests of 64 tokens) alone and beside two busy
processes in a session of their own (``while True: pass``; on a 2-core VM that leaves each
server's group about one core, since the kernel groups threads by session). Prints the tok/s.

    bench/.cache/venv-llamacpp-server/bin/python bench/contention.py
"""
import asyncio, subprocess, sys, time, json
sys.path.insert(0, "/work/main/bench")
from servers import SERVERS, BENCH_MODEL, defaults_config, running_server, wait_ready, REPO
from client import eos_token_id, request_bodies, run_level

def hogs(n):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(n)]

async def level(server, c, eos):
    bodies = request_bodies(server.spec, 2 * c, 64, eos)
    results, wall = await run_level(server.url, bodies, c)
    return round(sum(r.completion_tokens for r in results) / wall, 1)

async def main():
    model = BENCH_MODEL
    cfg = defaults_config(model, REPO / ".venv" / "bin" / "vramsupply")
    eos = eos_token_id(model)
    out = {}
    for name in ("vramsupply", "llama-server"):
        with running_server(SERVERS[name], cfg, model) as server:
            await wait_ready(server)
            await level(server, 1, eos)
            for hog_count in (0, 2):
                procs = hogs(hog_count)
                time.sleep(0.5)
                try:
                    r = {c: await level(server, c, eos) for c in (1, 4)}
                finally:
                    for p in procs: p.kill()
                out[f"{name} hogs={hog_count}"] = r
                print(name, "hogs", hog_count, r, flush=True)
    print(json.dumps(out))
asyncio.run(main())
