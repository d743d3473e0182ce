"""Settings precedence (flag > env > file > default) and readable validation errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from vramsupply.config import ConfigError, Settings, load_settings, write_config_values


def test_defaults_match_the_platform_docs(config_file: Path) -> None:
    loaded = load_settings()
    assert loaded.settings.input_price == 100
    assert loaded.settings.output_price == 200
    assert loaded.settings.platform_url == "https://vram.supply"
    assert loaded.settings.parallel == 16
    assert loaded.sources["input_price"] == "default"


def test_slots_default_to_16_sharing_one_kv_cache_and_to_4_each_with_its_own(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().settings.parallel == 16
    per_slot = load_settings({"kv_per_slot": True}).settings
    assert per_slot.parallel == 4  # each holds a whole context
    assert "parallel" not in per_slot.model_fields_set  # still a default: the GPU plan may lower it
    monkeypatch.setenv("VRAM_SUPPLY_PARALLEL", "8")
    assert load_settings({"kv_per_slot": True}).settings.parallel == 8


def test_precedence_flag_over_env_over_file_over_default(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config_values(config_file, {"input_price": 111, "output_price": 222, "parallel": 3})
    monkeypatch.setenv("VRAM_SUPPLY_INPUT_PRICE", "333")
    monkeypatch.setenv("VRAM_SUPPLY_OUTPUT_PRICE", "444")

    loaded = load_settings({"input_price": 555, "quant": None})

    assert loaded.settings.input_price == 555
    assert loaded.sources["input_price"] == "flag --input-price"
    assert loaded.settings.output_price == 444
    assert loaded.sources["output_price"] == "env VRAM_SUPPLY_OUTPUT_PRICE"
    assert loaded.settings.parallel == 3
    assert loaded.sources["parallel"] == f"config file {config_file}"
    assert loaded.settings.quant == "Q4_K_M"
    assert loaded.sources["quant"] == "default"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"VRAM_SUPPLY_INPUT_PRICE": "-5"}, "invalid input_price = '-5' (from env VRAM_SUPPLY_INPUT_PRICE): Input should be greater than or equal to 0"),
        ({"VRAM_SUPPLY_OUTPUT_PRICE": "1.5"}, "invalid output_price = '1.5' (from env VRAM_SUPPLY_OUTPUT_PRICE): Input should be a valid integer"),
        ({"VRAM_SUPPLY_PLATFORM_URL": "ftp://example.com"}, "invalid platform_url = 'ftp://example.com' (from env VRAM_SUPPLY_PLATFORM_URL)"),
        ({"VRAM_SUPPLY_ENDPOINT_URL": "not a url"}, "invalid endpoint_url = 'not a url' (from env VRAM_SUPPLY_ENDPOINT_URL)"),
        ({"VRAM_SUPPLY_PARALLEL": "0"}, "invalid parallel = '0' (from env VRAM_SUPPLY_PARALLEL)"),
        # before, an empty quant meant "the best that fits", though the user named one
        ({"VRAM_SUPPLY_QUANT": " "}, "invalid quant = ' ' (from env VRAM_SUPPLY_QUANT): name a quantization, e.g. Q4_K_M"),
        # before, the empty host listened on every interface
        ({"VRAM_SUPPLY_HOST": ""}, "invalid host = '' (from env VRAM_SUPPLY_HOST): name an address: 127.0.0.1 for this machine only"),
        ({"VRAM_SUPPLY_API_KEY": "sk-\x1b[31m"}, "invalid api_key"),  # it made every platform call a traceback
        ({"VRAM_SUPPLY_DRAIN_TIMEOUT": "inf"}, "invalid drain_timeout = 'inf' (from env VRAM_SUPPLY_DRAIN_TIMEOUT): Input should be a finite number"),
        ({"VRAM_SUPPLY_HEARTBEAT_INTERVAL": "600"}, "invalid heartbeat_interval = '600' (from env VRAM_SUPPLY_HEARTBEAT_INTERVAL): Input should be less than or equal to 120"),
    ],
)
def test_invalid_env_values_name_setting_and_source(env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith(expected)


def test_a_huge_refused_value_is_cut_in_its_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 100 KB value was echoed whole: its one error line filled the terminal."""
    monkeypatch.setenv("VRAM_SUPPLY_PARALLEL", "x" * 100_000)
    with pytest.raises(ConfigError) as info:
        load_settings()
    shown = "'" + "x" * 199
    assert str(info.value) == (
        f"invalid parallel = {shown}… (99,802 more characters) (from env VRAM_SUPPLY_PARALLEL): "
        "Input should be a valid integer, unable to parse string as an integer"
    )


