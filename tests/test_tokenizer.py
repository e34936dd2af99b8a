"""Tokenizer proof: ids identical to the `sentencepiece` package (test-only reference) and decode round-trips."""

import json
import pickle
import random
import struct
from pathlib import Path

import pytest

import tokenizer as T

FIXTURES = Path(__file__).parent / "fixtures" / "llama"
MODEL = FIXTURES / "tokenizer.model"

HARD = [
    "", " ", "  ", "   ", "a", " a", "a ", "  a  ", "a  b   c    d", " " * 17 + "x", " " * 40, "x" + " " * 33 + "y",
    "\t", "\ttab\t\tbed\t", "\n", "\n\n\n", "line1\nline2\r\n  indented\n\tend\n", "\r", " \n \n ",
    "0", "12345", "3.14159265358979", "1,000,000 and 2024-11-23 12:34:56", "9" * 60, "x=10**18+7; y=-0.5e-3",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n", "if (a && b) { printf(\"%d\\n\", a); }",
    "<s>", "</s>", "<unk>", "<pad>", "<s>hello</s>", "a <s> b", "<0x41>", "<|image|><image>",
    "镇", "你好，世界！", "日本語のテキストと 한국어 텍스트", "🦙", "🦙Ꙋ", "👍🏽👨‍👩‍👧‍👦 🇫🇷", "😀😃😄",
    "café naïve résumé Ångström Øre ß ÿ", "e\u0301", "\u00a0x\u00a0", "\u2581", "▁▁ ▁x", "a\u2581b",
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم שלום עולם नमस्ते दुनिया",
    "mixed: abc 漢字 123 😀 αβγ ﬁ ｈｅｌｌｏ",
    "\x00\x01\x02\x1b[31mred\x1b[0m\x7f", "a\x00b", "\ufeffBOM", "\ufffd", "\U0010ffff\U000e0001",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "ꙮ" * 10, "A" * 100, "ab" * 50, "🦙 " * 5 + "  🦙",
]


# whitespace runs of every length around 16 (SentencePiece chunks them by 16), before mergeable and unmergeable text
RUNS = [f.replace("{}", " " * n) for n in range(36)
        for f in ["{}x", "a{}镇", "{}1", "a{}\n{}", "\u2581{} 7", "x{}", "\t{}\t"]]


@pytest.fixture(scope="module")
def tok():
    return T.Tokenizer(MODEL)


@pytest.fixture(scope="module")
def tok_py():
    return T.Tokenizer(MODEL, engine="python")


@pytest.fixture(scope="module")
def sp():
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(MODEL))


def random_texts(n, seed=0):
    """Random strings from an alphabet rich in whitespace, digits, vocab and out-of-vocab characters."""
    rng = random.Random(seed)
    alphabet = list(" " * 8 + "\t\n\r" + "▁" + "0123456789" + "abcdefghijklmnopqrstuvwxyzABCXYZ")
    alphabet += list(".,;:!?'\"()[]{}<>/\\#=_-+*")
    alphabet += list("éèüßøçñ你好世界镇日本語한국어ΑβγПривет") + ["🦙", "😀", "Ꙋ", "\x00", "\x07", "\u0301", "ﬁ", "ｈ"]
    words = ["the", " the", "ing", "tion", "hello", " world", "  ", "def", "return", "1234", "    ", "<s>"]
    out = []
    for _ in range(n):
        parts = [rng.choice(words) if rng.random() < 0.3 else rng.choice(alphabet) for _ in range(rng.randint(0, 40))]
        out.append("".join(parts))
    return out


def test_shared_cases(tok, tok_py):
    cases = json.loads((FIXTURES / "tokenizer_cases.json").read_text())
    assert len(cases) > 100
    for c in cases:
        assert tok.encode(c["text"]) == c["ids"], c["text"]
        assert tok_py.encode(c["text"]) == c["ids"], c["text"]


@pytest.mark.parametrize("engine", ["tiktoken", "python"])
def test_parity_with_sentencepiece(engine, tok, tok_py, sp):
    t = tok if engine == "tiktoken" else tok_py
    assert t.engine == engine
    for text in HARD + RUNS + random_texts(400):
        assert t.encode(text, bos=False) == sp.encode(text), repr(text)


def test_decode_parity_and_round_trip(tok, sp):
    for text in HARD + random_texts(400, seed=1):
        ids = tok.encode(text)
        assert tok.decode(ids) == sp.decode(ids[1:]), repr(text)
        if sp.decode(sp.encode(text)) == text:
            assert tok.decode(ids) == text, repr(text)
    # invalid byte sequences: one U+FFFD per bad byte, as sentencepiece; control tokens and <unk> as sentencepiece
    b = tok.byte_ids
    for ids in [[b[0xE4]], [b[0xE4], b[0xB8], 263], [b[0xF0], b[0x9F], b[0xA6]], [b[0xED], b[0xA0], b[0x80]],
                [b[0x20], 263], [29871, 263], [263, 263], [2, 29871, 263], [263, 0, 263]]:
        tok.pad_id = -1  # so <unk> (0) is not dropped as padding
        assert tok.decode(ids) == sp.decode(ids), ids
    tok.pad_id = 0


def test_bos_eos_and_specials(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 32000)
    assert tok.encode("hi", bos=False) == tok.encode("hi")[1:]
    assert tok.encode("hi", bos=True, eos=True) == [1] + tok.encode("hi", bos=False) + [2]
    assert tok.encode("", bos=False) == [] and tok.encode("") == [1]
    assert 1 not in tok.encode("<s>", bos=False) and 2 not in tok.encode("</s>", bos=False)
    assert tok.token_id("<s>") == 1 and tok.id_to_piece(29871) == "\u2581"
    with pytest.raises(KeyError):
        tok.token_id("<not-a-token>")
    for bad in ([32000], [-1], [5, 40000]):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode(bad)


def test_add_special_tokens():
    t = T.Tokenizer(MODEL)  # own instance: adding tokens mutates it
    ids = t.add_special_tokens(["<image>", "<|beginofimage|>"])
    assert ids == [32000, 32001] and t.vocab_size == 32002
    assert t.add_special_tokens(["<image>", "<s>"]) == [32000, 1] and t.vocab_size == 32002
    assert t.token_id("<|beginofimage|>") == 32001 and t.id_to_piece(32001) == "<|beginofimage|>"
    text = "a <image> b <|beginofimage|>"
    assert not set(ids) & set(t.encode(text))
    assert t.decode([1, *t.encode("hi", bos=False), 32000, 32001, 2]) == "hi"
    t.pad_id = 31999
    assert t.decode(t.encode("x") + [31999, 31999]) == "x"
    t2 = pickle.loads(pickle.dumps(t))  # data-loader workers get a copy
    assert (t2.pad_id, t2.vocab_size, t2.encode(" a  b 1")) == (31999, 32002, t.encode(" a  b 1"))


# A tiny protobuf writer (test-only) to derive model files that sentencepiece itself loads as the reference.
def pb_varint(v):
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def pb_field(num, value):  # int -> varint, bytes/str -> length-delimited, float -> fixed32
    if isinstance(value, float):
        return pb_varint(num << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bytes, str)):
        value = value.encode() if isinstance(value, str) else value
        return pb_varint(num << 3 | 2) + pb_varint(len(value)) + value
    return pb_varint(num << 3) + pb_varint(int(value))


