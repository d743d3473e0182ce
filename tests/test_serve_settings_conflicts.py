"""`vramsupply serve` refuses settings that cannot work, and says what a working one exposes.

Every refusal is one `error:` line and exit 2 (an invalid setting, or two that do not go
together), before any model loads or any network call, so these run the real CLI in a child
process. Where the model is not the point, `--model` names a file that does not exist: had a
refusal not come first, the command would end on that instead (exit 1), and never serve.
"""

from __future__ import annotations

import json
import math
import urllib.request

import pytest
from agent_process import AgentProcess
from conftest import TINY_MODEL, run_cli

from vramsupply.config import ConfigError, Settings
from vramsupply.gpu.options import GpuOptionError, GpuOptions
from vramsupply.platform.offer import OfferError, check_endpoint_url
from vramsupply.platform.reachability import probe
from vramsupply.serve.options import listening_everywhere, start_warnings, upstream_options

MISSING = "/nonexistent/model.gguf"
DEAD_PLATFORM = "http://127.0.0.1:9"  # never reached: each command here ends before registering


def refused(*args: str, env: dict[str, str] | None = None) -> str:
    """Run `vramsupply ARGS`; it must be refused as a setting (exit 2) in one line; returns the line."""
    result = run_cli(*args, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    return result.stderr.strip()


def warnings_at_start(*args: str, env: dict[str, str] | None = None) -> list[str]:
    """Run `vramsupply serve ARGS` with a missing model (it stops there); the WARNING lines before it."""
    result = run_cli("serve", "--model", MISSING, *args, env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if " WARNING " in line]


# GPU placement (audit 3, 38)


@pytest.mark.parametrize("shares", ["0,0", "-1,2", "nan,1", "inf,1", "3,,1"])
def test_gpu_shares_that_cannot_split_a_model_are_a_setting_error_not_a_traceback(shares: str) -> None:
    line = refused("serve", "--model", str(TINY_MODEL), "--no-register", "--port", "0", "--tensor-split", shares)
    assert line.startswith(f"error: invalid tensor_split = '{shares}' (from flag --tensor-split): ")


@pytest.mark.parametrize("command", [["serve", "--no-register", "--port", "0"], ["bench", "--seconds", "3"], ["plan"]])
def test_every_command_refuses_bad_gpu_shares_from_the_environment_the_same_way(command: list[str]) -> None:
    line = refused(command[0], "--model", str(TINY_MODEL), *command[1:], env={"VRAM_SUPPLY_TENSOR_SPLIT": "0,0"})
    assert line == (
        "error: invalid tensor_split = '0,0' (from env VRAM_SUPPLY_TENSOR_SPLIT): each share is a finite number, "
        "none negative and not all zero, e.g. 3,1"
    )


@pytest.mark.parametrize("devices", [",,", "CUDA0,,CUDA1", "CUDA0,"])
def test_an_empty_device_name_is_refused_not_dropped(devices: str) -> None:
    line = refused("serve", "--model", MISSING, "--no-register", "--devices", devices)
    assert line.startswith(f"error: invalid devices = '{devices}' (from flag --devices): ")
    assert "name each device, e.g. CUDA0,CUDA1" in line


def test_a_gpu_option_the_build_cannot_honour_is_a_setting_error_wherever_it_escapes() -> None:
    assert issubclass(GpuOptionError, ConfigError) and GpuOptionError.exit_code == 2
    for shares in ((0.0, 0.0), (-1.0, 2.0), (math.nan, 1.0), (math.inf, 1.0)):
        with pytest.raises(GpuOptionError, match="tensor_split needs finite, non-negative shares"):
            GpuOptions(tensor_split=shares)


def test_a_main_gpu_no_device_has_is_warned_about_at_start() -> None:
    [warning] = warnings_at_start("--no-register", "--devices", "CUDA0", "--main-gpu", "1")
    assert "main_gpu = 1 names no GPU: llama.cpp sees 1 GPU among --devices, numbered from 0" in warning
    [beyond] = warnings_at_start("--no-register", "--main-gpu", "64")
    assert "main_gpu = 64 names no GPU" in beyond


# Settings that do not go together (audit 10)


def test_a_quantized_v_cache_with_flash_attention_off_names_both_flags() -> None:
    line = refused("serve", "--model", str(TINY_MODEL), "--no-register", "--cache-type-v", "q8_0", "--flash-attention", "off")
    assert line == (
        "error: a q8_0 V cache needs flash attention: cache_type_v = q8_0 (from flag --cache-type-v) and flash_attention = off "
        "(from flag --flash-attention) do not go together; use --flash-attention (VRAM_SUPPLY_FLASH_ATTENTION) auto or on, or --cache-type-v (VRAM_SUPPLY_CACHE_TYPE_V) f16"
    )


@pytest.mark.parametrize("register", [[], ["--no-register"]])
def test_a_tunnel_and_an_endpoint_url_are_refused_as_a_pair_before_the_tunnel_tool_is_looked_for(register: list[str]) -> None:
    line = refused("serve", "--model", MISSING, "--tunnel", "cloudflared", "--endpoint-url", "https://gpu.example.com", *register)
    assert line == (
        "error: pass either --endpoint-url or --tunnel, not both: endpoint_url = https://gpu.example.com (from flag --endpoint-url) "
        "and tunnel = cloudflared (from flag --tunnel); the cloudflared tunnel makes the endpoint URL"
    )


def test_the_upstream_engine_without_its_url_names_both_settings() -> None:
    line = refused("serve", "--engine", "upstream", "--no-register")
    assert line.startswith("error: engine = upstream (from flag --engine) needs upstream_url")
    assert "pass --upstream-url" in line and "VRAM_SUPPLY_UPSTREAM_URL" in line


# The demo (audit 11)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--no-register"], "error: --demo and --no-register do not go together: the demo registers, with a platform of its own; drop --no-register"),
        (["--platform-url", "https://vram.supply"], "error: --demo and --platform-url do not go together: the demo runs a platform of its own; drop --platform-url"),
        (["--endpoint-url", "https://gpu.example.com"], "error: --demo and --endpoint-url do not go together"),
        (["--api-key", "k"], "error: --demo and --api-key do not go together"),
        (["--tunnel", "cloudflared"], "error: --demo and tunnel = cloudflared (from flag --tunnel) do not go together: the demo stays on this machine"),
        (["--engine", "vllm"], "error: --demo and engine = vllm (from flag --engine) do not go together: the demo serves a GGUF with the llama.cpp engine"),
        (["--engine", "sglang"], "error: --demo and engine = sglang (from flag --engine)"),
    ],
)
def test_the_demo_refuses_what_it_would_ignore(args: list[str], line: str) -> None:
    assert refused("serve", "--demo", "--model", MISSING, *args).startswith(line)


