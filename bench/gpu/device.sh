#!/usr/bin/env bash
# The GPU benchmark on the lent GPU machine (the `device` tool), from what bench/gpu/pack.sh put in .gpu/.
#
# bench/gpu/run.sh is what a GPU owner would run: it installs through install.sh, which needs
# PyPI. The lent machine reaches no network and gives a session 15 minutes, so here:
#   1. the packed wheels go into a private site dir, first on PYTHONPATH with this checkout;
#   2. llama.cpp as shared libraries, CUDA for this GPU's compute capability only: libllama and
#      libggml* for llama-cpp-python's ctypes bindings (copied into its package's lib/), and
#      llama-server and llama-batched-bench linked to the very same libraries, so both servers run
#      the same kernels. Unpacked from .gpu/llama-cuda-bin.tar.xz where bench/gpu/prebuild.sh built
#      them on the CPU machine (the build takes minutes of the lease), else ONE CMake build here;
#   3. the bench model (2048 x 16, Q8_0, 1.1B) written with make_bench_model.py;
#   4. bench/gpu/run.py (vramsupply, llama-server -kvu and without, vramsupply --backend-sampling
#      at c = 1, 4, 16, 64; vramsupply --draft-max 8 at c = 1; then both servers at their
#      defaults at c = 1, 4, 16), bench/speculative.py and bench/step_sections.py;
#   5. the engine tests (tests/test_engine*.py) on this build: on a GPU, on the GPU.
# $OUT gets at most 8 files back, so it holds: device.log (all of this output), the results
# (gpu-<date>.json and .md, gpu-<date>-speculative.json, gpu-<date>-step-sections.json) and
# logs.tar.gz (CMake, the servers).
# usage, on the device: bash bench/gpu/device.sh        (carry .gpu; timeout_s 600)
#        anywhere, as a rehearsal without a GPU:  PYTHON=... bash bench/gpu/device.sh cpu
# env: PYTHON (default python3), GPU_WORK (default .gpu-work in this checkout, git-ignored, so a
#      second call on the still-warm machine finds the build and goes on from it), OUT,
#      BUILD_ONLY=1 (stop after the build: for a first call when the build may take most of the
#      command's 10 minutes), BENCH_ROUNDS (default 1), BENCH_DIM / BENCH_LAYERS / BENCH_FFN,
#      BENCH_CONCURRENCY (default 1,4,16,64), BENCH_DEFAULTS_CONCURRENCY (default 1,4,16; '' skips),
#      BENCH_SERVERS (run.py's --servers: only these, comma-separated),
#      SPECULATIVE, STEP_SECTIONS, ENGINE_TESTS (each default 1; 0 skips it), ENGINE_TESTS_TIMEOUT (150 s)
set -euo pipefail

repo_root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo_root"
backend="${1:-cuda}"
python="${PYTHON:-python3}"
work="${GPU_WORK:-$repo_root/.gpu-work}"
out="${OUT:-$work/out}"
logs="$work/logs"
date_tag="$(date -u +%Y-%m-%d)"
mkdir -p "$work" "$out" "$logs"
[[ -f .gpu/llama-src.tar.xz ]] || { echo "no .gpu/: run bench/gpu/pack.sh here, and carry .gpu" >&2; exit 1; }
exec > >(tee -a "$out/device.log") 2>&1
pack_logs() {  # with the servers' logs, which bench/servers.py writes under bench/.cache/logs
    mkdir -p "$logs/servers" && { cp bench/.cache/logs/*.log "$logs/servers/" 2>/dev/null || true; }
    tar -C "$work" -czf "$out/logs.tar.gz" logs || true
}
trap pack_logs EXIT
stage() { echo "== $* ($(date -u +%T))"; }

stage "1. packages"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" .gpu/wheels/*.whl
if [[ ! -d "$work/src/llama_cpp" ]]; then  # unpacked once: fresh sources would rebuild everything
    mkdir -p "$work/src" && tar -C "$work/src" -xJf .gpu/llama-src.tar.xz
fi
export PYTHONPATH="$repo_root:$work/src:$work/site${PYTHONPATH:+:$PYTHONPATH}"
# The bindings run from source, not installed: give them the metadata that installing would write
# (the bench reads llama-cpp-python's version by its distribution name).
llama_version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$work/src/llama_cpp/__init__.py")"
mkdir -p "$work/src/llama_cpp_python-$llama_version.dist-info"
printf 'Metadata-Version: 2.1\nName: llama-cpp-python\nVersion: %s\n' "$llama_version" \
    >"$work/src/llama_cpp_python-$llama_version.dist-info/METADATA"

install_fn() { VRAMSUPPLY_INSTALL_FUNCTIONS_ONLY=1 sh -c '. "$1"; shift; "$@"' sh "$repo_root/install.sh" "$@"; }

# The CUDA toolkit to build with: the one behind nvcc when it has cuBLAS (install.sh's checks), else
# that one merged with the cuBLAS of the Python's NVIDIA wheels (PyTorch's), under $work/cuda, with
# the unversioned library links CMake looks for. (The merge was never needed or run on a GPU.)
cuda_toolkit() {
    local root merged lib name
    root="$(install_fn system_cuda_root)"
    [[ -n "$root" ]] || { echo "no nvcc: no CUDA toolkit to build with" >&2; return 1; }
    echo "CUDA toolkit: $root ($(install_fn nvcc_version "$root"))" >&2
    if install_fn has_cublas "$root"; then echo "$root"; return 0; fi
    merged="$work/cuda"
    rm -rf "$merged" && mkdir -p "$merged" && cp -rs "$root/." "$merged/"
    while read -r part; do
        [[ -d "$part/include" || -d "$part/lib" ]] && cp -rsn "$part/." "$merged/"
    done < <("$python" -c 'import nvidia, os; [print(os.path.join(p, d)) for p in nvidia.__path__ for d in sorted(os.listdir(p))]' 2>/dev/null || true)
    [[ -e "$merged/lib64" ]] || ln -s lib "$merged/lib64"
    for lib in "$merged"/lib/lib*.so.[0-9]*; do
        name="${lib##*/}"
        [[ -e "$merged/lib/${name%%.so.*}.so" ]] || ln -s "$name" "$merged/lib/${name%%.so.*}.so"
    done
    if ! compgen -G "$merged/lib*/stubs/libcuda.so" >/dev/null; then  # CUDA::cuda_driver: the driver's own library
        lib="$(install_fn driver_library)"
        [[ -z "$lib" ]] || { mkdir -p "$merged/lib/stubs" && ln -sf "$lib" "$merged/lib/stubs/libcuda.so"; }
    fi
    install_fn has_cublas "$merged" || { echo "no cuBLAS in $root nor in the Python's NVIDIA wheels" >&2; return 1; }
    echo "cuBLAS: from the Python's NVIDIA wheels, merged into $merged" >&2
    echo "$merged"
}