def set_normalizer(model_bytes, **flags):
    """The model with NormalizerSpec bool fields replaced."""
    nums = {"add_dummy_prefix": 3, "remove_extra_whitespaces": 4}
    out = b""
    for num, value in T._fields(model_bytes):
        if num == 3:
            value = b"".join(pb_field(n, v) for n, v in T._fields(value) if n not in [nums[k] for k in flags])
            value += b"".join(pb_field(nums[k], v) for k, v in flags.items())
        out += pb_field(num, value)
    return out


def make_model(normal_pieces):
    """A small LLaMA-style BPE model: <unk>, <s>, </s>, 256 byte pieces, then (piece, score) NORMAL pieces."""
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)] + [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    pieces += [(p, float(s), 1) for p, s in normal_pieces]
    out = b"".join(pb_field(1, pb_field(1, p) + pb_field(2, s) + pb_field(3, t)) for p, s, t in pieces)
    trainer = pb_field(3, 2) + pb_field(4, len(pieces)) + pb_field(35, 1) + pb_field(40, 0) + pb_field(41, 1) \
        + pb_field(42, 2)
    normalizer = pb_field(1, "identity") + pb_field(3, 1) + pb_field(4, 0)
    return out + pb_field(2, trainer) + pb_field(3, normalizer)


@pytest.mark.parametrize("flags,engine", [(dict(add_dummy_prefix=False), "tiktoken"),
                                          (dict(remove_extra_whitespaces=True), "python")])  # python: builds faster
def test_normalizer_flags_match_sentencepiece(flags, engine, tmp_path):
    import sentencepiece as spm
    path = tmp_path / "tokenizer.model"
    path.write_bytes(set_normalizer(MODEL.read_bytes(), **flags))
    sp, t = spm.SentencePieceProcessor(model_file=str(path)), T.Tokenizer(path, engine=engine)
    for text in HARD + RUNS + random_texts(100, seed=2):
        ids = t.encode(text, bos=False)
        assert ids == sp.encode(text), repr(text)
        assert t.decode(ids) == sp.decode(ids), repr(text)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        T.Tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        T.Tokenizer(tmp_path)  # a folder without tokenizer.model
    assert T.Tokenizer(FIXTURES).encode("hi") == T.Tokenizer(MODEL).encode("hi")
    data = MODEL.read_bytes()
    for name, content in [("empty.model", b""), ("truncated.model", data[:100_000]), ("junk.model", b"\xff" * 64),
                          ("head.model", data[:1003])]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=name):
            T.Tokenizer(tmp_path / name)


