#!/bin/sh
# vramsupply installer: curl -fsSL https://vram.supply/install.sh | sh
# Installs the agent in its own virtual environment, builds llama.cpp for this machine's GPU, and
# links `vramsupply` onto PATH. Its options and environment are in usage() below (--help).
#
# Everything runs from main(), called on the last line, so a truncated download runs nothing.
set -eu

say() { printf '%s\n' "vramsupply: $*"; }
die() { printf '%s\n' "vramsupply: error: $*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }
# systemd is the init system (sd_booted(3)), not merely installed.
systemd_present() { have systemctl && [ -d /run/systemd/system ]; }

# The text is here, not read back from this file: piped to sh (`curl ... | sh -s -- --help`) there is no file.
usage() {
    cat <<'USAGE'
vramsupply installer: curl -fsSL https://vram.supply/install.sh | sh

Installs the vramsupply agent into its own virtual environment, builds llama.cpp for the GPU
this machine has, and links the `vramsupply` command onto PATH. Re-running upgrades in place.

  sh install.sh [--version X | --from PATH] [--backend cpu|cuda|hip|metal|vulkan]
                [--dry-run] [--strict] [--dev] [--service] [--uninstall [--purge]]

--dry-run prints the backend, toolchain, CPU code flags and Python it would use and installs nothing;
with --uninstall it prints what it would remove and removes nothing. A failed GPU build falls
back to the CPU build with a warning; --strict fails instead.
Environment overrides: VRAMSUPPLY_VERSION, VRAMSUPPLY_FROM, VRAMSUPPLY_BACKEND,
VRAMSUPPLY_CUDA_ARCHITECTURES, VRAMSUPPLY_HIP_TARGETS, CUDA_HOME (a CUDA toolkit to use),
VRAMSUPPLY_CPU_FLAGS (compiler flags for llama.cpp's CPU code, instead of the AMX probe's),
VRAMSUPPLY_DATA_DIR (where the venv lives), VRAMSUPPLY_BIN_DIR (where the link goes),
VRAMSUPPLY_UNINSTALL=1 (as --uninstall), VRAMSUPPLY_NVIDIA_SMI_TIMEOUT (seconds to wait for nvidia-smi, 30),
VRAMSUPPLY_PYTHON (the Python to make the venv with, used as is; by default the first of
python3.13, python3.12, python3.11, python3.10, python3 that is 3.10+ and makes a venv with pip).
USAGE
}

default_data_dir() {
    if [ "$(id -u)" = 0 ]; then
        echo "/usr/local/share/vramsupply"
    elif [ "$(uname -s)" = Darwin ]; then
        echo "$HOME/Library/Application Support/vramsupply"
    else
        echo "${XDG_DATA_HOME:-$HOME/.local/share}/vramsupply"
    fi
}

default_bin_dir() {
    if [ "$(id -u)" = 0 ]; then echo "/usr/local/bin"; else echo "$HOME/.local/bin"; fi
}

agent_data_dir() {
    # Where the agent keeps its endpoint token and registration state (platformdirs user data dir).
    if [ "$(uname -s)" = Darwin ]; then
        echo "$HOME/Library/Application Support/vramsupply"
    else
        echo "${XDG_DATA_HOME:-$HOME/.local/share}/vramsupply"
    fi
}

config_dir() {
    if [ "$(uname -s)" = Darwin ]; then
        echo "$HOME/Library/Application Support/vramsupply"
    else
        echo "${XDG_CONFIG_HOME:-$HOME/.config}/vramsupply"
    fi
}

service_unit() {
    # Where `vramsupply service install` puts the unit: system-wide as root, else the user's.
    if [ "$(id -u)" = 0 ]; then
        echo "/etc/systemd/system/vramsupply.service"
    else
        echo "${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user/vramsupply.service"
    fi
}

# --- Which Python makes the venv ------------------------------------------------------------------
# The first candidate that is 3.10 or newer AND makes a venv with pip. Debian and Ubuntu ship venv's
# pip (ensurepip) apart, one package per version (python3.12-venv): the newest Python there often
# cannot (python3.13 without python3.13-venv beside a python3.12 with it), and the install once died
# on it. VRAMSUPPLY_PYTHON names the one to use: checked the same way, never swapped for another.
python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true; } # "" when not a Python
python_recent() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; }
python_makes_venvs() { "$1" -m venv --help >/dev/null 2>&1 && "$1" -c 'import ensurepip' >/dev/null 2>&1; }
# PYTHON: the package that brings its venv's pip, named for its own version (python3 may be 3.12).
venv_fix() { echo "Debian/Ubuntu: apt install python$(python_version "$1" | grep . || echo 3)-venv"; }
NO_VENV="cannot create virtual environments with pip"
runnable() { case "$1" in */*) [ -f "$1" ] && [ -x "$1" ] ;; *) have "$1" ;; esac; }

chosen_python() { # the VRAMSUPPLY_PYTHON $python, or one line saying what is wrong with it
    runnable "$python" || die "VRAMSUPPLY_PYTHON=$python: no such program (name a Python 3.10 or newer: python3.12, /usr/bin/python3.12)"
    if ! python_recent "$python"; then
        old_version=$(python_version "$python")
        die "VRAMSUPPLY_PYTHON=$python is ${old_version:+Python $old_version, }not Python 3.10 or newer, which vramsupply needs"
    fi
    python_makes_venvs "$python" || die "VRAMSUPPLY_PYTHON=$python $NO_VENV ($(venv_fix "$python"))"
}

# Sets $python (to use), $python_note (a skipped one, for people) and $python_problem ("" when usable).
find_python() {
    python=${VRAMSUPPLY_PYTHON:-} python_note="" python_problem="" first_recent=""
    if [ -n "$python" ]; then chosen_python && python_note="set by VRAMSUPPLY_PYTHON" && return 0; fi
    for candidate in python3.13 python3.12 python3.11 python3.10 python3; do
        if ! have "$candidate" || ! python_recent "$candidate"; then continue; fi
        if python_makes_venvs "$candidate"; then
            python=$candidate
            if [ -n "$first_recent" ]; then python_note="$first_recent skipped: it $NO_VENV; $(venv_fix "$first_recent") to use it"; fi
            return 0
        fi
        [ -n "$first_recent" ] || first_recent=$candidate
    done
    if [ -n "$first_recent" ]; then
        python_problem="$first_recent $NO_VENV ($(venv_fix "$first_recent"))"
    else
        python_problem="Python 3.10 or newer is required (Debian/Ubuntu: apt install python3 python3-venv; macOS: brew install python)"
    fi
}

# --- Which llama.cpp backend: decided by a working device, never by a compiler alone ---------------
# detect_backend sets $backend and $why. A GPU counts only when its own tool lists it: `nvidia-smi -L`
# prints a "GPU 0: ..." line (a broken driver prints an error instead), `rocminfo` names a gfx agent.

# nvidia-smi waits on the driver, and a driver in a bad state can keep it waiting for ever (the
# install hung with it). So it runs under a time limit where there is a `timeout` (without one, as
# before), long enough for a driver's slow first start; VRAMSUPPLY_NVIDIA_SMI_TIMEOUT (seconds)
# changes it (the tests shorten it). After one call has run out of time none is made again: a
# hung driver costs one limit, not one per question. Never call it in $(...): it sets variables.
NVIDIA_SMI_LIMIT=30
ask_nvidia_smi() { # ARGS...: its output, errors too, in $smi_out; status 124 when it did not answer
    smi_out="" smi_status=0 smi_limit=${VRAMSUPPLY_NVIDIA_SMI_TIMEOUT:-$NVIDIA_SMI_LIMIT}
    case "$smi_limit" in *[!0-9]*) die "VRAMSUPPLY_NVIDIA_SMI_TIMEOUT=$smi_limit: set it to the whole seconds to wait for nvidia-smi ($NVIDIA_SMI_LIMIT unless set)" ;; esac
    if [ -n "${nvidia_smi_hung:-}" ]; then return 124; fi
    if have timeout; then
        smi_out=$(timeout "$smi_limit" nvidia-smi "$@" 2>&1) || smi_status=$?
    else
        smi_out=$(nvidia-smi "$@" 2>&1) || smi_status=$?
    fi
    if [ "$smi_status" = 124 ]; then nvidia_smi_hung=1 smi_out=""; fi
    return "$smi_status"
}
nvidia_hang() { echo "nvidia-smi did not answer in $smi_limit s"; }
# From `nvidia-smi -L`'s $smi_out: the GPU lines, or the first line of what it said instead.
nvidia_gpus() { printf '%s\n' "$smi_out" | grep '^GPU [0-9]' || true; }
nvidia_failure() { printf '%s\n' "$smi_out" | grep -v '^[[:space:]]*$' | head -n 1 | cut -c 1-160 || true; }

# Sets $driver, the CUDA version the driver supports ("12.4"; "" with no driver to ask), and
# $driver_unknown: why a driver that is there did not say ("" when it did, or there is none).
read_cuda_driver() {
    driver="" driver_unknown=""
    have nvidia-smi || return 0
    ask_nvidia_smi || true
    driver=$(printf '%s\n' "$smi_out" | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)
    if [ -n "${nvidia_smi_hung:-}" ]; then
        driver_unknown="$(nvidia_hang), so the driver's CUDA version is unknown"
    elif [ -z "$driver" ] && printf '%s\n' "$smi_out" | grep -q 'CUDA Version: *N/A'; then
        driver_unknown="the NVIDIA driver does not report its CUDA version (nvidia-smi: CUDA Version: N/A)"
    fi
}
# Sets $caps: "8.6" -> "86", one per distinct GPU architecture ("" when nvidia-smi does not say).
read_compute_caps() {
    caps=""
    have nvidia-smi || return 0
    ask_nvidia_smi --query-gpu=compute_cap --format=csv,noheader || true
    caps=$(printf '%s\n' "$smi_out" | tr -d ' .\r' | grep -E '^[0-9]+$' | sort -u | tr '\n' ' ' | sed 's/ $//' || true)
}
rocm_targets() { rocminfo 2>/dev/null | sed -n 's/^ *Name: *\(gfx[0-9a-z]*\).*/\1/p' | sort -u | tr '\n' ' ' | sed 's/ $//' || true; }

detect_backend() {
    why=""
    if [ -n "${VRAMSUPPLY_BACKEND:-}" ]; then
        backend=$VRAMSUPPLY_BACKEND why="set by VRAMSUPPLY_BACKEND"
        return 0
    fi
    if have nvidia-smi; then
        ask_nvidia_smi -L || true # once: its output serves both the GPUs and the failure
        gpus=$(nvidia_gpus)
        if [ -n "$gpus" ]; then
            backend=cuda why="nvidia-smi lists $(printf '%s\n' "$gpus" | wc -l | tr -d ' ') GPU(s): $(printf '%s\n' "$gpus" | head -n 1 | sed 's/ (UUID.*//')"
            return 0
        elif [ -n "${nvidia_smi_hung:-}" ]; then
            why="$(nvidia_hang); " # as for a GPU it does not list
        else
            why="nvidia-smi lists no GPU ($(nvidia_failure)); "
        fi
    fi
    if have rocminfo && [ -n "$(rocm_targets)" ]; then
        backend=hip why="${why}rocminfo lists AMD GPU(s): $(rocm_targets)"
    elif [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then
        backend=metal why="${why}Apple Silicon"
    else
        backend=cpu why="${why}no usable GPU found"
        if have nvcc; then why="$why (nvcc alone is not a GPU)"; fi
    fi
}

# --- How to build it: plan_toolchain sets $cmake_args, $toolchain (one line for people), and
# $toolchain_missing (why this machine cannot build it; empty when it can). CUDA may also set
# $cuda_root and $cuda_wheels (NVIDIA's toolkit wheels to fetch from PyPI into $cuda_root first).

# CUDA architectures built when no GPU is visible (`--backend cuda` on a build box), as llama.cpp's
# own portable list: PTX for Turing and Ampere (JIT-compiled on newer GPUs), SASS for RTX 30/40,
# Hopper and Blackwell. VRAMSUPPLY_CUDA_ARCHITECTURES overrides it (and the detected GPUs').
default_cuda_architectures() {
    case "$1" in
        12.[0-7] | 12.[0-7].*) echo "61-virtual;70-virtual;75-virtual;80-virtual;86-real;89-real;90-virtual" ;;
        12.*) echo "61-virtual;70-virtual;75-virtual;80-virtual;86-real;89-real;90-virtual;120a-real" ;;
        *) echo "75-virtual;80-virtual;86-real;89-real;90-virtual;120a-real" ;;
    esac
}

