"""Writes assets/world.model: the SentencePiece tokenizer of the tiny model (LLaMA-style BPE, 440 pieces).

    python assets/make_world_tokenizer.py      # needs the `sentencepiece` package (a test-only dependency)

Same kind of model as Vicuna's tokenizer.model (BPE, byte fallback, identity normalisation, <unk>=0 <s>=1 </s>=2),
so the tiny model runs the real tokenizer code path (tokenizer.Tokenizer). Trained on 60k texts of the synthetic
world; 440 pieces make every word of the world one token ("▁red", "▁circle", "▁centre"), and byte fallback still
encodes any other text. A caption is ~30 tokens instead of ~120 bytes, so a row of the LLM holds ~3x more documents.
"""
import random
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import world  # noqa: E402


def world_texts(n, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        scene = world.random_scene(rng)
        q, a = world.qa_pair(rng, scene)
        change = world.random_change(rng, scene)
        yield from [world.caption(scene), f"question: {q} answer: {a}"] + ([change[0]] if change else [])


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(world_texts(20000)))
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(ROOT / "assets" / "world"), model_type="bpe", vocab_size=440,
            byte_fallback=True, normalization_rule_name="identity", character_coverage=1.0, unk_id=0, bos_id=1,
            eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
            minloglevel=2)
    (ROOT / "assets" / "world.vocab").unlink()
    print(f"wrote {ROOT / 'assets' / 'world.model'}")
