"""The root `vramsupply` app, what every command shares (consoles, one-line errors, settings),
and ``main``: the CLI's one error boundary."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import sys
from typing import Any, NoReturn, Optional

import typer
from rich.text import Text

from vramsupply import __version__
from vramsupply.config import Settings, api_key_problem, config_path, display_value, env_name, load_settings, write_config_values
from vramsupply.display import FitTable, make_console, plain
from vramsupply.errors import Interrupted, VramsupplyError
from vramsupply.output import ClosedStdout, point_stdout_at_devnull, stand_in_for_closed_stdout

# -h is --help everywhere, as in most tools (no command uses -h for anything else; -m is --model).
# Click passes these names down to every subcommand's context; each group names them too.
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
# Help in click's plain layout, not typer's rich panels: those cut option names to fit their
# columns (`--context-length,--max-mode…`, `--tensor-parallel-…` at 80 columns, `--conte…` at 40),
# where click's wraps the help text and writes every name whole, at any width and through a pipe.


class _PlainHelpGroup(typer.core.TyperGroup):
    """Click's plain help, with each command's description whole: click cuts it to what fits on
    one line ("Store your vram.supply API key in the config file (mode...")."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=sys.maxsize)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


PLAIN_HELP: dict[str, Any] = {"rich_markup_mode": None, "cls": _PlainHelpGroup}

app = typer.Typer(
    name="vramsupply",
    help="Serve GGUF models on the vram.supply marketplace.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings=HELP_OPTIONS,
    **PLAIN_HELP,
)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True, context_settings=HELP_OPTIONS, **PLAIN_HELP)
app.add_typer(config_app, name="config")
service_app = typer.Typer(help="Run the agent as a systemd service.", no_args_is_help=True, context_settings=HELP_OPTIONS, **PLAIN_HELP)
app.add_typer(service_app, name="service")
models_app = typer.Typer(help="Find, download and manage GGUF models in the shared HuggingFace cache.", no_args_is_help=True, context_settings=HELP_OPTIONS, **PLAIN_HELP)
app.add_typer(models_app, name="models")

# No markup: nothing we print is markup, and what we print holds names and paths from outside (a
# "[/x]" in one stopped the command with rich's MarkupError).
console = make_console()
err_console = make_console(stderr=True)


def report(message: str) -> None:
    """One readable line on stderr (printed as text: brackets in a message are not markup)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Refuse a command's own arguments: one line on stderr and exit 2, the code of every invalid
    flag or setting (README); ``code`` 1 for a refusal that is no usage error."""
    report(message)
    raise typer.Exit(code)


def settings_from(flags: dict[str, Any]) -> Settings:
    return load_settings(flags).settings


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"vramsupply {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
) -> None:
    """vramsupply: the provider agent of the vram.supply inference marketplace."""


def _source(sources: dict[str, str], name: str) -> str:
    if name == "quant" and sources[name] == "default":  # unset, serve takes the quant that fits (README)
        return "default: unset, serve picks the best quant that fits, and this one only without a plan"
    return sources[name]


