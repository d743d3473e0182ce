#!/usr/bin/env bash
# Pack what the lent GPU machine (the `device` tool) needs for bench/gpu/device.sh into .gpu/
# (git-ignored through .git/info/exclude; name it in the run's `carry`).
#
# That machine reaches no network, so bench/gpu/run.sh (install.sh, pip, PyPI) cannot run there.
# It has Python 3.12 with nvcc, CMake, ninja, numpy, aiohttp, uvloop, typer, rich, psutil and
# matplotlib (the device tool's KINDS.md), and 64 MiB travel with a call. So this packs:
#   1. the llama.cpp source that our llama-cpp-python vendors (from its sdist, fetched by
#      bench/build_anchors.sh), without the backends, docs, tests and models it does not build,
#      plus the llama SPM vocabulary the bench model is written with, and llama-cpp-python's own
#      Python package (its ctypes bindings, which load the libraries device.sh builds);
#   2. wheels for Python 3.12 of the packages vramsupply and the bench need that the machine lacks
#      (or holds in another major version), at the versions this venv runs;
#      and pytest with the plugins the engine tests need, to run them there on the GPU;
#   3. the team's make_bench_model.py.
# Then bench/gpu/prebuild.sh may add llama.cpp built with CUDA for the lent GPU (kept by a repack).
# usage: bench/gpu/pack.sh   (env: PACK_PYTHON_VERSION, default 3.12; MAKE_BENCH_MODEL)
set -euo pipefail

repo_root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo_root"
python_version="${PACK_PYTHON_VERSION:-3.12}"
version="$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
src="bench/.cache/llama_cpp_python-$version"
make_bench_model="${MAKE_BENCH_MODEL:-$repo_root/../shared/tools/make_bench_model.py}"
[[ -d "$src/vendor/llama.cpp" ]] || { echo "no $src: run bench/build_anchors.sh first" >&2; exit 1; }
[[ -f "$make_bench_model" ]] || { echo "no $make_bench_model (set MAKE_BENCH_MODEL)" >&2; exit 1; }
for ignored in /.gpu/ /.gpu-work/; do  # the pack, and device.sh's build there
    grep -qx "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >>.git/info/exclude
done
# Everything but bench/gpu/prebuild.sh's llama-cuda-bin.*, which takes an hour to make again.
rm -rf .gpu/wheels .gpu/llama-src.tar.xz .gpu/ggml-vocab-llama-spm.gguf .gpu/make_bench_model.py && mkdir -p .gpu/wheels

echo "== llama.cpp $version source"
llama="$src/vendor/llama.cpp"
excluded_backends=()
for backend in "$llama"/ggml/src/ggml-*/; do
    name="$(basename "$backend")"
    [[ "$name" == ggml-cpu || "$name" == ggml-cuda ]] || excluded_backends+=(--exclude="vendor/llama.cpp/ggml/src/$name")
done
tar -C "$src" -cJf .gpu/llama-src.tar.xz \
    --exclude=vendor/llama.cpp/build --exclude=vendor/llama.cpp/docs --exclude=vendor/llama.cpp/tests \
    --exclude=vendor/llama.cpp/examples --exclude=vendor/llama.cpp/media --exclude=vendor/llama.cpp/benches \
    --exclude='vendor/llama.cpp/models/*' "${excluded_backends[@]}" \
    vendor/llama.cpp llama_cpp
cp "$llama/models/ggml-vocab-llama-spm.gguf" .gpu/
cp "$make_bench_model" .gpu/make_bench_model.py

echo "== wheels for Python $python_version"
# Pinned to what this venv runs; the machine's own aiohttp, numpy, uvloop, rich, jinja2, psutil,
# pyyaml, requests, tqdm, filelock, fsspec and packaging serve as they are.
pins=()
for name in pydantic pydantic-core pydantic-settings typing-inspection annotated-types typing-extensions \
    platformdirs tomlkit python-dotenv orjson gguf diskcache huggingface-hub hf-xet httpx2 httpcore2 \
    truststore idna anyio h11 click typer prometheus-client jsonschema jsonschema-specifications referencing rpds-py attrs \
    pytest pluggy iniconfig pytest-asyncio pytest-aiohttp pytest-timeout; do
    pins+=("$name==$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp "${platforms[@]}" -d .gpu/wheels "${pins[@]}"
du -sh .gpu
echo "packed .gpu/ (carry it: bench/gpu/device.sh reads it)"
