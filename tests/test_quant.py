"""quant.py: int8 weight-only quantisation of frozen Linear layers. Random small LLaMAs, the trained tiny model and
the official-layout fixture; CPU; seconds.

Tolerances (measured, stated as the relative error of the logits, ||int8 - float|| / ||float|| over all positions):
random LLaMA fp32 0.45% (bound 1%), bf16 against bf16 0.77% (bound 1.5%); the official fixture's text logits 1.8%
(bound 3%: its random fp16-drawn weights have heavier rows than a trained or default-initialised model)."""
import copy
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import generate
import world
from checkpoints import load
from llm import LLaMA, LLaMAConfig
from mmi import MMI, GatedMMFS, MMIConfig
from quant import Int8Linear, linear_weight_bytes, quantize_int8, quantize_weight
from vit import to_tensor01

CFG = dict(vocab_size=256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352, max_seq_len=128)
EVERY = lambda name, lin: True  # noqa: E731  (a random LLaMA is not frozen: quantise all its Linear layers)
ASSETS = Path(__file__).parent.parent / "assets"
FIXTURE = Path(__file__).parent / "fixtures" / "official-mmi"


def llama(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return LLaMA(LLaMAConfig(**CFG)).to(dtype).eval()


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tokens(seed=1, shape=(2, 32)):
    return torch.randint(0, CFG["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype,ratio", [(torch.bfloat16, 1 / 2), (torch.float32, 1 / 4)])
def test_weight_bytes_halved_against_bf16_quartered_against_fp32(dtype, ratio):
    m = llama(dtype)
    lins = {n: (l.out_features, l.in_features) for n, l in m.named_modules() if isinstance(l, nn.Linear)}
    before = linear_weight_bytes(m)
    names = quantize_int8(m, filter=EVERY)
    assert sorted(names) == sorted(lins)
    assert all(isinstance(m.get_submodule(n), Int8Linear) for n in names)
    after = linear_weight_bytes(m)
    # exactly one int8 per weight plus one scale per output channel in the original dtype
    assert after == sum(o * i + o * dtype.itemsize for o, i in lins.values())
    assert before * ratio < after <= before * ratio * (1 + dtype.itemsize / min(i for _, i in lins.values()))
    assert m.get_submodule(names[0]).weight_int8.dtype == torch.int8


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-2), (torch.bfloat16, 1.5e-2)])
def test_logits_within_tolerance(dtype, tol):
    m = llama(dtype)
    q = copy.deepcopy(m)
    quantize_int8(q, filter=EVERY)
    x = tokens()
    with torch.no_grad():
        assert rel_err(q(x), m(x)) < tol


def test_dequantised_weight_is_the_weight_to_int8_rounding():
    w = torch.randn(48, 80) * torch.rand(48, 1) * 3  # rows of different magnitude
    w[5] = 0  # a zero row must not divide by zero
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127 and s.shape == (48,)
    deq = q.float() * s[:, None]
    assert ((deq - w).abs() <= s[:, None] / 2 + 1e-7).all()  # half a step per channel at most
    assert deq[5].abs().max() == 0


def test_greedy_identical_where_the_margin_allows():
    """Greedy decoding of a random LLaMA: the int8 model picks the same token at every step whose top-1 / top-2
    margin (of the float model) exceeds twice the largest logit error measured on that step; the first step where it
    does not is where the two may part, and the test checks every step up to it (at least 8 here)."""
    m = llama()
    q = copy.deepcopy(m)
    quantize_int8(q, filter=EVERY)
    seq = tokens(2, (1, 8))
    checked = 0
    with torch.no_grad():
        for _ in range(40):
            a, b = m(seq)[0, -1], q(seq)[0, -1]
            top = a.topk(2).values
            if top[0] - top[1] <= 2 * (a - b).abs().max():
                break
            assert a.argmax() == b.argmax(), f"step {checked}: int8 picked another token despite the margin"
            seq = torch.cat([seq, a.argmax().view(1, 1)], 1)
            checked += 1
    assert checked >= 8


def test_trained_tiny_model_captions_identical():
    """The shipped tiny model (trained: real margins) captions held-out scenes with the same greedy text in int8."""
    m = load(ASSETS / "tiny").eval()
    q = copy.deepcopy(m)
    names = quantize_int8(q.llm, filter=lambda n, lin: ".inserted." not in n)
    assert names and not any(".inserted." in n for n in names)
    rng = random.Random(3)
    for _ in range(3):
        img = to_tensor01(world.render(world.random_scene(rng, "eval")))
        a = generate.generate(m, [img], max_new_tokens=40, max_images=0)
        b = generate.generate(q, [img], max_new_tokens=40, max_images=0)
        assert a == b and len(a[0]) > 20


