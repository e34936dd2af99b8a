"""The CUDA kernel of kernels/, checked on the CPU: the same deform_attn.cu compiled by g++ (kernels/portable.cuh
emulates CUDA threads) against an explicit loop of the formula and the grid_sample reference; plus an nvcc compile
check (registers, no spills) and the KernelUnavailable contract on machines without a GPU."""

import contextlib
import ctypes
import glob
import importlib.util
import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

import mmfs_kernel

if shutil.which("g++") is None:
    pytest.skip("g++ is not installed: the CPU emulation of the kernel cannot be built", allow_module_level=True)

from mmfs import deform_attn_reference


# ------------------------------------------------------------------------------------------- references and cases

def loop_reference(value, shapes, starts, loc, attn):
    """docs/kernel.md's formula, one scalar at a time (tiny sizes only)."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    out = torch.zeros(B, Q, M, D, dtype=value.dtype)
    for b in range(B):
        for q in range(Q):
            for m in range(M):
                for l in range(L):
                    H, W = shapes[l].tolist()
                    for p in range(P):
                        x, y = loc[b, q, m, l, p].tolist()
                        h, w = y * H - 0.5, x * W - 0.5
                        h0, w0 = int(torch.tensor(h).floor()), int(torch.tensor(w).floor())
                        lh, lw = h - h0, w - w0
                        for dy, dx, wt in [(0, 0, (1 - lh) * (1 - lw)), (0, 1, (1 - lh) * lw),
                                           (1, 0, lh * (1 - lw)), (1, 1, lh * lw)]:
                            yy, xx = h0 + dy, w0 + dx
                            if 0 <= yy < H and 0 <= xx < W:
                                out[b, q, m] += attn[b, q, m, l, p] * wt * value[b, starts[l] + yy * W + xx, m]
    return out.reshape(B, Q, M * D)


def grid_sample_reference(value, shapes, starts, loc, attn):
    """One grid_sample per level: a second, independent reference (checked against mmfs's below)."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    out = 0
    for l, (H, W) in enumerate(shapes.tolist()):
        v = value[:, starts[l]:starts[l] + H * W].permute(0, 2, 3, 1).reshape(B * M, D, H, W)
        g = (2 * loc[:, :, :, l] - 1).permute(0, 2, 1, 3, 4).reshape(B * M, Q, P, 2)
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*M, D, Q, P)
        a = attn[:, :, :, l].permute(0, 2, 1, 3).reshape(B * M, 1, Q, P)
        out = out + (s * a).sum(-1)
    return out.view(B, M, D, Q).permute(0, 3, 1, 2).reshape(B, Q, M * D)


reference = deform_attn_reference


