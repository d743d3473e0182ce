"""The memory plan: its numbers against llama.cpp's own accounting, its choices, and `vramsupply plan`.

The 8B, Qwen3.5-9B, Mamba-2.8B and bench models are header-only GGUFs (tests/gguf_shapes.py): llama.cpp's
`no_alloc` load reads only the header, so a 9B shape costs a few MB here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest
from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

from conftest import TINY_MODEL, run_cli
from fakehub import FakeFile, FakeHub, FakeRepo
from gguf_shapes import BENCH, LLAMA_8B, MAMBA_2_8B, QWEN35_9B, write_header_only
from vramsupply.gpu.accounting import measure
from vramsupply.gpu.devices import Device
from vramsupply.config import Settings as AgentSettings
from vramsupply.gpu.estimate import ModelShape, Settings
from vramsupply.gpu.gguf_header import read_local_header
from vramsupply.gpu.plan import GIB, Target, make_plan, refusal
from vramsupply.gpu.planning import fit_before_load, placed, plan_for
from vramsupply.gpu.source import ModelSource, QuantFile, local_source

MIB = 1024**2


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("shapes")
    return {
        "tiny": TINY_MODEL,
        "bench": write_header_only(folder / "bench-llama-768x12-Q8_0.gguf", BENCH),
        "8b": write_header_only(folder / "llama-8b-Q4_K_M.gguf", LLAMA_8B),
        "qwen35-9b": write_header_only(folder / "qwen35-9b-Q4_K_M.gguf", QWEN35_9B),
        "mamba-2.8b": write_header_only(folder / "mamba-2.8b-Q8_0.gguf", MAMBA_2_8B),
    }


CHECKS = [
    ("tiny", Settings(4096, 4)),
    ("tiny", Settings(300, 2, flash_attention=False)),
    ("bench", Settings(8192, 2, flash_attention=False)),
    ("bench", Settings(2048, 16, cache_type_k="q8_0", cache_type_v="q8_0")),
    ("bench", Settings(2048, 4, kv_per_slot=True)),
    ("8b", Settings(4096, 4)),
    ("8b", Settings(4096, 4, kv_per_slot=True)),
    ("8b", Settings(16384, 2, flash_attention=False, cache_type_k="q8_0")),
    ("qwen35-9b", Settings(4096, 4)),
    ("qwen35-9b", Settings(8192, 2, flash_attention=False)),
    ("mamba-2.8b", Settings(2048, 4)),
]


@pytest.mark.parametrize(("model", "settings"), CHECKS, ids=[f"{m}-{s.parallel}x{s.context_length}{'-per-slot' * s.kv_per_slot}-fa{int(s.flash_attention)}-{s.cache_type_k}" for m, s in CHECKS])
def test_the_estimate_is_within_10_percent_of_llama_cpps_own_accounting(shapes: dict[str, Path], model: str, settings: Settings) -> None:
    plan = make_plan(local_source(str(shapes[model])), Target((), Device("CPU", "", "cpu", 10**15, 10**15)), settings)
    planned = plan.candidates[0].estimate
    actual = measure(shapes[model], plan.settings)  # the tiny model's 2048-token training context caps 4096, as serving does

    assert planned.weights_bytes == pytest.approx(actual.weights_bytes, rel=0.01)
    assert planned.kv_bytes == pytest.approx(actual.kv_bytes, rel=0.01)
    assert planned.state_bytes == pytest.approx(actual.state_bytes, rel=0.01, abs=0.01 * MIB)  # llama.cpp logs MiB to 2 places
    assert planned.compute_bytes == pytest.approx(actual.compute_bytes, rel=0.10)
    assert planned.total_bytes == pytest.approx(actual.total_bytes, rel=0.10)


def gpu(free_gib: float, name: str = "CUDA0", description: str = "NVIDIA GeForce RTX 4090") -> Device:
    return Device(name, description, "gpu", 24 * GIB, int(free_gib * GIB))


HOST = Device("CPU", "AMD EPYC", "cpu", 64 * GIB, 60 * GIB)


@pytest.fixture(scope="module")
def llama_8b(shapes: dict[str, Path]) -> ModelSource:
    """The 8B shape as a Hub repo would offer it: four quants of realistic sizes."""
    one = local_source(str(shapes["8b"]))
    sizes = {"F16": 16.07, "Q8_0": 8.54, "Q6_K": 6.60, "Q4_K_M": 4.92}
    return ModelSource("meta-llama/llama-3.1-8b", one.shape, tuple(QuantFile(q, int(s * 10**9), 1) for q, s in sizes.items()))


def test_without_a_quant_the_best_that_fits_is_chosen_and_the_reason_given(llama_8b: ModelSource) -> None:
    roomy = make_plan(llama_8b, Target((gpu(23),), HOST), Settings(4096, 4))
    assert roomy.chosen is not None and roomy.chosen.quant == "Q8_0", "F16 is never chosen unasked"
    assert [c.quant for c in roomy.candidates] == ["Q8_0", "Q6_K", "Q4_K_M", "F16"]

    tight = make_plan(llama_8b, Target((gpu(6.5),), HOST), Settings(4096, 4))

    assert tight.chosen is not None and tight.chosen.quant == "Q4_K_M"
    assert [c.fits for c in tight.candidates] == [False, False, True, False]
    (why,) = tight.notes
    assert why.startswith("Q4_K_M: the best quant that fits CUDA0 (NVIDIA GeForce RTX 4090): 6.50 GiB free, 5.50 GiB after 1.00 GiB headroom")
    assert "Q8_0 would need" in why and "Q6_K would need" in why


def test_token_embeddings_stay_in_host_ram_so_the_gpu_needs_less_than_the_total(llama_8b: ModelSource) -> None:
    plan = make_plan(llama_8b, Target((gpu(23),), HOST), Settings(4096, 4), quant="Q4_K_M")
    chosen = plan.chosen
    assert chosen is not None
    embeddings = llama_8b.shape.input_bytes
    assert embeddings == 128256 * 4096 // 256 * 144  # Q4_K blocks: 144 bytes per 256 values
    assert chosen.needed_bytes == chosen.estimate.total_bytes - embeddings - 4 * 128256 * 4

    on_cpu = make_plan(llama_8b, Target((), HOST), Settings(4096, 4), quant="Q4_K_M").chosen
    assert on_cpu is not None and on_cpu.needed_bytes == on_cpu.estimate.total_bytes


def test_two_gpus_pool_their_memory_and_each_holds_a_compute_buffer(llama_8b: ModelSource) -> None:
    one = make_plan(llama_8b, Target((gpu(7),), HOST), Settings(4096, 4), quant="Q8_0")
    two = make_plan(llama_8b, Target((gpu(7), gpu(7, "CUDA1")), HOST), Settings(4096, 4), quant="Q8_0")
    assert one.chosen is None
    assert two.chosen is not None
    assert two.chosen.needed_bytes == one.candidates[0].needed_bytes + one.candidates[0].estimate.compute_bytes


def test_explicit_settings_that_do_not_fit_are_refused_with_the_numbers(llama_8b: ModelSource) -> None:
    plan = make_plan(llama_8b, Target((gpu(8),), HOST), Settings(4096, 4), quant="Q8_0")

    assert plan.chosen is None
    message = refusal(plan)
    assert message.startswith("Q8_0 needs ")
    assert "weights 7.95 GiB + KV 512.0 MiB (4 slot(s) sharing 4096 tokens) + compute " in message
    per_slot = refusal(make_plan(llama_8b, Target((gpu(8),), HOST), Settings(4096, 4, kv_per_slot=True), quant="Q8_0"))
    assert "weights 7.95 GiB + KV 2.00 GiB (4 slot(s) x 4096 tokens, 512.0 MiB each) + compute " in per_slot
    assert "but CUDA0 (NVIDIA GeForce RTX 4090): 8.00 GiB free, 7.00 GiB after 1.00 GiB headroom" in message
    assert message.endswith("lower --context-length (VRAM_SUPPLY_CONTEXT_LENGTH) or --parallel (VRAM_SUPPLY_PARALLEL), choose a smaller --quant (VRAM_SUPPLY_QUANT), or offload fewer layers (--n-gpu-layers (VRAM_SUPPLY_N_GPU_LAYERS))")


def test_offloading_fewer_layers_as_the_refusal_advises_needs_less_of_the_gpu(llama_8b: ModelSource) -> None:
    """--n-gpu-layers was only read as 0 or not: every count planned every layer on the GPU, so
    the refusal's advice, "offload fewer layers", could never help."""
    def needed(layers: int) -> int:
        [q8] = [c for c in make_plan(llama_8b, Target((gpu(8),), HOST), Settings(4096, 4, gpu_layers=layers), quant="Q8_0").candidates if c.quant == "Q8_0"]
        return q8.needed_bytes

    every, half, one = needed(-1), needed(16), needed(1)
    assert needed(32) == needed(99) == every  # the model's 32 layers, or more: all of them
    assert one < half < every
    assert abs((every - half) - (every - one) * 16 / 31) < 16 * 2**20, "each layer a 32nd of the weights and KV"
    fits = make_plan(llama_8b, Target((gpu(8),), HOST), Settings(4096, 4, gpu_layers=16), quant="Q8_0")
    assert fits.chosen is not None and fits.chosen.quant == "Q8_0"  # refused with every layer (the test above)