# The toolkit root behind the nvcc on PATH (nvcc may be a wrapper script, so ask nvcc itself).
system_cuda_root() {
    if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then echo "$CUDA_HOME"; return 0; fi
    have nvcc || return 0
    # No temporary folder (TMPDIR unwritable or full): nvcc cannot be asked, so its root is unknown.
    probe_dir=$(mktemp -d 2>/dev/null) || { say "cannot make a temporary folder (TMPDIR=${TMPDIR:-/tmp}) to ask nvcc where its toolkit is" >&2; return 0; }
    : > "$probe_dir/probe.cu"
    here=$(nvcc --dryrun -c "$probe_dir/probe.cu" -o "$probe_dir/probe.o" 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1 || true)
    rm -rf "$probe_dir"
    if [ -n "$here" ]; then (cd "$here/.." && pwd); fi
}
nvcc_version() { "$1/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1 || true; }
has_cublas() {
    for lib in "$1"/lib64/libcublas.so "$1"/lib/libcublas.so "$1"/targets/*/lib/libcublas.so; do
        [ -e "$lib" ] && [ -e "$1/include/cublas_v2.h" ] && return 0
    done
    return 1
}
major_of() { echo "${1%%.*}"; }
minor_of() { rest=${1#*.}; echo "${rest%%.*}"; }

# NVIDIA's CUDA toolkit wheels for CUDA $1 (MAJOR.MINOR): never newer than the driver supports.
cuda_wheel_specs() {
    maj=$(major_of "$1") upper="$(major_of "$1").$(($(minor_of "$1") + 1))"
    if [ "$maj" -ge 13 ]; then
        for pkg in nvidia-cuda-nvcc nvidia-cuda-crt nvidia-nvvm nvidia-cuda-runtime nvidia-cublas nvidia-cuda-cccl; do
            printf '%s>=%s.0,<%s ' "$pkg" "$maj" "$upper"
        done
    else
        for pkg in nvidia-cuda-nvcc-cu12 nvidia-cuda-runtime-cu12 nvidia-cublas-cu12 nvidia-cuda-cccl-cu12; do
            printf '%s>=12.0,<%s ' "$pkg" "$upper"
        done
    fi
}

plan_cuda() {
    read_cuda_driver
    if [ -n "$driver" ] && [ "$(major_of "$driver")" -lt 12 ]; then
        # No toolkit, wheels or architectures to plan: none this driver could run exists.
        toolchain="none (CUDA 12 or newer needs a newer NVIDIA driver)"
        toolchain_missing="the NVIDIA driver supports only CUDA $driver; llama.cpp needs CUDA 12 or newer (update the driver)"
        return 0
    fi
    read_compute_caps
    sys_root=$(system_cuda_root) sys_version="" not_system=""
    if [ -n "$sys_root" ]; then sys_version=$(nvcc_version "$sys_root"); fi
    if [ -z "$sys_root" ]; then
        not_system="no CUDA toolkit (nvcc) installed"
    elif [ -z "$sys_version" ]; then
        not_system="the nvcc in $sys_root does not run"
    elif ! has_cublas "$sys_root"; then
        not_system="the CUDA $sys_version toolkit in $sys_root has no cuBLAS"
    elif [ -n "$driver" ] && [ "$(major_of "$sys_version")" -gt "$(major_of "$driver")" ]; then
        not_system="the CUDA $sys_version toolkit in $sys_root is newer than the driver supports (CUDA $driver)"
    fi
    if [ -z "$not_system" ]; then
        cuda_root=$sys_root cuda_version=$sys_version cuda_wheels=""
        toolchain="system CUDA $sys_version toolkit in $sys_root (nvcc and cuBLAS)${driver_unknown:+; $driver_unknown}"
    else
        # Match the driver; without one, the nvcc on PATH; else (or when the driver is there but
        # does not say what it supports) the newest CUDA 12, which runs on drivers >= 525.
        cuda_version=${driver:-${sys_version:-12.9}}
        if [ -n "$driver_unknown" ]; then cuda_version=12.9; fi
        lowest_cap=$(printf '%s\n' "$caps" | tr ' ' '\n' | grep . | sort -n | head -n 1 || true)
        if [ "$(major_of "$cuda_version")" -ge 13 ] && [ -n "$lowest_cap" ] && [ "$lowest_cap" -lt 75 ]; then
            cuda_version=12.9 # CUDA 13 dropped GPUs older than Turing; the driver still runs CUDA 12.
        fi
        cuda_root="$data_dir/cuda-$cuda_version" cuda_wheels=$(cuda_wheel_specs "$cuda_version")
        toolchain="CUDA $cuda_version from NVIDIA's PyPI wheels ($(echo "$cuda_wheels" | sed 's/ $//')) in $cuda_root, because $not_system"
        if [ -n "$driver_unknown" ]; then toolchain="$toolchain; CUDA $cuda_version because $driver_unknown, and CUDA 12 runs on any driver >= 525"; fi
    fi
    if [ -n "${VRAMSUPPLY_CUDA_ARCHITECTURES:-}" ]; then
        archs=$VRAMSUPPLY_CUDA_ARCHITECTURES
    elif [ -n "$caps" ]; then
        archs=$(for cap in $caps; do case "$cap" in 12[01]) printf '%sa-real;' "$cap" ;; *) printf '%s-real;' "$cap" ;; esac; done | sed 's/;$//')
    else
        archs=$(default_cuda_architectures "$cuda_version")
    fi
    cmake_args="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$archs -DCMAKE_CUDA_COMPILER=$cuda_root/bin/nvcc -DCUDAToolkit_ROOT=$cuda_root"
    toolchain="$toolchain; architectures $archs"
    if [ -z "$caps" ]; then toolchain="$toolchain (no GPU visible: the portable list)"; fi
    if [ -z "$(driver_library)" ] && ! ls "$cuda_root"/lib*/stubs/libcuda.so >/dev/null 2>&1; then
        # Without libcuda.so nothing can link the driver API; llama.cpp then skips its VMM memory pool.
        cmake_args="$cmake_args -DGGML_CUDA_NO_VMM=ON"
        toolchain="$toolchain; no NVIDIA driver library here, so built without CUDA VMM"
    fi
}
driver_library() { ldconfig -p 2>/dev/null | sed -n 's/.*libcuda\.so\.1 .*=> //p' | head -n 1 || true; }

describe_build_tools() {
    compiler=$(cc --version 2>/dev/null | head -n 1 || true)
    cmake_version=$(cmake --version 2>/dev/null | head -n 1 || true)
    echo "C/C++ compiler (${compiler:-none found}), ${cmake_version:-cmake: none found}"
}

plan_toolchain() {
    cmake_args="" toolchain="" toolchain_missing="" cuda_root="" cuda_wheels="" hip_env=""
    case "$1" in
        cpu) toolchain=$(describe_build_tools) ;;
        cuda) plan_cuda ;;
        hip)
            targets=${VRAMSUPPLY_HIP_TARGETS:-$(rocm_targets)}
            cmake_args="-DGGML_HIP=on -DGPU_TARGETS=$(echo "$targets" | tr ' ' ';')"
            if have hipconfig; then
                hip_env="HIPCXX=$(hipconfig -l 2>/dev/null)/clang HIP_PATH=$(hipconfig -R 2>/dev/null)"
                toolchain="ROCm HIP in $(hipconfig -R 2>/dev/null) (clang $(hipconfig -l 2>/dev/null)/clang); targets ${targets:-none}"
            else
                toolchain="ROCm HIP (hipconfig)" toolchain_missing="hipconfig not found: install the ROCm HIP SDK (hip-dev)"
            fi
            if [ -z "$targets" ]; then toolchain_missing="no AMD GPU target (rocminfo lists none; set VRAMSUPPLY_HIP_TARGETS=gfx1100)"; fi ;;
        metal)
            cmake_args="-DGGML_METAL=on" toolchain="Apple clang and the Metal framework (Xcode command line tools)"
            have xcrun || toolchain_missing="xcrun not found: run xcode-select --install" ;;
        vulkan)
            cmake_args="-DGGML_VULKAN=on" toolchain="Vulkan headers and loader, glslc shader compiler"
            if ! have glslc; then
                toolchain_missing="glslc not found: install the Vulkan SDK (Debian/Ubuntu: apt install libvulkan-dev glslc)"
            fi ;;
        *) die "unknown backend '$1' (expected cpu, cuda, hip, metal or vulkan)" ;;
    esac
}