def test_byte_tokenizer():
    t = T.ByteTokenizer()
    assert (t.bos_id, t.eos_id, t.pad_id, t.vocab_size) == (256, 257, 258, 259)
    rng = random.Random(0)
    texts = HARD + ["".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0xD800),
                                            rng.randrange(0xE000, 0x110000)])) for _ in range(50)) for _ in range(50)]
    ids = t.add_special_tokens(["<image>", "<|beginofimage|>"])
    assert ids == [259, 260] and t.vocab_size == 261 and t.add_special_tokens(["<image>"]) == [259]
    assert t.token_id("<image>") == 259 and t.token_id("<s>") == 256 and t.token_id("<0x41>") == 65
    assert t.id_to_piece(260) == "<|beginofimage|>" and t.id_to_piece(65) == "<0x41>"
    for text in texts + ["<s></s><pad><image><|beginofimage|>"]:
        e = t.encode(text, bos=False)
        assert e == list(text.encode("utf-8")), repr(text)  # never a special id from text
        assert t.decode(t.encode(text, eos=True)) == text
    assert t.decode([256, 72, 259, 105, 258, 257]) == "Hi"
    assert t.decode([0xE4, 0xB8]) == "\ufffd\ufffd"
    t2 = pickle.loads(pickle.dumps(t))
    assert t2.vocab_size == 261 and t2.encode("<image>é", bos=False) == list("<image>é".encode())
    with pytest.raises(ValueError, match="out of range"):
        t.decode([261])


CHARS = [("\u2581", -100), ("a", -101), ("b", -102), ("c", -103), ("d", -104), ("é", -105), ("字", -106)]


@pytest.mark.parametrize("case", ["unreachable", "space_inside", "tied_scores"])
def test_small_models_match_sentencepiece(case, tmp_path):
    """Models that break what the tiktoken route relies on: it must drop the piece or fall back, staying exact."""
    import sentencepiece as spm
    normal = {
        # "bc" merges first in "▁abcd", so "▁abcd" (= "▁ab" + "cd" only) is never reached; tiktoken would return it
        # for the chunk "▁abcd" without running the BPE
        "unreachable": [("bc", -1), ("\u2581a", -2), ("cd", -3), ("\u2581ab", -4), ("\u2581abcd", -5),
                        ("\u2581\u2581", -1e9), ("é字", -6), ("\u2581é字", -7)],
        "space_inside": [("a\u2581b", -1), ("\u2581a", -2), ("cd", -3), ("\u2581\u2581", -1e9)],  # -> python engine
        "tied_scores": [("ab", -1), ("bc", -1), ("\u2581a", -2), ("cd", -3)],  # ties: position, not rank -> python
    }[case]
    path = tmp_path / "small.model"
    path.write_bytes(make_model(normal + CHARS))
    sp, t = spm.SentencePieceProcessor(model_file=str(path)), T.Tokenizer(path)
    assert t.engine == ("tiktoken" if case == "unreachable" else "python")
    if case == "unreachable":
        assert t.n_unreachable == 1
    rng = random.Random(0)
    texts = ["abcd", " abcd", "abcdabcd", "a b", "a  b", "é字", " é字x", "Z"] + \
        ["".join(rng.choice("abcd abé字\u2581Z") for _ in range(rng.randint(0, 12))) for _ in range(300)]
    for text in texts:
        assert t.encode(text, bos=False) == sp.encode(text), repr(text)
        assert t.decode(t.encode(text)) == sp.decode(sp.encode(text)), repr(text)


def test_world_tokenizer_of_the_tiny_model():
    """assets/world.model (the tiny preset's tokenizer): the same ids as sentencepiece on world texts and others,
    every word of the synthetic world is one piece, and decode inverts encode."""
    import sys
    import sentencepiece as spm
    assets = Path(__file__).parent.parent / "assets"
    sys.path.insert(0, str(assets))
    from make_world_tokenizer import world_texts
    import world
    ours, spm = T.Tokenizer(assets / "world.model"), spm.SentencePieceProcessor(model_file=str(assets / "world.model"))
    texts = list(world_texts(300, seed=1)) + random_texts(200)
    for text in texts:
        assert ours.encode(text, bos=False) == spm.encode(text), text
        assert ours.decode(ours.encode(text)) == spm.decode(spm.encode(text))
    words = {w for t in texts[:900] for w in t.replace(",", " ").replace(".", " ").replace("?", " ").split()}
    assert {"red", "circle", "centre", "triangle", "disappears"} <= words
    for w in words - {"question:", "answer:"}:
        assert len(ours.encode(w, bos=False)) == 1, w
    assert len(ours.encode(world.caption(world.make_scene({"top left": ("red", "circle")})), bos=False)) == 8
