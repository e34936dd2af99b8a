"""A warm start of the image tokenizer: the ViT, its adapter and the Perceiver resampler trained as a captioner.

The paper starts from a pretrained CLIP ViT; the tiny world trains its ViT from scratch. Trained jointly from step 0,
the LLM reads the picture through MMFS (its sampling points follow the text: "the next cell") and the resampler's
image tokens stay an average of the picture (cross-attention entropy 2.5 of a uniform 2.8 nats in the shipped model of
the previous recipe; the cell colours are not linearly readable from its tokens). MMFS weighs its points by the query
alone, so only the image tokens can answer "where is the red shape?" (find by content), and that model answered it
at chance. Here the image tokens alone must carry the caption: a throwaway 2-layer LLaMA writes it from them, with no
MMFS (tiny-only, a BLIP-2-style first stage; train.py --tokenizer_warm_steps).

    warm_start(model, steps=800)    # AdamW on model.visual_tokenizer and the throwaway decoder
    caption_exact(model, decoder, scenes)
"""
import math
import random

import torch
import torch.nn.functional as F

import world
from llm import LLaMA, LLaMAConfig
from vit import to_tensor01


def throwaway_decoder(model, n_layers=2):
    """A small LLaMA of the model's LLM width and vocabulary, reading image tokens as its first positions."""
    c = model.llm.cfg
    return LLaMA(LLaMAConfig(vocab_size=c.vocab_size, dim=c.dim, n_layers=n_layers, n_heads=c.n_heads,
                             hidden_dim=c.hidden_dim, norm_eps=c.norm_eps, max_seq_len=c.max_seq_len))


def images01(scenes, device):
    return torch.stack([to_tensor01(world.render(s)) for s in scenes]).to(device)


def caption_loss(model, decoder, scenes):
    """Cross-entropy of each scene's caption (and </s>) written by `decoder` after the scene's image tokens."""
    tok, dev = model.tok, model.boi.device
    ids = [tok.encode(world.caption(s), bos=False, eos=True) for s in scenes]
    T = max(map(len, ids))
    text = torch.tensor([i + [tok.pad_id] * (T - len(i)) for i in ids], device=dev)          # (B, T)
    image_tokens = model.visual_tokenizer(images01(scenes, dev))[0]                         # (B, n, D)
    h = decoder.forward_hidden(embeds=torch.cat([image_tokens, decoder.embed(text)], 1))
    n = image_tokens.shape[1]
    logits = decoder.lm_head(h[:, n - 1:-1])  # position n-1+t predicts text[t]
    return F.cross_entropy(logits.flatten(0, 1).float(), text.flatten(), ignore_index=tok.pad_id)


@torch.no_grad()
def caption_exact(model, decoder, scenes, max_len=60):
    """The fraction of scenes whose greedy caption (up to its first ".") is exactly world.caption(scene)."""
    tok = model.tok
    x = model.visual_tokenizer(images01(scenes, model.boi.device))[0]          # (B, n, D), then the text so far
    ids = []
    for _ in range(max_len):
        ids.append(decoder.lm_head(decoder.forward_hidden(embeds=x)[:, -1]).argmax(-1))  # (B,)
        x = torch.cat([x, decoder.embed(ids[-1])[:, None]], 1)
    texts = [tok.decode(i) for i in torch.stack(ids, 1).tolist()]
    return sum(t.split(".")[0].strip() + "." == world.caption(s) for t, s in zip(texts, scenes)) / len(scenes)


def warm_start(model, steps, batch=64, lr=1e-3, seed=0, log=None, eval_n=50):
    """`steps` AdamW steps of caption_loss on random training scenes (warmup 20 steps, cosine to 10%); only the
    image tokenizer (ViT, adapter, resampler) and the throwaway decoder train. Returns (last loss, held-out caption
    exact of eval_n scenes)."""
    model.train()
    with torch.random.fork_rng(devices=[]):  # the decoder's init: seeded, and torch's stream left as it was
        torch.manual_seed(seed)
        decoder = throwaway_decoder(model).to(model.boi.device)
    params = [p for p in model.visual_tokenizer.parameters() if p.requires_grad] + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    rng, loss = random.Random(f"tokenizer-warm:{seed}"), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        loss = caption_loss(model, decoder, [world.random_scene(rng) for _ in range(batch)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if log is not None and ((step + 1) % 100 == 0 or step + 1 == steps):
            log(dict(tokenizer_warm_step=step + 1, caption_loss=loss.item()))
    eval_rng = random.Random(f"tokenizer-warm-eval:{seed}")
    exact = caption_exact(model.eval(), decoder, [world.random_scene(eval_rng, "eval") for _ in range(eval_n)])
    model.train()
    return (None if loss is None else loss.item()), exact
