"""All inference of MM-Interleaved: the interleaved generation loop (official "Interleaved generation loop": sample
text with the KV cache; at BoI draw an image with the decoder, re-encode it with the vision tower, put it in context,
go on) and guided image sampling. `Session` holds one generation's tokens, image features, cache and states.

    items = generate(model, ["a red circle in the centre.", ], begin_image=True)   # [str | image [3, H, W] in [0, 1]]
"""
import time

import torch

from data import tokenize_document
from llm import sample_next
from mmi import MMI, VisualContext, document_ids, flatten_maps, sees

# The sampling settings of the demo, of train.py's evaluation and of generate()'s defaults: greedy text (answers
# are exact), DDIM 25 steps, guidance 2. OFFICIAL_SAMPLING: the authors' demo (generate(..., **OFFICIAL_SAMPLING)).
# min_length: </s> and BoI are not sampled before that many tokens of a text call; the repetition penalty covers the
# ids of the current text call only (as the authors').
SAMPLING = dict(temperature=0.0, top_k=None, top_p=0.9, repetition_penalty=1.0, min_length=0, sampler="ddim",
                steps=25, guidance=2.0)
OFFICIAL_SAMPLING = dict(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.3, min_length=8,
                         sampler="ddpm", steps=30, guidance=7.5)


@torch.no_grad()
def generate(model: MMI, prompt, max_new_tokens=90, max_images=4, begin_image=False, generator=None, use_cache=True,
             max_len=None, timings=None, stop_at=None, **sampling):
    """One interleaved loop continuing `prompt` (a list of str / PIL / [3,H,W] tensors): sample text with the KV
    cache; when BoI comes (or at once with begin_image=True), draw an image with the decoder, re-encode it with the
    vision tower (through 8 bits, as a saved picture: official), put it in context and go on; stop at </s>, after
    max_new_tokens tokens of one text call (the text between two images; official 90), at max_images images
    (max_images=0: text only, BoI stops), or once the text since the last image contains `stop_at` (e.g. "." ends an
    answer with its sentence) unless the very next token is BoI (a story's sentence gets its picture).
    sampling: SAMPLING's keys (temperature 0 = greedy).
    timings: a dict that receives "image_s", the seconds spent drawing images.
    Returns the generated items: str and image tensors [3, H, W] in [0, 1]."""
    opts = sampling_options(sampling)
    tok, cfg = model.tok, model.cfg
    s, logits = start(model, prompt, use_cache, max_len or model.llm.cfg.max_seq_len, begin_image)
    out, text, n_img, ended = [], [], 0, False  # ended: the text holds stop_at; only a BoI may follow
    while True:
        if begin_image and not out and not text:
            nxt = cfg.boi_id
        else:
            logits[[cfg.image_id, tok.pad_id, tok.bos_id]] = float("-inf")  # never sampled
            if len(text) < opts["min_length"] - 1:
                logits[[tok.eos_id, cfg.boi_id]] = float("-inf")
            penalised = opts["repetition_penalty"] != 1.0 and text
            prev = torch.tensor(text, device=logits.device)[None] if penalised else None
            nxt = int(sample_next(logits[None], opts["temperature"], opts["top_k"], opts["top_p"],
                                  opts["repetition_penalty"], prev, generator))
        if nxt == tok.eos_id or (ended and nxt != cfg.boi_id):
            break
        if nxt == cfg.boi_id:
            full = len(s.tokens) + 2 + cfg.n_image_tokens > s.max_len or len(s.embeds) >= cfg.max_images
            if n_img >= max_images or full:
                break
            if text:
                out.append(tok.decode(text))
                text = []
            s.feed([nxt])
            t0 = time.time()
            img = s.draw(opts["steps"], opts["sampler"], opts["guidance"], generator)
            if timings is not None:
                timings["image_s"] = timings.get("image_s", 0.0) + time.time() - t0
            out.append(img)
            n_img, ended = n_img + 1, False
            s.add_image(as_8bit(img))
            logits = s.feed([cfg.image_id] * cfg.n_image_tokens)
            continue
        text.append(nxt)
        if len(text) >= max_new_tokens or len(s.tokens) + 1 > s.max_len:
            break
        ended = bool(stop_at) and stop_at in tok.decode(text)
        logits = s.feed([nxt])
    if text:
        out.append(tok.decode(text))
    return out