def test_the_demo_refuses_another_engine_set_in_the_environment_naming_the_variable() -> None:
    line = refused("serve", "--demo", "--model", MISSING, env={"VRAM_SUPPLY_ENGINE": "vllm"})
    assert "engine = vllm (from env VRAM_SUPPLY_ENGINE)" in line


# The endpoint URL (audit 11, 19)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://gpu.example.com/v1", "must be the base URL, without /v1 (the platform adds /health and /v1/...): use https://gpu.example.com"),
        ("https://gpu.example.com/ x", "a URL has no spaces, control characters or backslashes"),
        ("https://gpu.example.com\tx", "a URL has no spaces, control characters or backslashes"),
        ("https://gpu.example.com\\x", "a URL has no spaces, control characters or backslashes"),
        ("https://gpu.example.com?", "must be a base URL without ?query or #fragment"),
        ("https://user:pw@gpu.example.com", "must not carry a user name or password"),
        ("https://gpu.example.com/a/../b", "is read by URL parsers as https://gpu.example.com/b: write it that way"),
        ("https://münchen.example", "is read by URL parsers as https://xn--mnchen-3ya.example: write it that way"),
        ("https://gpu.example.com:0", "must have a valid host and a port from 1 to 65535"),
    ],
)
def test_the_endpoint_url_is_checked_whenever_it_is_given_not_only_when_registering(url: str, problem: str) -> None:
    line = refused("serve", "--model", MISSING, "--no-register", "--endpoint-url", url)
    assert line.startswith(f"error: invalid endpoint_url = {url!r} (from flag --endpoint-url): {problem}")


