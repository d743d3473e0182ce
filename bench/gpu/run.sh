#!/usr/bin/env bash
# The GPU benchmark, for a machine with an NVIDIA GPU (driver; a CUDA toolkit is optional):
#   1. install vramsupply with install.sh --backend cuda --strict into bench/.cache/gpu: the CUDA
#      llama-cpp-python wheel for this GPU's architecture only (the path a GPU owner takes),
#      timed; the toolkit is the system's if complete, else NVIDIA's PyPI wheels;
#   2. llama-server from the same llama.cpp commit (the llama-cpp-python sdist), same toolkit,
#      same architecture;
#   3. a 1.1B random-weight llama (2048 x 16 layers, ffn 5632, Q8_0) with the llama SPM
#      tokenizer, written by the team's make_bench_model.py;
#   4. bench/gpu/run.py: vramsupply vs llama-server at c = 1, 4, 16, 64 (64 slots x 2048 tokens),
#      results in bench/results/gpu-<date>.json and .md;
#   5. bench/step_sections.py on the GPU: the scheduler's Python between two decodes, which weighs
#      more beside a GPU's short decode steps (bench/results/gpu-<date>-step-sections.json).
# usage: bench/gpu/run.sh   (env: MAKE_BENCH_MODEL, BENCH_JOBS, BENCH_DIM/LAYERS/FFN, BENCH_ROUNDS)
set -euo pipefail

repo_root="$(cd "$(dirname "$0")/../.." && pwd)"
cache="$repo_root/bench/.cache/gpu"
data_dir="$cache/agent"
jobs="${BENCH_JOBS:-$(nproc)}"
make_bench_model="${MAKE_BENCH_MODEL:-$repo_root/../shared/tools/make_bench_model.py}"
dim="${BENCH_DIM:-2048}" layers="${BENCH_LAYERS:-16}" ffn="${BENCH_FFN:-5632}"
mkdir -p "$cache"
nvidia-smi -L | grep -q '^GPU ' || { echo "no NVIDIA GPU listed by nvidia-smi -L: nothing to benchmark" >&2; exit 1; }

echo "== 1. vramsupply with the CUDA build (install.sh)"
sh "$repo_root/install.sh" --dry-run --backend cuda | tee "$cache/plan.txt"
start=$(date +%s)
CMAKE_BUILD_PARALLEL_LEVEL="$jobs" VRAMSUPPLY_DATA_DIR="$data_dir" VRAMSUPPLY_BIN_DIR="$cache/bin" \
    sh "$repo_root/install.sh" --backend cuda --strict --from "$repo_root"
build_s=$(($(date +%s) - start))
echo "CUDA build and install: ${build_s} s" | tee "$cache/build-time.txt"
python="$data_dir/venv/bin/python"
"$python" -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else "the installed build has no GPU offload")'

echo "== 2. llama-server from the same llama.cpp commit"
version="$("$python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
src="$cache/llama_cpp_python-$version"
if [[ ! -d "$src" ]]; then
    "$python" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$cache/sdist"
    tar -xzf "$cache/sdist/llama_cpp_python-$version.tar.gz" -C "$cache"
fi
# The toolkit and architectures install.sh chose, read back from its plan.
toolkit="$(ls -d "$data_dir"/cuda-* 2>/dev/null | head -n 1 || true)"
[[ -n "$toolkit" ]] || toolkit="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
archs="$(sed -n 's/.*architectures \([^ ;][^ ;]*\(;[^ ;][^ ;]*\)*\).*/\1/p' "$cache/plan.txt" | head -n 1)"
llama_dir="$src/vendor/llama.cpp"
if [[ ! -x "$llama_dir/build-cuda/bin/llama-server" ]]; then
    (
        cd "$llama_dir"
        PATH="$toolkit/bin:$PATH" cmake -B build-cuda -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
            -DCMAKE_CUDA_ARCHITECTURES="$archs" -DCMAKE_CUDA_COMPILER="$toolkit/bin/nvcc" -DCUDAToolkit_ROOT="$toolkit" \
            -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >/dev/null
        cmake --build build-cuda -j"$jobs" --target llama-server
    )
fi

echo "== 3. the bench model (${dim}x${layers}, ffn ${ffn}, Q8_0)"
"$python" -m pip install --quiet -r "$repo_root/bench/requirements.txt"
model="$cache/bench-llama-${dim}x${layers}-q8_0.gguf"
if [[ ! -f "$model" ]]; then
    "$python" "$make_bench_model" "$llama_dir/models/ggml-vocab-llama-spm.gguf" "$model.partial" "$dim" "$layers" "$ffn"
    mv "$model.partial" "$model"
fi

echo "== 4. vramsupply vs llama-server"
out="$repo_root/bench/results/gpu-$(date -u +%Y-%m-%d).json"
"$python" "$repo_root/bench/gpu/run.py" --vramsupply "$cache/bin/vramsupply" --llama-server "$llama_dir/build-cuda/bin/llama-server" \
    --model "$model" --rounds "${BENCH_ROUNDS:-2}" --build "$build_s s, with install.sh" --out "$out"
echo "results: $out"

echo "== 5. the scheduler's Python between two decodes, on the GPU"
"$python" "$repo_root/bench/step_sections.py" --model "$model" --rounds 2 \
    --out "$repo_root/bench/results/gpu-$(date -u +%Y-%m-%d)-step-sections.json"
