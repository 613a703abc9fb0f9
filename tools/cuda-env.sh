#!/usr/bin/env bash
# Source this to build gcg with `--features cuda` on a machine without a system CUDA toolkit,
# using NVIDIA's PyPI wheels (nvcc, runtime, cuBLAS, cuRAND, NVRTC) in a virtual environment:
#
#   python3 -m venv /work/cuda-venv && /work/cuda-venv/bin/pip install nvidia-cuda-nvcc==13.0.88 \
#     nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
#     nvidia-cuda-cccl==13.0.85 "nvidia-cublas<13.1" nvidia-curand nvidia-cuda-nvrtc==13.0.88
#   CUDA_VENV=/work/cuda-venv source tools/cuda-env.sh
#   cargo build --release -p gcg-cli --features cuda
#
# The link directory gets unversioned names for the CUDA libraries and a stub libcuda.so (the
# driver library exists only on GPU machines; the binary loads the real one at run time).
# On the GPU machine run with LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64.
set -e
venv=${CUDA_VENV:-/work/cuda-venv}
cu=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$cu/bin/nvcc" ] || { echo "no nvcc under $cu/bin (install the wheels listed above)" >&2; return 1 2>/dev/null || exit 1; }
links=${CUDA_LINK_DIR:-$venv/cuda-links}
mkdir -p "$links"
for lib in cublas cublasLt cudart nvrtc curand; do
  f=$(ls "$cu"/lib/lib$lib.so.* 2>/dev/null | sort | head -n1)
  [ -n "$f" ] && ln -sf "$f" "$links/lib$lib.so"
done
# Stub driver library: every cu* symbol the CUDA crates link against, as an empty function. The
# list below is what candle 0.11 / cudarc needed so far; `$links/extra-symbols` adds more (one per
# line; tools/gpu-check.sh appends the ones a link reports undefined), and the stub is rebuilt
# whenever the set changes.
syms="cuInit cuDeviceGet cuDeviceGetCount cuDeviceGetAttribute cuDeviceGetName cuDevicePrimaryCtxRetain cuDevicePrimaryCtxRelease cuDevicePrimaryCtxRelease_v2 cuCtxSetCurrent cuCtxGetCurrent cuCtxSynchronize cuCtxDestroy_v2 cuCtxGetDevice cuModuleLoad cuModuleLoadData cuModuleGetFunction cuModuleUnload cuLaunchKernel cuMemAlloc_v2 cuMemFree_v2 cuMemAllocAsync cuMemFreeAsync cuMemcpyHtoD_v2 cuMemcpyDtoH_v2 cuMemcpyDtoD_v2 cuMemcpyHtoDAsync_v2 cuMemcpyDtoHAsync_v2 cuMemcpyDtoDAsync_v2 cuMemcpyPeerAsync cuMemsetD8_v2 cuMemsetD8Async cuStreamCreate cuStreamDestroy_v2 cuStreamSynchronize cuStreamWaitEvent cuStreamIsCapturing cuEventCreate cuEventDestroy_v2 cuEventRecord cuEventSynchronize cuGetErrorString cuGetErrorName cuDriverGetVersion cuMemGetInfo_v2 cuPointerGetAttribute cuFuncGetAttribute cuFuncSetAttribute cuOccupancyMaxPotentialBlockSize"
[ -f "$links/extra-symbols" ] && syms="$syms $(tr '\n' ' ' <"$links/extra-symbols")"
syms=$(printf '%s\n' $syms | sort -u | tr '\n' ' ')
if [ ! -f "$links/libcuda.so" ] || [ "$(cat "$links/libcuda.symbols" 2>/dev/null)" != "$syms" ]; then
  src=$(mktemp --suffix .c)
  for s in $syms; do echo "int $s(void){return 0;}" >> "$src"; done
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$links/libcuda.so" "$src"
  rm -f "$src"
  printf '%s' "$syms" >"$links/libcuda.symbols"
fi
# Sourcing twice changes nothing (a changed RUSTFLAGS would make cargo rebuild everything).
case ":$PATH:" in *":$cu/bin:"*) ;; *) export PATH="$cu/bin:$PATH" ;; esac
export CUDA_ROOT="$cu" CUDA_PATH="$cu" CUDA_TOOLKIT_ROOT_DIR="$cu"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
case " ${RUSTFLAGS:-} " in *" -L $links "*) ;; *) export RUSTFLAGS="-L $links${RUSTFLAGS:+ $RUSTFLAGS}" ;; esac
case ":${LIBRARY_PATH:-}:" in *":$links:$cu/lib:"*) ;; *) export LIBRARY_PATH="$links:$cu/lib${LIBRARY_PATH:+:$LIBRARY_PATH}" ;; esac