stage "2. llama.cpp, $backend"
cuda_args=(-DGGML_CUDA=OFF)
capability=""
if [[ "$backend" == cuda ]]; then
    capability="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')"
    cuda_args=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${capability}-real")
    command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"  # CMake finds the toolkit through nvcc
    toolkit="$(cuda_toolkit 2>"$logs/toolkit.txt")" || { cat "$logs/toolkit.txt"; exit 1; }
    cat "$logs/toolkit.txt"
    cuda_args+=(-DCUDAToolkit_ROOT="$toolkit")
    if [[ "$toolkit" == "$work/cuda" ]]; then  # CMake takes the toolkit from nvcc itself: point it at the merged cuBLAS
        cuda_args+=(-DCUDA_cublas_LIBRARY="$toolkit/lib/libcublas.so" -DCUDA_cublasLt_LIBRARY="$toolkit/lib/libcublasLt.so"
            -DCMAKE_CUDA_FLAGS="-I$toolkit/include" -DCMAKE_CXX_FLAGS="-I$toolkit/include")
    fi
    export LD_LIBRARY_PATH="$toolkit/lib64:$toolkit/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"  # cuBLAS, wherever it came from
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
fi

build_llama() {
    local generator=() start
    command -v ninja >/dev/null && generator=(-G Ninja)
    start=$(date +%s)
    cmake -S "$work/src/vendor/llama.cpp" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
        "${cuda_args[@]}" >"$logs/cmake-configure.log" 2>&1 || { tail -n 40 "$logs/cmake-configure.log"; return 1; }
    cmake --build "$work/build" -j"$(nproc)" --target llama llama-server llama-batched-bench >"$logs/cmake-build.log" 2>&1 \
        || { tail -n 40 "$logs/cmake-build.log"; return 1; }
    # The first call's build is the one to report: a later call (after BUILD_ONLY=1) finds it done.
    [[ -f "$work/build-seconds" ]] || echo "$(($(date +%s) - start)) s, here" >"$work/build-seconds"
    echo "llama.cpp built here: $(($(date +%s) - start)) s this call"
}

unpack_prebuilt() {  # bench/gpu/prebuild.sh's build, if it is for this GPU's architecture
    [[ "$backend" == cuda && -f .gpu/llama-cuda-bin.tar.xz && -f .gpu/llama-cuda-bin.txt ]] || return 1
    local arch
    arch="$(sed -n 's/^arch=//p' .gpu/llama-cuda-bin.txt)"
    [[ "$arch" == "$capability" ]] || { echo "the prebuilt llama.cpp is for sm_$arch, this GPU is sm_$capability: building here"; return 1; }
    rm -rf "$work/build/bin" && mkdir -p "$work/build/bin" && tar -C "$work/build/bin" -xJf .gpu/llama-cuda-bin.tar.xz
    echo "$(sed -n 's/^build_seconds=//p' .gpu/llama-cuda-bin.txt) s, prebuilt on the CPU machine" >"$work/build-seconds"
    echo "llama.cpp prebuilt on the CPU machine: $(tr '\n' ' ' <.gpu/llama-cuda-bin.txt)"
}

