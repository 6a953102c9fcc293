#!/usr/bin/env python3
"""Registers and spills of every CUDA kernel, without a GPU: NVRTC compiles the sources (as
crates/indexcache-cuda/src/kernels.rs concatenates them) to an sm_90a cubin with ptxas's verbose
report. Usage: source scripts/ci/nvrtc_env.sh && python3 scripts/ci/kernel_regs.py [module ...]
(modules: indexer topk mla elementwise moe fp8 moe_decode gqa; default all)."""
import ctypes, glob, os, re, sys

K = os.path.join(os.path.dirname(__file__), "../../crates/indexcache-cuda/src/kernels")
MODULES = {  # kernels.rs: pdl.cuh first, then the shared headers, then the module
    "indexer": ["pdl.cuh", "indexer.cu"],
    "topk": ["pdl.cuh", "topk.cu"],
    "mla": ["pdl.cuh", "combine.cuh", "mla.cu"],
    "elementwise": ["pdl.cuh", "common.cuh", "norm.cuh", "elementwise.cu"],
    "moe": ["pdl.cuh", "common.cuh", "route.cuh", "moe.cu"],
    "fp8": ["pdl.cuh", "fp8.cu"],
    "moe_decode": ["pdl.cuh", "common.cuh", "norm.cuh", "route.cuh", "combine.cuh", "moe_decode.cu"],
    "gqa": ["pdl.cuh", "common.cuh", "gqa.cu"],
}


def nvrtc():
    for d in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        hits = sorted(glob.glob(os.path.join(d, "libnvrtc.so*")))
        if hits:
            return ctypes.CDLL(hits[0])
    sys.exit("libnvrtc not found: source scripts/ci/nvrtc_env.sh first")


def report(lib, name):
    code = "".join(open(os.path.join(K, f)).read() for f in MODULES[name]).encode()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), code, f"{name}.cu".encode(), 0, None, None):
        sys.exit(f"{name}: nvrtcCreateProgram failed")
    opts = [b"--gpu-architecture=sm_90a", b"--std=c++17", b"-default-device", b"--ptxas-options=-v"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    log = buf.value.decode()
    if rc:
        sys.exit(f"{name}: compilation failed\n{log}")
    entry, spills = None, 0
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            entry = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and (int(m.group(1)) or int(m.group(2))):
            spills += 1
            print(f"{name:12} {entry}: SPILLS {m.group(1)} B stores, {m.group(2)} B loads")
        m = re.search(r"Used (\d+) registers", line)
        if m:
            print(f"{name:12} {entry}: {m.group(1)} registers")
    return spills


if __name__ == "__main__":
    lib = nvrtc()
    names = sys.argv[1:] or list(MODULES)
    total = sum(report(lib, n) for n in names)
    print(f"{total} kernel(s) spill")
