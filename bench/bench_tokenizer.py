"""Encode speed of our Tokenizer (tiktoken engine and the plain-python engine) against the `sentencepiece` package.

    python bench/bench_tokenizer.py [--repeat=3]

Corpus: the licence texts in /usr/share/common-licenses (English prose), a few Python stdlib modules (code, deep
indentation) and the shared tokenizer cases (multilingual), split into paragraphs. Every paragraph's ids are also
checked against sentencepiece. Prints texts/s and MB/s (UTF-8 bytes) for per-paragraph calls and for one big text.
"""

import os
import sys
import time
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tokenizer as T  # noqa: E402

MODEL = ROOT / "tests" / "fixtures" / "llama" / "tokenizer.model"
repeat = int(next((a.split("=")[1] for a in sys.argv[1:] if a.startswith("--repeat=")), 3))


def corpus():
    import json
    docs = [p.read_text(errors="replace") for p in sorted(Path("/usr/share/common-licenses").glob("*")) if p.is_file()]
    lib = Path(os.__file__).parent
    docs += [(lib / f).read_text() for f in ["os.py", "argparse.py", "typing.py", "dataclasses.py", "textwrap.py"]]
    docs += [c["text"] for c in json.loads((MODEL.parent / "tokenizer_cases.json").read_text())]
    return [p for d in docs for p in d.split("\n\n") if p]


def best(fn):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    t0 = time.perf_counter()
    sum(range(10**7))
    print(f"machine check: sum(range(1e7)) {time.perf_counter() - t0:.2f} s (about 0.15 s on an idle core)")
    texts = corpus()
    big = "\n\n".join(texts)
    mb = len(big.encode()) / 1e6
    t0 = time.perf_counter()
    ours = T.Tokenizer(MODEL)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_py = T.Tokenizer(MODEL, engine="python")
    t_build_py = time.perf_counter() - t0
    sp = spm.SentencePieceProcessor(model_file=str(MODEL))
    ref = [sp.encode(t) for t in texts]
    bad = sum(ours.encode(t, bos=False) != r for t, r in zip(texts, ref))
    bad_py = sum(ours_py.encode(t, bos=False) != r for t, r in zip(texts, ref))
    bad_big = (ours.encode(big, bos=False) != sp.encode(big)) + (ours_py.encode(big, bos=False) != sp.encode(big))
    print(f"corpus: {len(texts)} paragraphs, {mb:.2f} MB, {sum(map(len, ref))} tokens; "
          f"mismatches vs sentencepiece: tiktoken {bad}, python {bad_py}, whole text {bad_big}")
    print(f"build: tiktoken engine {t_build:.2f} s, python engine {t_build_py:.2f} s (first build, then cached)")
    rows = [("sentencepiece", lambda t: sp.encode(t)), ("ours tiktoken", lambda t: ours.encode(t, bos=False)),
            ("ours python", lambda t: ours_py.encode(t, bos=False))]
    base = {}
    for name, enc in rows:
        t_each = best(lambda: [enc(t) for t in texts])
        base.setdefault("each", t_each)
        line = (f"{name:14s} per paragraph {len(texts) / t_each:7.0f} texts/s {mb / t_each:5.2f} MB/s "
                f"(x{base['each'] / t_each:.2f} of sp)")
        if name != "ours python":  # the plain-python BPE takes minutes on the whole corpus as one text
            t_big = best(lambda: enc(big))
            base.setdefault("big", t_big)
            line += f" | one text {mb / t_big:5.2f} MB/s (x{base['big'] / t_big:.2f})"
        print(line)
    # worst case for tiktoken: one long chunk with no space (its BPE is quadratic in the chunk length)
    for n in (1000, 10000, 50000):
        s = "x" + "ab1字" * (n // 4)
        t_sp, t_ours = best(lambda: sp.encode(s)), best(lambda: ours.encode(s))
        assert ours.encode(s, bos=False) == sp.encode(s)
        print(f"one {n}-char word: sentencepiece {t_sp * 1e3:.1f} ms, ours {t_ours * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