def test_registering_refuses_an_endpoint_url_a_parser_would_rewrite() -> None:
    with pytest.raises(OfferError, match=r"endpoint URL 'https://gpu\.example\.com/ x' must not contain spaces"):
        check_endpoint_url("https://gpu.example.com/ x")
    assert check_endpoint_url("https://GPU.example.com:8443/agent") == []


# Engine arguments the agent sets itself (audit 20)


@pytest.mark.parametrize(
    ("engine", "args", "line"),
    [
        ("vllm", "--port 9999", "error: engine_args may not set --port: the agent starts vLLM on a free port of its own"),
        ("vllm", "--gpu-memory-utilization 0.85 --port=9999", "error: engine_args may not set --port: "),
        ("vllm", "--host 0.0.0.0", "error: engine_args may not set --host: the agent starts vLLM on 127.0.0.1, for itself alone"),
        ("vllm", "--api-key secret", "error: engine_args may not set --api-key: the agent gives vLLM a random key of its own"),
        ("vllm", "--served-model-name x", "error: engine_args may not set --served-model-name: the agent names the model after --model"),
        ("vllm", "--max_model_len 4096", "error: engine_args may not set --max-model-len: use --context-length"),
        ("vllm", "-tp 2", "error: engine_args may not set -tp: use --tensor-parallel-size"),
        ("sglang", "--model-path org/other", "error: engine_args may not set --model-path: pass the weights with --model or --upstream-model"),
        ("sglang", "--max-running-requests 8", "error: engine_args may not set --max-running-requests: use --parallel"),
    ],
)
def test_engine_args_the_agent_sets_itself_are_refused_naming_the_setting_to_use(engine: str, args: str, line: str) -> None:
    result = refused("serve", "--engine", engine, "--model", "org/model", "--no-register", "--engine-command", "/nonexistent/engine", "--engine-args", args)
    assert result.startswith(line)


def test_other_engine_args_are_passed_on_as_written() -> None:
    settings = Settings(engine="vllm", model="org/model", engine_args="--gpu-memory-utilization 0.85 --quantization awq")
    assert upstream_options(settings).extra_args == ("--gpu-memory-utilization", "0.85", "--quantization", "awq")


# Who can reach /v1 (audit 4, 5)


def test_registering_a_public_endpoint_while_listening_on_loopback_warns_at_start() -> None:
    env = {"VRAM_SUPPLY_API_KEY": "k", "VRAM_SUPPLY_PLATFORM_URL": DEAD_PLATFORM}
    [warning] = warnings_at_start("--endpoint-url", "https://gpu.example.com", env=env)
    assert (
        "the agent listens on 127.0.0.1 only, which a port forward from your router cannot reach: for buyers to reach it at "
        "https://gpu.example.com, serve with --host 0.0.0.0 (VRAM_SUPPLY_HOST), or keep 127.0.0.1 behind a reverse proxy on this machine"
    ) in warning
    assert warnings_at_start("--endpoint-url", "https://gpu.example.com", "--host", "0.0.0.0", env=env) == []


def test_serving_every_address_without_a_token_warns_that_anyone_can_use_it() -> None:
    [warning] = warnings_at_start("--no-register", "--host", "0.0.0.0")
    assert "/v1 answers without a token on every address of this machine (--host 0.0.0.0)" in warning
    assert "set VRAM_SUPPLY_ENDPOINT_TOKEN (endpoint_token)" in warning
    assert warnings_at_start("--no-register", "--host", "0.0.0.0", env={"VRAM_SUPPLY_ENDPOINT_TOKEN": "tok"}) == []
    assert warnings_at_start("--no-register") == []


