"""llm.py: parity with transformers' LlamaForCausalLM in every checkpoint layout, KV cache, insertion point,
strict loading, sampling. Tiny random configs; fp32; seconds on a 2-core CPU."""
import json

import pytest
import torch
import transformers  # the reference (requirements-test.txt)
from safetensors.torch import save_file
from torch import nn

from llm import LLaMA, LLaMAConfig, generate, sample_next
from weights import CheckpointError


TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
TINY_CFG = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, max_seq_len=256)
HF_CONFIGS = {
    "v1.3": dict(rms_norm_eps=1e-6),  # no num_key_value_heads, no rope_theta in config.json
    "v1.5": dict(rms_norm_eps=1e-5, num_key_value_heads=4),
    "gqa": dict(rms_norm_eps=1e-5, num_key_value_heads=2),
    "theta": dict(rms_norm_eps=1e-6, num_key_value_heads=1, rope_theta=500000.0),
}


def hf_model(name, **extra):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY, **HF_CONFIGS[name], **extra)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains so a missed weight would show
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
    return m


def strip_config(folder, name):
    """Make config.json look like the real Vicuna files: v1.3 has neither num_key_value_heads nor rope_theta."""
    c = json.loads((folder / "config.json").read_text())
    if name == "v1.3":
        c.pop("num_key_value_heads", None)
        c.pop("rope_parameters", None)
        c.pop("rope_theta", None)
    (folder / "config.json").write_text(json.dumps(c))


def save_bin_shards(m, folder, n_shards=2):
    """pytorch_model-0000i-of-0000n.bin + index, as the Vicuna repos ship them (with inv_freq buffers)."""
    m.config.save_pretrained(folder)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    hd = m.config.hidden_size // m.config.num_attention_heads
    for i in range(m.config.num_hidden_layers):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    keys = list(sd)
    weight_map = {}
    for s in range(n_shards):
        fname = f"pytorch_model-{s + 1:05d}-of-{n_shards:05d}.bin"
        part = keys[s::n_shards]
        torch.save({k: sd[k].half() if sd[k].dtype == torch.float32 and "inv_freq" not in k else sd[k]
                    for k in part}, folder / fname)
        weight_map.update({k: fname for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def tokens(B=2, T=11, V=96, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(HF_CONFIGS))
@pytest.mark.parametrize("layout", ["safetensors", "sharded-safetensors"])
def test_parity_safetensors(tmp_path, name, layout):
    ref = hf_model(name)
    ref.save_pretrained(tmp_path, max_shard_size="20KB" if layout.startswith("sharded") else "1GB")
    if layout.startswith("sharded"):
        assert (tmp_path / "model.safetensors.index.json").exists()
    strip_config(tmp_path, name)
    ours = LLaMA.from_pretrained(tmp_path)
    assert ours.cfg.norm_eps == HF_CONFIGS[name]["rms_norm_eps"]
    assert ours.cfg.n_kv_heads == HF_CONFIGS[name].get("num_key_value_heads", 4)
    assert ours.cfg.rope_theta == HF_CONFIGS[name].get("rope_theta", 10000.0)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["v1.3", "gqa"])
def test_parity_sharded_bin_fp16(tmp_path, name):
    ref = hf_model(name)
    save_bin_shards(ref, tmp_path)
    strip_config(tmp_path, name)
    ours = LLaMA.from_pretrained(tmp_path, dtype=torch.float32)  # fp16 checkpoint, converted per tensor
    assert ours.lm_head.weight.dtype == torch.float32
    ref.load_state_dict({k: v.half().float() for k, v in ref.state_dict().items()})  # same rounding
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, atol=1e-5, rtol=1e-5)
    assert LLaMA.from_pretrained(tmp_path).lm_head.weight.dtype == torch.float16  # default: checkpoint dtype


def test_tied_embeddings(tmp_path):
    ref = hf_model("gqa", tie_word_embeddings=True)
    ref.save_pretrained(tmp_path)
    ours = LLaMA.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.embed.weight
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, atol=1e-5, rtol=1e-5)


def tiny_ours(seed=0, **kw):
    torch.manual_seed(seed)
    return LLaMA(LLaMAConfig(**{**TINY_CFG, **kw})).eval()


@torch.no_grad()
def test_kv_cache_matches_full_forward():
    m = tiny_ours()
    x = tokens(B=2, T=12, V=512)
    full = m(x)
    cache = m.new_cache(2, 16)
    out = [m(x[:, :5], cache=cache)]  # prefill
    out.append(m(x[:, 5:8], cache=cache))  # chunked prefill after earlier tokens
    for t in range(8, 12):  # single-token decode
        out.append(m(x[:, t : t + 1], cache=cache))
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_batched_equals_single_and_generate():
    m = tiny_ours()
    x = tokens(B=3, T=6, V=512)
    batched = generate(m, x, 8, temperature=0)
    for b in range(3):
        assert torch.equal(generate(m, x[b : b + 1], 8, temperature=0)[0], batched[b])
    full = m(batched)  # greedy: each generated token is the argmax of the full forward at the previous position
    assert torch.equal(full[:, 5:-1].argmax(-1), batched[:, 6:])


