"""The MMFS deformable-attention kernel (kernels/deform_attn.cu): build, load and autograd wrapper.

A module beside mmfs.py, not kernels/__init__.py: a package named `kernels` would shadow the PyPI `kernels` that
transformers imports, so kernels/ is a folder of CUDA sources only.

    cuda_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        CUDA tensors -> [B, Q, M*D], differentiable in value, locations and weights. The .cu is compiled on first use,
        through NVRTC (torch.cuda._compile_kernel, ~0.5 s, no toolkit needed) or else nvcc + ctypes; when neither
        works it raises KernelUnavailable with the reasons, and mmfs.deform_attn falls back to the torch reference.
        The first call per device and dtype also checks the kernel against the torch reference on a small case,
        forward and backward (checked); if they disagree it raises KernelUnavailable naming the max error, from then on.
    cpu_emulated_deform_attn(..., threads=64, blocks=None)
        The same .cu compiled by g++ (portable.cuh emulates CUDA threads on the CPU) and called through ctypes: how the
        tests check the kernel's arithmetic, indexing and atomics without a GPU. fp32 and fp64.

Layouts are Deformable DETR's (see deform_attn.cu). fp16/bf16 inputs are computed in fp32 and cast back.
"""

import contextlib
import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"  # the CUDA sources
SOURCE = KERNEL_DIR / "deform_attn.cu"
HEADER = KERNEL_DIR / "portable.cuh"
BUILD_DIR = KERNEL_DIR / "build"  # git-ignored cache of compiled libraries, one per source hash and flags

