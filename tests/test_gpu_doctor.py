"""`vramsupply doctor` on this machine: every check passes against a working local platform, and
each failure names its fix."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from agent_process import AgentProcess
from conftest import TINY_MODEL, run_cli
from live_platform import LivePlatform, free_port

CHECK_NAMES = ["backend", "driver", "decode", "gpu memory", "cpu", "disk", "port", "platform", "api key", "endpoint url", "reachability", "clock"]


def doctor(*args: str, **env: str) -> tuple[int, dict[str, dict[str, object]], str]:
    result = run_cli("doctor", "--json", *args, env=env)
    checks = json.loads(result.stdout)["checks"]
    assert [set(c) for c in checks] == [{"name", "ok", "detail", "fix"}] * len(checks)
    return result.returncode, {c["name"]: c for c in checks}, result.stderr


def fake_cloudflared(tmp_path: Path) -> str:
    """A PATH holding an executable named cloudflared (a test double: doctor only checks it is installed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "cloudflared"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_every_check_passes_on_a_configured_machine(tmp_path: Path) -> None:
    with LivePlatform() as platform:
        code, checks, stderr = doctor(
            VRAM_SUPPLY_PLATFORM_URL=platform.url,
            VRAM_SUPPLY_API_KEY=platform.api_key,
            VRAM_SUPPLY_TUNNEL="cloudflared",
            PATH=fake_cloudflared(tmp_path),
            VRAM_SUPPLY_PORT=str(free_port()),
            VRAM_SUPPLY_CACHE_DIR=str(tmp_path / "models"),
        )

    assert list(checks) == CHECK_NAMES
    assert code == 0, (checks, stderr)
    assert all(c["ok"] and c["fix"] == "" for c in checks.values())
    assert checks["endpoint url"]["detail"] == "made by the cloudflared tunnel when serve starts"
    assert "cloudflared tunnel makes the public URL" in str(checks["reachability"]["detail"])
    assert str(checks["decode"]["detail"]).startswith("decoded 1 token on ")
    assert " threads by default (" in str(checks["cpu"]["detail"])
    assert "s ahead of" in str(checks["clock"]["detail"]) or "s behind" in str(checks["clock"]["detail"])


def test_failures_exit_1_and_say_what_to_do(tmp_path: Path) -> None:
    closed = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        code, checks, _ = doctor(
            VRAM_SUPPLY_PLATFORM_URL=f"http://127.0.0.1:{closed}", VRAM_SUPPLY_PORT=str(squatter.getsockname()[1]), VRAM_SUPPLY_THREADS="512"
        )

    assert code == 1
    assert checks["platform"]["ok"] is False and "VRAM_SUPPLY_PLATFORM_URL" in str(checks["platform"]["fix"])
    assert checks["api key"] == {"name": "api key", "ok": False, "detail": "no API key configured", "fix": "run vramsupply login (or set VRAM_SUPPLY_API_KEY)"}
    assert checks["endpoint url"]["ok"] is False and "--endpoint-url" in str(checks["endpoint url"]["fix"])
    assert checks["port"]["ok"] is False and "taken by another program" in str(checks["port"]["detail"])
    assert checks["decode"]["ok"] is True
    assert checks["cpu"]["ok"] is False and "512 threads pinned by --threads / VRAM_SUPPLY_THREADS" in str(checks["cpu"]["detail"])
    assert "unset VRAM_SUPPLY_THREADS" in str(checks["cpu"]["fix"])


def test_a_rejected_key_and_the_table_with_marks(tmp_path: Path) -> None:
    with LivePlatform() as platform:
        code, checks, _ = doctor(VRAM_SUPPLY_PLATFORM_URL=platform.url, VRAM_SUPPLY_API_KEY="wrong-key")
        table = run_cli("doctor", env={"VRAM_SUPPLY_PLATFORM_URL": platform.url, "VRAM_SUPPLY_API_KEY": "wrong-key", "COLUMNS": "250"})
        ascii_table = run_cli("doctor", env={"VRAM_SUPPLY_PLATFORM_URL": platform.url, "VRAM_SUPPLY_API_KEY": "wrong-key", "COLUMNS": "250", "PYTHONIOENCODING": "ascii"})

    assert code == 1
    assert checks["api key"]["ok"] is False and checks["api key"]["detail"] == "the platform rejected the API key (HTTP 401)"
    assert table.returncode == 1
    assert "✓ backend" in table.stdout and "✗ api key" in table.stdout
    assert "ok   backend" in ascii_table.stdout and "FAIL api key" in ascii_table.stdout, "a terminal without ✓ and ✗ printed ? for both"
    assert "fix: run vramsupply login with a current key" in table.stdout


def test_a_gpu_the_build_cannot_use_is_a_failed_check(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text(
        '#!/bin/sh\ncase "$1" in\n  -L) echo "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-1)" ;;\n'
        '  *) echo "| NVIDIA-SMI 550.54.14    Driver Version: 550.54.14    CUDA Version: 12.4     |" ;;\nesac\n'
    )
    smi.chmod(0o755)

    _, checks, _ = doctor(PATH=f"{fake}:{os.environ['PATH']}")

    assert checks["backend"]["ok"] is False
    assert checks["backend"]["detail"] == "GPU present (NVIDIA GeForce RTX 4090) but this llama.cpp build is CPU-only"
    assert "install.sh" in str(checks["backend"]["fix"])
    assert checks["driver"] == {"name": "driver", "ok": True, "detail": "NVIDIA driver 550.54.14, CUDA 12.4", "fix": ""}


def fake_smi(tmp_path: Path, listing: str, header: str) -> str:
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_bytes(b'#!/bin/sh\ncase "$1" in\n  -L) printf \'' + listing.encode("latin-1") + b'\\n\' ;;\n  *) printf \'' + header.encode("latin-1") + b'\\n\' ;;\nesac\n')
    smi.chmod(0o755)
    return f"{fake}:{os.environ['PATH']}"


def test_a_container_without_libcuda_is_a_failed_driver_check_not_a_bug_report(tmp_path: Path) -> None:
    """nvidia-smi prints "CUDA Version: N/A" there: int("N/A") made it "report this as a vramsupply bug"."""
    path = fake_smi(tmp_path, "GPU 0: NVIDIA A100 (UUID: GPU-1)", "| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: N/A |")
    _, checks, _ = doctor(PATH=path)
    assert checks["driver"]["ok"] is False
    assert checks["driver"]["detail"] == "NVIDIA driver 535.104.05, but nvidia-smi shows CUDA N/A: the CUDA driver library (libcuda) is not visible here"


def test_output_of_a_vendor_tool_that_is_no_text_is_read_not_a_crash(tmp_path: Path) -> None:
    """Bytes that are no UTF-8 from nvidia-smi: serve died with a UnicodeDecodeError traceback after loading."""
    path = fake_smi(tmp_path, "GPU 0: NVIDIA \xff\xfe broken (UUID: GPU-1)", "\xff\xfe Driver Version: 550.54.14 CUDA Version: 12.4")
    code, checks, _ = doctor(PATH=path)
    assert all("UnicodeDecodeError" not in str(check["detail"]) for check in checks.values()), checks
    with AgentProcess("--model", str(TINY_MODEL), "--no-register", "--port", "0", env={"PATH": path}) as agent:
        agent.wait_ready()
        assert agent.stop() == 0
    assert "Traceback" not in agent.log


def test_a_vendor_tool_that_hangs_is_not_read_as_listing_no_gpu(tmp_path: Path) -> None:
    """A hung driver's nvidia-smi -L was "✓ backend: CPU build; no GPU found (nvidia-smi -L lists none)"."""
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls"
    (fake / "nvidia-smi").write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\nexec sleep 60\n")
    (fake / "nvidia-smi").chmod(0o755)
    _, checks, _ = doctor(PATH=f"{fake}:{os.environ['PATH']}")
    assert checks["backend"]["ok"] is False
    assert checks["backend"]["detail"].startswith("CPU build; whether a GPU is present is unknown: nvidia-smi -L did not answer within ")
    # the driver row says the same, without asking the hung tool again (which cost 5 s more)
    assert checks["driver"]["ok"] is False and checks["driver"]["detail"] == "nvidia-smi fails: nvidia-smi -L did not answer within 10 s"
    assert calls.read_text().splitlines() == ["-L"]


def test_an_endpoint_the_platform_cannot_reach_names_the_hop(tmp_path: Path) -> None:
    with LivePlatform() as platform:
        code, checks, _ = doctor(
            VRAM_SUPPLY_PLATFORM_URL=platform.url,
            VRAM_SUPPLY_API_KEY=platform.api_key,
            VRAM_SUPPLY_ENDPOINT_URL="https://gpu.example.com",
            VRAM_SUPPLY_PORT=str(free_port()),
        )

    assert code == 1
    assert checks["endpoint url"]["ok"] is True
    reachability = checks["reachability"]
    assert reachability["ok"] is False and str(reachability["detail"]).startswith("dns: the name gpu.example.com does not resolve")
    assert "--tunnel cloudflared" in str(reachability["detail"]) and reachability["fix"]


def test_a_model_cache_below_a_file_fails_the_disk_check(tmp_path: Path) -> None:
    """Before, doctor walked up to a parent that exists and reported its free space: a pass."""
    blocker = tmp_path / "hostname"
    blocker.write_text("a file, as /etc/hostname is")
    _, checks, _ = doctor(VRAM_SUPPLY_CACHE_DIR=str(blocker / "huggingface" / "hub"))
    assert checks["disk"]["ok"] is False
    assert checks["disk"]["detail"] == f"models would go to {blocker}/huggingface/hub, but {blocker} is a file"


def test_a_device_this_build_lacks_fails_the_decode_check_as_it_would_fail_serve() -> None:
    """Doctor loaded its test model with no placement at all, so VRAM_SUPPLY_DEVICES=CUDA0 on a
    CPU build passed every check while serve (and a service installed with it) failed at load."""
    code, checks, _ = doctor(VRAM_SUPPLY_DEVICES="CUDA0", VRAM_SUPPLY_NO_REGISTER="true")

    assert code == 1
    assert checks["decode"]["ok"] is False
    assert str(checks["decode"]["detail"]).startswith("no device 'CUDA0' in this llama.cpp build; it has: CPU")
    assert "VRAM_SUPPLY_DEVICES" in str(checks["decode"]["fix"])