# --- The CPU code every build carries ------------------------------------------------------------
# llama.cpp compiles its CPU backend for this machine's CPU (-march=native). On a CPU with AMX
# (Intel Xeon from Sapphire Rapids on) that brings in its AMX kernels, and GCC 12 (at least 12.2)
# miscompiles their tile set-up: its _tile_loadconfig intrinsic declares an 8-byte operand, so the
# compiler drops the stores of the tile rows and columns, and the first quantized matrix product (a
# Q4_K or Q8_0 model) dies with SIGSEGV in ggml_backend_amx_mul_mat. The probe compiles that
# pattern with this machine's compiler and runs it; when the tile configuration does not come back
# as written, the build leaves AMX out (llama.cpp then uses its AVX-512 kernels) and says so.
AMX_OFF="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

amx_probe_source() {
    cat <<'EOF'
#include <stdint.h>
#include <string.h>
#ifdef __AMX_TILE__
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
struct config { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };
__attribute__((noinline)) static void load(void) {
    _Alignas(64) struct config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) { c.rows[i] = 16; c.colsb[i] = 64; }
    _tile_loadconfig(&c);
}
__attribute__((noinline)) static void scribble(void) {
    volatile char junk[512];
    for (int i = 0; i < 512; i++) junk[i] = (char)0xff;
}
int main(void) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) return 0;
    scribble();
    load();
    _Alignas(64) struct config back;
    _tile_storeconfig(&back);
    _tile_release();
    return back.rows[0] == 16 && back.colsb[7] == 64 ? 0 : 1;
}
#else
int main(void) { return 0; }
#endif
EOF
}