def test_a_lower_case_variable_is_named_as_the_source_of_what_it_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read names in any case; `config show` said such a value was the default."""
    monkeypatch.setenv("vram_supply_port", "9091")
    loaded = load_settings()
    assert loaded.settings.port == 9091 and loaded.sources["port"] == "env vram_supply_port"
    monkeypatch.setenv("vram_supply_port", "99999")
    with pytest.raises(ConfigError, match=r"^invalid port = '99999' \(from env vram_supply_port\)"):
        load_settings()


def test_invalid_flag_and_file_values_name_their_source(config_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"invalid input_price = -1 \(from flag --input-price\)"):
        load_settings({"input_price": -1})
    write_config_values(config_file, {"output_price": "lots"})
    with pytest.raises(ConfigError, match=rf"invalid output_price = 'lots' \(from config file {config_file}\)"):
        load_settings()


def test_unknown_or_broken_config_file_is_a_clear_error(config_file: Path) -> None:
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text("input_prise = 5\n")
    with pytest.raises(ConfigError, match="unknown setting 'input_prise'"):
        load_settings()
    config_file.write_text("input_price = = 5\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings()
    config_file.write_bytes(b'model = "caf\xe9"\n')  # Latin-1, as an editor might save it
    with pytest.raises(ConfigError, match="it is not UTF-8 text"):
        load_settings()
    shown = run_cli("config", "show")
    assert shown.returncode == 2 and "Traceback" not in shown.stderr
    assert shown.stderr.strip() == f"error: cannot read config file {config_file}: it is not UTF-8 text (byte 12)"


def test_a_misspelt_environment_variable_is_named_with_the_setting_it_resembles() -> None:
    result = run_cli("config", "show", env={"VRAM_SUPPLY_PARALEL": "4", "VRAM_SUPPLY_XYZZY": "1", "VRAM_SUPPLY_PARALLEL": "2"})

    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "ignoring VRAM_SUPPLY_PARALEL: not a vramsupply setting (did you mean VRAM_SUPPLY_PARALLEL?)",
        "ignoring VRAM_SUPPLY_XYZZY: not a vramsupply setting",
    ]
    assert "ignoring" not in run_cli("config", "show", env={"VRAM_SUPPLY_CONFIG": "/nonexistent.toml"}).stderr, "the config file's path is no setting, and no typo"


def test_a_shared_cache_smaller_than_the_slots_is_refused_naming_both_settings() -> None:
    """llama.cpp aborted the process at load when the slots outnumbered the cache's cells."""
    result = run_cli("config", "show", env={"VRAM_SUPPLY_CONTEXT_LENGTH": "16", "VRAM_SUPPLY_PARALLEL": "256"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: context_length = 16 (from env VRAM_SUPPLY_CONTEXT_LENGTH) is smaller than parallel = 256 (from env VRAM_SUPPLY_PARALLEL): "
        "the slots share one KV cache of context_length tokens, so raise --context-length (VRAM_SUPPLY_CONTEXT_LENGTH) or lower --parallel (VRAM_SUPPLY_PARALLEL)"
    )
    assert run_cli("config", "show", env={"VRAM_SUPPLY_CONTEXT_LENGTH": "16", "VRAM_SUPPLY_PARALLEL": "256", "VRAM_SUPPLY_KV_PER_SLOT": "true"}).returncode == 0


def test_cli_reports_bad_setting_in_one_line_with_exit_2() -> None:
    result = run_cli("config", "show", env={"VRAM_SUPPLY_INPUT_PRICE": "-5"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "input_price" in lines[0] and "VRAM_SUPPLY_INPUT_PRICE" in lines[0]
    assert "Traceback" not in result.stderr


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("vramsupply ")


def test_config_show_lists_sources_and_masks_secrets(config_file: Path) -> None:
    write_config_values(config_file, {"api_key": "vs_live_supersecretkey1234"})
    result = run_cli("config", "show", "--json", env={"VRAM_SUPPLY_OUTPUT_PRICE": "250"})
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert set(shown) == set(Settings.model_fields)
    assert shown["output_price"] == {"value": "250", "source": "env VRAM_SUPPLY_OUTPUT_PRICE"}
    assert shown["api_key"]["value"] == "****1234"
    assert shown["api_key"]["source"].startswith("config file")
    assert "supersecret" not in result.stdout

    table = run_cli("config", "show")
    assert table.returncode == 0
    assert "supersecret" not in table.stdout
    assert "input_price" in table.stdout


def test_login_stores_key_0600_without_echo(config_file: Path) -> None:
    result = run_cli("login", input="vs_key_abcdefgh12345678\n")
    assert result.returncode == 0, result.stderr
    assert "vs_key_abcdefgh12345678" not in result.stdout + result.stderr
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert load_settings().settings.api_key.get_secret_value() == "vs_key_abcdefgh12345678"

    again = run_cli("login", "--api-key", "vs_key_second")
    assert again.returncode == 0
    assert load_settings().settings.api_key.get_secret_value() == "vs_key_second"
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600

    nowhere = run_cli("login", "--api-key", "vs_key_third", env={"VRAM_SUPPLY_CONFIG": "/proc/no-such-dir/config.toml"})
    assert nowhere.returncode == 1, nowhere.stderr  # the machine's state, not a setting to change (it was 2)
    assert nowhere.stderr.startswith("error: cannot write config file /proc/no-such-dir/config.toml: ") and "vs_key_third" not in nowhere.stderr


def test_login_rejects_empty_key() -> None:
    result = run_cli("login", "--api-key", "  ")
    assert result.returncode != 0
    assert "API key" in result.stderr


@pytest.mark.parametrize("piped", ["", "\n", "   \n"])
def test_login_with_nothing_piped_in_says_no_key_came(piped: str) -> None:
    result = run_cli("login", input=piped)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: no API key on standard input: pipe the key in (`echo KEY | vramsupply login`), or pass --api-key"


def test_a_price_with_a_few_digits_too_many_is_refused_by_name() -> None:
    result = run_cli("serve", "--model", "unused", "--input-price", "100000000000000000")
    env = run_cli("config", "show", env={"VRAM_SUPPLY_OUTPUT_PRICE": "20000000"})

    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: invalid input_price = 100000000000000000 (from flag --input-price): Input should be less than or equal to 1000000"
    )
    assert env.returncode == 2
    assert env.stderr.strip().startswith("error: invalid output_price = '20000000' (from env VRAM_SUPPLY_OUTPUT_PRICE): Input should be less than")
    assert load_settings({"input_price": 1_000_000}).settings.input_price == 1_000_000, "$10,000 per million is still a price"


def test_an_empty_cache_dir_or_api_key_is_unset_not_the_current_directory_or_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRAM_SUPPLY_CACHE_DIR", "")  # Path("") is ".": a service's writable path became "/"
    monkeypatch.setenv("VRAM_SUPPLY_API_KEY", " ")
    settings = load_settings().settings
    assert settings.cache_dir is None and settings.api_key is None


def test_login_takes_a_piped_key_refuses_a_control_character_and_needs_some_input() -> None:
    piped = run_cli("login", input="sk-piped-key\n")
    assert piped.returncode == 0 and "GetPassWarning" not in piped.stderr
    assert load_settings().settings.api_key.get_secret_value() == "sk-piped-key"
    escaped = run_cli("login", "--api-key", "sk-\x1b[31m")
    assert escaped.returncode == 2 and escaped.stderr.strip() == "error: an API key is 1 to 512 printable ASCII characters without spaces"
    closed = subprocess.run([sys.executable, "-m", "vramsupply", "login"], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert closed.returncode == 2 and "Traceback" not in closed.stderr


def test_an_output_encoding_without_our_characters_is_no_traceback() -> None:
    shown = run_cli("serve", "--help", env={"PYTHONIOENCODING": "ascii"})
    assert shown.returncode == 0 and "Traceback" not in shown.stderr


def test_a_config_path_that_is_a_fifo_is_one_line_not_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)  # reading it would wait forever for a writer
    monkeypatch.setenv("VRAM_SUPPLY_CONFIG", str(fifo))
    with pytest.raises(ConfigError, match="not a regular file"):
        load_settings()


def test_output_that_cannot_be_written_is_one_line_and_a_failure() -> None:
    with open("/dev/full", "w") as full:  # before: exit 0, or Python's "Exception ignored" block
        shown = subprocess.run([sys.executable, "-m", "vramsupply", "config", "show"], stdout=full, stderr=subprocess.PIPE, text=True)
    assert shown.returncode == 1
    assert shown.stderr.strip() == "error: cannot write to standard output: No space left on device"


def test_a_full_disk_that_is_not_standard_output_is_not_blamed_on_it() -> None:
    """A command stands in for one whose file write (which names no file) meets a full disk, its
    output going to a pipe: every such ENOSPC was "cannot write to standard output"."""
    script = (
        "import errno, sys; import vramsupply.cli.app; cli = sys.modules['vramsupply.cli.app']\n"
        "def full(**_): raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "cli.app = full; cli.main()"
    )
    shown = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert shown.returncode == 1
    assert shown.stderr.strip() == "error: No space left on device: a disk this command writes to is full; free some space and run it again"


def test_a_closed_standard_output_is_one_line_and_a_failure_not_silence() -> None:
    closed = subprocess.run(["sh", "-c", f'exec "{sys.executable}" -m vramsupply config show >&-'], capture_output=True, text=True)
    assert closed.returncode == 1
    assert closed.stderr.strip() == "error: cannot write to standard output: standard output is closed"


def test_a_deleted_working_directory_is_named_as_the_cause(tmp_path: Path) -> None:
    """A relative model path there was a bare "error: No such file or directory"."""
    gone = tmp_path / "gone"
    gone.mkdir()
    script = f'cd "{gone}" && rmdir "{gone}" && exec "{sys.executable}" -m vramsupply serve --model model.gguf --no-register'
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: the current directory no longer exists (it was deleted or moved): cd to one that does, or give absolute paths"
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["serve", "--bogus"], "error: No such option: --bogus (Possible options: --host) (see `vramsupply serve --help`)"),
        (["serve", "--input-price", "1.5"], "error: Invalid value for '--input-price': Input should be a valid integer, unable to parse string as an integer (see `vramsupply serve --help`)"),
        (["models", "pull"], "error: Missing argument 'model'. (see `vramsupply models pull --help`)"),
        (["bogus"], "error: No such command 'bogus'. (see `vramsupply --help`)"),
    ],
    ids=["unknown-flag", "bad-value", "missing-argument", "unknown-command"],
)
def test_a_usage_error_is_one_line_and_exit_2(args: list[str], line: str) -> None:
    """Typer drew these as a multi-line boxed panel."""
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip() == line


