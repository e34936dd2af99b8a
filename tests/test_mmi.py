"""mmi.py: the assembled MM-Interleaved model. Micro configs of the same classes; CPU; seconds each.

Proofs: zero gates / zero convs leave LLaMA and U-Net unchanged; image visibility in packed sequences; KV-cache
generation = recompute, projecting each image's MMFS values once per layer; an interleaved two-image prompt runs end
to end; one batch overfits (both losses); save/load round trip; the official preset builds on the meta device
(parameter counts)."""
import random
import re

import pytest
import torch

import generate
from data import tokenize_document
from llm import LLaMA, LLaMAConfig
from mmfs import MMFS
from checkpoints import build_model, load, save
from mmi import MMI, DecoderContext, GatedMMFS, MMIConfig, flatten_maps
from quant import quantize_int8

MICRO = {
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4,
                   image_size=16, layer_norm_eps=1e-5, num_channels=3, hidden_act="quick_gelu"),
    "adapter": dict(n_blocks=1, n_points=2, n_extra_extractors=0, spm_channels=8),
    "tokenizer": "byte",
    "llm": dict(vocab_size=259, dim=64, n_layers=2, n_heads=2, hidden_dim=128, norm_eps=1e-5, max_seq_len=256),
    "unet": dict(in_channels=3, out_channels=3, block_out_channels=[16, 32], layers_per_block=1,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[2, 2],
                 cross_attention_dim=32, norm_num_groups=8, sample_size=16),
    "mmfs.gate_init": 0.0,  # official-style zero gates (the tiny preset opens them; see mmi.PRESETS)
    "mmfs.every": 1, "mmfs.heads": 2, "mmfs.head_dim": 16, "mmfs.points": 2,
    "resampler.dim": 32, "resampler.layers": 2, "resampler.heads": 2, "resampler.ffn": 64,
    "decoder.queries": 4, "decoder.dim": 32, "decoder.heads": 2, "decoder.ffn": 64, "decoder.mmfs_heads": 2,
    "decoder.mmfs_head_dim": 16, "decoder.mmfs_points": 2, "n_image_tokens": 4, "max_images": 4, "image_size": 16,
}


def micro(seed=0, live=False, **overrides):
    """A micro model; live=True opens the gates and zero convs so MMFS paths actually matter."""
    torch.manual_seed(seed)
    model = MMI(MMIConfig.from_name("tiny", **{**MICRO, **overrides})).eval()
    if live:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".gate") or re.match(r"image_decoder\.taps\.\d+\.zero\.", name):
                    p.normal_(0, 0.5)
    return model