# The compiler flags llama.cpp's CPU code needs on this machine ("" when none): AMX_OFF when the
# probe shows the compiler miscompiles AMX tile set-up (or the probe dies). A compiler that cannot
# build the probe cannot turn AMX on either.
cpu_build_flags() {
    [ "$(uname -s 2>/dev/null)" = Linux ] && [ "$(uname -m 2>/dev/null)" = x86_64 ] || return 0
    have cc || return 0
    probe_dir=$(mktemp -d 2>/dev/null) || return 0
    amx_probe_source >"$probe_dir/amx.c"
    probe_status=0
    if cc -O2 -march=native "$probe_dir/amx.c" -o "$probe_dir/amx" >/dev/null 2>&1; then
        ("$probe_dir/amx"; exit $?) >/dev/null 2>&1 || probe_status=$?
    fi
    rm -rf "$probe_dir"
    if [ "$probe_status" != 0 ]; then echo "$AMX_OFF"; fi
}

checkout_dir() {
    # The directory this script lives in, when it is a vramsupply checkout (sh install.sh).
    case "$0" in
        */install.sh | install.sh) dir=$(cd "$(dirname "$0")" && pwd) ;;
        *) return 1 ;;
    esac
    grep -q '^name = "vramsupply"' "$dir/pyproject.toml" 2>/dev/null && echo "$dir"
}

require_build_tools() {
    cc_found=""
    for compiler in cc gcc clang; do have "$compiler" && cc_found=$compiler && break; done
    [ -n "$cc_found" ] || die "no C compiler found; llama.cpp is built from source. Install one (Debian/Ubuntu: apt install build-essential; macOS: xcode-select --install)"
    have c++ || have g++ || have clang++ || die "no C++ compiler found (Debian/Ubuntu: apt install build-essential)"
    have cmake || die "cmake not found; llama.cpp needs it to build (Debian/Ubuntu: apt install cmake; macOS: brew install cmake)"
}

# --- Building llama-cpp-python, alive and never leaving the user with nothing -------------------------
LLAMA_SPEC="llama-cpp-python>=0.3.36,<0.4"

fmt_elapsed() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# What the build is doing now, from its log: ninja's "[N/M]" step and the file it compiles.
build_step() {
    recent=$(tail -n 40 "$1" 2>/dev/null || true)
    step=$(printf '%s\n' "$recent" | sed -n 's/.*\[\([0-9]*\/[0-9]*\)\].*/\1/p' | tail -n 1)
    if [ -n "$step" ]; then
        file=$(printf '%s\n' "$recent" | sed -n 's/.*\[[0-9]*\/[0-9]*\].* -c \([^ ]*\).*/\1/p' | tail -n 1)
        if [ -n "$file" ]; then echo "step $step (${file##*/})"; else echo "step $step (linking)"; fi
    elif grep -q -- '-- Configuring\|^ *-- ' "$1" 2>/dev/null; then
        echo "configuring with cmake"
    else
        echo "preparing the build"
    fi
}

# Prints the elapsed time and current step: in place on a terminal, a line every 30 s otherwise.
build_ticker() {
    started=$(date +%s) last=$started
    while kill -0 "$$" 2>/dev/null; do
        sleep 2
        now=$(date +%s)
        if [ -t 1 ]; then
            printf '\r\033[K%s' "vramsupply: $2: $(fmt_elapsed $((now - started))), $(build_step "$1")"
        elif [ $((now - last)) -ge 30 ]; then
            say "$2: $(fmt_elapsed $((now - started))), $(build_step "$1")"
            last=$now
        fi
    done
}

run_build() { # LOG LABEL COMMAND...: the command's output goes to LOG; returns its status
    log=$1 label=$2
    shift 2
    build_ticker "$log" "$label" &
    ticker_pid=$!
    trap 'kill "$ticker_pid" 2>/dev/null; exit 130' INT TERM
    status=0
    "$@" >"$log" 2>&1 || status=$?
    kill "$ticker_pid" 2>/dev/null || true
    wait "$ticker_pid" 2>/dev/null || true
    trap - INT TERM
    if [ -t 1 ]; then printf '\r\033[K'; fi
    return "$status"
}

# One line saying why a build failed: CMake's first error, else the compiler's, else the last line.
build_failure_reason() {
    reason=$(awk '/CMake Error/ { found = 1; next } found && NF { sub(/^[ \t]+/, ""); print; exit }' "$1" 2>/dev/null)
    [ -n "$reason" ] || reason=$(grep -E '(^|[ :)])(error|fatal error|nvcc fatal)[ ]*:' "$1" 2>/dev/null | head -n 1 | sed 's/^[[:space:]]*//')
    [ -n "$reason" ] || reason=$(grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | sed 's/^[[:space:]]*//')
    echo "$reason" | cut -c 1-200
}

plan_cpu_flags() { # sets $cpu_flags and $cpu_flags_why; VRAMSUPPLY_CPU_FLAGS (even empty) overrides the probe
    if [ -n "${VRAMSUPPLY_CPU_FLAGS+set}" ]; then
        cpu_flags=$VRAMSUPPLY_CPU_FLAGS cpu_flags_why="from VRAMSUPPLY_CPU_FLAGS"
    else
        cpu_flags=$(cpu_build_flags)
        cpu_flags_why="AMX left out: this compiler miscompiles llama.cpp's AMX tile set-up, which crashes quantized models"
    fi
}