can_offload() {  # the bindings load the build's libraries; for CUDA they must offload
    rm -rf "$work/src/llama_cpp/lib" && mkdir -p "$work/src/llama_cpp/lib"
    find "$work/build/bin" -maxdepth 1 -name 'lib*.so*' -exec cp -P {} "$work/src/llama_cpp/lib/" \;
    "$python" -c '
import sys, llama_cpp
offload = llama_cpp.llama_supports_gpu_offload()
print("llama_cpp", llama_cpp.__version__, "GPU offload:", offload)
sys.exit("this build cannot offload to the GPU" if sys.argv[1] == "cuda" and not offload else 0)' "$backend"
}

# A prebuilt's RUNPATH names the CPU machine's folders: its libraries are found through this.
export LD_LIBRARY_PATH="$work/build/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [[ -x "$work/build/bin/llama-server" ]] && can_offload; then
    echo "llama.cpp: from an earlier call on this machine"
elif unpack_prebuilt && can_offload && "$work/build/bin/llama-server" --version; then
    echo "llama.cpp: the prebuilt one runs here"
else
    rm -rf "$work/build/bin"
    build_llama
    can_offload
fi
build_s="$(cat "$work/build-seconds")"
echo "llama.cpp build: $build_s"
mkdir -p "$work/bin"
printf '#!/bin/sh\nexec "%s" -m vramsupply "$@"\n' "$(command -v "$python")" >"$work/bin/vramsupply"
chmod +x "$work/bin/vramsupply"
[[ "${BUILD_ONLY:-0}" == 1 ]] && { stage "built; BUILD_ONLY=1 stops here"; exit 0; }

stage "3. the bench model"
if [[ "$backend" == cuda ]]; then shape=("${BENCH_DIM:-2048}" "${BENCH_LAYERS:-16}" "${BENCH_FFN:-5632}"); else shape=(256 2 512); fi
model="$work/bench-llama-${shape[0]}x${shape[1]}-q8_0.gguf"
[[ -f "$model" ]] || { "$python" .gpu/make_bench_model.py .gpu/ggml-vocab-llama-spm.gguf "$model.partial" "${shape[@]}" && mv "$model.partial" "$model"; }

stage "4. vramsupply against llama-server"
concurrency="${BENCH_CONCURRENCY:-1,4,16,64}"
defaults_concurrency="${BENCH_DEFAULTS_CONCURRENCY-1,4,16}"
[[ "$backend" == cuda ]] || { concurrency="${BENCH_CONCURRENCY:-1,4}"; defaults_concurrency="${BENCH_DEFAULTS_CONCURRENCY-1}"; }
PYTHONUNBUFFERED=1 "$python" bench/gpu/run.py --vramsupply "$work/bin/vramsupply" --llama-server "$work/build/bin/llama-server" \
    --model "$model" --concurrency "$concurrency" --defaults-concurrency "$defaults_concurrency" --rounds "${BENCH_ROUNDS:-1}" \
    --build "$build_s" --servers "${BENCH_SERVERS:-}" --out "$out/gpu-$date_tag.json"

quiet() { grep -v '^llama_\|^load\|^print_info\|^llm_\|^ggml_\|^  Device' || true; }
if [[ "${SPECULATIVE:-1}" == 1 ]]; then
    stage "5. prompt-lookup drafts with and without, in the engine (bench/speculative.py)"
    PYTHONUNBUFFERED=1 "$python" bench/speculative.py --models "vramsupply/assets/stories260K.gguf,$model" --rounds 3 \
        --out "$out/gpu-$date_tag-speculative.json" 2>&1 | quiet
fi
if [[ "${STEP_SECTIONS:-1}" == 1 ]]; then
    stage "6. the scheduler's Python between two decodes"
    PYTHONUNBUFFERED=1 "$python" bench/step_sections.py --model "$model" --rounds 2 --out "$out/gpu-$date_tag-step-sections.json" 2>&1 | quiet
fi

if [[ "${ENGINE_TESTS:-1}" == 1 ]]; then
    stage "7. the engine tests, on this build (the GPU: every test model's layers are offloaded)"
    xdist=()
    "$python" -c 'import xdist' 2>/dev/null && xdist=(-n 4)
    # (but the two that drive the HTTP server with the openai SDK, which that machine lacks)
    tests=()
    for test in tests/test_engine*.py; do [[ "$test" == */test_engine_launch.py || "$test" == */test_engine_recurrent.py ]] || tests+=("$test"); done
    timeout "${ENGINE_TESTS_TIMEOUT:-150}" "$python" -m pytest -q -p no:cacheprovider "${xdist[@]}" --timeout 60 "${tests[@]}" 2>&1 \
        | tail -n 40 || echo "engine tests: exit $?"
fi
stage "done: $out"