def test_split_mode_none_and_a_tensor_split_plan_the_gpus_as_they_use_them(llama_8b: ModelSource) -> None:
    """Every GPU's free memory was added up whatever was set: a model for one 4 GiB GPU was planned
    as fitting two, and ran out of GPU memory inside llama.cpp."""
    two = Target((gpu(4), gpu(4, "CUDA1")), HOST)

    def fits(**settings: object) -> bool:
        target = placed(two, AgentSettings(**settings))  # type: ignore[arg-type]
        return make_plan(llama_8b, target, Settings(4096, 4), quant="Q4_K_M").chosen is not None

    assert fits()  # split by free memory: 6 GiB usable for about 5
    assert not fits(split_mode="none")  # all on CUDA0: 3 GiB usable
    assert placed(two, AgentSettings(split_mode="none", main_gpu=1)).gpus == (gpu(4, "CUDA1"),)
    assert not fits(tensor_split=[1, 0])  # all layers on CUDA0
    assert fits(tensor_split=[1, 1])


def test_a_context_that_was_not_set_shrinks_to_fit_like_llama_server_fit(llama_8b: ModelSource) -> None:
    plan = make_plan(llama_8b, Target((gpu(12),), HOST), Settings(32768, 4), quant="Q8_0", context_fixed=False)

    assert plan.chosen is not None and plan.chosen.fits
    assert 2048 <= plan.settings.context_length < 32768 and plan.settings.context_length % 256 == 0
    assert plan.settings.parallel == 4
    one_step_more = make_plan(llama_8b, Target((gpu(12),), HOST), Settings(plan.settings.context_length + 256, 4), quant="Q8_0")
    assert one_step_more.chosen is None, "the largest context that fits, to 256 tokens"
    (note,) = plan.notes
    assert note.startswith(f"Q8_0 fits only with 4 slot(s) sharing {plan.settings.context_length} tokens (asked 4 x 32768)")


