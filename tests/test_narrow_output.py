"""What a provider reads in a narrow terminal (40 columns) and through a pipe: every value whole.

Rich, short of room, ended table cells with "…" (``prov_e4a949d2ea6b1…``, ``http://127.0.0.1:8…``,
token counts ``1…``, prices ``$2.…``) or dropped whole columns (gross and earned); piped output was
wrapped at 80 columns, so ``| grep`` saw half a value; typer's help cut flag names
(``--context-length,--max-mode…``); log messages wrapped into an 11-column strip beside the time.

A value may wrap onto the next line in a narrow terminal, never be cut: ``unfolded`` joins the lines
back (dropping the table rules and indentation) so that a value shows whole wherever it wrapped.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

import pytest
from conftest import run_cli
from live_platform import API_KEY, LivePlatform
from ports import free_port

from vramsupply.ledger import Entry, LedgerStore, default_ledger_path, earned_nanocents, gross_nanocents
from vramsupply.ledger.money import dollars_text
from vramsupply.platform import PlatformClient, Phase, RegistrationState, default_state_path
from vramsupply.platform.api import RegisterRequest
from vramsupply.platform.state import write_state

NARROW = {"COLUMNS": "40"}
PROVIDER_ID = "prov_e4a949d2ea6b1c7f0a3d5e8b2c4f6a19"
PLATFORM_URL = "http://127.0.0.1:8123/platform-behind-a-proxy/v1"
ENDPOINT_URL = "https://gpu-box-7.tunnel.example.com/provider/endpoint"
TABLE_RULES = "│┃║┆┊╎"


def unfolded(output: str) -> str:
    """The output with its line breaks, table rules and indentation taken out: a value that wrapped
    (within its cell or its block) reads whole again."""
    return "".join(line.strip().strip(TABLE_RULES).strip() for line in output.splitlines())


def assert_whole(output: str, *values: str) -> None:
    assert "…" not in output, output
    joined = unfolded(output)
    for value in values:
        assert value.replace(" ", "") in joined.replace(" ", ""), f"{value!r} is not whole in:\n{output}"


def widest_line(output: str) -> int:
    return max(len(line.rstrip()) for line in output.splitlines())


def test_status_in_40_columns_shows_the_whole_provider_id_and_urls() -> None:
    write_state(
        default_state_path(),
        RegistrationState(
            phase=Phase.registered, platform_url=PLATFORM_URL, model="stories260k", endpoint_url=ENDPOINT_URL,
            provider_id=PROVIDER_ID, pid=os.getpid(), updated_at=time.time(), last_heartbeat_at=time.time(),
        ),
    )
    port = free_port()
    result = run_cli("status", env={**NARROW, "VRAM_SUPPLY_PORT": str(port)})

    assert result.returncode in (1, 3), result.stderr
    assert_whole(result.stdout, PROVIDER_ID, PLATFORM_URL, ENDPOINT_URL, f"http://127.0.0.1:{port}")
    assert widest_line(result.stdout) <= 40


def registered_here() -> None:
    write_state(
        default_state_path(),
        RegistrationState(
            phase=Phase.registered, platform_url=PLATFORM_URL, model="stories260k", endpoint_url=ENDPOINT_URL,
            provider_id=PROVIDER_ID, pid=os.getpid(), updated_at=time.time(), last_heartbeat_at=time.time(),
        ),
    )


def assert_each_on_one_line(output: str, *words: str) -> None:
    """Each of ``words`` (a value with no space in it) sits whole on one line: a cell folds between
    words, and breaks a word only where the word is wider than the terminal."""
    lines = output.splitlines()
    for word in words:
        assert any(word in line for line in lines), f"{word!r} is broken across lines in:\n{output}"


@pytest.mark.parametrize("columns", [70, 90, 120])
def test_status_as_wide_as_the_terminal_folds_between_words_and_keeps_every_value_whole(columns: int) -> None:
    """Between "one block per row" and "every cell on one line" a table folds its cells, each column
    at least as wide as its longest word: no id, URL or word is split, no line passes the edge."""
    registered_here()
    port = free_port()
    result = run_cli("status", env={"COLUMNS": str(columns), "VRAM_SUPPLY_PORT": str(port)})

    assert result.returncode in (1, 3), result.stderr
    assert_whole(result.stdout, PROVIDER_ID, PLATFORM_URL, ENDPOINT_URL, f"http://127.0.0.1:{port}")
    assert_each_on_one_line(result.stdout, PROVIDER_ID, PLATFORM_URL, ENDPOINT_URL, f"http://127.0.0.1:{port}")
    assert widest_line(result.stdout) <= columns


def test_fit_table_neither_overrides_nor_calls_a_private_method_of_rich() -> None:
    """rich's private methods change between releases without notice: an upgrade must not silently
    bring back cut values (or a crash) in every table we print. FitTable uses rich's public API only."""
    import inspect

    from rich.table import Table

    from vramsupply.display import FitTable

    rich_private = {name for name in dir(Table) if name.startswith("_") and not name.startswith("__")}
    overridden = rich_private & set(vars(FitTable))
    used = rich_private & set(re.findall(r"\.(_[A-Za-z]\w*)", inspect.getsource(FitTable)))
    assert not overridden and not used, f"FitTable relies on rich's private {sorted(overridden | used)}"