build_id() { echo "$1${cpu_flags:+ $cpu_flags}"; } # BACKEND: what $data_dir/backend records

llama_importable() { "$venv/bin/python" -c 'import llama_cpp' >/dev/null 2>&1; }

# The venv's pip. A function, never a word-split string: the venv's path may hold spaces (the
# macOS default, ~/Library/Application Support, does).
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }

# NVIDIA's toolkit wheels, merged into one CUDA tree at $cuda_root (the layout CMake and nvcc expect).
# It stays after the build: the built library loads cudart and cuBLAS from it (link_cuda_runtime).
install_cuda_wheels() {
    if [ -x "$cuda_root/bin/nvcc" ] && has_cublas "$cuda_root"; then return 0; fi
    staging="$cuda_root.partial"
    rm -rf "$staging" && mkdir -p "$staging/root"
    say "downloading the CUDA $cuda_version toolkit from PyPI into $cuda_root (about 1.5 GB, once)"
    # shellcheck disable=SC2086
    if ! pip install --quiet --target "$staging/site" $cuda_wheels >"$staging/pip.log" 2>&1; then
        failure="could not install NVIDIA's CUDA $cuda_version wheels: $(build_failure_reason "$staging/pip.log")"
        return 1
    fi
    # Each step is checked: this runs where `set -e` does not apply (in an `||`), and a full disk
    # must not leave a partial toolkit that looks complete to the next run.
    for part in "$staging"/site/nvidia/*/; do
        if ! cp -R -l -f "$part." "$staging/root/" 2>/dev/null && ! cp -R -f "$part." "$staging/root/" 2>"$staging/cp.log"; then
            failure="could not put the CUDA toolkit together in $staging: $(tail -n 1 "$staging/cp.log" | cut -c 1-200)"
            return 1
        fi
    done
    root="$staging/root"
    [ -e "$root/lib64" ] || ln -s lib "$root/lib64"
    case "$(uname -m)" in aarch64 | arm64) target=sbsa-linux ;; *) target="$(uname -m)-linux" ;; esac
    mkdir -p "$root/targets/$target"
    ln -sfn ../../include "$root/targets/$target/include"
    ln -sfn ../../lib "$root/targets/$target/lib"
    for lib in "$root"/lib/lib*.so.[0-9]*; do
        name=${lib##*/}
        [ -e "$root/lib/${name%%.so.*}.so" ] || ln -s "$name" "$root/lib/${name%%.so.*}.so"
    done
    driver=$(driver_library)
    if [ -n "$driver" ]; then mkdir -p "$root/lib/stubs" && ln -sf "$driver" "$root/lib/stubs/libcuda.so"; fi
    if ! { rm -rf "$cuda_root" && mv "$root" "$cuda_root"; }; then
        failure="could not move the CUDA toolkit into $cuda_root"
        return 1
    fi
    rm -rf "$staging"
}

# pip with what llama.cpp's build needs for the planned backend ($cmake_args, $cpu_flags, the
# toolkit's compiler). Used for the build, and for installing vramsupply itself: an upgrade whose
# release needs a newer llama-cpp-python makes pip build it, and without these it would be built
# for the CPU, silently replacing a GPU build.
pip_for_build() {
    extra_path=${cuda_root:+$cuda_root/bin:}
    # shellcheck disable=SC2086
    env PATH="$extra_path$PATH" ${cuda_root:+CUDACXX=$cuda_root/bin/nvcc} ${hip_env:-} CMAKE_ARGS="$cmake_args" \
        CFLAGS="${CFLAGS:+$CFLAGS }$cpu_flags" CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }$cpu_flags" \
        "$venv/bin/python" -m pip --disable-pip-version-check "$@"
}

# pip's wheel cache ignores CMAKE_ARGS and CFLAGS: a GPU build, or one with CPU flags, must never
# reuse (or leave) a cached wheel.
no_cache_for() { # BACKEND
    if [ "$1" != cpu ] || [ -n "$cpu_flags" ]; then echo "--no-cache-dir"; fi
}

build_llama() { # BACKEND: build and install llama-cpp-python for it, log in $build_log
    build_log="$data_dir/build-$1.log"
    flags=""
    if llama_importable; then flags="--force-reinstall --no-deps"; fi
    flags="$flags $(no_cache_for "$1")"
    say "building llama-cpp-python for $1 (several minutes; log: $build_log)"
    # shellcheck disable=SC2086
    run_build "$build_log" "building llama.cpp for $1" pip_for_build install -v $flags "$LLAMA_SPEC"
}

# A release PyPI does not have (--version) is said before the long llama.cpp build, not after it.
check_release() { # SPEC
    found=$(pip install --dry-run --no-deps --quiet "$1" 2>&1) && return 0
    reason=$(printf '%s\n' "$found" | sed -n 's/^ERROR: //p' | tail -n 1)
    die "cannot install $1 from PyPI: ${reason:-$(printf '%s\n' "$found" | grep -v '^[[:space:]]*$' | tail -n 1)}"
}

# The CUDA build needs cudart and cuBLAS at run time, and a toolkit from PyPI (or in an unusual
# place) is not on the loader's path: link them beside llama.cpp's libraries, whose RUNPATH is
# $ORIGIN. A driver-only machine then loads the build without LD_LIBRARY_PATH.
link_cuda_runtime() { # VENV CUDA_ROOT
    lib_dir=$("$1/bin/python" -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("llama_cpp").origin), "lib"))') || return 1
    cuda_lib="$2/lib64"
    [ -d "$cuda_lib" ] || cuda_lib="$2/lib"
    for lib in "$cuda_lib"/libcudart.so.[0-9]* "$cuda_lib"/libcublas.so.[0-9]* "$cuda_lib"/libcublasLt.so.[0-9]*; do
        [ -e "$lib" ] && ln -sf "$lib" "$lib_dir/${lib##*/}"
    done
    return 0
}

build_gpu() { # BACKEND: 0 when the GPU build is installed; else $failure says why in one line
    failure="" build_log="$data_dir/build-$1.log"
    if [ -n "$toolchain_missing" ]; then failure=$toolchain_missing && return 1; fi
    if [ -n "$cuda_wheels" ]; then install_cuda_wheels || return 1; fi
    if ! build_llama "$1"; then failure=$(build_failure_reason "$build_log") && return 1; fi
    if [ "$1" = cuda ] && ! link_cuda_runtime "$venv" "$cuda_root" >>"$build_log" 2>&1; then
        failure="could not link the CUDA runtime libraries from $cuda_root" && return 1
    fi
    if ! "$venv/bin/python" -c 'import llama_cpp' >>"$build_log" 2>&1; then
        failure="the $1 build does not load: $(tail -n 1 "$build_log")" && return 1
    fi
}

say_fallback() {
    bar='vramsupply: !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!'
    {
        echo "$bar"
        say "!! the $1 build failed: $failure"
        say "!! installing the CPU build instead: models will run on the CPU, NOT on the GPU."
        if [ -e "${build_log:-}" ]; then say "!! full build log: $build_log"; fi
        say "!! fix the cause and run install.sh again (--strict fails instead of falling back)."
        echo "$bar"
    }
}

