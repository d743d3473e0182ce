"""Test double: the real `vramsupply` command line with one fault injected into llama.cpp's decode.

Run as ``python tests/fault_agent.py serve ...`` with
  FAULT_AGENT_KIND=<kind>        what the faulty decode does:
                                   crash        raise
                                   stall        block forever
                                   fail_status  return -3 (llama.cpp's "compute failed", e.g. out of GPU memory)
                                   stall_once   block FAULT_STALL_SECONDS once, then decode normally
  FAULT_AGENT_TRIGGER=<path>     the fault strikes at the first decode after this file exists,
                                 so a test can first see the agent healthy, then break it.
  FAULT_STALL_SECONDS=<seconds>  how long ``stall_once`` blocks (default 10).
  FAULT_AGENT_AFTER=<n>          the fault strikes only after n decodes with the trigger there
                                 (default 0): a request then streams some tokens, and stops mid-answer.

``stall_once`` says on stderr when the stall begins ("FAULT: stalling a decode") and ends
("FAULT: the decode resumes"), so a test can tell what happened while the step was stuck.

Only ``llama_cpp.llama_decode`` is replaced; the scheduler, server and serve lifecycle that must
notice the fault are the real ones.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import llama_cpp

from vramsupply.cli import main

KIND = os.environ["FAULT_AGENT_KIND"]
TRIGGER = Path(os.environ["FAULT_AGENT_TRIGGER"])
STALL_SECONDS = float(os.environ.get("FAULT_STALL_SECONDS", "10"))
AFTER = int(os.environ.get("FAULT_AGENT_AFTER", "0"))
decodes_with_trigger = 0
COMPUTE_FAILED = -3
real_decode = llama_cpp.llama_decode
never = threading.Event()


def faulty_decode(ctx: object, batch: object) -> int:
    global decodes_with_trigger
    if TRIGGER.exists() and AFTER and decodes_with_trigger < AFTER:
        decodes_with_trigger += 1
    elif TRIGGER.exists():
        if KIND == "crash":
            raise RuntimeError("injected fault: the decode step crashed")
        if KIND == "fail_status":
            return COMPUTE_FAILED
        if KIND == "stall_once":
            TRIGGER.unlink()
            print("FAULT: stalling a decode", file=sys.stderr, flush=True)
            # Until a monotonic deadline, as Python 3.11+'s time.sleep does: 3.10's sleep (select with a
            # relative timeout) leaves out the time the process was stopped (SIGSTOP).
            deadline = time.monotonic() + STALL_SECONDS
            while (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, 0.05))
            print("FAULT: the decode resumes", file=sys.stderr, flush=True)
        else:
            if AFTER:
                print("FAULT: stalling a decode", file=sys.stderr, flush=True)
            never.wait()
    return real_decode(ctx, batch)


llama_cpp.llama_decode = faulty_decode

if __name__ == "__main__":
    main()
