"""`python -m vramsupply` and the `vramsupply` command: import the command line, then run it.

Importing it takes about half a second, more on a busy machine. Ctrl-C in that window exits at once
with 130: nothing has been opened or written yet, so there is nothing to clean up. A
KeyboardInterrupt raised in the middle of an import can instead leave the interpreter waiting at
exit (seen as `devplatform` ignoring a Ctrl-C sent 0.3 s after start on a loaded machine), so the
window gets a handler that ends the process outright. Once the import is done Python's own
handler is back, and each command's own signal handling takes over.

`serve` promises more (README): Ctrl-C or SIGTERM at any moment stops it and exits 0. Its own
handling (``signals.StopSignals``) starts only once the command runs, up to a second or two after
the process did, and SIGTERM's default ended it with 143 and no word, so a service manager or a
script that stopped a just-started agent saw a failure. For `serve` the window's handler covers
SIGTERM and SIGHUP too, stays until ``StopSignals`` replaces it, and exits 0 with one line: before
that nothing is loaded, listening or registered (the data dir's lock goes with the process).

What comes before this module runs, the interpreter's own start (10 to 20 ms, most of it ``site``),
no Python code can cover: a SIGTERM there ends the process by the signal. systemd counts that as a
clean stop, as it counts an exit 0 (SIGTERM is one of the signals it takes as success for a service
that is not oneshot), so the unit needs no ``SuccessExitStatus=143``: nothing here exits 143.

Every command runs in Python's UTF-8 mode. Where the locale is no UTF-8 one and Python was told
not to switch by itself (``PYTHONCOERCECLOCALE=0``), it decodes the command line and file names as
ASCII, and a model file named `modèle.gguf` came in as a string no JSON or log line can hold
(`serve` died with a traceback writing it into its state file). Such a process runs itself
again at once, with ``-X utf8`` (the same process: ``exec`` keeps its pid for systemd), before
anything is imported or opened. Python 3.15 makes UTF-8 mode the default (PEP 686).
"""

import os
import signal
import sys

EARLY_STOP_LINE = "stopped before serving started"


def _exit_now(signum: int, frame: object) -> None:
    os._exit(128 + signum)


def _stop_before_serving(signum: int, frame: object) -> None:
    """`serve` stopped before its own handling began: nothing to drain or settle."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    try:
        os.write(2, f"{name} received: {EARLY_STOP_LINE}\n".encode())
    except OSError:
        pass  # no stderr to tell: the exit code still says it
    os._exit(0)


def _is_serve(args: list[str]) -> bool:
    """Whether the command is `serve`: the first word that is no option (the root has no option taking a value)."""
    return next((arg for arg in args if not arg.startswith("-")), None) == "serve"


def _handle_early_stops(serving: bool) -> None:
    if not serving:
        signal.signal(signal.SIGINT, _exit_now)
        return
    signal.signal(signal.SIGINT, _stop_before_serving)
    signal.signal(signal.SIGTERM, _stop_before_serving)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup: a closed terminal stops nothing
        signal.signal(signal.SIGHUP, _stop_before_serving)


def _in_utf8() -> bool:
    return bool(sys.flags.utf8_mode) or sys.getfilesystemencoding().lower().replace("-", "") == "utf8"


def _again_in_utf8_mode() -> None:
    """Run this command line again in Python's UTF-8 mode (see the module's docstring)."""
    argv = list(sys.orig_argv)
    os.execv(sys.executable, [argv[0], "-X", "utf8", *argv[1:]])


def run() -> None:
    if not _in_utf8():
        _again_in_utf8_mode()
    serving = _is_serve(sys.argv[1:])
    _handle_early_stops(serving)
    try:
        from vramsupply.cli import main
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        if not serving:  # serve keeps the handler until StopSignals replaces it
            signal.signal(signal.SIGINT, signal.default_int_handler)
    main()


if __name__ == "__main__":
    run()