# A venv made half (no pip: python3-venv was missing, or Ctrl-C while it was made) or whose Python
# is gone (a distro upgrade) is made again; a working one is kept, with its llama.cpp build.
make_venv() { # PYTHON
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -m pip --version >/dev/null 2>&1; then return 0; fi
    if [ -e "$venv" ]; then
        say "the virtual environment in $venv is broken (no working pip); making it again"
        "$1" -m venv --clear "$venv" || { rm -rf "$venv" && "$1" -m venv "$venv"; }
    else
        say "creating virtual environment in $venv"
        "$1" -m venv "$venv"
    fi
}

# BIN_DIR/vramsupply may be our link (replaced), or a link elsewhere (another install: replaced,
# and said); never a file or folder of someone else's.
check_link_target() { # PATH
    if [ -L "$1" ]; then
        current=$(readlink "$1")
        [ "$current" = "$venv/bin/vramsupply" ] || say "replacing $1, which pointed to $current"
    elif [ -e "$1" ]; then
        die "$1 exists and is not a link this installer made; move it away, or set VRAMSUPPLY_BIN_DIR to another folder"
    fi
}

# --- Uninstalling: every step goes through remove_path or the dry_run test in front of the agent's
# own commands, so that `--uninstall --dry-run` says exactly what a real run would remove and changes
# nothing. (It once returned before dry_run was read: a dry run uninstalled, with --purge deleted the
# user's configuration and downloaded models.)
NL='
'
removed_paths=$NL # what remove_path took (a dry run only pretends), one a line

