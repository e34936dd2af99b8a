"""The image tokenizer's warm start (captioner.py): it trains the image tokens to carry the caption and touches
nothing else; its held-out score is exact-match of greedy captions."""
import random

import torch

import captioner
import checkpoints
import world

SMALL = {"n_image_tokens": 4, "llm.n_layers": 2, "llm.dim": 64, "llm.hidden_dim": 128}


def test_warm_start_trains_the_image_tokens_and_nothing_else():
    torch.manual_seed(0)
    model = checkpoints.build_model(**SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scenes = [world.random_scene(random.Random(i)) for i in range(8)]
    torch.manual_seed(1)
    first = captioner.caption_loss(model, captioner.throwaway_decoder(model), scenes).item()
    loss, exact = captioner.warm_start(model, steps=40, batch=8, eval_n=2)
    assert loss < 0.75 * first  # 6.3 nats (about a uniform guess over 440 pieces) -> 3.7 in 40 steps
    assert 0 <= exact <= 1
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("visual_tokenizer.") for k in changed)
    assert any(k.startswith("visual_tokenizer.resampler.") for k in changed)
    assert any(k.startswith("visual_tokenizer.adapter.vit.") for k in changed)


class ScriptedDecoder(torch.nn.Module):
    """Writes each row's script, one piece per call of lm_head (what a decoder would write greedily)."""

    def __init__(self, scripts, vocab, dim):
        super().__init__()
        self.scripts, self.vocab, self.dim, self.t = scripts, vocab, dim, 0

    def embed(self, ids):
        return torch.zeros(*ids.shape, self.dim)

    def forward_hidden(self, embeds):
        return embeds

    def lm_head(self, h):
        ids = [s[self.t] if self.t < len(s) else s[-1] for s in self.scripts]
        self.t += 1
        return torch.nn.functional.one_hot(torch.tensor(ids), self.vocab).float()


def test_caption_exact_grades_each_caption_up_to_its_full_stop():
    model = checkpoints.build_model(**SMALL)
    tok, rng = model.tok, random.Random(0)
    scenes = [world.random_scene(rng, "eval") for _ in range(4)]
    right = [tok.encode(world.caption(s) + " question:", bos=False, eos=False) for s in scenes]  # goes on: cut at "."
    wrong = tok.encode(world.caption(scenes[0]), bos=False, eos=False)  # scene 0's caption for scene 3
    decoder = ScriptedDecoder(right[:3] + [wrong], model.llm.cfg.vocab_size, model.llm.cfg.dim)
    assert captioner.caption_exact(model, decoder, scenes, max_len=max(map(len, right))) == 0.75