def fill_ledger() -> list[Entry]:
    now = time.time()
    rows = []
    for index, (prompt, completion) in enumerate([(1_234_567, 3_456_789), (2_345_678, 4_567_890)]):
        gross = gross_nanocents(prompt, completion, 250, 1_000)
        rows.append(Entry(now - 60 * (index + 1), f"chatcmpl-{index}", "org/stories260k", "platform", True, 1, prompt, 0, completion, 250, 1_000, gross, earned_nanocents(gross)))
    store = LedgerStore(default_ledger_path())
    store.add(rows)
    store.close()
    return rows


def test_earnings_in_40_columns_shows_every_count_and_both_money_figures() -> None:
    rows = fill_ledger()
    result = run_cli("earnings", env=NARROW)

    assert result.returncode == 0, result.stderr
    gross, earned = sum(r.gross_nanocents for r in rows), sum(r.earned_nanocents for r in rows)
    prompt, completion = sum(r.prompt_tokens for r in rows), sum(r.completion_tokens for r in rows)
    assert_whole(result.stdout, "org/stories260k", f"{prompt:,}", f"{completion:,}", dollars_text(gross), dollars_text(earned))
    assert "gross" in result.stdout and "earned" in result.stdout, "both money columns are shown"
    assert widest_line(result.stdout) <= 40, "the chart's bars fit the terminal too"


async def test_demand_in_40_columns_shows_whole_model_ids_and_prices() -> None:
    model = "unsloth/qwen3.5-9b-instruct-gguf"
    with LivePlatform() as platform:
        async with PlatformClient(platform.url, API_KEY) as client:
            for endpoint, prices in (("http://10.0.0.1:8080", (250, 1_000)), ("http://10.0.0.2:8080", (275, 1_250))):
                await client.register(RegisterRequest(endpoint_url=endpoint, model=model, input_price_per_million=prices[0],
                                                      output_price_per_million=prices[1], context_length_offered=2048))
        result = run_cli("demand", env={**NARROW, "VRAM_SUPPLY_PLATFORM_URL": platform.url, "VRAM_SUPPLY_API_KEY": API_KEY})

    assert result.returncode == 0, result.stderr
    assert_whole(result.stdout, model, "$2.50–$2.75", "$10.00–$12.50")


def test_demand_at_every_terminal_width_keeps_each_word_on_one_line_and_within_the_edge() -> None:
    """A provider resizing the terminal from 32 to 140 columns: one block per row, then a table whose
    cells fold between words, then every cell on one line; never a cut value or a line past the edge."""
    from rich.console import Console

    from vramsupply.platform.api import DemandResponse
    from vramsupply.platform.commands import demand_view

    model = "unsloth/qwen3.5-9b-instruct-gguf"
    demand = DemandResponse.model_validate({"models": [
        {"model": model, "requests_24h": 1_234_567, "online_providers": 12,
         "input_price_per_million": {"min": 250, "max": 275}, "output_price_per_million": {"min": 1_000, "max": 1_250}},
        {"model": "org/stories260k", "requests_24h": 5, "online_providers": 1},
    ]})
    layouts = set()
    for columns in range(32, 141):  # from the width of the longest value: a narrower terminal must break it
        console = Console(file=io.StringIO(), width=columns, color_system=None)
        console.print(demand_view(demand, servable={model}))
        output = console.file.getvalue()

        assert "…" not in output and widest_line(output) <= columns, output
        assert_each_on_one_line(output, model, "$2.50–$2.75", "$10.00–$12.50", "1,234,567", "org/stories260k")
        header_lines = sum("┃" in line for line in output.splitlines())
        layouts.add("blocks" if not header_lines else "folded table" if header_lines > 1 else "table")
    assert layouts == {"blocks", "folded table", "table"}