def test_a_default_context_gives_way_to_4096_before_the_quant_does(llama_8b: ModelSource) -> None:
    """The default context is 8192; a GPU that held Q8_0 at the old default of 4096 still gets Q8_0."""
    target, asked = Target((gpu(9.75),), HOST), Settings(8192, 16)
    assert make_plan(llama_8b, target, Settings(4096, 16)).chosen.quant == "Q8_0"
    assert make_plan(llama_8b, target, asked).chosen.quant == "Q6_K", "a context that was set is kept, so the quant gives"

    plan = make_plan(llama_8b, target, asked, context_fixed=False)

    assert plan.chosen is not None and plan.chosen.quant == "Q8_0"
    assert 4096 <= plan.settings.context_length < 8192 and plan.settings.parallel == 16
    assert make_plan(llama_8b, target, Settings(plan.settings.context_length + 256, 16), quant="Q8_0").chosen is None
    (note,) = plan.notes
    assert note.startswith(f"Q8_0 fits only with 16 slot(s) sharing {plan.settings.context_length} tokens (asked 16 x 8192)")


def test_below_4096_a_lower_quant_at_the_full_default_context_comes_first(llama_8b: ModelSource) -> None:
    target = Target((gpu(9.25),), HOST)
    assert make_plan(llama_8b, target, Settings(2048, 16)).chosen.quant == "Q8_0", "Q8_0 would fit at 2048 tokens"

    plan = make_plan(llama_8b, target, Settings(8192, 16), context_fixed=False)

    assert plan.chosen is not None and plan.chosen.quant == "Q6_K"
    assert plan.settings.context_length == 8192