@torch.no_grad()
def draw_image(model: MMI, context, generator=None, use_cache=True, **sampling):
    """The picture that follows `context` (a list of str / PIL / [3, H, W] tensors): its BoI is fed and the decoder
    draws it; nothing is generated after it. sampling: SAMPLING's keys. -> image [3, H, W] in [0, 1]."""
    opts = sampling_options(sampling)
    s, _ = start(model, context, use_cache, model.llm.cfg.max_seq_len, begin_image=True)
    s.feed([model.cfg.boi_id])
    return s.draw(opts["steps"], opts["sampler"], opts["guidance"], generator)


def sampling_options(sampling):
    unknown = sampling.keys() - SAMPLING.keys()
    if unknown:
        raise TypeError(f"unknown sampling options {sorted(unknown)}; known: {sorted(SAMPLING)}")
    return {**SAMPLING, **sampling}


def start(model: MMI, prompt, use_cache, max_len, begin_image):
    """A Session with the prompt fed (checked against the model's limits first) -> (session, last logits)."""
    ids, images = tokenize_document(prompt, model.tok, model.cfg.n_image_tokens, eos=False)
    check_fits(model, len(ids) + 1, len(images) + begin_image, max_len)  # + the first new token (or image)
    s = Session(model, use_cache, max_len)
    for img in images:
        s.add_image(img)
    return s, s.feed(ids)


def check_fits(model: MMI, n_tokens, n_images, max_len=None, what="the prompt"):
    """ValueError (one line) unless n_tokens positions (an image counts BoI + its n_image_tokens slots) and n_images
    images fit what the model can hold: its context (the LLM's max_seq_len, or max_len) and the images one token may
    look back at through MMFS (cfg.max_images: the size of its image-index table)."""
    max_len = max_len or model.llm.cfg.max_seq_len
    if n_tokens > max_len:
        raise ValueError(f"{what} needs {n_tokens} positions (each image {model.cfg.n_image_tokens + 1}); "
                         f"the model's context holds {max_len}")
    if n_images > model.cfg.max_images:
        raise ValueError(f"{what} has {n_images} images; the model sees at most {model.cfg.max_images} per document")


def as_8bit(img):
    """A drawn image [3, H, W] in [0, 1] as the 8-bit picture it is saved as: what goes back into the context."""
    return (img * 255).round() / 255


