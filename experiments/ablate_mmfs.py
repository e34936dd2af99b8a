"""
The paper's MMFS ablation (Tab. 6), reproduced small: train the tiny model on the synthetic world twice, with and
without MMFS (mmi.MMIConfig.use_mmfs: the LLM's and the U-Net's), same seed, data and steps, and score both on the
held-out scenes. Two experiments:
  reading   captions and questions (i2t + qa): do the LLM's words come out right (fine detail: colour and shape)?
  story     stories only: does the next image keep what the sentence did not change (multi-image consistency)?

    python experiments/ablate_mmfs.py                       # both experiments, the two runs of each side by side
    python experiments/ablate_mmfs.py --only=story --steps=300

Each run is `python train.py` with the defaults of train.py except the overrides printed; logs in experiments/out-ablate.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = {  # name: (train.py overrides, default steps)
    "reading": (["--kinds=i2t:0.7,qa:0.3", "--eval_kinds=i2t,qa"], 400),
    "story": (["--kinds=story:1", "--eval_kinds=story"], 250),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(EXPERIMENTS), help="run one experiment")
    ap.add_argument("--steps", type=int, help="training steps per run (default: per experiment)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "out-ablate"))
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, (overrides, steps) in EXPERIMENTS.items():
        if args.only and name != args.only:
            continue
        steps = args.steps or steps
        runs = {}
        for mmfs in (True, False):  # side by side: one process per CPU core
            out = Path(args.out) / f"{name}-mmfs-{'on' if mmfs else 'off'}"
            cmd = [sys.executable, "train.py", f"--out_dir={out}", f"--max_steps={steps}", "--warmup_steps=30",
                   "--batch_size=8", f"--use_mmfs={mmfs}", *overrides]
            print(" ".join(cmd[1:]), flush=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / "log.jsonl").unlink(missing_ok=True)
            runs[mmfs] = (out, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                                stderr=open(out / "stderr.txt", "w")))
        results = {}
        for mmfs, (out, proc) in runs.items():
            if proc.wait() != 0:
                sys.exit(f"error: run failed, see {out / 'stderr.txt'}")
            records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            evals = [r for r in records if "eval" in r]
            train = [r for r in records if "loss" in r]
            results[mmfs] = dict(evals[-1]["eval"], text_loss=train[-1]["text_loss"], image_loss=train[-1]["image_loss"],
                                 minutes=train[-1]["time"] / 60)
        print(f"\n{name}, {steps} steps (held-out, 50 per kind)")
        print(f"| metric | with MMFS | without MMFS |\n|---|---|---|")
        for key in results[True]:
            print(f"| {key} | {results[True][key]:.3f} | {results[False][key]:.3f} |")


if __name__ == "__main__":
    main()