def test_slots_shrink_when_only_they_were_left_unset(llama_8b: ModelSource) -> None:
    plan = make_plan(llama_8b, Target((gpu(14),), HOST), Settings(16384, 8, kv_per_slot=True), quant="Q8_0", parallel_fixed=False)

    assert plan.chosen is not None
    assert plan.settings.context_length == 16384
    assert 1 < plan.settings.parallel < 8
    assert make_plan(llama_8b, Target((gpu(14),), HOST), Settings(16384, plan.settings.parallel + 1, kv_per_slot=True), quant="Q8_0").chosen is None


def test_the_shared_kv_cache_costs_one_context_whatever_the_slot_count(llama_8b: ModelSource) -> None:
    def kv(settings: Settings) -> int:
        return make_plan(llama_8b, Target((), HOST), settings, quant="Q8_0").candidates[0].estimate.kv_bytes

    one_context = 4096 * 32 * 8 * 128 * 2 * 2
    assert kv(Settings(4096, 1)) == kv(Settings(4096, 4)) == kv(Settings(4096, 16)) == one_context
    assert kv(Settings(4096, 4, kv_per_slot=True)) == 4 * one_context


def test_a_context_beyond_the_training_context_is_planned_as_the_engine_serves_it(shapes: dict[str, Path]) -> None:
    def planned(settings: Settings) -> int:  # the tiny model was trained on 2048 tokens
        return make_plan(local_source(str(shapes["tiny"])), Target((), HOST), settings).settings.context_length

    assert planned(Settings(8192, 1)) == 2048  # one slot: its requests are cut to 2048
    assert planned(Settings(8192, 4)) == 8192  # a cache shared by 4 slots keeps its size
    assert planned(Settings(16384, 4)) == 8192  # ... up to what 4 requests of 2048 fill
    assert planned(Settings(8192, 4, kv_per_slot=True)) == 2048  # a cache per slot is one request's


def test_plan_says_when_it_serves_less_context_than_asked(shapes: dict[str, Path]) -> None:
    capped = run_cli("plan", "--model", str(shapes["tiny"]), "--context-length", "99999999", "--parallel", "4")
    assert capped.returncode == 0, capped.stderr
    said = " ".join(capped.stdout.split())
    assert "the model was trained on 2048 tokens: requests are served up to 2048 tokens, and the KV cache the slots share holds 8192" in said

    within = run_cli("plan", "--model", str(shapes["tiny"]), "--context-length", "1024")
    assert within.returncode == 0 and "trained on" not in within.stdout


def test_plan_json_for_a_local_file_has_exactly_the_documented_keys(shapes: dict[str, Path]) -> None:
    result = run_cli("plan", "--model", str(shapes["bench"]), "--context-length", "1024", "--parallel", "2", "--json")

    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert set(plan) == {"model", "devices", "candidates", "chosen"}
    assert [set(device) for device in plan["devices"]] == [{"name", "total_bytes", "free_bytes"}]
    (only,) = plan["candidates"]
    assert set(only) == {"quant", "file_bytes", "weights_bytes", "kv_bytes", "compute_bytes", "total_bytes", "fits"}
    assert only["quant"] == "Q8_0" and only["fits"] is True and plan["chosen"] == only
    assert only["kv_bytes"] == 1024 * 12 * 3 * 64 * 2 * 2  # one context, shared by the 2 slots
    assert only["total_bytes"] == only["weights_bytes"] + only["kv_bytes"] + only["compute_bytes"]


def split_copy(model: Path, folder: Path, stem: str) -> list[Path]:
    """``model`` written as a split GGUF (by the gguf package, as llama.cpp's gguf-split names
    the parts), 20 tensors a part."""
    reader = gguf.GGUFReader(model)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(folder / f"{stem}.gguf", arch=arch, endianess=reader.endianess, split_max_tensors=20)
    copy_with_new_metadata(reader, writer, {}, [])
    return sorted(folder.glob(f"{stem}-*-of-*.gguf"))


