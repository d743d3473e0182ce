#!/usr/bin/env bash
# Build llama.cpp with CUDA for one GPU architecture HERE, on a machine with nvcc but no GPU, no
# cuBLAS and no driver, and pack its libraries and servers into .gpu/ for bench/gpu/device.sh.
#
# Why: the lent GPU machine gives a session 15 minutes, and the CUDA build of llama.cpp would take
# several of them there; on this machine it costs only time. It is the same source that
# bench/gpu/pack.sh packed (.gpu/llama-src.tar.xz) and device.sh would build, with the same CMake
# options, for the architecture named (default 90: the lent H100/H200).
#   - cuBLAS: NVIDIA's PyPI wheel (nvidia-cublas) for nvcc's major.minor, its headers to compile
#     against and its libraries to link; at run time the GPU machine's own cuBLAS is loaded.
#   - the driver library (libcuda.so.1, for ggml-cuda's virtual-memory pool): a stub made here
#     from the driver functions ggml-cuda calls, only to link; the GPU machine's driver is loaded.
# Built in one pass without the stub's symbols (a shared library may leave symbols undefined),
# then the stub is written from what libggml-cuda.so left undefined, and everything is linked again.
# Took about 27 minutes on the 2-core development machine (mostly the flash-attention and
# quantized-matmul template instances), sharing it with another build for part of the time.
# usage: bench/gpu/pack.sh && bench/gpu/prebuild.sh [ARCH]   (env: PREBUILD_WORK, PREBUILD_JOBS)
set -euo pipefail

repo_root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo_root"
arch="${1:-90}"
work="${PREBUILD_WORK:-$repo_root/bench/.cache/gpu-prebuild}"
jobs="${PREBUILD_JOBS:-$(nproc)}"
src="$work/src" build="$work/build" tk="$work/cuda"
[[ -f .gpu/llama-src.tar.xz ]] || { echo "no .gpu/: run bench/gpu/pack.sh first" >&2; exit 1; }
install_fn() { VRAMSUPPLY_INSTALL_FUNCTIONS_ONLY=1 sh -c '. "$1"; shift; "$@"' sh "$repo_root/install.sh" "$@"; }
root="$(install_fn system_cuda_root)"  # nvcc may be a wrapper script: install.sh asks nvcc itself
[[ -n "$root" ]] || { echo "no nvcc: nothing to build CUDA with" >&2; exit 1; }
cuda_version="$(install_fn nvcc_version "$root")"
mkdir -p "$work"

echo "== 1. the toolkit: $root (nvcc $cuda_version) with the cuBLAS wheel"
if [[ ! -d "$tk" ]]; then
    major="${cuda_version%%.*}" minor="${cuda_version#*.}"
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$work/wheels" "nvidia-cublas>=$major.$minor,<$major.$((minor + 1))"
    rm -rf "$work/cublas" && mkdir -p "$work/cublas" && unzip -q -o "$work"/wheels/nvidia_cublas-*.whl -d "$work/cublas"
    mkdir -p "$tk" && cp -rs "$root/." "$tk/"
    for part in "$work"/cublas/nvidia/*/; do cp -rsn "$part." "$tk/"; done
    rm -f "$tk/lib64" && ln -s lib "$tk/lib64"
    for lib in "$tk"/lib/libcublas*.so.[0-9]*; do ln -sf "${lib##*/}" "${lib%%.so.*}.so"; done
fi
mkdir -p "$tk/lib/stubs"
cublas_version="$(ls "$work"/wheels/nvidia_cublas-*.whl | sed -n 's/.*nvidia_cublas-\([^-]*\)-.*/\1/p' | head -n 1)"

stub() {  # a libcuda.so.1 that defines each named driver function as an empty one
    local c="$work/libcuda-stub.c"
    echo "/* link-time stand-in for the NVIDIA driver library; never loaded */" >"$c"
    for name in "$@"; do echo "void $name(void) {}" >>"$c"; done
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tk/lib/stubs/libcuda.so" "$c"
    ln -sf libcuda.so "$tk/lib/stubs/libcuda.so.1"  # what the linker looks for behind libggml-cuda.so's NEEDED
}
[[ -f "$tk/lib/stubs/libcuda.so" ]] || stub

echo "== 2. configure, sm_$arch"
if [[ ! -f "$build/CMakeCache.txt" ]]; then
    rm -rf "$src" && mkdir -p "$src" && tar -C "$src" -xJf .gpu/llama-src.tar.xz
    generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    PATH="$tk/bin:$PATH" cmake -S "$src/vendor/llama.cpp" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch-real" -DCUDAToolkit_ROOT="$tk" -DCMAKE_CUDA_COMPILER="$tk/bin/nvcc" \
        -DCUDA_cublas_LIBRARY="$tk/lib/libcublas.so" -DCUDA_cublasLt_LIBRARY="$tk/lib/libcublasLt.so" \
        -DCUDA_cuda_driver_LIBRARY="$tk/lib/stubs/libcuda.so" \
        -DCMAKE_CUDA_FLAGS="-I$tk/include" -DCMAKE_CXX_FLAGS="-I$tk/include" >"$work/configure.log"
fi

echo "== 3. build ($jobs jobs)"
start=$(date +%s)
cmake --build "$build" -j"$jobs" --target ggml-cuda >"$work/build.log"
mapfile -t driver_calls < <(nm -D --undefined-only "$build/bin/libggml-cuda.so" | awk '$2 ~ /^cu[A-Z]/ {print $2}' | sort -u)
echo "driver functions ggml-cuda calls: ${#driver_calls[@]}"
stub "${driver_calls[@]}"
rm -f "$build"/bin/libggml-cuda.so*  # linked again, now against the full stub
# The programs' links check libggml-cuda.so's symbols, and GNU ld finds its NEEDED libcuda.so.1 on
# LD_LIBRARY_PATH.
LD_LIBRARY_PATH="$tk/lib/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cmake --build "$build" -j"$jobs" --target llama llama-server llama-batched-bench >>"$work/build.log"
[[ -f "$work/build-seconds" ]] || echo "$(($(date +%s) - start))" >"$work/build-seconds"
readelf -d "$build/bin/libggml-cuda.so" | grep -q 'NEEDED.*libcuda\.so\.1' || { echo "libggml-cuda.so does not load the driver" >&2; exit 1; }

echo "== 4. pack"
staging="$work/pack" && rm -rf "$staging" && mkdir -p "$staging"
(cd "$build/bin" && cp -P lib*.so* llama-server llama-batched-bench "$staging/")
find "$staging" -type f -exec strip --strip-unneeded {} \;
tar -C "$staging" -cJf .gpu/llama-cuda-bin.tar.xz .
printf 'arch=%s\nbuild_seconds=%s\njobs=%s\nnvcc=%s\ncublas_wheel=%s\nbuilt=%s\n' "$arch" "$(cat "$work/build-seconds")" "$jobs" \
    "$cuda_version" "$cublas_version" "$(date -u +%FT%TZ)" >.gpu/llama-cuda-bin.txt
cat .gpu/llama-cuda-bin.txt
du -sh .gpu/llama-cuda-bin.tar.xz .gpu