class Session:
    """State of one interleaved generation (batch 1): tokens, image features, KV cache, final hidden states.
    With the cache (use_cache), a decoded token costs the same whatever the length so far: only the new positions are
    embedded and get a visibility row (from the document and BoI positions kept here, not a layout of the sequence),
    and each LLM MMFS layer keeps its projected values: an image is normed and projected once per layer when it
    enters the context (add_image), not again for every token decoded after it. Without the cache everything is
    recomputed: the reference the cache is tested against."""

    def __init__(self, model: MMI, use_cache, max_len):
        self.m, self.max_len, self.device = model, max_len, next(model.parameters()).device
        self.tokens, self.embeds, self.llm_values, self.dec_values, self.hidden = [], [], [], [], []
        self.llm_shapes = self.dec_shapes = None  # the (H, W) of the levels in llm_values / dec_values (every image's)
        self.doc_ids, self.bois = [], []  # document of each position; (position, document) of each BoI
        self.slots_fed = 0                # <|image|> positions fed so far
        self.cache = model.llm.new_cache(1, max_len) if use_cache else None
        self.projected = {}  # GatedMMFS -> (n_images, S, heads*head_dim), only with the cache

    def add_image(self, img01):
        emb, maps = self.m.visual_tokenizer(img01[None].to(self.device))
        self.embeds.append(emb)
        values, self.llm_shapes = flatten_maps(maps[1:])  # the LLM's MMFS reads levels 2-4
        dec_values, self.dec_shapes = flatten_maps(maps)    # the decoder's, all four
        self.llm_values.append(values)
        self.dec_values.append(dec_values)
        if self.cache is not None:  # extend every layer's projected values by the new image
            for layer in (b.inserted for b in self.m.llm.layers if b.inserted is not None):
                p = layer.project_values(values)                                  # (1, S, heads*head_dim)
                self.projected[layer] = torch.cat([self.projected[layer], p]) if layer in self.projected else p

    def feed(self, new):
        """Run the LLM over new tokens (prefill or decode) -> logits of the last one [V + 2]."""
        m, T0, new = self.m, len(self.tokens), list(new)
        self.tokens += new
        last = self.doc_ids[-1] if self.doc_ids else 0  # the new positions' documents, numbered as MMI.layout does
        self.doc_ids += (last + document_ids(torch.tensor(new), m.tok.bos_id)).tolist()
        self.bois += [(t, self.doc_ids[t]) for t, i in enumerate(new, T0) if i == m.cfg.boi_id]
        n_tok = m.cfg.n_image_tokens
        first = 0 if self.cache is None else T0  # the positions this call computes
        k0, self.slots_fed = self.slots_fed // n_tok, self.slots_fed + sum(i == m.cfg.image_id for i in new)
        images = self.embeds[k0 if first else 0:self.slots_fed // n_tok]  # the images whose slots are computed
        x = m.embed(torch.tensor(self.tokens[first:], device=self.device)[None],
                    torch.cat(images) if images else None)                      # (1, T - first, D)
        ctx = self.visual_context(first)
        h = m.llm.forward_hidden(embeds=x, cache=self.cache, ctx=ctx)[:, T0 - first:]
        self.hidden.append(h[0])
        return m.logits(h[0, -1])

    def visual_context(self, first):
        """MMFS context of positions first.. (with the cache: the projected values of add_image). A BoI just fed has
        no image yet: its slot is zeros that no token can see."""
        if not (self.bois and self.llm_values):
            return None
        pos = torch.arange(first, len(self.tokens), device=self.device)
        docs = torch.tensor(self.doc_ids[first:], device=self.device)
        boi_pos, boi_doc = torch.tensor(self.bois, device=self.device).T
        visible = sees(docs[None], pos[None], boi_doc[None], boi_pos[None])  # (1, T - first, n_images): MMI.layout's

        def per_row(x):  # (images so far, S, C) -> (1, n_images, S, C)
            missing = len(self.bois) - x.shape[0]
            return (torch.cat([x, x.new_zeros(missing, *x.shape[1:])]) if missing else x)[None]
        if self.cache is None:
            return VisualContext(per_row(torch.cat(self.llm_values)), self.llm_shapes, visible)
        return VisualContext(None, self.llm_shapes, visible, {layer: per_row(p) for layer, p in self.projected.items()})

    def draw(self, steps, sampler, guidance, generator):
        """Generate the image whose BoI was just fed; MMFS reads the previous image of the document."""
        m = self.m
        h = torch.cat(self.hidden)[None]                                          # (1, T, D)
        (pos, doc), prev = self.bois[-1], [p for p, d in self.bois[:-1] if d == self.bois[-1][1]]
        start = self.doc_ids.index(doc)                                           # the document's first position
        as_tensor = lambda *v: torch.tensor(v, device=self.device)  # noqa: E731
        cond = m.image_decoder.condition(h, as_tensor(0), as_tensor(start), as_tensor(pos))
        if self.dec_values:
            dec, shapes = torch.cat(self.dec_values), self.dec_shapes
        else:  # no image yet: prev is -1, so this placeholder is never read (MMFS then outputs its bias)
            dec, shapes = cond.new_zeros(1, 4, m.visual_tokenizer.vit.cfg.hidden_size), torch.tensor([[1, 1]] * 4)
        prev_index = len(self.bois) - 2 if prev else -1  # images are numbered by their BoI, as in MMI.layout
        ctx = m.image_decoder.context(dec, shapes.to(self.device), as_tensor(prev_index))
        return m.image_decoder.sample(cond, ctx, steps, sampler, guidance, generator)[0]