@config_app.command("show")
def config_show(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Show every effective setting and where it came from (secrets masked)."""
    loaded = load_settings()
    rows = [(name, display_value(loaded.settings, name), _source(loaded.sources, name)) for name in Settings.model_fields]
    if as_json:
        console.print_json(json.dumps({name: {"value": value, "source": source} for name, value, source in rows}))
        return
    table = FitTable(title=f"vramsupply settings (config file: {config_path()})")
    for column in ("setting", "value", "source"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(plain(value) for value in row))  # a setting may hold anything, escape characters too
    console.print(table)


@app.command()
def login(
    api_key: Optional[str] = typer.Option(None, "--api-key", help="API key; prompted for (hidden) when omitted."),
) -> None:
    """Store your vram.supply API key in the config file (mode 0600)."""
    key = (api_key if api_key is not None else _ask_for_key()).strip()
    problem = api_key_problem(key)
    if problem is not None:
        fail(problem)
    path = config_path()
    write_config_values(path, {"api_key": key})
    console.print(f"API key saved to {path} (mode 0600).")
    from vramsupply.platform.api_key import api_key_variable

    overriding = api_key_variable()
    if overriding is not None and os.environ[overriding].strip() != key:  # it beats the config file: every command uses it
        err_console.print(f"warning: {overriding} is set in this environment and is used instead of the saved key: unset it to use this one", highlight=False, soft_wrap=True)
    from vramsupply.service.held_keys import services_keeping_another_key

    for env_file, flag in services_keeping_another_key(key):
        err_console.print(
            f"warning: the service's {env_file} sets another {env_name('api_key')}, which the service uses: "
            f"run `vramsupply service install{flag}` again to give it this one", highlight=False, soft_wrap=True,
        )  # fmt: skip


def _ask_for_key() -> str:
    """Hidden at a terminal; one line when piped in (getpass would warn that it cannot hide it)."""
    if sys.stdin is None or sys.stdin.closed:
        fail("no API key: pass --api-key, or run `vramsupply login` in a terminal")
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line.strip():
            fail("no API key on standard input: pipe the key in (`echo KEY | vramsupply login`), or pass --api-key")
        return line
    try:
        return typer.prompt("vram.supply API key", hide_input=True)
    except typer.Abort:  # Ctrl-C or end of input at the prompt
        raise Interrupted("login cancelled; nothing saved") from None


USER_UNIT_OPTION = typer.Option(False, "--user", help="The per-user service (systemctl --user) instead of the system one.")
UNIT_DIR_OPTION = typer.Option(None, "--unit-dir", help="Directory for the unit file (default: systemd's own).")
ENV_FILE_OPTION = typer.Option(None, "--env-file", help="Settings file the unit reads (default: /etc/vramsupply/env; with --user ~/.config/vramsupply/env).")
QUANT_OPTION = typer.Option(None, "--quant", help="Quantization, e.g. Q4_K_M (default: the quant setting; unset, the best that fits this machine).")
CACHE_DIR_OPTION = typer.Option(None, "--cache-dir", metavar="<path>", help="HuggingFace cache dir (default: the cache_dir setting, else the shared HF cache).")
JSON_OPTION = typer.Option(False, "--json", help="Print JSON instead of a table.")


def main() -> None:
    """The CLI's one error boundary: a known error becomes one line on stderr and its exit code.

    Usage errors (unknown flag, bad type) are typer's, formatted and exited (2) inside ``app()``.
    An interrupt that reaches here arrived outside any command's own signal handling (while
    Python was still importing, say): exit 130 quietly, as a shell expects.
    """
    stand_in_for_closed_stdout()
    _tolerant_output()
    try:
        code = app(standalone_mode=False, prog_name="vramsupply")  # usage errors come here as exceptions, not typer's boxed panel
    except SystemExit:
        _flush_stdout()
        raise
    except typer.TyperException as exc:  # click's errors, which typer vendors: usage (exit 2) and the like
        _command_line_error(exc)
    except typer.Abort:  # Ctrl-C or end of input at a prompt
        sys.exit(Interrupted.exit_code)
    except VramsupplyError as exc:
        report(str(exc))
        sys.exit(exc.exit_code)
    except BrokenPipeError:  # the reader of our output left (`| head`): quietly, as click does
        point_stdout_at_devnull()
        sys.exit(1)
    except OSError as exc:  # the system refused something no module turned into a VramsupplyError
        _flush_stdout()  # when it was standard output, say so (and not again at exit)
        report(_os_error_line(exc))
        sys.exit(1)
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit(Interrupted.exit_code)
    _flush_stdout()
    sys.exit(code if isinstance(code, int) else 0)  # typer.Exit's code; a command's own return value is not one


def _command_line_error(exc: typer.TyperException) -> NoReturn:
    """A usage error (unknown flag or command, a bad or missing value) in one line, as every other
    error, with where the help is; a group named alone (`vramsupply config`) shows its help."""
    code = getattr(exc, "exit_code", 2)
    if type(exc).__name__ == "NoArgsIsHelpError":  # click's message is the help itself
        typer.echo(exc.format_message())
    else:
        format_message = getattr(exc, "format_message", None)
        message = format_message() if format_message is not None else str(exc)
        ctx = getattr(exc, "ctx", None)
        report(f"{message} (see `{ctx.command_path} --help`)" if code == 2 and ctx is not None else message)
    _flush_stdout()
    sys.exit(code)


def _tolerant_output() -> None:
    """An output encoding without the characters we print (``PYTHONIOENCODING=ascii``; a ✓, an
    ellipsis) writes them as ``?``, where it raised from inside rich with a traceback."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and (stream.encoding or "").lower().replace("-", "") not in ("utf8", "utf16", "utf32"):
            try:
                reconfigure(errors="replace")
            except (OSError, ValueError):
                pass


def _os_error_line(exc: OSError) -> str:
    if exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    if isinstance(exc, ClosedStdout) or (exc.errno == errno.ENOSPC and _stdout_can_fill()):  # no file named: our output (rich flushes as it prints)
        point_stdout_at_devnull()
        return f"cannot write to standard output: {exc.strerror}"
    if exc.errno == errno.ENOSPC:  # a write or close names no file; it was not our output
        return f"{exc.strerror}: a disk this command writes to is full; free some space and run it again"
    if exc.errno == errno.ENOENT and _working_directory_gone():  # a relative path made absolute
        return "the current directory no longer exists (it was deleted or moved): cd to one that does, or give absolute paths"
    return str(exc.strerror or exc)


def _stdout_can_fill() -> bool:
    """Whether standard output could be what is full: a file or a device (``> /dev/full``), not a
    terminal, pipe or socket, which never answer "no space"; when it cannot be told, it could."""
    try:
        fd = sys.stdout.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):
        return True
    return not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd))


def _working_directory_gone() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


def _flush_stdout() -> None:
    """Output that could not be written (a full disk, a reader that left) is an error in one line,
    not Python's "Exception ignored" block at exit, and never a success."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        point_stdout_at_devnull()
        sys.exit(1)
    except (OSError, ValueError) as exc:
        point_stdout_at_devnull()
        report(f"cannot write to standard output: {getattr(exc, 'strerror', None) or exc}")
        sys.exit(1)