# g++ flags of the CPU emulation; MMI_KERNEL_SANITIZE=1 (kernels/sanitize.sh) adds ASan/UBSan.
CPU_FLAGS = ["-O2", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-x", "c++"]
NVCC_FLAGS = ["-O3", "-shared", "-Xcompiler", "-fPIC", "-x", "cu"]  # the nvcc + ctypes fallback route
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


class KernelUnavailable(RuntimeError):
    """The kernel cannot run here (no GPU, no compiler, build or load failure); the message says why."""


# ----------------------------------------------------------------------------------------------------------- building

def kernel_source():
    """The .cu text with portable.cuh pasted in, so NVRTC needs no include path."""
    return SOURCE.read_text().replace('#include "portable.cuh"', HEADER.read_text())


def _cached_build(tag, compiler_cmd):
    """Compile deform_attn.cu with compiler_cmd (its input and output are appended) into BUILD_DIR, keyed by a hash of
    the sources and the command; concurrent builders race harmlessly (build in a temporary name, then rename)."""
    key = hashlib.sha256((kernel_source() + "\0" + " ".join(compiler_cmd)).encode()).hexdigest()[:16]
    for folder in (BUILD_DIR, Path(tempfile.gettempdir()) / "mmi-kernels"):  # the repo may be read-only
        try:
            folder.mkdir(parents=True, exist_ok=True)
            break
        except OSError:
            continue
    lib = folder / f"{tag}-{key}.so"
    if lib.exists():
        return lib
    tmp = folder / f"{lib.name}.{os.getpid()}.tmp"
    # the real file, not a pasted copy, so compiler and sanitizer messages point at deform_attn.cu's own lines
    proc = subprocess.run(compiler_cmd + [str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise KernelUnavailable(f"{compiler_cmd[0]} failed to build {SOURCE}:\n{proc.stderr[-4000:]}")
    os.replace(tmp, lib)
    return lib


def _load_library(path):
    """ctypes handle with the signatures of the four *_launch entry points of deform_attn.cu."""
    lib = ctypes.CDLL(str(path))
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    for suffix in ("f32", "f64"):
        fwd, bwd = getattr(lib, f"deform_attn_forward_{suffix}_launch"), getattr(lib, f"deform_attn_backward_{suffix}_launch")
        fwd.argtypes = [ptr, i32, i32] + [ptr] * 6 + [i32] * 7  # stream, grid, block, 6 tensors, B S M D Q L P
        bwd.argtypes = [ptr, i32, i32] + [ptr] * 9 + [i32] * 7
        fwd.restype = bwd.restype = i32
    return lib


class _CtypesBackend:
    """Runs the *_launch entry points of a shared library (the g++ emulation, or an nvcc build on the GPU)."""

    def __init__(self, lib, stream_of=lambda device: None):
        self.lib, self.stream_of = lib, stream_of

    def __call__(self, kernel, grid, block, tensors, sizes):
        launch = getattr(self.lib, kernel + "_launch")
        err = launch(self.stream_of(tensors[0].device), grid, block, *[t.data_ptr() for t in tensors], *sizes)
        if err != 0:
            raise RuntimeError(f"{kernel} launch failed with cudaError {err}")


class _NvrtcBackend:
    """Kernels compiled at run time by NVRTC through torch (private API, hence the nvcc fallback)."""

    def __init__(self, device):
        major, minor = torch.cuda.get_device_capability(device)
        src = kernel_source()
        self.kernels = {name: torch.cuda._compile_kernel(src, name, compute_capability=f"{major}{minor}")
                        for name in _KERNEL_NAMES}

    def __call__(self, kernel, grid, block, tensors, sizes):
        stream = torch.cuda.current_stream(tensors[0].device)
        self.kernels[kernel](grid=(grid, 1, 1), block=(block, 1, 1), args=[*tensors, *sizes], stream=stream)


_KERNEL_NAMES = [f"deform_attn_{d}_{s}" for d in ("forward", "backward") for s in ("f32", "f64")]
_CPU = {}  # sanitize flag -> backend
_GPU = {}  # device index -> backend, or the KernelUnavailable it raised (so a failed build is not retried per call)


def cpu_library_path(sanitize=None):
    """Build (or find in the cache) the g++ emulation library and return its path."""
    if sanitize is None:
        sanitize = os.environ.get("MMI_KERNEL_SANITIZE") == "1"
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise KernelUnavailable(f"the CPU emulation of the kernel needs a C++20 compiler; {cxx!r} is not on the PATH")
    return _cached_build("cpu-asan" if sanitize else "cpu", [cxx] + CPU_FLAGS + (SANITIZE_FLAGS if sanitize else []))


def nvcc_library_path(arch):
    """Build (or find in the cache) the kernels and their *_launch host functions with nvcc, for one GPU arch."""
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc):
        raise KernelUnavailable("nvcc not found (PATH, CUDA_HOME)")
    return _cached_build(f"cuda-{arch}", [nvcc, f"-arch={arch}"] + NVCC_FLAGS)


def _cpu_backend():
    sanitize = os.environ.get("MMI_KERNEL_SANITIZE") == "1"
    if sanitize not in _CPU:
        _CPU[sanitize] = _CtypesBackend(_load_library(cpu_library_path(sanitize)))
    return _CPU[sanitize]


def _gpu_backend(device):
    """NVRTC first, then nvcc + ctypes; KernelUnavailable listing every route's failure."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _GPU:
        reasons = []
        try:
            with torch.cuda.device(index):
                _GPU[index] = _NvrtcBackend(index)
        except Exception as e:  # any failure of the private NVRTC API means: try the next route
            reasons.append(f"NVRTC: {type(e).__name__}: {e}")
        if index not in _GPU:
            try:
                major, minor = torch.cuda.get_device_capability(index)
                lib = _load_library(nvcc_library_path(f"sm_{major}{minor}"))
                _GPU[index] = _CtypesBackend(lib, lambda dev: ctypes.c_void_p(torch.cuda.current_stream(dev).cuda_stream))
            except Exception as e:
                reasons.append(f"nvcc: {type(e).__name__}: {e}")
                _GPU[index] = KernelUnavailable("could not build the CUDA kernel: " + "; ".join(reasons))
    if isinstance(_GPU[index], KernelUnavailable):
        raise _GPU[index]
    return _GPU[index]


# ------------------------------------------------------------------------------------------------------ the operator

class _DeformAttn(torch.autograd.Function):
    """Forward and backward through a backend: backend(kernel_name, grid, block, tensors, sizes)."""

    @staticmethod
    def forward(ctx, backend, config, value, shapes, starts, loc, attn):
        B, S, M, D = value.shape
        Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
        sizes = [B, S, M, D, Q, L, P]
        out = value.new_empty(B, Q, M * D)  # every element is written by the kernel
        n = B * Q * M * D
        if n > 0:
            grid, block = config(n)
            backend(f"deform_attn_forward_{_SUFFIX[value.dtype]}", grid, block,
                    [value, shapes, starts, loc, attn, out], sizes)
        ctx.save_for_backward(value, shapes, starts, loc, attn)
        ctx.backend, ctx.config, ctx.sizes = backend, config, sizes
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_value, grad_loc, grad_attn = torch.zeros_like(value), torch.zeros_like(loc), torch.zeros_like(attn)
        n = grad_out.numel()
        if n > 0:
            grid, block = ctx.config(n)
            with _device_guard(value):
                ctx.backend(f"deform_attn_backward_{_SUFFIX[value.dtype]}", grid, block,
                            [value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc, grad_attn], ctx.sizes)
        return None, None, grad_value, None, None, grad_loc, grad_attn


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _device_guard(t):
    # Kernels launch on the current device: without this guard, tensors on cuda:1 give wrong results.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Check shapes and level layout (a wrong S would make the kernel read out of bounds), cast to the compute dtype
    (fp64 stays fp64, everything else runs in fp32) and make everything contiguous on value's device."""
    if value.dim() != 4 or sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"expected value [B,S,M,D] and sampling_locations [B,Q,M,L,P,2], got "
                         f"{tuple(value.shape)} and {tuple(sampling_locations.shape)}")
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    if tuple(sampling_locations.shape[:3]) != (B, Q, M) or tuple(attention_weights.shape) != (B, Q, M, L, P):
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} / attention_weights "
                         f"{tuple(attention_weights.shape)} do not match value {tuple(value.shape)}")
    if tuple(spatial_shapes.shape) != (L, 2) or tuple(level_start_index.shape) != (L,):
        raise ValueError(f"spatial_shapes must be [{L}, 2] and level_start_index [{L}], got "
                         f"{tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}")
    if max(B, S, M, D, Q, L, P) >= 2**31:
        raise ValueError("each size must fit in 32 bits (products are 64-bit inside the kernel)")
    dev = value.device
    hw_starts = torch.cat([spatial_shapes.reshape(-1).to(dev), level_start_index.reshape(-1).to(dev)]).tolist()  # 1 sync
    hw, starts = hw_starts[: 2 * L], hw_starts[2 * L:]
    expect, total = [], 0
    for l in range(L):
        expect.append(total)
        total += hw[2 * l] * hw[2 * l + 1]
    if total != S or starts != expect or min(hw, default=1) < 1:
        raise ValueError(f"spatial_shapes {hw} / level_start_index {starts} do not describe value's S={S} rows")
    dtype = _compute_dtype(value.dtype)
    return (value.to(dtype).contiguous(), spatial_shapes.to(dev, torch.int64).contiguous(),
            level_start_index.to(dev, torch.int64).contiguous(), sampling_locations.to(dev, dtype).contiguous(),
            attention_weights.to(dev, dtype).contiguous())


