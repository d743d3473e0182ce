"""Test double: the real `vramsupply` command line with one fault injected into llama.cpp's decode.

Run as ``python tests/fault_agent.py serve ...`` with
  FAULT_AGENT_KIND=crash|stall   what the faulty decode does: raise, or block forever
  FAULT_AGENT_TRIGGER=<path>     the fault strikes at the first decode after this file exists,
                                 so a test can first see the agent healthy, then break it.

Only ``llama_cpp.llama_decode`` is replaced; the scheduler, server and serve lifecycle that must
notice the fault are the real ones.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import llama_cpp

from vramsupply.cli import main

KIND = os.environ["FAULT_AGENT_KIND"]
TRIGGER = Path(os.environ["FAULT_AGENT_TRIGGER"])
real_decode = llama_cpp.llama_decode
never = threading.Event()


def faulty_decode(ctx: object, batch: object) -> int:
    if TRIGGER.exists():
        if KIND == "crash":
            raise RuntimeError("injected fault: the decode step crashed")
        never.wait()
    return real_decode(ctx, batch)


llama_cpp.llama_decode = faulty_decode

if __name__ == "__main__":
    main()
