"""
Everything this repository can only check on a GPU, in one unattended run (under 10 minutes on one GPU), one line
per check:

    python bench/gpu_check.py                 # all checks; --out_dir=... keeps their outputs (default: a temp dir)

  kernel     the MMFS CUDA kernel: first-call self-check against the torch reference, then bench/bench_kernel.py
             (agreement and speed, both cases)
  train      a short tiny training run on the GPU: train.py --max_steps=20 --device=cuda
  demo       the demo on the GPU: sample.py --device=cuda (the five prompts, samples/index.html)
  memory     bench/memory.py --measure for the README table's configurations that fit this card: the plan (fake
             tensors, on the CPU) against torch.cuda.max_memory_allocated of the same step run for real; the
             figures for the "measured" column of bench/README.md

Each check runs as its own process with a time limit; a check that fails prints its last error line and the run goes
on. Exit status: 0 if every check that ran passed.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 570  # all checks; each starts only if its own limit fits in what is left
# memory checks, most useful first: (name, GiB of card needed, limit s, bench/memory.py flags): table rows
MEMORY = [
    ("memory gen 13b int8", 20, 200, "--mode=generate --llm=13b --dtype=float16 --seq_len=2048 --quantize=int8"),
    ("memory train 1b", 20, 200,
     "--mode=train --llm=1b --dtype=bfloat16 --grad_checkpointing=True --batch_size=1 --seq_len=512"),
    ("memory gen 13b fp16", 36, 200, "--mode=generate --llm=13b --dtype=float16 --seq_len=2048"),
    ("memory train 13b", 70, 240,
     "--mode=train --llm=13b --dtype=bfloat16 --grad_checkpointing=True --batch_size=1 --seq_len=2048"),
]


def sh(cmd, limit, env=None):
    """Run cmd (a list) in the repository root -> (ok, seconds, output)."""
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                           env={**os.environ, **(env or {})})
        return p.returncode == 0, time.time() - t0, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return False, time.time() - t0, out + f"\ntimed out after {limit} s"


def last(out, *keys):
    """The last line of out that contains one of keys (else the last non-empty line), shortened."""
    lines = [l.strip() for l in out.splitlines() if l.strip()]
    hits = [l for l in lines if any(k in l for k in keys)]
    return ((hits or lines or [""])[-1])[:160]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default=None, help="where the training run and the demo write (default: temp dir)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"gpu_check: no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                 "run it on a machine with an NVIDIA GPU")
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="gpu_check-"))
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, {total:.1f} GiB, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}; outputs in {out}", flush=True)
    py = sys.executable
    checks = [
        ("kernel self-check", 120, [py, "-c", "import torch, mmfs, mmfs_kernel; "
                                    "mmfs_kernel.checked(mmfs_kernel._cuda_kernel, mmfs.deform_attn_reference, "
                                    "torch.device('cuda'), torch.float32); print('self-check passed (fp32)')"],
         ("passed", "Error", "error")),
        ("kernel benchmark", 120, [py, "bench/bench_kernel.py", "--iters=10"], ("speed-up", "Error", "error")),
        ("train 20 steps", 180, [py, "train.py", "--max_steps=20", "--device=cuda", f"--out_dir={out / 'train'}",
                                 "--eval_n=4"], ("loss", "error", "Error")),
        ("demo", 150, [py, "sample.py", "--device=cuda", f"--out_dir={out / 'samples'}"],
         ("index.html", "error", "Error")),
    ]
    for name, need, limit, flags in MEMORY:  # the rows whose plan fits this card (need: GiB of card)
        if total >= need:
            checks.append((name, limit, [py, "bench/memory.py", "--measure", *flags.split()],
                           ("measured", "skipped", "rror")))
    start, failed = time.time(), 0
    for name, limit, cmd, keys in checks:
        left = BUDGET_S - (time.time() - start)
        if left < min(limit, 60):
            print(f"{name:<26} SKIP   (the 10-minute budget is spent)", flush=True)
            continue
        ok, secs, text = sh(cmd, min(limit, left))
        failed += not ok
        print(f"{name:<26} {'ok' if ok else 'FAIL':<6} {secs:6.1f} s  {last(text, *keys)}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