def test_a_local_split_model_is_planned_with_the_weights_of_every_part(tmp_path: Path) -> None:
    """A big model comes in parts; counting the first alone judged a 3-part model to need a third
    of its memory."""
    parts = split_copy(TINY_MODEL, tmp_path, "Tiny-Q4_K_M")
    whole = json.loads(run_cli("plan", "--model", str(TINY_MODEL), "--json").stdout)["chosen"]
    result = run_cli("plan", "--model", str(parts[0]), "--json")

    assert len(parts) == 3 and result.returncode == 0, result.stderr
    split = json.loads(result.stdout)["chosen"]
    assert split["file_bytes"] == sum(part.stat().st_size for part in parts)
    assert split["weights_bytes"] > 0.95 * whole["weights_bytes"], (split, whole)

    second = run_cli("plan", "--model", str(parts[1]))
    assert second.returncode != 0 and f"give the first, {parts[0].name} (llama.cpp loads the others from it)" in " ".join(second.stderr.split())
    parts[1].unlink()
    missing = run_cli("plan", "--model", str(parts[0]))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert (
        f"{parts[0]} is part 1 of a model split in 3 files, but in {tmp_path} Tiny-Q4_K_M-*-of-00003.gguf lacks part 2 of 3: "
        "every part must be in the same folder"
    ) in " ".join(missing.stderr.split())


def test_a_quant_named_with_a_local_file_is_said_to_have_no_effect(shapes: dict[str, Path]) -> None:
    other = run_cli("plan", "--model", str(shapes["bench"]), "--quant", "q4_k_m")
    assert other.returncode == 0, other.stderr
    assert f"--quant (VRAM_SUPPLY_QUANT) applies to HuggingFace models only: {shapes['bench'].name} is served as it is (Q8_0), not Q4_K_M" in " ".join(other.stdout.split())

    same = run_cli("plan", "--model", str(shapes["bench"]), "--quant", "Q8_0")
    unset = run_cli("plan", "--model", str(shapes["bench"]))
    assert "applies to HuggingFace models only" not in same.stdout + unset.stdout