def test_meta_device_counts_bytes_without_weights():
    with torch.device("meta"):
        m = LLaMA(LLaMAConfig(vocab_size=32000, dim=5120, n_layers=2, n_heads=40, hidden_dim=13824)).half()
    before = linear_weight_bytes(m)
    quantize_int8(m, filter=EVERY)
    lin = [l for l in m.modules() if isinstance(l, Int8Linear)]
    assert lin and all(l.weight_int8.is_meta and l.weight_int8.dtype == torch.int8 for l in lin)
    assert all(l.scales.dtype == torch.float16 for l in lin)
    assert 0.5 < linear_weight_bytes(m) / before < 0.5 + 1 / 5120


def test_backward_saves_only_the_int8_weight():
    """Gradients through a quantised layer equal those through its dequantised float weight, and autograd keeps no
    float copy of the weight for backward (a frozen LLM under trainable MMFS layers would otherwise hold one)."""
    lin = nn.Linear(64, 96)
    q = Int8Linear.from_linear(lin.requires_grad_(False))
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert not any(t.is_floating_point() and t.shape == (96, 64) for t in saved)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    x2 = x.detach().requires_grad_()
    (gx2,) = torch.autograd.grad(F.linear(x2, q.dequantized(), q.bias), x2, g)
    torch.testing.assert_close(gx, gx2, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # same dtype rule as the Linear it replaces
        assert q(x).dtype == lin(x).dtype == torch.bfloat16


def test_mmfs_and_trainable_parameters_untouched():
    """Quantising the frozen LLM of a model whose LLM is frozen (as the paper's): MMFS layers, the trainable two-row
    head and every other trainable parameter stay the same objects; a training step still reaches all of them."""
    torch.manual_seed(0)
    model = MMI(MMIConfig.from_name("tiny", freeze_llm=True, freeze_vit=True))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = quantize_int8(model.llm)
    assert len(names) == 4 * 7 + 1  # 7 Linear per block and the LM head; nothing else
    assert not any(".inserted." in n for n in names)
    assert all(isinstance(b.inserted, GatedMMFS) for b in model.llm.layers[::model.cfg.mmfs.every])
    assert {n: p for n, p in model.named_parameters() if p.requires_grad} == trainable
    n_groups = sum(len(g["params"]) for g in model.param_groups())
    assert n_groups == len(trainable)
    tok = SimpleNamespace(bos_id=1, eos_id=2, pad_id=0, boi_id=model.cfg.boi_id, image_id=model.cfg.image_id)
    model.tok = tok  # no tokenizer file needed: the ids are enough for a batch made by hand
    n = model.cfg.n_image_tokens
    ids = [1, 5, 6, 7, tok.boi_id] + [tok.image_id] * n + [8, 9, tok.boi_id] + [tok.image_id] * n + [10, 2]
    batch = dict(tokens=torch.tensor([ids]), images=torch.rand(2, 3, 32, 32))
    model.train()(batch)["loss"].backward()
    gate = model.llm.layers[0].inserted.mmfs.sampling_offsets.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0  # the gradient reached MMFS through int8 layers
    assert all(p.grad is None for n, p in model.llm.named_parameters() if n.endswith(("weight_int8", "scales")))


def test_official_fixture_text_logits(build_official):
    m, meta = build_official()
    ids = meta["token_ids"]
    from safetensors.torch import load_file
    fx = load_file(str(FIXTURE / "fixture.safetensors"))
    toks, images = fx["input.text_ids"], fx["input.image_tensors"]
    real = toks != ids["pad"]
    with torch.no_grad():
        ref = m.logits(m.hidden_states(toks, images)[0])[real]
        mmfs = [id(b.inserted) for b in m.llm.layers if b.inserted is not None]
        names = quantize_int8(m.llm)  # the released model's LLM is frozen: requires_grad False selects it
        assert len(names) == 6 * 7 + 1 and [id(b.inserted) for b in m.llm.layers if b.inserted is not None] == mmfs
        out = m.logits(m.hidden_states(toks, images)[0])[real]
    V = ids["vocab_size_llm"]
    assert rel_err(out[:, :V], ref[:, :V]) < 3e-2
    assert (out[:, :V].argmax(-1) == ref[:, :V].argmax(-1)).float().mean() > 0.9


def test_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file
    q = llama()
    quantize_int8(q, filter=EVERY)
    save_file(q.state_dict(), str(tmp_path / "q.safetensors"))
    with torch.device("meta"):
        fresh = LLaMA(LLaMAConfig(**CFG))
    quantize_int8(fresh, filter=EVERY)  # the skeleton: same buffers, on the meta device
    fresh.load_state_dict(load_file(str(tmp_path / "q.safetensors")), assign=True)
    fresh._init_buffers()  # the rotary tables are not saved
    x = tokens()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), q(x))
