# Source me: installs NVRTC 13.0 from PyPI into .venv-nvrtc (once) and points LD_LIBRARY_PATH at
# it, so the CUDA kernels compile to PTX for compute_90a on a machine without CUDA or a GPU.
# Safe to source on the GPU machine too (it only adds a directory to the library path).
_nv_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
_nv_venv="${INDEXCACHE_NVRTC_VENV:-$_nv_root/.venv-nvrtc}"
if [ ! -e "$_nv_venv/.ok" ]; then
    python3 -m venv "$_nv_venv"
    "$_nv_venv/bin/pip" install -q "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*"
    touch "$_nv_venv/.ok"
fi
_nv_lib="$(ls -d "$_nv_venv"/lib/python3*/site-packages/nvidia/cu13/lib | head -n1)"
export LD_LIBRARY_PATH="$_nv_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _nv_root _nv_venv _nv_lib