def test_the_quant_note_is_for_a_path_the_user_gave_not_for_a_hub_models_download(shapes: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """A Hub file was picked by its quant tag, which its header may name otherwise (UD-Q4_K_XL is a
    Q4_K_M to llama.cpp): serving it after the download must not say --quant was ignored."""
    with caplog.at_level(logging.WARNING, logger="vramsupply.gpu.planning"):
        fit_before_load(AgentSettings(model="unsloth/bench-GGUF", quant="UD-Q4_K_XL"), {"quant"}, shapes["bench"])
        assert not caplog.records
        fit_before_load(AgentSettings(model=str(shapes["bench"]), quant="UD-Q4_K_XL"), {"quant"}, shapes["bench"])
    [warned] = [r.getMessage() for r in caplog.records]
    assert "applies to HuggingFace models only" in warned and "not UD-Q4_K_XL" in warned


def test_plan_refuses_in_one_line_what_cannot_fit(shapes: dict[str, Path]) -> None:
    table = run_cli("plan", "--model", str(shapes["8b"]), "--context-length", "131072", "--parallel", "256", "--kv-per-slot")
    assert table.returncode == 1
    assert "nothing fits: Q4_K_M needs" in table.stdout and "lower --context-length (VRAM_SUPPLY_CONTEXT_LENGTH) or --parallel (VRAM_SUPPLY_PARALLEL)" in table.stdout

    missing = run_cli("plan", "--model", "./absent.gguf")
    assert missing.returncode == 1 and missing.stderr.strip() == "error: model file absent.gguf does not exist"


@pytest.fixture
def hub_8b(shapes: dict[str, Path]) -> Iterator[FakeHub]:
    """A GGUF repo of 8B-shaped files whose stored bytes are only the header: a plan that read more
    than the header would fail, and nothing is downloaded."""
    header = local_source(str(shapes["8b"])).shape.header_bytes
    with shapes["8b"].open("rb") as fh:
        head = fh.read(header)
    files = {
        "Llama-8B-Q4_K_M.gguf": FakeFile(head, claimed_size=4_920_000_000),
        "Llama-8B-Q8_0.gguf": FakeFile(head + b"8", claimed_size=8_540_000_000),
        "Llama-8B-Q6_K.gguf": FakeFile(head + b"6", claimed_size=6_600_000_000),
    }
    with FakeHub([FakeRepo("acme/Llama-8B-GGUF", files, ["gguf"])]) as hub:
        yield hub


def test_plan_for_a_hub_model_reads_only_the_header_over_http_range(hub_8b: FakeHub, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": hub_8b.url, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "", "HF_HUB_OFFLINE": ""}

    result = run_cli("plan", "--model", "acme/Llama-8B-GGUF", "--context-length", "4096", "--parallel", "4", "--json", env=env)

    assert result.returncode in (0, 1), result.stderr
    plan = json.loads(result.stdout)
    assert plan["model"] == "acme/llama-8b-gguf"
    assert [c["quant"] for c in plan["candidates"]] == ["Q8_0", "Q6_K", "Q4_K_M"]
    q4 = plan["candidates"][2]
    assert q4["file_bytes"] == 4_920_000_000 and q4["kv_bytes"] == 4096 * 32 * 8 * 128 * 2 * 2
    fitting = [c for c in plan["candidates"] if c["fits"]]
    assert plan["chosen"] == (fitting[0] if fitting else None)
    reads = [r for r in hub_8b.requests if r.method == "GET" and "/resolve/" in r.path]
    assert reads and all(r.headers.get("Range", "").startswith("bytes=0-") for r in reads)
    assert all(int(r.headers["Range"].split("-")[1]) < 64 * MIB for r in reads), "the header only, never the weights"
    assert not list((tmp_path / "hf").rglob("*.gguf")), "nothing downloaded"


def test_a_hybrid_models_plan_counts_kv_for_its_attention_layers_and_a_state_per_slot(shapes: dict[str, Path]) -> None:
    """Qwen3.5-9B-like: 8 attention layers among 32 and 24 gated delta nets. Before, the plan
    counted KV for all 32 layers (4x too much) and no recurrent state; both now match llama.cpp
    (the accounting test above). Each slot holds a whole state, so unset slots stay at 4, not 16."""
    shape = local_source(str(shapes["qwen35-9b"])).shape
    assert shape.recurrent and shape.kv_heads == (0, 0, 0, 4) * 8
    assert shape.state_floats == 24 * (3 * (4096 + 2 * 16 * 128) + 128 * 4096)  # conv inputs + the delta net's state
    assert not ModelShape.from_header(read_local_header(TINY_MODEL), TINY_MODEL.stat().st_size).recurrent

    settings = AgentSettings(model=str(shapes["qwen35-9b"]), context_length=4096)
    plan = plan_for(settings, quant_explicit=False, parallel_explicit=False, target=Target((), HOST))
    assert plan.settings.parallel == 4
    estimate = plan.chosen.estimate if plan.chosen else None
    assert estimate and estimate.kv_bytes == 4096 * 8 * 4 * 256 * 2 * 2 and estimate.state_bytes == 4 * 4 * shape.state_floats
    assert plan_for(settings, quant_explicit=False, parallel_explicit=True, target=Target((), HOST)).settings.parallel == 16


def test_plan_shows_a_hybrid_models_recurrent_state_beside_its_kv(shapes: dict[str, Path]) -> None:
    result = run_cli("plan", "--model", str(shapes["qwen35-9b"]), "--context-length", "4096", "--json")
    assert result.returncode == 0, result.stderr
    (only,) = json.loads(result.stdout)["candidates"]
    kv, states = 4096 * 8 * 4 * 256 * 2 * 2, 4 * 4 * 24 * (3 * (4096 + 2 * 16 * 128) + 128 * 4096)  # 4 slots by default
    assert only["kv_bytes"] == kv + states and only["total_bytes"] == only["weights_bytes"] + only["kv_bytes"] + only["compute_bytes"]

    table = run_cli("plan", "--model", str(shapes["qwen35-9b"]), "--context-length", "4096")
    assert table.returncode == 0 and "KV+state" in table.stdout

    refused = run_cli("plan", "--model", str(shapes["qwen35-9b"]), "--context-length", "131072", "--parallel", "256", "--kv-per-slot")
    assert refused.returncode == 1
    assert "+ recurrent state 12.56 GiB (256 x 50.2 MiB) + compute" in refused.stdout
