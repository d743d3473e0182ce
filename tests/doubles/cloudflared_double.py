"""A test double for `cloudflared tunnel --url URL` (Cloudflare's quick tunnel): no network beyond 127.0.0.1.

Like the real tool it prints its log to stderr, including the box with the public
``https://<words>.trycloudflare.com`` address, and forwards traffic to URL; here the "public" side
is a TCP port on 127.0.0.1. Every start appends ``{"pid", "url", "forward_port"}`` as one JSON line
to ``$CLOUDFLARED_DOUBLE_DIR/starts.jsonl``, so a test can see each run, reach the agent through
it, and kill it. Each run announces a new URL, as a restarted quick tunnel does. With
``CLOUDFLARED_DOUBLE_LONG_LINE=N`` it first logs a line of N characters.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


def log(level: str, message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {level} {message}", file=sys.stderr, flush=True)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main() -> None:
    args = sys.argv[1:]
    if args[:1] != ["tunnel"] or "--url" not in args:
        log("ERR", f"the cloudflared test double only knows `tunnel --url URL`, got {args}")
        sys.exit(2)
    target = urlsplit(args[args.index("--url") + 1])

    async def forward(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(target.hostname, target.port)
        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))

    server = await asyncio.start_server(forward, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state = Path(os.environ["CLOUDFLARED_DOUBLE_DIR"])
    runs = len((state / "starts.jsonl").read_text().splitlines()) if (state / "starts.jsonl").exists() else 0
    url = f"https://double-run-{runs + 1}-{os.getpid()}.trycloudflare.com"
    with open(state / "starts.jsonl", "a") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "url": url, "forward_port": port}) + "\n")

    log("INF", "Thank you for trying Cloudflare Tunnel. Doing so, without a Cloudflare account, is a quick way to experiment.")
    log("INF", "Requesting new quick Tunnel on trycloudflare.com...")
    if os.environ.get("CLOUDFLARED_DOUBLE_LONG_LINE"):  # a log line past asyncio's 64 KiB reader limit
        log("DBG", "x" * int(os.environ["CLOUDFLARED_DOUBLE_LONG_LINE"]))
    log("INF", "+--------------------------------------------------------------------------------------------+")
    log("INF", "|  Your quick Tunnel has been created! Visit it at (it may take some time to be reachable):  |")
    log("INF", f"|  {url}{' ' * max(1, 90 - len(url))}|")
    log("INF", "+--------------------------------------------------------------------------------------------+")
    log("INF", f"Registered tunnel connection connIndex=0 location=test-double protocol=quic forwarding to {target.geturl()}")
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