def test_selling_for_nothing_is_warned_about_at_start() -> None:
    env = {"VRAM_SUPPLY_API_KEY": "k", "VRAM_SUPPLY_PLATFORM_URL": DEAD_PLATFORM}
    [warning] = warnings_at_start("--endpoint-url", "https://gpu.example.com", "--host", "0.0.0.0", "--output-price", "0", env=env)
    assert "output_price (--output-price, VRAM_SUPPLY_OUTPUT_PRICE) 0: generated tokens are sold for nothing; prices are in cents per million tokens" in warning
    [from_env] = warnings_at_start("--endpoint-url", "https://gpu.example.com", "--host", "0.0.0.0", env={**env, "VRAM_SUPPLY_INPUT_PRICE": "0"})
    assert "input_price (--input-price, VRAM_SUPPLY_INPUT_PRICE) 0: prompt tokens are sold for nothing" in from_env, "set in the environment, not by a flag"
    both = start_warnings(Settings(endpoint_url="https://gpu.example.com", host="::", api_key="k", input_price=0, output_price=0))
    assert both == [
        "input_price (--input-price, VRAM_SUPPLY_INPUT_PRICE) and output_price (--output-price, VRAM_SUPPLY_OUTPUT_PRICE) 0: "
        "every token is sold for nothing; prices are in cents per million tokens (the defaults are 100 and 200)"
    ]
    assert start_warnings(Settings(no_register=True, input_price=0, output_price=0)) == [], "nothing is sold without registering"


def test_what_is_safe_or_intended_is_not_warned_about() -> None:
    assert start_warnings(Settings(endpoint_url="http://127.0.0.1:8080", api_key="k")) == []  # this machine's own URL
    assert start_warnings(Settings(tunnel="cloudflared", api_key="k")) == []  # the tunnel reaches loopback
    assert start_warnings(Settings(endpoint_url="https://gpu.example.com", host="::", api_key="k")) == []
    assert start_warnings(Settings(host="::1", no_register=True)) == []


async def test_the_reachability_fix_names_the_loopback_listen_address_a_forward_cannot_reach() -> None:
    on_loopback = await probe("http://192.168.1.20:8080", "http://127.0.0.1:8080", listen_host="127.0.0.1")
    assert on_loopback.hop == "address"
    assert "the agent listens on 127.0.0.1 only, which a port forward cannot reach: serve with --host 0.0.0.0 (VRAM_SUPPLY_HOST)" in on_loopback.message
    everywhere = await probe("http://192.168.1.20:8080", "http://127.0.0.1:8080", listen_host="0.0.0.0")
    assert "--host 0.0.0.0" not in everywhere.message

def test_an_agent_on_every_address_prints_a_url_that_can_be_used_and_says_where_it_listens() -> None:
    with AgentProcess("--model", str(TINY_MODEL), "--no-register", "--host", "0.0.0.0", "--port", "0") as agent:
        agent.wait_ready()
        assert agent.base_url.startswith("http://127.0.0.1:"), agent.stdout
        with urllib.request.urlopen(agent.base_url.removesuffix("/v1") + "/health", timeout=30) as response:
            assert response.status == 200
        assert any("listening on every address of this machine (--host 0.0.0.0): this machine reaches it at http://127.0.0.1:" in line for line in agent.stderr)
    assert listening_everywhere("127.0.0.1", "http://127.0.0.1:8080") is None
    assert listening_everywhere("::", "http://[::1]:8080") is not None


def test_doctor_names_the_loopback_listen_address_when_a_forward_is_the_fix() -> None:
    env = {"VRAM_SUPPLY_ENDPOINT_URL": "http://192.168.1.20:8080", "VRAM_SUPPLY_API_KEY": "k", "VRAM_SUPPLY_PLATFORM_URL": "http://127.0.0.1:9"}
    checks = {check["name"]: check for check in json.loads(run_cli("doctor", "--json", env=env).stdout)["checks"]}
    assert "the agent listens on 127.0.0.1 only, which a port forward cannot reach: serve with --host 0.0.0.0" in checks["reachability"]["detail"]
    everywhere = {check["name"]: check for check in json.loads(run_cli("doctor", "--json", env={**env, "VRAM_SUPPLY_HOST": "0.0.0.0"}).stdout)["checks"]}
    assert "--host 0.0.0.0" not in everywhere["reachability"]["detail"]
