#!/usr/bin/env bash
# Build the benchmark anchors into bench/.cache (git-ignored); every step is skipped when already done.
#   1. llama.cpp's llama-server and llama-batched-bench from the SAME llama.cpp commit that the
#      installed llama-cpp-python vendors (taken from that version's sdist), so the comparison
#      measures our engine and HTTP layer, not a different llama.cpp.
#   2. A separate venv with llama-cpp-python[server] (same version) for `python -m llama_cpp.server`,
#      so the server extra never leaks into the project venv. It also gets the bench tools
#      (bench/requirements.txt), and runs bench/run.py.
#   3. The bench model: a random-weight 768x12 llama with the real llama SPM tokenizer.
# usage: bench/build_anchors.sh [PYTHON]   (PYTHON: the project's interpreter, default .venv/bin/python)
# MAKE_BENCH_MODEL points at the team's make_bench_model.py (default ../shared/tools/ beside the repo).
set -euo pipefail

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
project_python="${1:-$repo_root/.venv/bin/python}"
cache="$repo_root/bench/.cache"
jobs="${BENCH_BUILD_JOBS:-2}"
mkdir -p "$cache"

version="$("$project_python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
src="$cache/llama_cpp_python-$version"
llama_dir="$src/vendor/llama.cpp"
bin_dir="$llama_dir/build/bin"
venv="$cache/venv-llamacpp-server"
bench_model="$cache/bench-llama-768x12-q8_0.gguf"
make_bench_model="${MAKE_BENCH_MODEL:-$repo_root/../shared/tools/make_bench_model.py}"
echo "llama-cpp-python $version"

# The CPU flags install.sh builds llama.cpp with on this machine (AMX left out where the compiler
# miscompiles it, see install.sh): every anchor and the project's own llama-cpp-python get the
# same ones, so the servers compared run the same kernels, and none crashes on the Q8_0 model.
cpu_flags="$(VRAMSUPPLY_INSTALL_FUNCTIONS_ONLY=1 sh -c '. "$1"; plan_cpu_flags; echo "$cpu_flags"' sh "$repo_root/install.sh")"
echo "CPU flags: ${cpu_flags:-none}"

if [[ ! -d "$llama_dir" ]]; then
    echo "fetching the llama-cpp-python $version sdist"
    "$project_python" -m pip download --quiet --no-binary :all: --no-deps \
        "llama-cpp-python==$version" -d "$cache/sdist"
    tar -xzf "$cache/sdist/llama_cpp_python-$version.tar.gz" -C "$cache"
fi

flags_stamp="$llama_dir/build/vramsupply-cpu-flags"
if [[ -d "$llama_dir/build" && "$(cat "$flags_stamp" 2>/dev/null)" != "$cpu_flags" ]]; then
    rm -rf "$llama_dir/build"  # CMake reads CFLAGS only when it first configures a build directory
fi
if [[ ! -x "$bin_dir/llama-server" || ! -x "$bin_dir/llama-batched-bench" ]]; then
    echo "building llama-server and llama-batched-bench (-j$jobs; takes minutes)"
    (
        cd "$llama_dir"
        CFLAGS="$cpu_flags" CXXFLAGS="$cpu_flags" nice cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >/dev/null
        nice cmake --build build -j"$jobs" --target llama-server llama-batched-bench
    )
    echo "$cpu_flags" >"$flags_stamp"
fi

# With CPU flags, llama-cpp-python is built once with them, and that wheel goes into both venvs.
wheel_dir="$cache/llama-wheel"
install_flagged_wheel() { # VENV_PYTHON: install the flagged wheel unless that venv has it already
    local stamp
    stamp="$(dirname "$1")/../vramsupply-llama-cpu-flags"
    [[ "$(cat "$stamp" 2>/dev/null)" == "$version $cpu_flags" ]] && return 0
    if [[ "$(cat "$wheel_dir/stamp" 2>/dev/null)" != "$version $cpu_flags" ]]; then
        echo "building llama-cpp-python $version with $cpu_flags (takes minutes)"
        rm -rf "$wheel_dir" && mkdir -p "$wheel_dir"
        CFLAGS="$cpu_flags" CXXFLAGS="$cpu_flags" nice "$project_python" -m pip wheel --quiet --no-deps --no-cache-dir \
            --no-binary llama-cpp-python "llama-cpp-python==$version" -w "$wheel_dir"
        echo "$version $cpu_flags" >"$wheel_dir/stamp"
    fi
    "$1" -m pip install --quiet --force-reinstall --no-deps "$wheel_dir"/llama_cpp_python-*.whl
    echo "$version $cpu_flags" >"$stamp"
}
if [[ -n "$cpu_flags" ]]; then install_flagged_wheel "$project_python"; fi

venv_version() {
    "$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || true
}
if [[ ! -x "$venv/bin/python" || "$(venv_version)" != "$version" ]]; then
    echo "creating $venv"
    "$project_python" -m venv --clear "$venv"
    "$venv/bin/pip" install --quiet "llama-cpp-python[server]==$version" -r "$repo_root/bench/requirements.txt"
fi
if [[ -n "$cpu_flags" ]]; then install_flagged_wheel "$venv/bin/python"; fi

if [[ ! -f "$bench_model" ]]; then
    echo "writing the bench model"
    "$venv/bin/python" "$make_bench_model" \
        "$llama_dir/models/ggml-vocab-llama-spm.gguf" "$bench_model.partial"
    mv "$bench_model.partial" "$bench_model"
fi

echo "anchors ready:"
echo "  $bin_dir/llama-server"
echo "  $bin_dir/llama-batched-bench"
echo "  $venv/bin/python -m llama_cpp.server"
echo "  $bench_model"
