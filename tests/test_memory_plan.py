"""bench/memory.py: the memory plan on fake tensors against the same tracker on real CPU tensors of the same step
(within 10% is the bar; measured: equal to the byte), and the weight table on the meta device. CPU; seconds."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_mmi import MICRO

_path = Path(__file__).resolve().parent.parent / "bench" / "memory.py"
_spec = importlib.util.spec_from_file_location("bench_memory", _path)
memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory)


def plan_and_real(cfg, mode, **kw):
    return [memory.run(cfg, mode, torch.float32, target="cpu", fake=f, **kw) for f in (True, False)]


@pytest.mark.parametrize("name,mode", [("tiny", "train"), ("micro", "generate")])
def test_plan_matches_real_cpu_tensors(name, mode):
    """The tiny preset's training step (forward under the tracker, backward, clip, AdamW) and a micro model's
    interleaved generation round (prompt, decoding, drawing with guidance, re-encoding)."""
    cfg = memory.config("tiny", **(MICRO if name == "micro" else {}))
    plan, real = plan_and_real(cfg, mode, batch_size=2, seq_len=128 if name == "tiny" else 64)
    assert abs(plan["peak"] / real["peak"] - 1) < 0.10, (plan["peak"], real["peak"])
    assert plan["split"].get("Parameter") == real["split"].get("Parameter")  # the same weights, fake or not
    if mode == "train":
        assert plan["split"]["Optstate"] > 0 and plan["split"]["Optstate"] == real["split"]["Optstate"]


def test_weight_table_and_int8_on_the_meta_device():
    """The official model in fp16 without weights: per-component bytes, and int8 halves the LLM's Linear layers
    only (MMFS, embeddings and the rest unchanged)."""
    cfg = memory.config("official")
    fp16 = memory.weight_table(memory.build_meta(cfg, "generate", torch.float16))
    int8 = memory.weight_table(memory.build_meta(cfg, "generate", torch.float16, quantize="int8"))
    llm16 = fp16[("LLM", "float16")][0]
    assert abs(llm16 / 2**30 - 24.25) < 0.01  # Vicuna-13B: 13.0 B parameters in fp16
    embed = 32000 * 5120 * 2
    assert int8[("LLM", "int8")][0] == pytest.approx((llm16 - embed) / 2, rel=2e-3)  # + fp16 scales: 1 per row
    for key in fp16:
        if key[0] != "LLM":
            assert int8[key] == fp16[key], key


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: gpu_check would run")
def test_gpu_check_without_cuda_says_so_in_one_line():
    p = subprocess.run([sys.executable, str(_path.parent / "gpu_check.py")], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "no CUDA device" in p.stderr