def piped(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`vramsupply ARGS | cat`: no terminal anywhere, and no COLUMNS (a shell does not export it)."""
    environment = {name: value for name, value in os.environ.items() if name not in ("COLUMNS", "LINES")}
    return subprocess.run([sys.executable, "-m", "vramsupply", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={**environment, **env}, timeout=120)


def test_config_show_piped_to_grep_sees_whole_lines() -> None:
    result = piped("config", "show", VRAM_SUPPLY_CONTEXT_LENGTH="4096")

    assert result.returncode == 0, result.stderr
    [publishers] = [line for line in result.stdout.splitlines() if "gguf_publishers" in line]
    default = json.loads(piped("config", "show", "--json").stdout)["gguf_publishers"]["value"]
    assert str(default) in publishers or ",".join(default) in publishers, publishers
    [context] = [line for line in result.stdout.splitlines() if re.match(r"\W*context_length ", line)]
    assert "4096" in context and "VRAM_SUPPLY_CONTEXT_LENGTH" in context and "…" not in context, context


def serve_flags() -> set[str]:
    import typer

    from vramsupply.cli import app

    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    return {name for param in serve.params for name in (*param.opts, *param.secondary_opts) if name.startswith("--")}


@pytest.mark.parametrize("columns", ["40", "80"])
def test_serve_help_shows_every_flag_name_whole(columns: str) -> None:
    result = run_cli("serve", "--help", env={"COLUMNS": columns})

    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout, result.stdout
    shown = set(re.findall(r"--[A-Za-z0-9][\w-]*", result.stdout))
    assert serve_flags() <= shown, f"cut or missing: {sorted(serve_flags() - shown)}"
    assert {"--context-length", "--max-model-len"} <= shown
    # Click lays help out at least 50 columns wide (a narrower terminal wraps it, cutting nothing);
    # only a line of option names, which are never broken, may be wider than that.
    wide = [line for line in result.stdout.splitlines() if len(line) > max(int(columns), 50)]
    assert all(re.fullmatch(r"\s*-[\w-]+((, | / )-[\w-]+)*( <\w+>)?", line) for line in wide), wide


LOGS_IN_A_TERMINAL = """
import logging
from vramsupply.logging import configure_logging
configure_logging("INFO")
logging.getLogger("vramsupply.serve").info("listening on http://127.0.0.1:8080 for buyers, model org/stories260k")
"""


def in_a_terminal(columns: int, code: str, env: dict[str, str] | None = None) -> str:
    """What ``code`` writes to a terminal ``columns`` wide (a pseudo-terminal: stdout and stderr both)."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    environment = {name: value for name, value in os.environ.items() if name not in ("COLUMNS", "LINES", "NO_COLOR")}
    process = subprocess.Popen([sys.executable, "-c", code], stdin=child, stdout=child, stderr=child, env={**environment, "TERM": "xterm", **(env or {})})
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal closed: the child has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=60)
    os.close(main)
    return re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode()).replace("\r", "")


def test_a_log_line_in_a_40_column_terminal_uses_the_whole_width() -> None:
    shown = in_a_terminal(40, LOGS_IN_A_TERMINAL)

    lines = [line for line in shown.splitlines() if line.strip()]
    assert "INFO" in lines[0], shown
    assert not any(line.startswith(" " * 20) for line in lines), f"a message hangs under the time and level:\n{shown}"
    assert "http://127.0.0.1:8080" in unfolded(shown) and "org/stories260k" in unfolded(shown), shown
    assert widest_line(shown) <= 40


def test_columns_0_hides_nothing_in_a_pipe_or_a_terminal() -> None:
    """rich takes ``COLUMNS=0`` as a width of nothing: every command printed nothing, error lines too."""
    failed = run_cli("plan", "--model", "/nonexist.gguf", env={"COLUMNS": "0"})
    assert failed.returncode == 1 and failed.stderr == "error: model file /nonexist.gguf does not exist\n"
    assert run_cli("--version", env={"COLUMNS": "0"}).stdout.startswith("vramsupply ")
    shown = in_a_terminal(40, LOGS_IN_A_TERMINAL, env={"COLUMNS": "0"})
    assert "http://127.0.0.1:8080" in unfolded(shown) and widest_line(shown) <= 40, shown


def test_the_command_list_describes_each_command_whole() -> None:
    """Click's plain help cuts a command's description to one line ("... (mode..."); ours wraps it."""
    result = run_cli("--help", env={"COLUMNS": "80"})

    commands = result.stdout.split("Commands:")[1]
    assert result.returncode == 0 and "..." not in commands and "…" not in commands
    assert "Store your vram.supply API key in the config file (mode 0600)." in result.stdout
