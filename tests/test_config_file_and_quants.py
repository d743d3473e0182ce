"""The config file as the user wrote it, a config path that is not there, quant names that are no
quantization, the serve flags `plan` takes, and the quant of a file that does not state it."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from conftest import TINY_MODEL, run_cli
from vramsupply.config import load_settings
from vramsupply.gpu.gguf_header import GgufHeader, TensorInfo
from vramsupply.gpu.source import quant_of_header
from vramsupply.hub.quant import quant_problem

HAND_WRITTEN = """\
# my settings

port = 9000 # comment

# prices, in cents per million tokens
input_price = 150
api_key = "vs_key_old_0000"  # from an earlier login
"""

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_TOKEN": ""}


def one_line_error(result: object) -> str:
    stderr = str(getattr(result, "stderr")).strip()
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    return stderr


# Finding 12: login wrote the file back bare.


def test_login_changes_only_the_key_and_keeps_the_users_comments_blank_lines_and_order(config_file: Path) -> None:
    config_file.parent.mkdir(parents=True)
    config_file.write_text(HAND_WRITTEN)

    result = run_cli("login", "--api-key", "vs_key_new_1234")

    assert result.returncode == 0, result.stderr
    assert config_file.read_text() == HAND_WRITTEN.replace("vs_key_old_0000", "vs_key_new_1234")
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert load_settings().settings.port == 9000


def test_login_adds_a_missing_key_after_what_the_user_wrote(config_file: Path) -> None:
    config_file.parent.mkdir(parents=True)
    without_key = HAND_WRITTEN.replace('api_key = "vs_key_old_0000"  # from an earlier login\n', "")
    config_file.write_text(without_key)

    assert run_cli("login", "--api-key", "vs_key_new_1234").returncode == 0

    assert config_file.read_text() == without_key + 'api_key = "vs_key_new_1234"\n'


def test_login_still_refuses_a_file_with_an_unknown_key_and_leaves_it_as_it_was(config_file: Path) -> None:
    config_file.parent.mkdir(parents=True)
    config_file.write_text("# mine\ninput_prise = 5\n")

    result = run_cli("login", "--api-key", "vs_key_new_1234")

    assert result.returncode == 2
    assert one_line_error(result) == f"error: unknown setting 'input_prise' in config file {config_file}"
    assert config_file.read_text() == "# mine\ninput_prise = 5\n"


# Finding 15: a config path the user named, and mistyped, ran everything on defaults.


def test_a_config_file_named_by_vram_supply_config_that_is_not_there_is_an_error(tmp_path: Path) -> None:
    typo = tmp_path / "etc" / "confg.toml"
    named = {"VRAM_SUPPLY_CONFIG": str(typo)}

    for args in (["config", "show"], ["plan", "--model", str(TINY_MODEL)]):
        result = run_cli(*args, env=named)
        assert result.returncode == 2, result.stdout
        assert one_line_error(result) == (
            f"error: config file {typo} (named by VRAM_SUPPLY_CONFIG) does not exist: correct the path, create the file "
            f"(`vramsupply login` writes one there), or unset VRAM_SUPPLY_CONFIG to use "
            f"{Path.home() / '.config' / 'vramsupply' / 'config.toml'}"
        )

    # login is how such a file comes to be
    assert run_cli("login", "--api-key", "vs_key_new_1234", env=named).returncode == 0
    shown = run_cli("config", "show", "--json", env=named)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["api_key"]["source"] == f"config file {typo}"


def test_the_default_config_file_not_yet_created_is_no_error(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not config_file.exists()
    named_default = run_cli("config", "show")  # VRAM_SUPPLY_CONFIG names the default path here
    monkeypatch.delenv("VRAM_SUPPLY_CONFIG")
    unset = run_cli("config", "show")

    for result in (named_default, unset):
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert "input_price" in result.stdout


# Finding 13: a quant name that is no quantization reached the Hub, the cache or a plan as it was.


@pytest.mark.parametrize(
    "args",
    [
        ["plan", "--model", str(TINY_MODEL), "--quant", "Q4KM"],
        ["serve", "--model", "org/model", "--quant", "Q4KM", "--no-register", "--port", "0"],
        ["bench", "--model", str(TINY_MODEL), "--quant", "Q4KM", "--seconds", "3"],
        ["models", "resolve", "org/model", "--quant", "Q4KM"],
        ["models", "pull", "org/model", "--quant", "Q4KM"],
    ],
    ids=["plan", "serve", "bench", "models-resolve", "models-pull"],
)
def test_a_mistyped_quant_is_refused_alike_by_every_command_with_the_close_names(args: list[str]) -> None:
    result = run_cli(*args, env=OFFLINE, timeout=60)

    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert line.startswith("error: invalid quant = 'Q4KM' (from flag --quant): "), line
    assert "did you mean Q4_K_M" in line and "vramsupply models resolve" in line


def test_a_quant_like_nothing_known_is_refused_with_llama_cpps_list_whatever_its_source() -> None:
    result = run_cli("plan", "--model", str(TINY_MODEL), env={"VRAM_SUPPLY_QUANT": "nonsense"})

    assert result.returncode == 2
    line = one_line_error(result)
    assert line.startswith("error: invalid quant = 'nonsense' (from env VRAM_SUPPLY_QUANT): ")
    assert "Q8_0" in line and "IQ4_XS" in line and "UD-Q4_K_XL" in line


@pytest.mark.parametrize("quant", ["Q4_K_M", "q4_k_m", "Q4_K", "IQ4_XS", "bf16", "MXFP4", "Q4_K_L", "Q3_K_XL", "UD-Q4_K_XL", "ud-iq2_m", "TQ1_0"])
def test_llama_cpps_quants_their_aliases_and_publishers_variants_are_accepted(quant: str) -> None:
    assert quant_problem(quant) is None


@pytest.mark.parametrize(("typo", "meant"), [("Q8", "Q8_0"), ("Q6K", "Q6_K"), ("UD-Q4KXL", "UD-Q4_K_XL"), ("Q4_0_4_4", "Q4_0")])
def test_a_typo_is_answered_with_the_quant_it_resembles(typo: str, meant: str) -> None:
    problem = quant_problem(typo)
    assert problem is not None and f"did you mean {meant}" in problem


# Finding 16: plan's errors named flags plan did not have.


def plan_json(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    result = run_cli("plan", "--model", str(TINY_MODEL), "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["chosen"]


def test_plan_takes_the_cache_type_its_own_advice_names() -> None:
    quantized = {"VRAM_SUPPLY_CACHE_TYPE_K": "q8_0"}
    refused = run_cli("plan", "--model", str(TINY_MODEL), env=quantized)
    assert refused.returncode != 0
    assert one_line_error(refused).endswith("use --cache-type-k (VRAM_SUPPLY_CACHE_TYPE_K) f16")

    assert plan_json("--cache-type-k", "f16", env=quantized)["kv_bytes"] == plan_json()["kv_bytes"]


def test_plan_takes_the_serve_flags_that_change_its_numbers() -> None:
    default = plan_json()

    assert plan_json("--n-ubatch", "64")["compute_bytes"] < default["compute_bytes"]
    assert plan_json("--n-batch", "64")["compute_bytes"] < default["compute_bytes"]
    # "auto" (the default) is off on an Intel CPU with AMX (gpu/options.py): compare the two settings
    assert plan_json("--flash-attention", "off")["compute_bytes"] > plan_json("--flash-attention", "on")["compute_bytes"]
    assert plan_json("--n-gpu-layers", "0")["total_bytes"] == default["total_bytes"]  # this machine plans on its CPU anyway

    flash_off = run_cli("plan", "--model", str(TINY_MODEL), "--cache-type-v", "q8_0", "--flash-attention", "off")
    assert flash_off.returncode != 0 and "needs flash attention" in one_line_error(flash_off)
    no_such_gpu = run_cli("plan", "--model", str(TINY_MODEL), "--devices", "NOPE0")
    assert no_such_gpu.returncode != 0 and "no device 'NOPE0'" in one_line_error(no_such_gpu)


# Finding 37: the bundled model's quant showed as "unknown".


def test_the_bundled_model_which_states_no_file_type_plans_as_the_f32_it_is() -> None:
    assert plan_json()["quant"] == "F32"


def tensor(name: str, ggml_type: int) -> TensorInfo:
    return TensorInfo(name, (256, 256), ggml_type, 0)


def test_a_file_without_a_file_type_is_the_type_most_of_its_tensors_have_as_llama_cpp_guesses() -> None:
    q4_k, q6_k, f32 = 12, 14, 0
    tensors = (
        *(tensor(f"blk.{i}.ffn_{part}.weight", q4_k) for i in range(2) for part in ("up", "down", "gate")),
        *(tensor(f"blk.{i}.attn_norm.weight", f32) for i in range(2)),
        tensor("output.weight", q6_k),
    )

    assert quant_of_header(GgufHeader({}, tensors, 0), Path("model.gguf")) == "Q4_K_M"
    assert quant_of_header(GgufHeader({"general.file_type": 7}, tensors, 0), Path("model.gguf")) == "Q8_0", "a stated type wins"
    assert quant_of_header(GgufHeader({}, (), 0), Path("model.gguf")) == "unknown"