def images(n, seed=0, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def pack(model, tok, docs):
    """Documents -> one packed row (concatenated, as data.py packs them) + the images in order."""
    ids, imgs = [], []
    for d in docs:
        i, m = tokenize_document(d, tok, model.cfg.n_image_tokens)
        ids += i
        imgs += m
    return dict(tokens=torch.tensor([ids]), images=torch.stack(imgs))


def test_config_presets_and_overrides():
    cfg = MMIConfig.from_name("tiny", n_image_tokens=8, **{"llm.n_layers": 6})
    assert cfg.n_image_tokens == 8 and cfg.llm["n_layers"] == 6 and cfg.boi_id == 440 and cfg.image_id == 441
    off = MMIConfig.from_name("official")
    assert (off.boi_id, off.image_id, off.pad_id, off.n_image_tokens, off.decoder.loss_weight) == (32000, 32001, 31999,
                                                                                                 64, 10.0)
    with pytest.raises(KeyError):
        MMIConfig.from_name("tiny", not_a_field=1)


def test_layout_visibility_rules():
    model = micro()
    tok = model.tok
    B, I, n = model.cfg.boi_id, model.cfg.image_id, model.cfg.n_image_tokens
    s, e = tok.bos_id, tok.eos_id
    # doc 1: <s> BoI img a BoI img b </s>; doc 2: <s> x BoI img </s>  (one packed row)
    row = [s, B] + [I] * n + [97, B] + [I] * n + [e, s, 120, B] + [I] * n + [e]
    lay = model.layout(torch.tensor([row]))
    pos = lay.pos.tolist()
    assert pos == [1, 3 + n, 7 + 2 * n] and lay.prev.tolist() == [-1, 0, -1]
    assert lay.has_context.tolist() == [False, True, True]  # the first image has only "<s> BoI" as context
    vis = lay.visible[0]  # (T, 3)
    for t in range(len(row)):
        doc1 = t < 5 + 2 * n
        assert vis[t, 0] == (doc1 and t > pos[0])   # BoI does not see its own image; its <|image|> tokens do
        assert vis[t, 1] == (doc1 and t > pos[1])
        assert vis[t, 2] == (not doc1 and t > pos[2])  # nothing from the other document
    tgt = model.text_targets(torch.tensor([row]))[0]
    assert tgt[0] == -100 and (tgt[1:1 + n] == -100).all()  # BoI right after <s>, <|image|> targets: ignored
    assert tgt[1 + n] == 97 and tgt[2 + n] == B and tgt[3 + 2 * n] == e and tgt[5 + 2 * n] == 120
    assert tgt[4 + 2 * n] == -100  # <s> ignored
    # image-text pairs (official LAION rule): no text loss before the document's first BoI; the BoI itself counts
    pair = [s, 97, 98, B] + [I] * n + [99, e, s, B] + [I] * n + [100, e]
    tgt = model.text_targets(torch.tensor([pair]), pairs=True)[0].tolist()
    assert tgt[:3] == [-100, -100, B] and tgt[3 + n:5 + n] == [99, e] and tgt[-2:] == [100, e]


def test_zero_gates_leave_llama_and_unet_unchanged():
    model = micro()
    tok = model.tok
    batch = pack(model, tok, [["a red circle", images(1)[0], "moves"], [images(1, 1)[0], "x"]])
    emb, maps = model.visual_tokenizer(batch["images"])
    values, shapes = flatten_maps(maps[1:])
    lay = model.layout(batch["tokens"])
    x = model.embed(batch["tokens"], emb)
    ctx = model.visual_context(lay, values, shapes, 1)
    plain = LLaMA(LLaMAConfig(**model.cfg.llm)).eval()
    plain.load_state_dict({k: v for k, v in model.llm.state_dict().items() if ".inserted." not in k})
    with torch.no_grad():
        assert torch.equal(model.llm(embeds=x, ctx=ctx), plain(embeds=x))
        xt, t, cond = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.randn(2, 4, 32)
        dv, dshapes = flatten_maps(maps)
        ctx = model.image_decoder.context(dv, dshapes, torch.tensor([0, -1]))
        assert torch.equal(model.image_decoder.denoise(xt, t, cond, ctx), model.image_decoder.unet(xt, t, cond))


def test_decoder_mmfs_reads_only_the_previous_image():
    """U-Net MMFS: an image with a previous image reads it (and only it); one without reads the null key, i.e. the
    same as MMFS over an invisible image; a batch mixing both equals each image denoised alone."""
    model = micro(live=True)
    _, maps = model.visual_tokenizer(images(2))
    dv, dshapes = flatten_maps(maps)
    xt, t, cond = torch.randn(3, 3, 16, 16), torch.tensor([10, 500, 900]), torch.randn(3, 4, 32)
    dec = model.image_decoder
    ctx = dec.context(dv, dshapes, torch.tensor([0, -1, 1]))
    with torch.no_grad():
        out = dec.denoise(xt, t, cond, ctx)
        for i in range(3):
            one = dec.denoise(xt[i:i + 1], t[i:i + 1], cond[i:i + 1],
                              DecoderContext(ctx.values[i:i + 1], dshapes, ctx.has_prev[i:i + 1]))
            assert torch.allclose(out[i:i + 1], one, atol=1e-5)
        other = dec.denoise(xt, t, cond, dec.context(dv, dshapes, torch.tensor([1, -1, 0])))
        assert torch.equal(out[1], other[1]) and not torch.allclose(out[0], other[0])
        # no previous image == MMFS computed over an invisible image (the null key)
        skip = dec.taps[0].mmfs
        q = torch.randn(1, 5, skip.output_proj.out_features)
        null = skip(q, torch.rand(5, 2), dec.taps[0].project_values(ctx.values[:1]), dshapes,
                    torch.zeros(1, 5, 1, dtype=torch.bool), value_projected=True)
        assert torch.allclose(null, skip.output_proj.bias.expand(1, 5, -1))


def test_without_mmfs_is_the_plain_models():
    """use_mmfs=False (the ablation): no MMFS layer anywhere; the LLM is plain LLaMA, the decoder the plain U-Net,
    and a training step still runs and trains."""
    model = micro(use_mmfs=False)
    assert not any(isinstance(m, (GatedMMFS, MMFS)) for m in model.llm.modules()) and len(model.image_decoder.taps) == 0
    tok = model.tok
    batch = pack(model, tok, [["a red circle", images(1)[0], "moves", images(1, 1)[0]]])
    emb, maps = model.visual_tokenizer(batch["images"])
    plain = LLaMA(LLaMAConfig(**model.cfg.llm)).eval()
    plain.load_state_dict(model.llm.state_dict())
    x = model.embed(batch["tokens"], emb)
    xt, t, cond = torch.randn(1, 3, 16, 16), torch.tensor([10]), torch.randn(1, 4, 32)
    dv, dshapes = flatten_maps(maps)
    ctx = model.image_decoder.context(dv, dshapes, torch.tensor([0]))
    with torch.no_grad():
        assert torch.equal(model.llm(embeds=x), plain(embeds=x))
        assert torch.equal(model.image_decoder.denoise(xt, t, cond, ctx), model.image_decoder.unet(xt, t, cond))
    out = model.train()(batch)
    out["loss"].backward()
    assert out["n_images"] == 2 and model.image_decoder.unet.conv_in.weight.grad.abs().sum() > 0


def test_visibility_in_packed_sequences():
    model = micro(live=True)
    tok = model.tok
    n = model.cfg.n_image_tokens
    batch = pack(model, tok, [["one", images(1, 1)[0], "two", images(1, 2)[0], "three"],
                              ["four", images(1, 3)[0], "five"]])
    toks = batch["tokens"]
    lay = model.layout(toks)
    p0, p1, p2 = lay.pos.tolist()

    def hidden(imgs=None, maps_fn=None):
        emb, maps = model.visual_tokenizer(batch["images"] if imgs is None else imgs)
        values, shapes = flatten_maps(maps[1:])
        if maps_fn is not None:
            values = maps_fn(values)
        ctx = model.visual_context(lay, values, shapes, 1)
        with torch.no_grad():
            return model.llm.forward_hidden(embeds=model.embed(toks, emb), ctx=ctx)[0]

    base = hidden()
    # a later image (pixels, so embeddings and maps) changes nothing before its first <|image|> token
    changed = batch["images"].clone()
    changed[1] = torch.rand(3, 16, 16)
    h = hidden(changed)
    assert torch.equal(h[:p1 + 1], base[:p1 + 1]) and not torch.allclose(h[p1 + 1:], base[p1 + 1:])
    # BoI's output does not depend on its own image
    changed = batch["images"].clone()
    changed[2] = torch.rand(3, 16, 16)
    assert torch.equal(hidden(changed)[p2], base[p2])

    # MMFS of document 1's image 0 is read by document 1's later tokens only, never by document 2. (Self-attention
    # is causal without a document mask, as official, so later layers may mix documents: watch the first MMFS.)
    seen = []
    hook = model.llm.layers[0].inserted.register_forward_hook(lambda m, inp, out: seen.append(out - inp[0]))

    def bump(v):
        v = v.clone()
        v[0] += 1.0
        return v
    hidden(), hidden(maps_fn=bump)
    hook.remove()
    base, h = seen[0][0], seen[-1][0]  # (T, D) what layer 0's MMFS adds, without and with the change
    doc2 = int((toks[0] == tok.bos_id).nonzero()[1])  # where document 2 starts
    assert torch.equal(h[:p0 + 1], base[:p0 + 1]) and torch.equal(h[doc2:], base[doc2:])
    assert not torch.allclose(h[p0 + 1:doc2], base[p0 + 1:doc2])


def test_generation_cache_equals_recompute_and_interleaves():
    model = micro(live=True)
    tok = model.tok
    prompt = [images(1, 5)[0], "a blue square", images(1, 6)[0], "then"]
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(0)
        runs.append(generate.generate(model, prompt, max_new_tokens=6, begin_image=True, temperature=0, steps=3,
                                      guidance=2.0, generator=g, use_cache=use_cache))
    a, b = runs
    assert isinstance(a[0], torch.Tensor) and a[0].shape == (3, 16, 16) and isinstance(a[-1], str) and a[-1]
    assert [type(x) for x in a] == [type(x) for x in b]
    for x, y in zip(a, b):
        if isinstance(x, str):
            assert x == y
        else:
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    text_only = generate.generate(model, ["hello"], max_new_tokens=5, max_images=0, temperature=0)
    assert all(isinstance(x, str) for x in text_only)
    t2i = generate.generate(model, ["a red circle"], max_new_tokens=2, max_images=1, begin_image=True, steps=2)
    assert isinstance(t2i[0], torch.Tensor) and t2i[0].shape == (3, 16, 16)


def test_generation_projects_each_image_once_per_mmfs_layer():
    # With the cache, an LLM MMFS layer norms + projects an image once, when it enters the context, and reuses it
    # for every later token; the recompute path projects all images at every call. Same logits either way.
    model = micro(live=True, **{"llm.n_layers": 3, "mmfs.every": 2})  # MMFS in layers 0 and 2
    tok = model.tok
    layers = [b.inserted for b in model.llm.layers if b.inserted is not None]
    calls = {}
    hooks = [g.mmfs.value_proj.register_forward_hook(lambda mod, a, out, i=i: calls.update({i: calls.get(i, 0) + 1}))
             for i, g in enumerate(layers)]
    ids, imgs = tokenize_document([images(1, 1)[0], "a red", images(1, 2)[0], "then"], tok, model.cfg.n_image_tokens,
                                  eos=False)
    new = [ord(c) for c in "xyz"]                                # three decode steps
    sessions, logits = {}, {}
    for use_cache in (True, False):
        calls.clear()
        s = sessions[use_cache] = generate.Session(model, use_cache, 256)
        for img in imgs:
            s.add_image(img)
        logits[use_cache] = [s.feed(ids)] + [s.feed([t]) for t in new]
        boi = s.feed([model.cfg.boi_id])                         # a BoI whose image is not drawn yet
        s.add_image(images(1, 3)[0])                             # ... now it is: the cache grows by one image
        logits[use_cache] += [boi, s.feed([model.cfg.image_id] * model.cfg.n_image_tokens), s.feed([new[0]])]
        feeds = 1 + len(new) + 3
        assert calls == ({0: 3, 1: 3} if use_cache else {0: feeds, 1: feeds}), (use_cache, calls)
    for h in hooks:
        h.remove()
    assert len(layers) == 2 and sessions[True].projected[layers[0]].shape[0] == 3
    for a, b in zip(logits[True], logits[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Image sampling: each U-Net MMFS projects the previous image once for all denoising steps (both CFG branches).
    calls.clear()
    hooks = [m.value_proj.register_forward_hook(lambda mod, a, out, i=i: calls.update({i: calls.get(i, 0) + 1}))
             for i, m in enumerate(tap.mmfs for tap in model.image_decoder.taps)]
    sessions[True].feed([model.cfg.boi_id])
    sessions[True].draw(steps=3, sampler="ddim", guidance=2.0, generator=None)
    for h in hooks:
        h.remove()
    assert calls == {i: 1 for i in range(len(model.image_decoder.taps))}


def test_overfit_one_batch_both_losses():
    """30 AdamW steps on one caption-then-image document (~20 s on a busy 2-core CPU)."""
    import world
    model = micro(seed=1)
    tok = model.tok
    doc = world.synthetic_document(random.Random(0), "t2i", size=16)
    ids, imgs = tokenize_document(doc, tok, model.cfg.n_image_tokens)
    batch = dict(tokens=torch.tensor([ids]), images=torch.stack(imgs))

    def evaluate():  # eval mode and fixed draws of noise / timesteps: a deterministic image loss, the mean of 8
        model.eval()  # (one draw is a single timestep, too noisy to measure learning by)
        outs = []
        for seed in range(8):
            torch.manual_seed(seed)
            with torch.no_grad():
                outs.append(model(batch))
        model.train()
        return float(outs[0]["text_loss"]), sum(float(o["image_loss"]) for o in outs) / len(outs)

    text0, image0 = evaluate()
    opt = torch.optim.AdamW(model.param_groups(0.0, lr=3e-3, lr_unet=3e-3, lr_offsets=3e-4))
    for step in range(30):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    text1, image1 = evaluate()
    assert text1 < 0.4 * text0 and image1 < 0.5 * image0, (text0, text1, image0, image1)


def test_save_load_round_trip(tmp_path):
    model = micro(live=True)
    tok = model.tok
    batch = pack(model, tok, [["hello", images(1)[0], "world", images(1, 1)[0]]])
    save(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load(tmp_path / "ckpt").eval()
    outs = []
    for m in (model, loaded):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(m(batch))
    for k in ("loss", "text_loss", "image_loss"):
        assert torch.equal(outs[0][k], outs[1][k])


def test_param_groups_and_freezing():
    model = micro()
    groups = model.param_groups(0.05, lr=1e-4, lr_unet=1e-5, lr_offsets=1e-5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert "head_bias" not in {n for n, p in model.named_parameters() if id(p) in by_param}  # frozen, as official
    layer_norms = {n + "." + k for n, m in model.named_modules() if type(m) is torch.nn.LayerNorm
                   for k, _ in m.named_parameters()}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = by_param[id(p)]
        if "sampling_offsets" in name:
            assert g["lr"] == 1e-5 and g["weight_decay"] == 0.0
        elif name.startswith("image_decoder.unet."):
            assert g["lr"] == 1e-5
        else:
            assert g["lr"] == 1e-4
        # official: no decay on biases, nn.LayerNorm, gates, offsets; RMSNorm / GroupNorm / the SPM's own LayerNorm
        # class, gammas, the BoI vector and embeddings are decayed
        no_decay = name.endswith(("bias", ".gate")) or name in layer_norms or "sampling_offsets" in name
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    decayed = {n for n, p in model.named_parameters() if p.requires_grad and by_param[id(p)]["weight_decay"]}
    assert {"boi", "llm.layers.0.norm1.weight", "visual_tokenizer.adapter.interactions.0.injector.gamma",
            "visual_tokenizer.adapter.spm.stem.0.1.weight", "image_decoder.unet.conv_norm_out.weight",
            "llm.layers.0.inserted.norm_q.weight"} <= decayed
    frozen = micro(freeze_vit=True, freeze_llm=True)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert not any(n.startswith("visual_tokenizer.adapter.vit.") for n in trainable)
    assert all(".inserted." in n for n in trainable if n.startswith("llm."))
    assert {"boi", "new_head.bias", "image_decoder.unet.conv_in.weight"} <= trainable


def test_grad_checkpointing_same_gradients():
    grads = []
    for on in (False, True):
        model = micro(seed=2, live=True)
        model.set_grad_checkpointing(on)
        tok = model.tok
        batch = pack(model, tok, [["hi", images(1)[0], "there", images(1, 1)[0]]])
        torch.manual_seed(0)
        model(batch)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def official_param_counts(taps):
    """The authors' MMInterleaved (release configuration) per component, counted here from their module definitions
    (transformers' CLIP / LLaMA / BLIP-2 Q-Former, their ViT-Adapter, MMFS and MMFSNet), not from mmi's modules:
    {component: (parameters, of which mmi has no counterpart: constant tables, never-read rows)}."""
    lin = lambda i, o: i * o + o  # noqa: E731
    ln = lambda d: 2 * d  # noqa: E731
    Dv, Fv, Lv, g = 1024, 4096, 24, 16                       # CLIP ViT-L/14 at 224 px
    D, V, F, L = 5120, 32000, 13824, 40                      # Vicuna-13B
    C, M, P = 1024, 16, 8                                    # U-Net context width; MMFS heads and points
    vit = Dv + 3 * 14 * 14 * Dv + (g * g + 1) * Dv + ln(Dv) + Lv * (4 * lin(Dv, Dv) + 2 * ln(Dv) + lin(Dv, Fv)
                                                                   + lin(Fv, Dv))

    def msda(levels, points=4, heads=16):  # MSDeformAttn(d_model=Dv, ratio 0.5)
        return lin(Dv, heads * levels * points * 2) + lin(Dv, heads * levels * points) + lin(Dv, Dv // 2) + \
            lin(Dv // 2, Dv)
    h, c = Dv // 4, 64
    extractor = 2 * ln(Dv) + msda(1) + ln(Dv) + lin(Dv, h) + 9 * h + h + lin(h, Dv)
    injector = 2 * ln(Dv) + msda(3) + Dv
    spm = 27 * c + 2 * 9 * c * c + 3 * ln(c) + 9 * c * 2 * c + ln(2 * c) + 9 * 2 * c * 4 * c + 9 * 16 * c * c + \
        2 * ln(4 * c) + lin(c, Dv) + lin(2 * c, Dv) + 2 * lin(4 * c, Dv)
    adapter = 3 * Dv + spm + 4 * (injector + extractor) + 2 * extractor + 4 * Dv * Dv + Dv

    def qformer(hid, layers, heads, ffn, enc, cross_every, qk, queries):
        n = queries * hid + ln(hid)
        for i in range(layers):
            norms = 2 * ln(hid // heads) if qk else 0
            n += 4 * lin(hid, hid) + norms + ln(hid) + lin(hid, ffn) + lin(ffn, hid) + ln(hid)
            if i % cross_every == 0:
                n += 2 * lin(hid, hid) + 2 * lin(enc, hid) + norms + ln(hid)
        return n
    table = (g * g + 1) * Dv                                 # visual_tokenizer.pos_embed
    resampler = lin(Dv, Dv) + 2 * ln(Dv) + qformer(768, 12, 12, 3072, Dv, 2, True, 64) + lin(768, D) + table
    mmfs_llm = 1 + D + Dv + lin(D, M * P * 2) + Dv + lin(D, D) + lin(D, M * 3 * (P + 1)) + lin(Dv, Dv) + \
        lin(Dv, D) + 50 * D
    n_mmfs = len(range(0, L, 4))

    def tap(ch):  # MMFSBlock: norms, MMFS (1024 wide, 4 levels, 10 image rows), 64x64 table, 1x1 conv
        return ln(ch) + ln(Dv) + lin(ch, M * P * 2) + 1024 + lin(ch, ch) + lin(ch, M * 4 * (P + 1)) + \
            lin(Dv, 1024) + lin(1024, ch) + 10 * ch + 64 * 64 * ch + lin(ch, ch)

    def tap_extra(ch):  # its ignore_token, table, image-index rows 2.. and null-slot logit rows
        return 1024 + 64 * 64 * ch + 8 * ch + M * 4 * (ch + 1)
    return dict(vit=(vit, 0), adapter=(adapter, 0), resampler=(resampler, table),
                llm=((V + 2) * D + L * (4 * D * D + 3 * D * F + 2 * D) + D, 2 * D),   # BoI, <|image|> rows
                llm_mmfs=(n_mmfs * mmfs_llm, n_mmfs * (Dv + M * 3 * (D + 1))),
                text_head=((V + 2) * D + (V + 2) + lin(D, 2), 2 * D),                  # 2 zero rows: folded
                boi=(D, 0), decoder_context=(lin(D, D) + qformer(C, 1, 16, 3072, D, 1, False, 77) + 77 * C, 0),
                unet=(865_910_724, 0),                                                 # SD 2.1 (diffusers)
                unet_mmfs=(sum(tap(ch) for ch, _ in taps), sum(tap_extra(ch) for ch, _ in taps)),
                vae=(83_653_863, 0))


def test_official_preset_on_meta_device():
    with torch.device("meta"):
        model = MMI(MMIConfig.from_name("official"))
    assert all(p.is_meta for p in model.parameters())
    counts = model.param_counts()
    official = official_param_counts(model.image_decoder.unet.taps)
    assert counts.keys() == official.keys()
    for k, (total, trainable) in counts.items():
        assert total == official[k][0] - official[k][1], (k, total, official[k])  # exactly, component by component
        # frozen as in the paper: ViT, LLaMA, VAE, and the LM head but its trainable two-row part
        assert trainable == (0 if k in ("vit", "llm", "vae") else 2 * 5120 + 2 if k == "text_head" else total), k
    named = sum(p.numel() for n, p in model.named_parameters() if ".post_layernorm." not in n)
    assert sum(t for t, _ in counts.values()) == named  # every parameter in exactly one component


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """Tiny random CLIP / LLaMA (with the real LLaMA tokenizer.model) / SD 2 folders in the official layouts."""
    import diffusers
    import transformers
    import json
    import shutil
    from pathlib import Path
    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    v = {k: MICRO["vision"][k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "patch_size", "image_size")}
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**v)).save_pretrained(root / "clip")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-6))
    llama.save_pretrained(root / "llm")
    shutil.copy(Path(__file__).parent / "fixtures" / "llama" / "tokenizer.model", root / "llm" / "tokenizer.model")
    u = {k: tuple(x) if isinstance(x, list) else x for k, x in MICRO["unet"].items()}
    u.update(in_channels=4, out_channels=4, sample_size=2)
    diffusers.UNet2DConditionModel(**u, use_linear_projection=True).save_pretrained(root / "sd" / "unet")
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                            latent_channels=4, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(root / "sd" / "vae")
    (root / "sd" / "scheduler").mkdir()
    (root / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False, clip_sample=False)))
    return root


def test_from_components_freezing_and_partial_save(components, tmp_path):
    from safetensors import safe_open
    skip = ("vision", "llm", "unet", "vae", "schedule", "tokenizer", "pad_id", "freeze_vit", "freeze_llm", "lr",
            "lr_unet", "lr_offsets")
    kw = {k: v for k, v in MICRO.items() if k not in skip}
    model = build_model("official", clip=components / "clip", llm=components / "llm", sd=components / "sd", **kw).eval()
    dec = model.image_decoder
    assert model.cfg.schedule["prediction_type"] == "epsilon" and dec.vae is not None and dec.latent == 2
    counts = model.param_counts()
    assert counts["vit"][1] == counts["llm"][1] == counts["vae"][1] == 0 and counts["unet"][1] == counts["unet"][0]
    tok = model.tok
    assert (tok.pad_id, tok.token_id("<|beginofimage|>"), tok.token_id("<|image|>")) == (31999, 32000, 32001)
    batch = pack(model, tok, [["a cat", images(1)[0], "and a dog", images(1, 1)[0]]])
    save(model, tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert not any(k.startswith(("visual_tokenizer.adapter.vit.", "image_decoder.vae.")) for k in saved)
    assert all(".inserted." in k for k in saved if k.startswith("llm."))
    assert {"image_decoder.unet.conv_in.weight", "visual_tokenizer.adapter.level_embed", "boi"} <= saved
    loaded = load(tmp_path / "ckpt").eval()
    outs = []
    for m in (model, loaded):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(m(batch)["loss"])
    assert torch.equal(outs[0], outs[1])
    # the frozen LLM in int8 (train.py --quantize=int8): a step trains MMFS; a save stores the same keys as before
    quantize_int8(model.llm)
    model.train()(batch)["loss"].backward()
    assert model.llm.layers[0].inserted.mmfs.value_proj.weight.grad is not None
    save(model, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == saved


@pytest.mark.parametrize("layers, heads, kv_heads, every", [(20, 4, 2, 2), (7, 4, 1, 1), (32, 2, 2, 3)])
def test_any_llama_family_llm_assembles(components, tmp_path, layers, heads, kv_heads, every):
    """The LLM's sizes come from its folder (depth, width, heads, grouped-query heads, vocabulary) and MMFS sits at
    the paper's relative depths (every 4th of 40 layers: every round(layers / 10)-th); a training step runs."""
    import shutil
    import transformers
    from checkpoints import mmfs_every
    llm = tmp_path / "llm"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=128, rms_norm_eps=1e-5)).save_pretrained(llm)
    shutil.copy(components / "llm" / "tokenizer.model", llm / "tokenizer.model")
    kw = {k: v for k, v in MICRO.items() if k.startswith(("resampler.", "decoder.")) or k == "n_image_tokens"}
    model = build_model("official", clip=components / "clip", llm=llm, sd=components / "sd", **kw)
    c = model.llm.cfg
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.vocab_size) == (layers, 32, heads, kv_heads, 32000)
    assert mmfs_every(layers) == every == model.cfg.mmfs.every and mmfs_every(40) == 4
    placed = [i for i, b in enumerate(model.llm.layers) if isinstance(b.inserted, GatedMMFS)]
    assert placed == list(range(0, layers, every))
    batch = pack(model, model.tok, [["a cat", images(1)[0], "and a dog", images(1, 1)[0]]])
    out = model.train()(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["n_images"] == 2
    assert all(b.inserted.gate.grad is not None for b in model.llm.layers if b.inserted is not None)


def test_generation_stops_at_stop_string():
    model = micro(live=True)
    full = generate.generate(model, ["hello"], max_new_tokens=12, max_images=0, temperature=0)[0]
    stop = full[3:5]
    cut = generate.generate(model, ["hello"], max_new_tokens=12, max_images=0, temperature=0, stop_at=stop)[0]
    assert full.startswith(cut) and stop in cut and stop not in cut[:-1]  # stops at the token that completes it


def test_generation_stop_string_lets_a_picture_follow(monkeypatch):
    """stop_at ends the text unless the very next token is BoI: a story's sentence still gets its picture."""
    model = micro(live=True)
    tok, boi = model.tok, model.cfg.boi_id
    a, dot = tok.encode("a", bos=False), tok.encode(".", bos=False)
    script = iter([*a, *dot, boi, *a, *dot, boi, *a, *dot, *a])  # what the "model" samples, in order
    monkeypatch.setattr(generate, "sample_next", lambda *args: torch.tensor([next(script)]))
    out = generate.generate(model, ["hello"], max_images=1, stop_at=".", steps=1)
    assert [x if isinstance(x, str) else "image" for x in out] == ["a.", "image", "a."]  # 2nd BoI: max_images
    script = iter([*a, *dot, *a, *dot, boi])
    out = generate.generate(model, ["hello"], max_images=1, stop_at=".", steps=1)
    assert out == ["a."]  # not BoI after the stop: the text ends there


def test_generation_min_length_holds_back_eos():
    model = micro(live=True)
    with torch.no_grad():
        model.head_bias[model.tok.eos_id] = 1e4  # a model that always wants to stop
    assert generate.generate(model, ["hello"], max_new_tokens=9, max_images=0) == []
    text = generate.generate(model, ["hello"], max_new_tokens=9, max_images=0, min_length=6)
    five = generate.generate(model, ["hello"], max_new_tokens=5, max_images=0, min_length=6)  # cut at 5 tokens
    assert text == five and text[0]  # official: </s> and BoI barred for the first 5 tokens, then it stops