def make_case(level_shapes, B=2, M=3, D=5, Q=7, P=3, dtype=torch.float64, lo=-0.15, hi=1.15, seed=0):
    """Random op inputs; locations in [lo, hi] so some points fall outside or straddle the border."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(level_shapes, dtype=torch.int64)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    L, S = len(level_shapes), int(areas.sum())
    value = torch.randn(B, S, M, D, generator=g, dtype=dtype)
    loc = lo + (hi - lo) * torch.rand(B, Q, M, L, P, 2, generator=g, dtype=dtype)
    attn = torch.rand(B, Q, M, L, P, generator=g, dtype=dtype).softmax(-1)
    return value, shapes, starts, loc, attn


# 2 images x 3 non-square levels, folded into 6 levels as MMFS does; a 1x1 level; a single level.
CASES = {
    "two_images_three_levels": [(6, 4), (3, 2), (2, 1)] * 2,
    "tiny_levels": [(1, 1), (1, 3), (4, 1)],
    "one_level": [(5, 7)],
}


def run_both(fn, args, grad_out):
    """Output and the gradients (value, locations, weights) of fn for a given output gradient."""
    leaves = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [leaves[0], leaves[3], leaves[4]], grad_out)
    return out.detach(), grads


# ------------------------------------------------------------------------------------------------------------ tests

def test_forward_matches_explicit_loop():
    args = make_case([(3, 4), (2, 3)], B=2, M=2, D=3, Q=2, P=2)
    torch.testing.assert_close(mmfs_kernel.cpu_emulated_deform_attn(*args), loop_reference(*args), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_fp64(case):
    args = make_case(CASES[case])
    grad_out = torch.randn(args[0].shape[0], args[3].shape[1], args[0].shape[2] * args[0].shape[3],
                           dtype=torch.float64)
    out, grads = run_both(mmfs_kernel.cpu_emulated_deform_attn, args, grad_out)
    ref_out, ref_grads = run_both(reference, args, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for name, got, want in zip(["value", "locations", "weights"], grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=lambda m: f"grad {name}: {m}")


def test_forward_backward_fp32():
    args = make_case(CASES["two_images_three_levels"], dtype=torch.float32, seed=1)
    grad_out = torch.randn(2, 7, 15)
    out, grads = run_both(mmfs_kernel.cpu_emulated_deform_attn, args, grad_out)
    ref_out, ref_grads = run_both(reference, args, grad_out)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_local_grid_sample_reference_agrees_with_mmfs():
    args = make_case(CASES["two_images_three_levels"])
    torch.testing.assert_close(grid_sample_reference(*args), deform_attn_reference(*args), rtol=0, atol=1e-12)


def test_gradcheck():
    # The gradient jumps where h or w crosses a pixel centre line, so draw every point inside a cell at a fraction
    # in [0.1, 0.9] of it: cells from fully outside (-3) through the borders (-1, H-1) to fully outside (H+1).
    value, shapes, starts, _, attn = make_case([(3, 4), (2, 2)], B=1, M=2, D=2, Q=3, P=2)
    g = torch.Generator().manual_seed(3)
    size = shapes.flip(1).to(torch.float64).view(1, 1, 1, 2, 1, 2)  # (W, H) per level, matching (x, y)
    cell = torch.randint(-3, 4, (1, 3, 2, 2, 2, 2), generator=g).to(torch.float64)
    cell = torch.minimum(cell, size)  # up to one past the last cell on the far side
    frac = 0.1 + 0.8 * torch.rand(cell.shape, generator=g, dtype=torch.float64)
    loc = (cell + frac + 0.5) / size
    inputs = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), attn.requires_grad_())
    # float atomics from several OpenMP workers may add in any order: allow last-bit differences between runs
    assert torch.autograd.gradcheck(mmfs_kernel.cpu_emulated_deform_attn, inputs, nondet_tol=1e-12)


def test_points_on_borders_and_outside():
    # Exact pixel centres, map edges, the half-pixel band outside (h or w in [-1, 0) and [H-1, H)), exactly on
    # h = -1 and h = H (no corner inside: value 0), far away, both axes at once.
    H, W = 3, 4
    xs = [0.0, 1.0, 0.5 / W, 1 - 0.5 / W, -0.5 / W, 1 + 0.5 / W, -0.2 / W, 1 + 0.2 / W, -5.0, 7.0, 0.37]
    ys = [0.0, 1.0, 0.5 / H, 1 - 0.5 / H, -0.5 / H, 1 + 0.5 / H, -0.2 / H, 1 + 0.2 / H, 9.0, -3.0, 0.61]
    pts = torch.tensor([(x, y) for x in xs for y in ys], dtype=torch.float64)  # every combination
    Q = len(pts)
    value, shapes, starts, _, _ = make_case([(H, W)], B=1, M=1, D=2, Q=Q, P=1)
    loc = pts.view(1, Q, 1, 1, 1, 2)
    attn = torch.ones(1, Q, 1, 1, 1, dtype=torch.float64)
    args = (value, shapes, starts, loc, attn)
    out = mmfs_kernel.cpu_emulated_deform_attn(*args)
    torch.testing.assert_close(out, loop_reference(*args), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, reference(*args), rtol=0, atol=1e-12)
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    (_, grads), (_, ref_grads) = run_both(mmfs_kernel.cpu_emulated_deform_attn, args, grad_out), run_both(reference, args, grad_out)
    # value and weight gradients are continuous in the location; the location gradient jumps on pixel-centre lines,
    # where the side taken depends on rounding (y*H - 0.5 here, ((2y-1+1)*H-1)/2 in grid_sample): compare it off them
    for got, want in zip(grads[::2], ref_grads[::2]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    pix = pts * torch.tensor([W, H], dtype=torch.float64) - 0.5
    off_lines = ((pix - pix.round()).abs() > 1e-9).all(1).view(1, Q, 1, 1, 1, 1)
    assert off_lines.sum() >= 20
    torch.testing.assert_close(grads[1] * off_lines, ref_grads[1] * off_lines, rtol=0, atol=1e-12)
    assert out[0, xs.index(-5.0) * len(ys)].abs().max() == 0  # far outside: exactly zero


def test_non_finite_locations_poison_like_the_reference():
    # NaN / inf locations give NaN outputs and NaN location/weight gradients (never a silent "outside the map" zero);
    # a huge finite location is simply outside. Value gradients stay zero there in both.
    value, shapes, starts, loc, attn = make_case([(3, 4)], B=1, M=1, D=2, Q=5, P=1)
    inf = float("inf")
    loc[0, 0, 0, 0, 0, 0], loc[0, 1, 0, 0, 0, 1], loc[0, 2, 0, 0, 0, 0] = float("nan"), inf, -inf
    loc[0, 3, 0, 0, 0] = 1e30
    args = (value, shapes, starts, loc, attn)
    grad_out = torch.randn(1, 5, 2, dtype=torch.float64)
    (out, grads), (ref_out, ref_grads) = run_both(mmfs_kernel.cpu_emulated_deform_attn, args, grad_out), run_both(reference, args, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12, equal_nan=True)
    assert out[0, :3].isnan().all() and (out[0, 3] == 0).all() and not out[0, 4].isnan().any()
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=0, atol=1e-12)
    assert grads[1][0, :3].isnan().all() and grads[2][0, :3].isnan().all()
    assert not grads[1][0, 3:].isnan().any() and not grads[2][0, 3:].isnan().any()


@pytest.mark.parametrize("threads,blocks", [(1, 1), (1, 13), (32, 1), (64, None), (7, 3), (256, 2)])
def test_launch_configurations_agree(threads, blocks):
    # Small grids make each thread loop (grid stride); odd block sizes split (b,q,m) rows across blocks.
    args = make_case(CASES["two_images_three_levels"], seed=5)
    grad_out = torch.randn(2, 7, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    base_out, base_grads = run_both(mmfs_kernel.cpu_emulated_deform_attn, args, grad_out)
    out, grads = run_both(lambda *a: mmfs_kernel.cpu_emulated_deform_attn(*a, threads=threads, blocks=blocks), args, grad_out)
    assert torch.equal(out, base_out)  # no atomics in the forward: bit-identical
    for got, want in zip(grads, base_grads):  # atomics add in launch-dependent order: equal up to rounding
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_concurrent_atomics_fp32_and_fp64():
    # Big enough (>= 1024 emulated threads) for the launch to be spread over OpenMP workers, so the gradient atomics
    # really race; several queries sample the same few pixels of a tiny level to make the value-gradient adds collide.
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-4)]:
        args = make_case([(2, 3), (8, 6)], B=2, M=2, D=8, Q=64, P=2, dtype=dtype, seed=7)
        grad_out = torch.randn(2, 64, 16, dtype=dtype, generator=torch.Generator().manual_seed(8))
        out, grads = run_both(lambda *a: mmfs_kernel.cpu_emulated_deform_attn(*a, threads=16), args, grad_out)
        ref_out, ref_grads = run_both(reference, args, grad_out)
        torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_half_precision_runs_in_fp32():
    value, shapes, starts, loc, attn = make_case(CASES["tiny_levels"], dtype=torch.float32)
    out = mmfs_kernel.cpu_emulated_deform_attn(value.bfloat16(), shapes, starts, loc.bfloat16(), attn.bfloat16())
    assert out.dtype == torch.bfloat16
    want = reference(value.bfloat16().float(), shapes, starts, loc.bfloat16().float(), attn.bfloat16().float())
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)


def test_non_contiguous_inputs_and_empty_queries():
    value, shapes, starts, loc, attn = make_case(CASES["one_level"])
    want = mmfs_kernel.cpu_emulated_deform_attn(value, shapes, starts, loc, attn)
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    torch.testing.assert_close(mmfs_kernel.cpu_emulated_deform_attn(value_t, shapes, starts, loc, attn), want)
    empty = mmfs_kernel.cpu_emulated_deform_attn(value, shapes, starts, loc[:, :0], attn[:, :0])
    assert empty.shape == (2, 0, 15)


def test_rejects_inconsistent_level_layout():
    value, shapes, starts, loc, attn = make_case(CASES["tiny_levels"])
    with pytest.raises(ValueError, match="do not describe"):
        mmfs_kernel.cpu_emulated_deform_attn(value[:, :-1], shapes, starts, loc, attn)  # S one short: would read past
    with pytest.raises(ValueError, match="do not describe"):
        mmfs_kernel.cpu_emulated_deform_attn(value, shapes, starts + 1, loc, attn)


def test_cuda_kernel_unavailable_is_reported_as_such():
    args = make_case(CASES["one_level"])
    with pytest.raises(mmfs_kernel.KernelUnavailable):
        mmfs_kernel.cuda_deform_attn(*args, reference=deform_attn_reference)  # CPU tensors (and, on this machine, no CUDA at all)
    assert issubclass(mmfs_kernel.KernelUnavailable, RuntimeError)


# ------------------------------------------------------------------------------------------- nvcc compile check

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch,route", [("sm_80", "nvcc"), ("sm_90", "nvrtc")])
def test_nvcc_compiles_without_register_spills(arch, route, tmp_path):
    # sm_80: the nvcc fallback's shared library, which must also load and export the four launchers by C name.
    # sm_90: device code only, from the text NVRTC compiles at run time (header pasted in). ptxas reports per kernel.
    if route == "nvcc":
        out = tmp_path / "k.so"
        cmd = ["nvcc", f"-arch={arch}", *mmfs_kernel.NVCC_FLAGS, "-Xptxas", "-v", str(mmfs_kernel.SOURCE), "-o", str(out)]
    else:
        src = tmp_path / "deform_attn.cu"
        src.write_text(mmfs_kernel.kernel_source())
        cmd = ["nvcc", "-cubin", "-O3", f"-arch={arch}", "-Xptxas", "-v", str(src), "-o", str(tmp_path / "k.cubin")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = proc.stdout + proc.stderr
    regs = dict(re.findall(r"Function properties for (\w+).*?Used (\d+) registers", report, re.S))
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", report)]
    print(arch, "registers:", regs)
    assert sorted(regs) == sorted(f"deform_attn_{d}_{s}" for d in ("forward", "backward") for s in ("f32", "f64"))
    assert len(spills) == 4 and not any(spills), f"register spills on {arch}:\n{report}"
    if route == "nvcc":
        mmfs_kernel._load_library(out)  # loads without a GPU; a missing symbol raises AttributeError


def find_nvrtc():
    """libnvrtc from MMI_NVRTC_DIR, the CUDA toolkit, or an nvidia-cuda-nvrtc wheel; None if there is none."""
    dirs = [os.environ.get("MMI_NVRTC_DIR", ""), "/usr/local/cuda/lib64"]
    nvidia = importlib.util.find_spec("nvidia")
    for root in (nvidia.submodule_search_locations if nvidia else []):
        dirs += glob.glob(os.path.join(root, "*", "lib"))
    for d in filter(None, dirs):
        libs = sorted(glob.glob(os.path.join(d, "libnvrtc.so*")))
        if libs:
            for builtins in glob.glob(os.path.join(d, "libnvrtc-builtins.so*")):  # dlopen()ed by soname at compile
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(libs[0])
    return None


def test_nvrtc_compiles_the_source():
    # The run-time route's compiler, without a GPU: the pasted source, the flags torch adds, names left unmangled.
    nvrtc = find_nvrtc()
    if nvrtc is None:
        pytest.skip("no libnvrtc here (set MMI_NVRTC_DIR, or pip install nvidia-cuda-nvrtc)")
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), mmfs_kernel.kernel_source().encode(), b"deform_attn.cu",
                                    0, None, None) == 0
    names = [f"deform_attn_{d}_{s}" for d in ("forward", "backward") for s in ("f32", "f64")]
    for name in names:
        nvrtc.nvrtcAddNameExpression(prog, name.encode())
    opts = [b"--gpu-architecture=sm_80", b"-D__CUDA_NO_HALF_OPERATORS__", b"-D__CUDA_NO_HALF_CONVERSIONS__",
            b"-D__CUDA_NO_BFLOAT16_CONVERSIONS__", b"-D__CUDA_NO_HALF2_OPERATORS__"]
    result = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    assert result == 0, log.value.decode()
    for name in names:
        lowered = ctypes.c_char_p()
        assert nvrtc.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)) == 0
        assert lowered.value.decode() == name
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


def test_gpu_build_failures_become_kernel_unavailable(monkeypatch):
    # Pretend to be a GPU machine where both routes fail: one KernelUnavailable naming both reasons, remembered so
    # that later calls fail fast instead of recompiling (mmfs then warns once and uses the reference).
    calls = []

    def nvrtc_fails(*args, **kwargs):
        calls.append("nvrtc")
        raise RuntimeError("nvrtc says no")

    def nvcc_fails(arch):
        calls.append(arch)
        raise mmfs_kernel.KernelUnavailable("nvcc not found")

    monkeypatch.setattr(mmfs_kernel, "_GPU", {})
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "_compile_kernel", nvrtc_fails)
    monkeypatch.setattr(mmfs_kernel, "nvcc_library_path", nvcc_fails)
    for _ in range(2):
        with pytest.raises(mmfs_kernel.KernelUnavailable, match="NVRTC: RuntimeError: nvrtc says no.*nvcc not found"):
            mmfs_kernel._gpu_backend(torch.device("cuda", 0))
    assert calls == ["nvrtc", "sm_90"]


# ------------------------------------------------------------------------------------------ first-call self-check

def perturbed(where):
    """The emulated kernel with a planted bug in its forward output or only in its value gradient."""
    calls = []

    def kernel(value, *rest):
        calls.append(value.dtype)
        out = mmfs_kernel.cpu_emulated_deform_attn(value, *rest)
        if where == "forward":
            return out + 0.05  # gradients unchanged
        return out + 0.1 * (value - value.detach()).sum()  # forward unchanged, every value gradient off

    return kernel, calls


@pytest.fixture
def cpu_as_cuda(monkeypatch):
    """Route mmfs_kernel.cuda_deform_attn (and mmfs.deform_attn's dispatch) to a stand-in kernel on CPU tensors."""
    import mmfs

    monkeypatch.setattr(mmfs_kernel, "_CHECKED", {})
    monkeypatch.setattr(mmfs_kernel, "_require_cuda", lambda value: None)
    monkeypatch.setattr(mmfs, "_kernel_failed", False)
    monkeypatch.setattr(mmfs, "_wants_kernel", lambda value: not mmfs._kernel_failed)
    return lambda kernel: monkeypatch.setattr(mmfs_kernel, "_cuda_kernel", kernel)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_self_check_passes_the_emulated_kernel(dtype):
    err, what = mmfs_kernel.self_check_error(mmfs_kernel.cpu_emulated_deform_attn, deform_attn_reference,
                                       torch.device("cpu"), dtype)
    assert err < mmfs_kernel.SELF_CHECK_TOL[dtype] / 100, (err, what)


@pytest.mark.parametrize("where,what", [("forward", "output"), ("backward", "value gradient")])
def test_wrong_kernel_warns_once_and_falls_back(cpu_as_cuda, where, what, recwarn):
    import mmfs

    kernel, calls = perturbed(where)
    cpu_as_cuda(kernel)
    args = make_case(CASES["two_images_three_levels"], dtype=torch.float32)
    with torch.no_grad():  # as in generation: the check still runs its backward
        outs = [mmfs.deform_attn(*args) for _ in range(3)]
    assert len(calls) == 1  # only the self-check ran it
    messages = [str(w.message) for w in recwarn if "mmfs" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert "self-check" in messages[0] and "max error" in messages[0] and f"in the {what}" in messages[0]
    for out in outs:
        torch.testing.assert_close(out, deform_attn_reference(*args), rtol=0, atol=0)
    with pytest.raises(mmfs_kernel.KernelUnavailable, match=f"max error .* in the {what}"):
        mmfs_kernel.cuda_deform_attn(*args, reference=deform_attn_reference)  # remembered: not checked again
    assert len(calls) == 1


def test_good_kernel_is_checked_once_per_dtype_and_used(cpu_as_cuda, recwarn):
    import mmfs

    calls = []
    cpu_as_cuda(lambda value, *rest: calls.append(value.dtype) or mmfs_kernel.cpu_emulated_deform_attn(value, *rest))
    args64 = make_case(CASES["tiny_levels"])
    args32 = [a.float() if a.is_floating_point() else a for a in args64]
    for args in (args64, args64, args32, [a.bfloat16() if a.is_floating_point() else a for a in args64]):
        mmfs.deform_attn(*args)
    # first fp64 call: check + run; second: run; fp32: check + run; bf16 computes in fp32, already checked: run
    assert calls == [torch.float64] * 3 + [torch.float32] * 2 + [torch.bfloat16]
    assert not [w for w in recwarn if "mmfs" in str(w.message)]
    assert mmfs_kernel._CHECKED == {("cpu", torch.float64): None, ("cpu", torch.float32): None}


def test_kernel_that_raises_fails_the_check(cpu_as_cuda):
    def broken(*args):
        raise RuntimeError("too many resources requested for launch")

    cpu_as_cuda(broken)
    with pytest.raises(mmfs_kernel.KernelUnavailable, match="self-check.*RuntimeError: too many resources"):
        mmfs_kernel.cuda_deform_attn(*make_case(CASES["one_level"]), reference=deform_attn_reference)