def test_a_group_named_alone_shows_its_help_and_exits_2() -> None:
    result = run_cli("config")
    assert result.returncode == 2 and "show" in result.stdout and result.stderr == ""


def test_a_cache_dir_under_home_written_with_a_tilde_is_the_homes_folder(config_file: Path) -> None:
    """Before, `cache_dir = "~/models"` made serve download into a folder named `~` wherever it ran."""
    write_config_values(config_file, {"cache_dir": "~/models"})

    assert load_settings({}).settings.cache_dir == Path.home() / "models"


@pytest.mark.parametrize("command", [["models", "list"], ["models", "rm", "--all", "-y"]])
def test_a_cache_dir_that_is_a_file_is_refused_not_shown_as_an_empty_cache(tmp_path: Path, command: list[str]) -> None:
    """A typo that names a file made `models list` say no model was downloaded, and `models rm --all`
    say it removed nothing, both exit 0."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a cache")
    reason = f"{a_file} is not a directory: name the folder models are kept in (it is made if missing)"
    flag = run_cli(*command, "--cache-dir", str(a_file))
    env = run_cli(*command, env={"VRAM_SUPPLY_CACHE_DIR": str(a_file)})
    assert (flag.returncode, flag.stderr.strip()) == (2, f"error: invalid cache_dir = '{a_file}' (from flag --cache-dir): {reason}")
    assert (env.returncode, env.stderr.strip()) == (2, f"error: invalid cache_dir = '{a_file}' (from env VRAM_SUPPLY_CACHE_DIR): {reason}")
    assert a_file.read_text() == "not a cache"
    missing = run_cli(*command, "--cache-dir", str(tmp_path / "not-yet"))
    assert missing.returncode == 0, "a folder not made yet is a cache with nothing in it"


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("VRAM_SUPPLY_ENDPOINT_TOKEN", "abcdefgh ", "an endpoint token"),  # before: served, and no buyer got in
        ("VRAM_SUPPLY_ENDPOINT_TOKEN", "token\r", "an endpoint token"),  # a CRLF env file
        ("VRAM_SUPPLY_UPSTREAM_API_KEY", "a\nb", "an upstream API key"),  # before: the upstream was blamed
    ],
)
def test_a_token_or_key_no_http_header_can_carry_is_refused_at_load(variable: str, value: str, said: str) -> None:
    result = run_cli("config", "show", env={variable: value})
    assert result.returncode == 2
    field = variable.removeprefix("VRAM_SUPPLY_").lower()
    assert result.stderr.strip() == (
        f"error: invalid {field} = *** (from env {variable}): {said} is 1 to 512 printable ASCII characters without spaces"
    )


def test_true_or_false_in_the_config_file_is_no_number(config_file: Path) -> None:
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text("parallel = true\n")  # before: parallel 1, said nowhere
    shown = run_cli("config", "show")
    assert shown.returncode == 2
    assert shown.stderr.strip() == f"error: invalid parallel = True (from config file {config_file}): true is not a number"
    config_file.write_text("kv_per_slot = true\ninput_price = 5\n")  # a switch is true or false, a price a number
    assert run_cli("config", "show").returncode == 0


def test_config_show_says_an_unset_quant_is_chosen_to_fit() -> None:
    """Before: "Q4_K_M  default", while serve takes the best quant that fits when none is set."""
    shown = json.loads(run_cli("config", "show", "--json").stdout)["quant"]
    assert shown == {"value": "Q4_K_M", "source": "default: unset, serve picks the best quant that fits, and this one only without a plan"}
    chosen = json.loads(run_cli("config", "show", "--json", env={"VRAM_SUPPLY_QUANT": "Q8_0"}).stdout)["quant"]
    assert chosen == {"value": "Q8_0", "source": "env VRAM_SUPPLY_QUANT"}