@torch.no_grad()
def test_generate_stops_and_pads():
    m = tiny_ours()
    x = tokens(B=2, T=4, V=512)
    free = generate(m, x, 6, temperature=0)
    stop = int(free[0, 5])  # row 0 emits this at its 2nd step
    out = generate(m, x, 6, stop_ids=[stop], pad_id=0, temperature=0)
    assert out[0, 5] == stop and (out[0, 6:] == 0).all()


@torch.no_grad()
def test_embeds_input_equals_tokens():
    m = tiny_ours()
    x = tokens(B=2, T=7, V=512)
    torch.testing.assert_close(m.forward_hidden(embeds=m.embed(x)), m.forward_hidden(x))


class Recorder(nn.Module):
    """Identity-ish inserted module: adds a learnable zero-init term, records the ctx it was given."""

    def __init__(self, dim):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))
        self.calls = []

    def forward(self, h, ctx):
        self.calls.append(ctx)
        return h + self.gate * ctx["extra"]


@torch.no_grad()
def test_insert_point():
    m = tiny_ours(n_layers=4)
    x = tokens(B=2, T=5, V=512)
    before = m(x)
    recs = {i: Recorder(m.cfg.dim) for i in (1, 3)}  # every 2nd layer, as MMFS
    for i, r in recs.items():
        m.insert(i, r)
    ctx = {"extra": torch.ones(m.cfg.dim)}
    torch.testing.assert_close(m(x, ctx=ctx), before)  # zero gate: the decoder is unchanged
    assert all(r.calls == [ctx] for r in recs.values())
    assert m.layers[0].inserted is None and m.layers[2].inserted is None
    recs[3].gate.fill_(0.5)
    assert not torch.allclose(m(x, ctx=ctx), before)
    # the insertion sits between attention and MLP: h_after_attn + inserted term, then the MLP sees it
    blk, h = m.layers[3], torch.randn(1, 3, m.cfg.dim)
    cos, sin = m.rope_cos[:3], m.rope_sin[:3]
    h1 = h + blk.attn(blk.norm1(h), cos, sin) + 0.5
    torch.testing.assert_close(blk(h, cos, sin, ctx=ctx), h1 + blk.mlp(blk.norm2(h1)))


# ---- strict loading ----------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    ref = hf_model("gqa")
    ref.save_pretrained(tmp_path)
    return tmp_path, ref.state_dict()


def resave(folder, sd):
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")


def test_missing_key(saved):
    folder, sd = saved
    del sd["model.layers.1.mlp.up_proj.weight"]
    resave(folder, sd)
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.mlp\.up_proj\.weight"):
        LLaMA.from_pretrained(folder)


def test_unexpected_key(saved):
    folder, sd = saved
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    resave(folder, sd)
    with pytest.raises(CheckpointError, match=r"unexpected.*layers\.0\.attn\.q_norm\.weight"):
        LLaMA.from_pretrained(folder)


def test_wrong_shape(saved):
    folder, sd = saved
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    resave(folder, sd)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*k_proj\.weight.*\(8, 32\)"):
        LLaMA.from_pretrained(folder)


def test_truncated_and_corrupt_files(saved):
    folder, _ = saved
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated: header intact, tensor data cut
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LLaMA.from_pretrained(folder)
    f.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LLaMA.from_pretrained(folder)


def test_corrupt_bin_and_missing_shard(tmp_path):
    ref = hf_model("v1.3")
    save_bin_shards(ref, tmp_path)
    shard = tmp_path / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        LLaMA.from_pretrained(tmp_path)
    shard.unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin.*missing"):
        LLaMA.from_pretrained(tmp_path)


def test_config_defaults():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                rms_norm_eps=1e-5)
    c = LLaMAConfig.from_hf(base)
    assert (c.n_kv_heads, c.rope_theta, c.norm_eps) == (2, 10000.0, 1e-5)
    c = LLaMAConfig.from_hf({**base, "num_key_value_heads": 1, "rope_theta": 1e6})
    assert (c.n_kv_heads, c.rope_theta) == (1, 1e6)
    with pytest.raises(ValueError):
        LLaMAConfig.from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


# ---- sampling ----------------------------------------------------------------------------------------------------


def test_sample_next():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    top5 = logits.topk(5, dim=-1).indices
    for _ in range(20):
        s = sample_next(logits, top_k=5, generator=g)
        assert (s[:, None] == top5).any(-1).all()
    peaked = torch.tensor([[5.0, 4.0, 0.0, -1.0, -3.0]])  # p ~ [0.72, 0.27, 0.005, ...]
    drawn = {int(sample_next(peaked, top_p=0.9, generator=g)) for _ in range(200)}
    assert drawn == {0, 1}
    assert {int(sample_next(peaked, top_p=0.5, generator=g)) for _ in range(50)} == {0}
    # repetition penalty: a positive and a negative repeated logit both go down; greedy then picks another token
    rep = torch.tensor([[2.0, 1.9, -1.0, 0.5]])
    assert int(sample_next(rep, temperature=0, repetition_penalty=1.3, prev=torch.tensor([[0]]))) == 1
    probs_before = rep.softmax(-1)
    for tok in (0, 2):
        counts = torch.zeros(4)
        for _ in range(400):
            counts[sample_next(rep, repetition_penalty=2.0, prev=torch.tensor([[tok]]), generator=g)] += 1
        assert counts[tok] / 400 < probs_before[0, tok] * 0.8
