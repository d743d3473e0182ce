"""Small things a new provider met in the CLI (the audit of 2026-12-05), each as they would meet it:
help as -h, a doctor for a purely local agent, offline pulls that give advice that applies,
readable tuner and context lines, short API keys in logs, service commands where systemd is not
running, bad model paths named for what they are, and a devplatform key checked like login's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_process import AgentProcess
from conftest import REPO, TINY_MODEL, run_cli
from fakehub import FakeFile, FakeHub, FakeRepo
from gguf_shapes import LLAMA_8B, write_header_only
from live_platform import free_port
from test_engine_thread_tuner import TwoCoreMachine, serve_for, tuner_on


def run_in(directory: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``run_cli`` from another working directory (a relative --model names a file there), with
    the package of this checkout, as ``run_cli`` imports it from the current directory."""
    return subprocess.run(
        [sys.executable, "-m", "vramsupply", *args],
        capture_output=True, text=True, cwd=directory, timeout=120,
        env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO), **(env or {})},
    )


def offline_hub(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A Hub nobody answers at (a closed port) and an empty HuggingFace cache."""
    return {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "", "HF_HUB_OFFLINE": "", **extra}


# ---- 30: -h is --help everywhere -----------------------------------------------------------------


@pytest.mark.parametrize("command", [(), ("serve",), ("models",), ("models", "pull"), ("service", "logs"), ("config", "show")])
def test_dash_h_shows_the_help_of_every_command_and_group(command: tuple[str, ...]) -> None:
    result = run_cli(*command, "-h")
    assert result.returncode == 0, result.stderr
    assert f"Usage: vramsupply {' '.join(command)}".rstrip() in result.stdout
    assert "No such option" not in result.stderr


def test_dash_m_is_still_the_model_and_dash_h_shows_both() -> None:
    help_text = run_cli("serve", "-h").stdout
    assert "-m" in help_text and "-h" in help_text
    missing = run_cli("plan", "-m", "./no-such-model.gguf")
    assert missing.returncode == 1 and "no-such-model.gguf does not exist" in missing.stderr


# ---- 17: doctor for an agent that serves locally only ----------------------------------------------


def test_doctor_passes_a_local_only_agent_without_contacting_the_platform(tmp_path: Path) -> None:
    with socket.socket() as platform:  # listens, never answers: a probe would connect here
        platform.bind(("127.0.0.1", 0))
        platform.listen()
        result = run_cli(
            "doctor", "--json",
            env={
                "VRAM_SUPPLY_NO_REGISTER": "1",
                "VRAM_SUPPLY_PLATFORM_URL": f"http://127.0.0.1:{platform.getsockname()[1]}",
                "VRAM_SUPPLY_PORT": str(free_port()),
                "VRAM_SUPPLY_CACHE_DIR": str(tmp_path / "models"),
            },
        )
        platform.setblocking(False)
        with pytest.raises(BlockingIOError):
            platform.accept()  # nobody connected

    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    assert result.returncode == 0, checks
    for name in ("platform", "api key", "endpoint url", "clock"):
        assert checks[name] == {"name": name, "ok": True, "detail": "not needed: serving locally only (no_register)", "fix": ""}


# ---- 14 and 36: offline, the advice applies to the command that failed ------------------------------


def test_an_offline_pull_says_to_run_it_again_online_not_to_run_itself(tmp_path: Path) -> None:
    unreachable = run_cli("models", "pull", "org/model", env=offline_hub(tmp_path))
    offline = run_cli("models", "pull", "org/model", "--quant", "Q8_0", env=offline_hub(tmp_path, HF_HUB_OFFLINE="1"))

    assert unreachable.returncode == offline.returncode == 1
    assert unreachable.stderr.startswith("error: cannot reach the Hub at http://127.0.0.1:")
    assert unreachable.stderr.rstrip().endswith("holds no verified copy of org/model Q4_K_M: run this command again once the Hub can be reached")
    assert offline.stderr.startswith("error: HF_HUB_OFFLINE is set, and ")
    assert offline.stderr.rstrip().endswith("holds no verified copy of org/model Q8_0: unset HF_HUB_OFFLINE and run this command again while online")
    for result in (unreachable, offline):
        assert "vramsupply models pull" not in result.stderr and "Traceback" not in result.stderr


def test_serve_offline_plans_on_the_cached_file_only_when_there_is_one(tmp_path: Path) -> None:
    nothing = run_cli("serve", "--model", "org/model", "--no-register", "--port", "0", env=offline_hub(tmp_path))
    assert nothing.returncode == 1
    assert "memory plan before download skipped (cannot reach the Hub" in nothing.stderr
    assert "planning on the cached file" not in nothing.stderr
    assert "download it once while online (vramsupply models pull org/model --quant Q4_K_M)" in nothing.stderr  # serve's advice stays

    env = offline_hub(tmp_path)
    with FakeHub([FakeRepo("acme/Tiny-GGUF", {"Tiny-Q4_K_M.gguf": FakeFile(TINY_MODEL.read_bytes())}, ["gguf"])]) as hub:
        assert run_cli("models", "pull", "acme/Tiny-GGUF", "--quant", "Q4_K_M", env={**env, "HF_ENDPOINT": hub.url}).returncode == 0
    with AgentProcess("--model", "acme/Tiny-GGUF", "--quant", "Q4_K_M", "--no-register", "--port", "0", env=env) as agent:
        agent.wait_ready()
    assert any("before download skipped" in line and line.endswith("; planning on the cached file instead") for line in agent.stderr)


# ---- 22: the context asked for is named -------------------------------------------------------------


def test_a_context_beyond_the_training_context_is_told_with_the_one_asked_for() -> None:
    with AgentProcess("--model", str(TINY_MODEL), "--no-register", "--port", "0", "--context-length", "100000", "--parallel", "16") as agent:
        agent.wait_ready()
    told = [line for line in agent.stderr if "was trained on" in line or "more than llama" in line]
    assert told and "WARNING" in told[0], agent.stderr
    assert "context_length 100000 is more than llama was trained on; serving requests of up to 2048 tokens, one KV cache of 32768 tokens" in told[0]
    assert not any("context_length 32768" in line for line in agent.stderr)
    planned = " ".join(run_cli("plan", "--model", str(TINY_MODEL), "--context-length", "100000", "--parallel", "16").stdout.split())
    assert "requests are served up to 2048 tokens, and the KV cache the slots share holds 32768; context_length is 100000" in planned


# ---- 21: a short API key in the logs -----------------------------------------------------------------


def test_a_one_letter_api_key_is_masked_as_a_word_not_inside_every_word() -> None:
    with AgentProcess("--model", str(TINY_MODEL), "--no-register", "--port", "0", env={"VRAM_SUPPLY_API_KEY": "k"}) as agent:
        agent.wait_ready()
    log = "\n".join(agent.stderr)
    assert f"loading stories260k from {TINY_MODEL}" in log
    assert "****" not in log


def test_a_long_secret_is_still_masked_wherever_it_appears_and_a_short_one_where_it_stands_alone() -> None:
    script = (
        "import logging\n"
        "from vramsupply.logging import configure_logging\n"
        "configure_logging('INFO', ['k', 'endpoint-token-0123456789'])\n"
        "logging.getLogger('vramsupply.test').info('unknown tokens at /work; key=k, Bearer k; /v1?t=endpoint-token-0123456789x')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "unknown tokens at /work; key=****, Bearer ****; /v1?t=****x" in result.stderr, result.stderr


# ---- 23: the thread tuner's line ---------------------------------------------------------------------


def test_a_thread_switch_is_told_in_words_that_add_up(caplog: pytest.LogCaptureFixture) -> None:
    machine = TwoCoreMachine(busy_programs=1)  # one thread: 6 ms a step, two: 330 ms
    tuner = tuner_on(machine)
    with caplog.at_level("INFO", logger="vramsupply.engine.thread_tuner"):
        serve_for(tuner, machine, 2)
        machine.busy_programs = 0
        serve_for(tuner, machine, 3)
    fewer, more = [record.getMessage() for record in caplog.records]
    assert fewer == "using 1 CPU thread instead of 2: other programs may be keeping the cores busy; steps were 55× faster with 1"
    assert more.startswith("using 2 CPU threads instead of 1: ") and more.endswith(" faster with 2")
    assert "0.00×" not in fewer + more


# ---- 35: service status and logs where systemd is not running ----------------------------------------


@pytest.fixture
def no_systemd(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """systemctl and journalctl as on a host booted without systemd (a container, WSL)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("systemctl", "journalctl"):
        (bin_dir / tool).write_text(
            "#!/bin/sh\n"
            f"printf '%s\\n' \"{tool} $*\" >> '{calls}'\n"
            'case "$*" in *is-system-running*) echo offline; exit 1 ;; esac\n'
            "echo 'System has not been booted with systemd as init system (PID 1). Can't operate.' >&2; exit 1\n"
        )
        (bin_dir / tool).chmod(0o755)
    yield bin_dir, calls


@pytest.mark.parametrize(("args", "what"), [(("status",), "status"), (("logs", "-f"), "log"), (("status", "--user"), "status")])
def test_status_and_logs_say_that_systemd_is_not_running(no_systemd: tuple[Path, Path], args: tuple[str, ...], what: str) -> None:
    bin_dir, calls = no_systemd
    result = run_cli("service", *args, env={"PATH": str(bin_dir)})

    assert result.returncode == 1
    manager = "the systemd user manager (systemctl --user) is not running for this login" if "--user" in args else "systemd is not running here"
    assert result.stderr.startswith(f"error: {manager} (a container, WSL without systemd")
    assert f"so no vramsupply.service runs and there is no {what} to show; run the agent in the foreground with `vramsupply serve`" in result.stderr
    assert "booted with systemd" not in result.stderr
    assert [line for line in calls.read_text().splitlines() if "is-system-running" not in line] == []


# ---- 28: a bad model path is named for what it is ---------------------------------------------------


def test_a_directory_or_a_dangling_link_given_as_the_model_is_named_for_what_it_is(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "split").mkdir()
    for part in (1, 2):
        (tmp_path / "split" / f"m-0000{part}-of-00002.gguf").write_bytes(b"")
    (tmp_path / "link.gguf").symlink_to(tmp_path / "gone" / "m.gguf")

    def error(*args: str, code: int = 1) -> str:
        result = run_in(tmp_path, *args, "--no-register", "--port", "0") if args[0] == "serve" else run_in(tmp_path, *args)
        assert result.returncode == code, result
        return result.stderr.strip()

    for model in ("d", "./d/"):
        assert error("serve", "--model", model) == f"error: {tmp_path / 'd'} is a directory, not a .gguf file"
    assert error("plan", "--model", "d") == "error: d is a directory, not a .gguf file"
    assert error("serve", "--model", "split") == (
        f"error: {tmp_path / 'split'} is a directory, not a .gguf file; it holds m-00001-of-00002.gguf, m-00002-of-00002.gguf: "
        "pass one of them (of a split model, its first part)"
    )
    assert error("serve", "--model", "link.gguf") == (
        f"error: model file {tmp_path / 'link.gguf'} does not exist: it is a symbolic link to {tmp_path / 'gone' / 'm.gguf'}, which does not exist"
    )
    assert error("serve", "--model", "nothing", code=2) == "error: 'nothing' is neither a HuggingFace model id (org/model) nor a path to a .gguf file"
    (tmp_path / "a.gguf").symlink_to("b.gguf")
    (tmp_path / "b.gguf").symlink_to("a.gguf")
    looped = "is a symbolic link that leads back to itself (through b.gguf): point it at the .gguf file"
    assert error("serve", "--model", "a.gguf") == f"error: model file {tmp_path / 'a.gguf'} {looped}", "b.gguf exists: never 'does not exist'"
    assert error("plan", "--model", "a.gguf") == f"error: model file a.gguf {looped}"


# ---- 29: a local file that does not fit ---------------------------------------------------------------


def test_a_local_file_that_cannot_fit_is_not_told_to_choose_a_quant_and_sizes_read_in_tib(tmp_path: Path) -> None:
    model = write_header_only(tmp_path / "llama-8b-Q4_K_M.gguf", LLAMA_8B)
    result = run_cli("serve", "--model", str(model), "--context-length", "131072", "--parallel", "256", "--kv-per-slot", "--no-register", "--port", "0")

    assert result.returncode == 1
    message = result.stderr.strip()
    assert "KV 4.00 TiB (256 slot(s) x 131072 tokens, 16.00 GiB each)" in message and "GiB (256" not in message
    assert message.endswith("lower --context-length (VRAM_SUPPLY_CONTEXT_LENGTH) or --parallel (VRAM_SUPPLY_PARALLEL), or use a smaller quantization of this model (another .gguf file)")
    assert "--quant" not in message


# ---- 26: devplatform's --api-key ------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a b", ""])
def test_devplatform_refuses_a_key_login_would_refuse(key: str) -> None:
    result = run_cli("devplatform", "--port", "0", "--api-key", key, timeout=20)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: invalid --api-key {key!r}: an API key is 1 to 512 printable ASCII characters without spaces"
    assert "export" not in result.stdout


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["models", "rm"], "name one model"),
        (["earnings", "--since", "0h"], "is not a window"),
        (["earnings", "--by", "week"], "choose model or day"),
        (["login", "--api-key", ""], "an API key is"),
    ],
)
def test_a_commands_own_bad_arguments_exit_2_as_every_bad_flag_does(args: list[str], said: str) -> None:
    """README: 2 for an invalid setting or flag. These said so with 1, as for a failure."""
    result = run_cli(*args)
    assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("plan", "-m", "~nouser/x.gguf"), {}),
        (("serve", "-m", "~nouser/x.gguf", "--no-register", "--port", "0"), {}),
        (("models", "pull", "~nouser/x.gguf"), {}),
        (("models", "list", "--cache-dir", "~nouser/c"), {}),
        (("config", "show"), {"VRAM_SUPPLY_CONFIG": "~nouser/c.toml"}),
        (("config", "show"), {"VRAM_SUPPLY_CACHE_DIR": "~nouser/c"}),
        (("models", "list"), {"HF_HOME": "~nouser/hf"}),
    ],
)
def test_a_tilde_naming_no_user_is_one_line_not_a_traceback(args: tuple[str, ...], env: dict[str, str], tmp_path: Path) -> None:
    """Path.expanduser raises RuntimeError for ~name with no such user: a traceback, before."""
    result = run_in(tmp_path, *args, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("there is no user 'nouser' on this machine for ~nouser to stand for")
    assert not (tmp_path / "~nouser").exists()


def test_an_empty_cache_dir_flag_is_no_setting_as_an_empty_variable_is_not_the_current_directory(tmp_path: Path) -> None:
    flag = run_in(tmp_path, "models", "list", "--cache-dir", "")
    variable = run_in(tmp_path, "models", "list", env={"VRAM_SUPPLY_CACHE_DIR": ""})
    assert flag.returncode == 0 and flag.stdout == variable.stdout, (flag.stdout, variable.stdout)
    assert "huggingface" in flag.stdout  # before: "no models downloaded by vramsupply in ."


@pytest.mark.parametrize("interval", ["nan", "inf", "1e400", "0.01", "100000"])
def test_devplatform_refuses_a_health_interval_that_is_no_usable_number_of_seconds(interval: str) -> None:
    refused = run_cli("devplatform", "--health-interval", interval, "--port", "0", timeout=30)
    assert refused.returncode == 2  # before: nan refused for being below 0.05, inf and 1e400 taken
    assert refused.stderr.strip().startswith("error: --health-interval must be a number of seconds from 0.05 to 86400, got ")


def test_advice_names_the_batch_when_the_compute_buffer_is_most_of_what_does_not_fit(tmp_path: Path) -> None:
    model = write_header_only(tmp_path / "llama-8b-Q4_K_M.gguf", LLAMA_8B)
    args = ("--context-length", "33554432", "--parallel", "256", "--n-ubatch", "8192", "--n-batch", "8192", "--flash-attention", "off")
    result = run_cli("plan", "--model", str(model), *args)
    assert result.returncode == 1
    assert "compute 33.00 TiB" in result.stdout
    # before: only the context, the slots and a smaller quantization, which saves nothing of it
    assert result.stdout.strip().endswith("lower --n-ubatch (VRAM_SUPPLY_N_UBATCH), --context-length (VRAM_SUPPLY_CONTEXT_LENGTH) or --parallel (VRAM_SUPPLY_PARALLEL), or use a smaller quantization of this model (another .gguf file)")
