"""`python -m vramsupply` and the `vramsupply` command: import the command line, then run it.

Importing it takes about half a second, more on a busy machine. Ctrl-C in that window exits at once
with 130: nothing has been opened or written yet, so there is nothing to clean up. A
KeyboardInterrupt raised in the middle of an import can instead leave the interpreter waiting at
exit (seen as `devplatform` ignoring a Ctrl-C sent 0.3 s after start on a loaded machine), so the
window gets a handler that ends the process outright. Once the import is done Python's own
handler is back, and each command's own signal handling takes over.
"""

import os
import signal
import sys


def _exit_now(signum: int, frame: object) -> None:
    os._exit(128 + signum)


def run() -> None:
    signal.signal(signal.SIGINT, _exit_now)
    try:
        from vramsupply.cli import main
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    main()


if __name__ == "__main__":
    run()