def cuda_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, reference):
    """The CUDA kernel (see module docstring); raises KernelUnavailable when it cannot run here, or when it failed its
    first-call self-check against `reference` (mmfs.deform_attn_reference, passed in so that this package never
    imports mmfs back) on this device and dtype."""
    _require_cuda(value)
    checked(_cuda_kernel, reference, value.device, _compute_dtype(value.dtype))
    return _cuda_kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _require_cuda(value):
    if not value.is_cuda:
        raise KernelUnavailable(f"cuda_deform_attn needs CUDA tensors, got value on {value.device}")
    if not torch.cuda.is_available():
        raise KernelUnavailable("CUDA is not available")
    _gpu_backend(value.device)  # built once per device; a failure is remembered and raised again


def _cuda_kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The kernel on CUDA tensors, without the self-check."""
    backend = _gpu_backend(value.device)
    args = _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    def config(n, threads=256):
        return min(math.ceil(n / threads), 1 << 20), threads  # grid-stride loop covers any remainder

    with torch.cuda.device(value.device):
        out = _DeformAttn.apply(backend, config, *args)
    return out.to(value.dtype)


def cpu_emulated_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                             threads=64, blocks=None):
    """The same kernel source compiled with g++ and run on CPU tensors (fp32 or fp64); `threads` per block and
    `blocks` (default: enough for one element per thread) choose the emulated launch configuration."""
    if value.is_cuda:
        raise ValueError("cpu_emulated_deform_attn takes CPU tensors")
    backend = _cpu_backend()
    args = _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    def config(n):
        return (blocks or math.ceil(n / threads)), threads

    return _DeformAttn.apply(backend, config, *args).to(value.dtype)


# --------------------------------------------------------------------------------------------- first-call self-check
# The CPU tests run this source through g++, never through nvcc/NVRTC on a real GPU. So on the first call per device
# and compute dtype the kernel must agree with mmfs.deform_attn_reference on a small random case, forward and
# backward; if it does not, cuda_deform_attn raises KernelUnavailable (with the max error) for the rest of the process,
# and mmfs.deform_attn warns once and uses the reference.

SELF_CHECK_TOL = {torch.float32: 1e-3, torch.float64: 1e-9}  # max error / max(1, the reference's largest magnitude)
_CHECKED = {}  # (device, compute dtype) -> None if the kernel passed, else the KernelUnavailable it failed with


def self_check_error(kernel, reference, device, dtype):
    """(error, what): the kernel's largest error against the reference over the output and the gradients of value,
    locations and weights, each relative to the reference's largest magnitude (at least 1). NaN counts as inf."""
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([(5, 7), (3, 4), (1, 1)] * 2)  # two images of three levels, one level 1x1
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    B, Q, M, D, L, P = 2, 6, 2, 8, len(shapes), 3
    value = torch.randn(B, int(areas.sum()), M, D, generator=g, dtype=torch.float64)
    # points inside a cell, at a fraction in [0.1, 0.9] of it: the location gradient jumps on pixel-centre lines, where
    # the kernel and grid_sample may round to different sides. Cells from outside the map to one past its far edge.
    size = shapes.flip(1).to(torch.float64).view(1, 1, 1, L, 1, 2)  # (W, H) per level, matching (x, y)
    cell = torch.minimum(torch.randint(-2, 8, (B, Q, M, L, P, 2), generator=g).to(torch.float64), size)
    loc = (cell + 0.1 + 0.8 * torch.rand(cell.shape, generator=g, dtype=torch.float64) + 0.5) / size
    attn = torch.rand(B, Q, M, L, P, generator=g, dtype=torch.float64).softmax(-1)
    grad_out = torch.randn(B, Q, M * D, generator=g, dtype=torch.float64).to(device, dtype)
    shapes, starts = shapes.to(device), starts.to(device)
    results = []
    for fn in (kernel, reference):
        leaves = [t.to(device, dtype).requires_grad_() for t in (value, loc, attn)]
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
        results.append([out.detach(), *torch.autograd.grad(out, leaves, grad_out)])
    worst = (0.0, "output")
    for what, got, want in zip(["output", "value gradient", "location gradient", "weight gradient"], *results):
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1)).item()
        err = math.inf if math.isnan(err) else err
        if err > worst[0]:
            worst = (err, what)
    return worst


def checked(kernel, reference, device, dtype):
    """Self-check `kernel` once per (device, dtype); raise KernelUnavailable, now and on every later call, if it
    failed. Runs with autograd on and autocast off whatever the caller's mode (inference, no_grad, autocast)."""
    key = (str(device), dtype)
    if key not in _CHECKED:
        try:
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                err, what = self_check_error(kernel, reference, device, dtype)
            failure = None if err <= SELF_CHECK_TOL[dtype] else f"max error {err:.2e} in the {what}"
        except KernelUnavailable:
            raise
        except Exception as e:  # a launch or shape error is a failed check too
            failure = f"it raised {type(e).__name__}: {' '.join(str(e).split())[:500]}"  # one line for the warning
        _CHECKED[key] = failure and KernelUnavailable(
            f"self-check against mmfs.deform_attn_reference failed on {device}, {dtype}: {failure}")
    if _CHECKED[key] is not None:
        raise _CHECKED[key]
