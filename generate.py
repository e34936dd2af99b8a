"""The interleaved generation loop of MM-Interleaved (official.md, "Interleaved generation loop"): sample text with
the KV cache; at BoI draw an image with the decoder, re-encode it with the vision tower, put it in context, go on.
`MMI.generate` calls `generate` here; `Session` holds one generation's tokens, image features, cache and states."""
import torch

from llm import sample_next
from mmi import MMI, VisualContext


@torch.no_grad()
def generate(model, prompt, tok, max_new_tokens=90, max_images=4, begin_image=False, temperature=1.0, top_k=None,
             top_p=0.9, repetition_penalty=1.3, steps=30, sampler="ddpm", guidance=7.5, generator=None,
             use_cache=True, max_len=None):
    """One interleaved loop (official "Interleaved generation loop"): sample text with the KV cache; when BoI
    comes (or at once with begin_image=True), draw an image with the decoder, re-encode it with the vision
    tower, put it in context and go on; stop at </s>, max_new_tokens text tokens or max_images images
    (max_images=0: text only, BoI stops). prompt: list of str / PIL / [3,H,W] tensors.
    Returns the generated items: str and image tensors [3, H, W] in [0, 1]. temperature 0 = greedy."""
    ids, images = model.encode_document(prompt, tok, eos=False)
    s = Session(model, use_cache, max_len or model.llm.cfg.max_seq_len)
    for img in images:
        s.add_image(img)
    logits = s.feed(ids)
    out, text, n_text, n_img = [], [], 0, 0
    while True:
        if begin_image and not out and not text:
            nxt = model.cfg.boi_id
        else:
            logits[[model.cfg.image_id, tok.pad_id, tok.bos_id]] = float("-inf")  # never sampled
            prev = torch.tensor(s.tokens, device=logits.device)[None]
            nxt = int(sample_next(logits[None], temperature, top_k, top_p, repetition_penalty, prev, generator))
        if nxt == tok.eos_id:
            break
        if nxt == model.cfg.boi_id:
            if n_img >= max_images or len(s.tokens) + 2 + model.cfg.n_image_tokens > s.max_len:
                break
            if text:
                out.append(tok.decode(text))
                text = []
            s.feed([nxt])
            img = s.draw(steps, sampler, guidance, generator)
            out.append(img)
            n_img += 1
            s.add_image(img)
            logits = s.feed([model.cfg.image_id] * model.cfg.n_image_tokens)
            continue
        text.append(nxt)
        n_text += 1
        if n_text >= max_new_tokens or len(s.tokens) + 1 > s.max_len:
            break
        logits = s.feed([nxt])
    if text:
        out.append(tok.decode(text))
    return out


class Session:
    """State of one interleaved generation (batch 1): tokens, image features, KV cache, final hidden states.
    With the cache (use_cache), each LLM MMFS layer also keeps its projected values: an image is normed and projected
    once per layer when it enters the context (add_image), not again for every token decoded after it."""

    def __init__(self, model: MMI, use_cache, max_len):
        self.m, self.max_len, self.device = model, max_len, next(model.parameters()).device
        self.tokens, self.embeds, self.llm_values, self.dec_values, self.hidden = [], [], [], [], []
        self.cache = model.llm.new_cache(1, max_len) if use_cache else None
        self.projected = {}  # GatedMMFS -> (n_images, S, heads*head_dim), only with the cache

    def add_image(self, img01):
        emb, maps = self.m.encode_images(img01[None].to(self.device))
        self.embeds.append(emb)
        values, shapes = self.m.flatten_maps(maps[1:])
        self.llm_values.append((values, shapes))
        self.dec_values.append(self.m.flatten_maps(maps))
        if self.cache is not None:  # extend every layer's projected values by the new image
            for layer in (b.inserted for b in self.m.llm.layers if b.inserted is not None):
                p = layer.project_values(values)                                  # (1, S, heads*head_dim)
                self.projected[layer] = torch.cat([self.projected[layer], p]) if layer in self.projected else p

    def feed(self, new):
        """Run the LLM over new tokens (prefill or decode) -> logits of the last one [V + 2]."""
        m, T0 = self.m, len(self.tokens)
        self.tokens += list(new)
        toks = torch.tensor(self.tokens, device=self.device)[None]
        n_slots = int((toks == m.cfg.image_id).sum()) // m.cfg.n_image_tokens  # images already in the sequence
        emb = torch.cat(self.embeds[:n_slots]) if n_slots else None
        x = m.embed(toks, emb)                                                   # (1, T, D)
        ctx = self.visual_context(m.layout(toks), T0)
        if self.cache is not None:  # only the new positions
            h = m.llm.forward_hidden(embeds=x[:, T0:], cache=self.cache, ctx=ctx)
        else:                       # recompute everything (the reference the cache is tested against)
            h = m.llm.forward_hidden(embeds=x, ctx=ctx)[:, T0:]
        self.hidden.append(h[0])
        return m.logits(h[0, -1])

    def visual_context(self, lay, T0):
        """MMFS context of the positions fed this call: T0 on with the cache (the projected values of add_image),
        all of them without. A BoI just fed has no image yet: its slot is zeros that no token can see."""
        if not (lay["n_max"] and self.llm_values):
            return None

        def per_row(x):  # (n_images, S, C) -> (1, n_max, S, C)
            missing = lay["n_max"] - x.shape[0]
            return (torch.cat([x, x.new_zeros(missing, *x.shape[1:])]) if missing else x)[None]
        shapes = self.llm_values[0][1]
        if self.cache is None:
            return VisualContext(per_row(torch.cat([v for v, _ in self.llm_values])), shapes, lay["visible"])
        projected = {layer: per_row(p) for layer, p in self.projected.items()}
        return VisualContext(None, shapes, lay["visible"][:, T0:], projected)

    def draw(self, steps, sampler, guidance, generator):
        """Generate the image whose BoI was just fed; MMFS reads the previous image of the document."""
        m = self.m
        toks = torch.tensor(self.tokens, device=self.device)[None]
        lay = m.layout(toks)
        h = torch.cat(self.hidden)[None]                                          # (1, T, D)
        i = len(lay["pos"]) - 1                                                   # the image being drawn
        cond = m.condition(h, lay["rows"][i:], lay["start"][i:], lay["pos"][i:])
        if self.dec_values:
            dec, shapes = torch.cat([v for v, _ in self.dec_values]), self.dec_values[0][1]
        else:  # no image yet: prev is -1, so this placeholder is never read (MMFS then outputs its bias)
            dec, shapes = cond.new_zeros(1, 4, m.adapter.vit.cfg.hidden_size), torch.tensor([[1, 1]] * 4)
        values, visible = m.decoder_values(dec, shapes.to(self.device), lay["prev"][i:])
        return m.sample_images(cond, values, visible, steps, sampler, guidance, generator)[0]