is_removed() { # PATH: remove_path took it, or a folder it is in
    p=$1
    while :; do
        case "$removed_paths" in *"$NL$p$NL"*) return 0 ;; esac
        case "$p" in */?*) p=${p%/*} ;; *) return 1 ;; esac
    done
}

gone() { [ ! -e "$1" ] && [ ! -L "$1" ] || is_removed "$1"; } # PATH: absent, or (dry run) would be

remove_path() { # PATH: rm -rf, said; in a dry run only said
    if gone "$1"; then return 0; fi
    removed_paths="$removed_paths$1$NL"
    if [ "$dry_run" = 1 ]; then say "would remove $1"; return 0; fi
    rm -rf "$1" || die "could not remove $1"
    say "removed $1"
}

remove_if_emptied() { # DIR: removed when nothing is left in it but what was removed above
    [ -d "$1" ] && ! gone "$1" || return 0
    for entry in "$1"/* "$1"/.[!.]* "$1"/..?*; do gone "$entry" || return 0; done
    if [ "$dry_run" = 1 ]; then remove_path "$1"; else rmdir "$1" 2>/dev/null && removed_paths="$removed_paths$1$NL" && say "removed $1"; fi
    return 0
}

service_env_file() { # where `vramsupply service install` puts the service's settings by default
    if [ "$(id -u)" = 0 ]; then echo "/etc/vramsupply/env"; else echo "$(config_dir)/env"; fi
}
# The system service's StateDirectory= (endpoint token, registration, earnings ledger) and
# CacheDirectory= (downloaded models), and its account: what a root purge takes with the service.
service_state_dir() { echo "/var/lib/vramsupply"; }
service_cache_dir() { echo "/var/cache/vramsupply"; }
SERVICE_USER_COMMENT="vramsupply provider agent" # useradd's comment: the account is ours
service_user_ours() {
    have getent || return 1
    [ "$(getent passwd vramsupply 2>/dev/null | cut -d: -f5 | cut -d, -f1)" = "$SERVICE_USER_COMMENT" ]
}

# What `vramsupply service uninstall --purge` leaves nothing of: the env file, and as root the
# service's folders and account. Sets $env_file; true when there is any of it.
service_leftovers() { # UNIT
    env_file=$(sed -n 's/^EnvironmentFile=-\{0,1\}//p' "$1" 2>/dev/null | head -n 1)
    env_file=${env_file:-$(service_env_file)}
    [ -e "$env_file" ] && return 0
    [ "$(id -u)" = 0 ] || return 1
    [ -e "$(service_state_dir)" ] || [ -e "$(service_cache_dir)" ] || service_user_ours
}

say_service_purge() { # dry run: what the agent's purge would remove beside the unit
    if [ -e "$env_file" ]; then say "would remove the service's settings in $env_file" && removed_paths="$removed_paths$env_file$NL"; fi
    [ "$(id -u)" = 0 ] || return 0
    remove_path "$(service_state_dir)"
    remove_path "$(service_cache_dir)"
    if service_user_ours; then say "would remove the system user vramsupply (not while a process of it runs)"; fi
}

# Only the service that runs this install's agent, not one belonging to another venv. With --purge,
# what a service left behind goes even when its unit is gone (removed by hand, or a run cut short).
uninstall_service() { # PURGE
    unit=$(service_unit) scope="" purge_flag="" what=""
    if [ "$(id -u)" != 0 ]; then scope="--user"; fi
    if [ "$1" = 1 ]; then purge_flag="--purge"; fi
    if grep -qF "ExecStart=$venv/bin/vramsupply " "$unit" 2>/dev/null; then
        what="stop and disable the systemd service and remove $unit"
    elif [ -e "$unit" ] || [ "$1" != 1 ] || ! service_leftovers "$unit"; then
        return 0 # another install's service, or nothing of one here
    else
        what="remove what the systemd service left"
    fi
    service_leftovers "$unit" || true # sets $env_file
    agent_command="vramsupply service uninstall${scope:+ $scope}${purge_flag:+ $purge_flag}"
    if [ ! -x "$venv/bin/vramsupply" ]; then
        say "no vramsupply in $venv to $what with; install it again and run: $agent_command"
        return 0
    fi
    if [ "$dry_run" = 1 ]; then
        say "would $what ($agent_command)"
        if [ -n "$purge_flag" ]; then say_service_purge; fi
        return 0
    fi
    # shellcheck disable=SC2086
    "$venv/bin/vramsupply" service uninstall $scope $purge_flag || say "could not $what; run: $agent_command"
}

uninstall_models() {
    if [ ! -x "$venv/bin/vramsupply" ]; then
        say "no vramsupply in $venv to remove the downloaded models with; remove them with 'hf cache' if you wish"
    elif [ "$dry_run" = 1 ]; then
        say "would remove every downloaded model (vramsupply models rm --all --yes)"
    else
        "$venv/bin/vramsupply" models rm --all --yes || say "could not remove downloaded models; remove them with 'hf cache' if you wish"
    fi
}

# The files the agent writes in its data dir (platform/token.py, platform/state.py, ledger/store.py
# with SQLite's own beside it, throughput/store.py, instance_lock.py) and its config dir; a purge
# takes these and no other (tests/test_install_purge.py keeps the list in step with the agent).
AGENT_DATA_FILES="endpoint_token registration.json ledger.sqlite3 ledger.sqlite3-wal ledger.sqlite3-shm ledger.sqlite3-journal bench.json agent.lock"
AGENT_CONFIG_FILES="config.toml"

remove_agent_files() { # DIR NAME...: each, and the .NAME.* a write cut short leaves (write_private_file)
    dir=$1
    shift
    for name in "$@"; do
        for path in "$dir/$name" "$dir/.$name".*; do remove_path "$path"; done
    done
}

# The downloaded models an uninstall keeps, and their size ("2 models, 9.8 GB on disk"), asked of
# the agent before its venv goes; nothing when there are none or it cannot say.
models_kept() {
    [ -x "$venv/bin/vramsupply" ] && [ -x "$venv/bin/python" ] || return 0
    "$venv/bin/vramsupply" models list --json 2>/dev/null | "$venv/bin/python" -c '
import json, sys
from rich.filesize import decimal
models = json.load(sys.stdin)
if models:
    print("%d model%s, %s on disk" % (len(models), "" if len(models) == 1 else "s", decimal(sum(m["on_disk"] for m in models))))
' 2>/dev/null || true
}

uninstall() { # DATA_DIR BIN_DIR PURGE
    data_dir=$1 bin_dir=$2 purge=$3
    venv="$data_dir/venv" kept=kept models=""
    if [ "$dry_run" = 1 ]; then say "dry run: uninstalling would do this, and nothing is changed" && kept="would keep"; fi
    if [ "$purge" != 1 ]; then models=$(models_kept); fi
    uninstall_service "$purge"
    if [ "$purge" = 1 ]; then uninstall_models; fi
    link="$bin_dir/vramsupply"
    # Only our link: one to another install's vramsupply (pipx, another venv) is not ours to remove.
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$venv/bin/vramsupply" ]; then remove_path "$link"; fi
    for path in "$venv" "$data_dir"/cuda-[0-9]* "$data_dir/backend" "$data_dir"/build-*.log; do
        remove_path "$path"
    done
    remove_agent_files "$(agent_data_dir)" registration.json
    if [ "$purge" = 1 ]; then
        # shellcheck disable=SC2086
        remove_agent_files "$(config_dir)" $AGENT_CONFIG_FILES
        # shellcheck disable=SC2086
        remove_agent_files "$(agent_data_dir)" $AGENT_DATA_FILES
        # a damaged ledger the agent moved aside (ledger/recorder.py), with its -wal and -shm
        for path in "$(agent_data_dir)"/ledger.sqlite3.damaged-*; do remove_path "$path"; done
        remove_if_emptied "$(config_dir)"
    fi
    remove_if_emptied "$data_dir"
    remove_if_emptied "$(agent_data_dir)"
    # VRAMSUPPLY_DATA_DIR may name a shared folder, and the agent's folders may hold the user's own
    # files: what neither the installer nor the agent wrote there stays.
    if ! gone "$data_dir"; then say "$kept $data_dir: it holds files this installer did not write"; fi
    if [ "$purge" = 1 ]; then
        agent_dir=$(agent_data_dir)
        for dir in "$agent_dir" "$(config_dir)"; do # one folder on macOS; the install's too by default
            [ "$dir" = "$data_dir" ] || gone "$dir" || say "$kept $dir: it holds files vramsupply did not write"
            [ "$(config_dir)" != "$agent_dir" ] || break
        done
    fi
    if [ "$purge" != 1 ]; then
        say "$kept configuration ($(config_dir), endpoint token) and downloaded models${models:+ ($models)}; use --uninstall --purge to remove them too"
    fi
    if [ "$dry_run" = 1 ]; then say "dry run: nothing was removed"; fi
}

# What pip installs ($spec) and, for people, from where ($source). Reads only: a dry run calls it.
plan_spec() {
    if [ -z "$from" ] && [ -z "$version" ]; then
        from=$(checkout_dir || true)
    fi
    extras=""
    if [ "$dev" = 1 ]; then extras="[dev]"; fi # before the version: vramsupply[dev]==X
    if [ -n "$from" ]; then
        [ -e "$from" ] || die "--from path '$from' does not exist"
        spec="$(cd "$from" 2>/dev/null && pwd || echo "$from")$extras" source="from $spec"
    elif [ -n "$version" ]; then
        spec="vramsupply$extras==$version" source="$spec from PyPI"
    else
        spec="vramsupply$extras" source="the latest vramsupply$extras from PyPI"
    fi
}

# The installer reads VRAMSUPPLY_*, the agent VRAM_SUPPLY_*: one spelled for the other is said, not
# silently ignored (VRAMSUPPLY_MODEL set for the agent did nothing).
INSTALLER_SETTINGS="VERSION FROM BACKEND PYTHON CUDA_ARCHITECTURES HIP_TARGETS CPU_FLAGS DATA_DIR BIN_DIR UNINSTALL NVIDIA_SMI_TIMEOUT INSTALL_FUNCTIONS_ONLY"
hint_misspelled_settings() {
    for name in $(env | sed -n 's/^VRAMSUPPLY_\([A-Za-z0-9_]*\)=.*/\1/p' | sort -u); do
        case " $INSTALLER_SETTINGS " in
            *" $name "*) ;;
            *) say "VRAMSUPPLY_$name is not an installer setting, so it is ignored; the agent reads VRAM_SUPPLY_$name" >&2 ;;
        esac
    done
    for name in $(env | sed -n 's/^VRAM_SUPPLY_\([A-Za-z0-9_]*\)=.*/\1/p' | sort -u); do
        case " $INSTALLER_SETTINGS " in
            *" $name "*) say "VRAM_SUPPLY_$name is ignored: the installer reads VRAMSUPPLY_$name" >&2 ;;
        esac
    done
}

