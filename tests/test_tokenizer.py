"""Tokenizer proof: ids identical to the `sentencepiece` package (test-only reference) and decode round-trips."""

import json
import random
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


@pytest.fixture(scope="module")
def tok():
    return T.Tokenizer(MODEL)


@pytest.fixture(scope="module")
def tok_py():
    return T.Tokenizer(MODEL, engine="python")


@pytest.fixture(scope="module")
def sp():
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(MODEL))


def random_texts(n, seed=0):
    """Random strings from an alphabet rich in whitespace, digits, vocab and out-of-vocab characters."""
    rng = random.Random(seed)
    alphabet = list(" " * 8 + "\t\n\r" + "▁" + "0123456789" + "abcdefghijklmnopqrstuvwxyzABCXYZ" + ".,;:!?'\"()[]{}<>/\\#=_-+*")
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
    for text in HARD + random_texts(400):
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


def set_normalizer(model_bytes, **flags):
    """Returns the model with NormalizerSpec bool fields replaced (a tiny protobuf writer; test-only)."""
    nums = {"add_dummy_prefix": 3, "remove_extra_whitespaces": 4}

    def varint(v):
        out = bytearray()
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                return bytes(out)

    def field(num, wire, payload):
        key = varint(num << 3 | wire)
        return key + (varint(len(payload)) + payload if wire == 2 else varint(payload))

    out = b""
    for num, value in T._fields(model_bytes):
        if num == 3:
            inner = b"".join(field(n, 0 if isinstance(v, int) else 2, v) for n, v in T._fields(value)
                             if n not in (nums[k] for k in flags))
            value = inner + b"".join(field(nums[k], 0, int(v)) for k, v in flags.items())
        out += field(num, 2, value) if isinstance(value, bytes) else field(num, 0, value)
    return out


@pytest.mark.parametrize("flags", [dict(add_dummy_prefix=False), dict(remove_extra_whitespaces=True)])
def test_normalizer_flags_match_sentencepiece(flags, tmp_path):
    spm = pytest.importorskip("sentencepiece")
    path = tmp_path / "tokenizer.model"
    path.write_bytes(set_normalizer(MODEL.read_bytes(), **flags))
    sp, t = spm.SentencePieceProcessor(model_file=str(path)), T.Tokenizer(path)
    for text in HARD + random_texts(100, seed=2):
        ids = t.encode(text, bos=False)
        assert ids == sp.encode(text), repr(text)
        assert t.decode(ids) == sp.decode(ids), repr(text)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        T.Tokenizer(tmp_path / "nope.model")
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