main() {
    # An empty VRAMSUPPLY_* is unset, as a shell's `VAR= sh install.sh` means; an empty option is refused.
    version=${VRAMSUPPLY_VERSION:-} version_by=VRAMSUPPLY_VERSION
    from=${VRAMSUPPLY_FROM:-} from_by=VRAMSUPPLY_FROM
    backend=""
    dev=0 service=0 remove=0 purge=0 dry_run=0 strict=0
    case "${VRAMSUPPLY_UNINSTALL:-}" in # `curl … | VRAMSUPPLY_UNINSTALL=1 sh`, where passing options is awkward
        "" | 0 | false | no) ;;
        1 | true | yes) remove=1 ;;
        *) die "VRAMSUPPLY_UNINSTALL=$VRAMSUPPLY_UNINSTALL: set it to 1 to uninstall, or leave it unset" ;;
    esac
    while [ $# -gt 0 ]; do
        case "$1" in
            --version) [ -n "${2:-}" ] || die "--version needs a value (a release on PyPI: --version 1.2.3)"; version=$2 version_by=--version; shift ;;
            --from) [ -n "${2:-}" ] || die "--from needs a path (a vramsupply checkout or wheel)"; from=$2 from_by=--from; shift ;;
            --backend) [ -n "${2:-}" ] || die "--backend needs cpu, cuda, hip, metal or vulkan (leave it out to detect the GPU)"; backend=$2; shift ;;
            --dry-run) dry_run=1 ;;
            --strict) strict=1 ;;
            --dev) dev=1 ;;
            --service) service=1 ;;
            --uninstall) remove=1 ;;
            --purge) purge=1 ;;
            -h | --help) usage; exit 0 ;;
            *) die "unknown option '$1' (see --help)" ;;
        esac
        shift
    done
    if [ "$purge" = 1 ] && [ "$remove" = 0 ]; then die "--purge goes with --uninstall (sh install.sh --uninstall --purge); nothing was done"; fi
    if [ -n "$version" ] && [ -n "$from" ]; then
        die "$version_by $version and $from_by $from name two things to install: give one of them; nothing was done"
    fi
    hint_misspelled_settings

    data_dir=${VRAMSUPPLY_DATA_DIR:-$(default_data_dir)}
    bin_dir=${VRAMSUPPLY_BIN_DIR:-$(default_bin_dir)}
    if [ -d "$data_dir" ]; then data_dir=$(cd "$data_dir" && pwd); fi # as the install recorded it
    venv="$data_dir/venv"

    if [ "$remove" = 1 ]; then
        uninstall "$data_dir" "$bin_dir" "$purge"
        return 0
    fi

    if [ -n "$backend" ]; then why="asked for with --backend"; else detect_backend; fi
    plan_toolchain "$backend"
    plan_cpu_flags
    say "llama.cpp backend: $backend ($why)"
    say "toolchain: $toolchain"
    if [ -n "$cpu_flags" ]; then say "CPU code flags: $cpu_flags ($cpu_flags_why)"; fi
    if [ -n "$toolchain_missing" ]; then
        if [ "$strict" = 1 ]; then
            say "cannot build for $backend: $toolchain_missing (--strict: the install stops here)"
        else
            say "cannot build for $backend: $toolchain_missing; the CPU build would be installed instead"
        fi
    fi
    find_python
    plan_spec
    if [ -z "$python_problem" ]; then say "python: $python${python_note:+ ($python_note)}"; fi
    if [ "$dry_run" = 1 ]; then
        if [ -n "$python_problem" ]; then say "python: none ($python_problem)"; fi
        say "would install $source into $venv, linked as $bin_dir/vramsupply"
        say "dry run: nothing was installed"
        return 0
    fi
    [ -z "$python_problem" ] || die "$python_problem"
    if [ "$strict" = 1 ] && [ -n "$toolchain_missing" ]; then die "cannot build for $backend: $toolchain_missing"; fi

    say "installing $source"

    mkdir -p "$data_dir" "$bin_dir"
    # Absolute, so that the link works from anywhere (a relative VRAMSUPPLY_DATA_DIR left it dangling).
    data_dir=$(cd "$data_dir" && pwd) && bin_dir=$(cd "$bin_dir" && pwd) && venv="$data_dir/venv"
    check_link_target "$bin_dir/vramsupply"
    make_venv "$python"
    pip install --quiet --upgrade pip
    if [ -z "$from" ]; then check_release "$spec"; fi

    # The backend file also records the CPU flags, so a build made before a flag was needed is redone.
    previous_build=$(cat "$data_dir/backend" 2>/dev/null || echo none)
    fell_back=0
    if [ "$previous_build" != "$(build_id "$backend")" ] || ! llama_importable; then
        require_build_tools
        installed=""
        if [ "$backend" != cpu ]; then
            if build_gpu "$backend"; then
                installed=$backend
            elif [ "$strict" = 1 ]; then
                die "the $backend build failed: $failure (full log: $build_log; --strict: no CPU fallback)"
            else
                say_fallback "$backend"
                fell_back=1
            fi
        fi
        if [ -z "$installed" ]; then
            plan_toolchain cpu
            if [ "$previous_build" != "$(build_id cpu)" ] || ! llama_importable; then
                build_llama cpu || die "the CPU build failed too: $(build_failure_reason "$build_log") (full log: $build_log)"
            fi
            installed=cpu
        fi
        build_id "$installed" > "$data_dir/backend"
    fi

    was=$("$venv/bin/vramsupply" --version 2>/dev/null || true) # an upgrade: an agent may run it still
    # With the build's environment: pip may rebuild llama-cpp-python for the new release (pip_for_build).
    # shellcheck disable=SC2046
    pip_for_build install --quiet --upgrade $(no_cache_for "$(head -n 1 "$data_dir/backend" | cut -d ' ' -f 1)") "$spec"
    ln -sfn "$venv/bin/vramsupply" "$bin_dir/vramsupply"
    say "installed $("$venv/bin/vramsupply" --version) -> $bin_dir/vramsupply"

    case ":$PATH:" in
        *":$bin_dir:"*) ;;
        *) say "$bin_dir is not on your PATH; add it with: export PATH=\"$bin_dir:\$PATH\" (in ~/.profile to keep it)" ;;
    esac

    if [ "$service" = 0 ] && [ -t 0 ] && systemd_present; then
        printf '%s' "vramsupply: install the systemd service now? [y/N] "
        read -r answer || answer=""
        case "$answer" in [Yy]*) service=1 ;; esac
    fi
    if [ "$service" = 1 ]; then
        # As root the system unit (dedicated user); otherwise the per-user unit.
        if [ "$(id -u)" = 0 ]; then
            "$venv/bin/vramsupply" service install
        else
            "$venv/bin/vramsupply" service install --user
        fi
    fi
    say "next: vramsupply serve --demo   (or: vramsupply login, then vramsupply serve --model org/model)"
    if [ "$service" = 0 ]; then say_restart_running "$was"; fi # `service install` restarted the service
    if [ "$fell_back" = 1 ]; then
        say "WARNING: this is the CPU build; the $backend build failed: $failure" >&2
    fi
}

# After an upgrade, an agent started before it runs the old version still (and, importing lazily,
# may mix in the new one's modules): say how to restart the service, or the agent in this data dir.
say_restart_running() { # VERSION_BEFORE (empty: a fresh install)
    [ -n "$1" ] || return 0
    scope=""
    if [ "$(id -u)" != 0 ]; then scope=" --user"; fi
    # shellcheck disable=SC2086
    if grep -qF "ExecStart=$venv/bin/vramsupply " "$(service_unit)" 2>/dev/null && systemd_present && systemctl$scope is-active --quiet vramsupply 2>/dev/null; then
        say "the vramsupply service still runs $1: restart it to use the new version: systemctl$scope restart vramsupply"
        return 0
    fi
    pid=$("$venv/bin/python" -c 'from vramsupply.instance_lock import lock_holder; print(lock_holder() or "")' 2>/dev/null || true)
    case "$pid" in
        "" | *[!0-9]*) ;;
        *) say "an agent started before this upgrade (pid $pid) still runs $1: stop it (Ctrl-C, or kill $pid) and start it again to use the new version" ;;
    esac
}

# Tests set VRAMSUPPLY_INSTALL_FUNCTIONS_ONLY=1 and source this file to call one function.
if [ -z "${VRAMSUPPLY_INSTALL_FUNCTIONS_ONLY:-}" ]; then main "$@"; fi
