"""Tokenizers: the LLaMA/Vicuna SentencePiece BPE (read from tokenizer.model, run on tiktoken) and a byte tokenizer.

Tokenizer(path) encodes exactly as the `sentencepiece` package does for LLaMA's tokenizer.model, without
sentencepiece or protobuf at run time: a ~30-line protobuf reader gets the pieces, and tiktoken runs the BPE on a
re-ranked table (see _build_tiktoken for why that is exact; ~1.7x the speed of sentencepiece on short texts).
engine="python" is a plain SentencePiece BPE, the fallback for models the tiktoken route cannot replay. Models
with a normalization table or user-defined pieces are refused with a ValueError rather than encoded differently.
ByteTokenizer() is a byte-level tokenizer for small models trained from scratch. Both share one interface:

    tok.encode(text, bos=True, eos=False) -> list[int]      text is always plain text ("<s>" is five characters)
    tok.decode(ids) -> str                                    drops bos/eos/pad and special tokens
    tok.bos_id, tok.eos_id, tok.pad_id (settable), tok.vocab_size
    tok.add_special_tokens(["<image>", ...]) -> ids           appended after the current vocabulary
    tok.token_id(name) -> int, tok.id_to_piece(id) -> str
"""

import functools
import heapq
import re
import struct
from pathlib import Path

import tiktoken

SPACE = "\u2581"  # "▁": SentencePiece's escaped space
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type
BPE = 2  # TrainerSpec.model_type


# ----------------------------------------------------------------------------------------------------------------
# A minimal protobuf reader for sentencepiece_model.proto (ModelProto). Field numbers are those of the .proto file.

def _varint(buf, i):
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _fields(buf):
    """Yields (field_number, value) of one message: ints for varints, bytes for fixed32/64 and length-delimited."""
    i, end = 0, len(buf)
    while i < end:
        key, i = (buf[i], i + 1) if buf[i] < 0x80 else _varint(buf, i)  # one-byte fast path: most keys/lengths
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = (buf[i], i + 1) if buf[i] < 0x80 else _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > end:
            raise ValueError("truncated message")
        yield field, value


def _int32(v):  # int32 fields are sign-extended to 64 bits on the wire (pad_id = -1)
    return v - (1 << 64) if v >= 1 << 63 else v


def _piece(msg):
    """SentencePiece {1: piece, 2: score, 3: type} -> (str, float, int)."""
    n = msg[1]
    if msg[0] == 0x0A and n < 0x80 and msg[n + 2:n + 3] == b"\x15":  # fast path for the usual layout (~3x faster)
        t = msg[n + 8] if len(msg) == n + 9 and msg[n + 7] == 0x18 else NORMAL if len(msg) == n + 7 else None
        if t is not None:
            return msg[2:n + 2].decode("utf-8"), struct.unpack_from("<f", msg, n + 3)[0], t
    p = dict(_fields(msg))
    return p[1].decode("utf-8"), struct.unpack("<f", p[2])[0] if 2 in p else 0.0, p.get(3, NORMAL)


def read_sentencepiece_model(path):
    """Returns (pieces [(piece, score, type)], trainer {name: value}, normalizer {name: value}) with proto defaults."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    buf = path.read_bytes()
    trainer = dict(model_type=1, byte_fallback=False, treat_whitespace_as_suffix=False,
                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_surface=" \u2047 ")
    normalizer = dict(name="", precompiled_charsmap=b"", add_dummy_prefix=True, remove_extra_whitespaces=True,
                      escape_whitespaces=True)
    t_fields = {3: "model_type", 35: "byte_fallback", 24: "treat_whitespace_as_suffix", 40: "unk_id", 41: "bos_id",
                42: "eos_id", 43: "pad_id", 44: "unk_surface"}
    n_fields = {1: "name", 2: "precompiled_charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                5: "escape_whitespaces"}
    pieces, specs = [], set()
    try:
        for field, value in _fields(buf):
            if field == 1:  # repeated SentencePiece
                pieces.append(_piece(value))
            elif field in (2, 3):  # TrainerSpec, NormalizerSpec; everything else is skipped
                specs.add(field)
                spec, names = (trainer, t_fields) if field == 2 else (normalizer, n_fields)
                for f, v in _fields(value):
                    if f in names:
                        old = spec[names[f]]
                        spec[names[f]] = (v.decode("utf-8") if isinstance(old, str) else v if isinstance(old, bytes)
                                          else bool(v) if isinstance(old, bool) else _int32(v))
    except (IndexError, KeyError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{path}: not a valid SentencePiece model ({type(e).__name__}: {e})") from None
    if not pieces or 2 not in specs or any(t not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)
                                           for _, _, t in pieces):
        raise ValueError(f"{path}: not a valid SentencePiece model (no pieces, no trainer spec or unknown piece "
                         "types; truncated file?)")
    return pieces, trainer, normalizer


def _utf8(b):
    """Bytes -> str, one U+FFFD per invalid byte (as sentencepiece does; Python's 'replace' merges some runs)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return re.sub("[\udc80-\udcff]", "\ufffd", b.decode("utf-8", "surrogateescape"))


def _check_ids(ids, vocab_size):
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        raise ValueError(f"token id out of range [0, {vocab_size}): {min(ids) if min(ids) < 0 else max(ids)}")


# ----------------------------------------------------------------------------------------------------------------

class Tokenizer:
    """SentencePiece BPE (LLaMA / Vicuna tokenizer.model). engine="python" is a plain SentencePiece-BPE reference."""

    def __init__(self, path, engine="tiktoken"):
        # The tables are read-only once built: instances of the same file share them (building takes ~0.5 s).
        path = Path(path)
        if path.is_dir():  # a model folder (Vicuna ships tokenizer.model beside the weights)
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        st = path.stat()
        self.__dict__.update(_tables(str(path), engine, st.st_size, st.st_mtime_ns))
        self.pad_id = 0  # the contract: <unk> unless told otherwise (official MM-Interleaved sets 31999)
        self.added = {}  # name -> id of tokens added after the vocabulary

    def _build(self, path, engine):
        self.path = path
        pieces, trainer, norm = read_sentencepiece_model(path)
        names = {p for p, _, t in pieces if t == BYTE}
        why = ("not a BPE model" if trainer["model_type"] != BPE else
               "no byte fallback" if not trainer["byte_fallback"] or names != {f"<0x{b:02X}>" for b in range(256)} else
               "suffix whitespace" if trainer["treat_whitespace_as_suffix"] else
               "a normalization table" if norm["precompiled_charsmap"] or norm["name"] not in ("identity", "") else
               "user-defined or unused pieces" if any(t in (USER_DEFINED, UNUSED) for _, _, t in pieces) else None)
        if why:
            raise ValueError(f"{path}: unsupported SentencePiece model ({why}); only LLaMA-style BPE is implemented")
        self.pieces = [p for p, _, _ in pieces]
        self.types = [t for _, _, t in pieces]
        self.scores = [s for _, s, _ in pieces]
        self.piece_to_id = {p: i for i, p in enumerate(self.pieces)}
        self.add_dummy_prefix = norm["add_dummy_prefix"]
        self.remove_extra_whitespaces = norm["remove_extra_whitespaces"]
        self.escape_whitespaces = norm["escape_whitespaces"]
        self.unk_id, self.bos_id, self.eos_id = trainer["unk_id"], trainer["bos_id"], trainer["eos_id"]
        # Only NORMAL pieces take part in merges; anything else the BPE leaves behind is spelt as <0xXX> bytes.
        self.merge_score = {p: s for p, s, t in pieces if t == NORMAL}
        self.byte_ids = [self.piece_to_id[f"<0x{b:02X}>"] for b in range(256)]
        # decode: every id's bytes (control tokens -> nothing, <unk> -> its surface " ⁇ ", "▁" -> " ")
        self.id_bytes = [bytes([int(p[3:5], 16)]) if t == BYTE else trainer["unk_surface"].encode() if t == UNKNOWN
                         else b"" if t == CONTROL else p.replace(SPACE, " ").encode() for p, _, t in pieces]
        self.engine = engine
        if engine == "tiktoken":
            self._build_tiktoken()
        elif engine != "python":
            raise ValueError(f"engine must be 'tiktoken' or 'python', got {engine!r}")

    # --- tiktoken engine ----------------------------------------------------------------------------------------
    def _build_tiktoken(self):
        """Re-rank the vocabulary so that tiktoken's byte-level BPE replays SentencePiece's character-level BPE.

        SentencePiece starts from characters and merges the adjacent pair with the best score (ties: leftmost).
        tiktoken starts from bytes and merges the adjacent pair with the lowest rank (ties: leftmost). So:
        ranks 0-255 = bytes; then every character's byte prefixes and the character itself (all characters are
        assembled before any merge; an unknown character never assembles and stays as bytes); then the merged
        pieces in score order. Token ids are not usable as ranks (characters sit at the end of LLaMA's vocab).
        The 16 whitespace-only pieces share the lowest score, so SentencePiece merges them last and leftmost
        first: a run of "▁" becomes chunks of 16 from the left. The pre-split regex cuts the text before every
        "▁" (no other piece holds "▁" past its first character, so no merge crosses that point) and cuts a run of
        n "▁" into chunks of 16 from the left plus its last "▁", which goes with the next word; tiktoken returns
        a chunk that is a whole token as is. When that last "▁" cannot merge with the word (" 1", "  \n"), it is
        left alone and SentencePiece would have joined it to the run: _join_spaces does that afterwards.
        These facts are checked here; a model that breaks them falls back to the python engine.
        """
        normal = [(i, p) for i, p in enumerate(self.pieces) if self.types[i] == NORMAL]
        ws = {len(p): i for i, p in normal if not p.strip(SPACE)}  # whitespace-only pieces by length
        merged = sorted(((i, p) for i, p in normal if len(p) > 1 and p.strip(SPACE)),
                        key=lambda ip: -self.scores[ip[0]])
        ws_scores = {self.scores[i] for n, i in ws.items() if n > 1}
        m_scores = [self.scores[i] for i, _ in merged]
        if not (sorted(ws) == list(range(1, len(ws) + 1)) and len(ws_scores) <= 1
                and (not ws_scores or max(ws_scores) < min(m_scores)) and len(set(m_scores)) == len(m_scores)
                and SPACE not in "".join(p[1:] for _, p in merged)):
            self.engine = "python"
            return
        ranks = {bytes([b]): b for b in range(256)}
        chars = {c for _, p in normal for c in p}
        for c in sorted(chars):
            u = c.encode()
            for k in range(2, len(u) + 1):
                ranks.setdefault(u[:k], len(ranks))
        for _, p in merged:
            ranks[p.encode()] = len(ranks)
        for n in sorted(ws)[1:]:  # only ever whole chunks (runs), never merged with anything
            ranks[(SPACE * n).encode()] = len(ranks)
        pat = f"{SPACE}{{1,{len(ws)}}}(?={SPACE})|{SPACE}?[^{SPACE}]+|{SPACE}"
        enc = tiktoken.Encoding("spm-bpe", pat_str=pat, mergeable_ranks=ranks, special_tokens={})
        # tiktoken returns a chunk that is itself a token without running BPE, but SentencePiece might not reach
        # that piece from its characters. Encode every piece followed by a character found in no piece (so the BPE
        # runs; "▁" + marker in front of pieces without "▁" starts a new chunk) and drop the pieces it does not
        # rebuild: SentencePiece never produces those. One call for all pieces; one per piece if any differ.
        m = next(chr(c) for c in range(1, 0x110000) if chr(c) not in chars)
        tail = enc.encode_ordinary(m)
        text = "".join(p + m if p[0] == SPACE else SPACE + m + p + m for _, p in merged)
        want = [r for _, p in merged for r in ([] if p[0] == SPACE else [ranks[SPACE.encode()], *tail])
                + [ranks[p.encode()], *tail]]
        unreachable = [] if enc.encode_ordinary(text) == want else [
            p.encode() for _, p in merged if enc.encode_ordinary(p + m) != [ranks[p.encode()]] + tail]
        if unreachable:
            for b in unreachable:
                del ranks[b]  # gaps in the ranks are fine for tiktoken
            enc = tiktoken.Encoding("spm-bpe", pat_str=pat, mergeable_ranks=ranks, special_tokens={})
        self._enc = enc
        # rank -> token id; -1: not a piece (a character prefix or an unknown character) -> spell as <0xXX> bytes
        self._rank_id = [-1] * (max(ranks.values()) + 1)
        self._rank_bytes = {r: b for b, r in ranks.items()}
        for i, p in normal:
            r = ranks.get(p.encode())
            if r is not None:
                self._rank_id[r] = i
        for b in range(256):  # a byte that is not a piece (e.g. "\n") is its <0xXX> token: no spelling needed
            if self._rank_id[b] < 0:
                self._rank_id[b] = self.byte_ids[b]
        self._ws_ids = [ws[n] for n in range(1, len(ws) + 1)]  # id of "▁" * n
        self._ws_len = {i: n for n, i in ws.items()}
        self.n_unreachable = len(unreachable)

    def _encode_tiktoken(self, s):
        ids = list(map(self._rank_id.__getitem__, self._enc.encode_ordinary(s)))
        if -1 in ids:  # leftover character prefixes / unknown characters -> byte fallback
            ids = self._spell_bytes(ids, self._enc.encode_ordinary(s))
        if SPACE + SPACE in s:  # only then is there a run for a lone "▁" to join
            ids = self._join_spaces(ids)
        return ids

    def _spell_bytes(self, ids, ranks):
        out = []
        for i, r in zip(ids, ranks):
            if i >= 0:
                out.append(i)
            else:
                out.extend(self.byte_ids[b] for b in self._rank_bytes[r])
        return out

    def _join_spaces(self, ids):
        """A lone "▁" right after a run's last chunk ("▁" * r, r < 16) makes it "▁" * (r + 1), as SentencePiece."""
        one, ws, out, i = self._ws_ids[0], self._ws_ids, [], 0
        while True:
            try:
                j = ids.index(one, i)  # jump from one lone "▁" to the next at C speed
            except ValueError:
                return out + ids[i:]
            out += ids[i:j]
            r = self._ws_len.get(out[-1], len(ws)) if out else len(ws)
            if r < len(ws):
                out[-1] = ws[r]
            else:
                out.append(one)
            i = j + 1

    # --- python engine: SentencePiece's BPE as written (heap of candidate pairs, best score, then leftmost) ---
    def _encode_python(self, s):
        sym = list(s)  # symbols: characters; a merged-away symbol becomes None
        nxt, prv = list(range(1, len(sym) + 1)), list(range(-1, len(sym) - 1))
        heap = []

        def push(left, right):
            if left >= 0 and right < len(sym):
                score = self.merge_score.get(sym[left] + sym[right])
                if score is not None:
                    heapq.heappush(heap, (-score, left, sym[left] + sym[right]))

        for i in range(len(sym) - 1):
            push(i, i + 1)
        while heap:
            _, left, piece = heapq.heappop(heap)
            right = nxt[left]
            if sym[left] is None or right >= len(sym) or sym[left] + sym[right] != piece:
                continue  # stale: one side was merged since this pair was pushed
            sym[left], sym[right] = piece, None
            nxt[left] = nxt[right]
            if nxt[right] < len(sym):
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        ids = []
        for p in sym:
            if p is not None:
                i = self.piece_to_id.get(p)
                if i is not None and self.types[i] == NORMAL:
                    ids.append(i)
                else:
                    ids.extend(self.byte_ids[b] for b in p.encode())
        return ids

    # --- public interface ---------------------------------------------------------------------------------------
    def normalize(self, text):
        """The text SentencePiece runs BPE on: spaces -> "▁", one dummy "▁" prefix (LLaMA's identity normalizer)."""
        if self.remove_extra_whitespaces:
            text = re.sub(" +", " ", text.strip(" "))
        if not text:
            return ""
        if self.escape_whitespaces:
            text = text.replace(" ", SPACE)
        text = (SPACE if self.add_dummy_prefix else "") + text
        # sentencepiece strips trailing whitespace after escaping, so trailing literal "▁" goes too
        return text.rstrip(SPACE if self.escape_whitespaces else " ") if self.remove_extra_whitespaces else text

    def encode(self, text, bos=True, eos=False):
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        s = self.normalize(text)
        ids = (self._encode_tiktoken(s) if self.engine == "tiktoken" else self._encode_python(s)) if s else []
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        _check_ids(ids, self.vocab_size)
        n, drop = len(self.pieces), {self.bos_id, self.eos_id, self.pad_id}
        ids = [i for i in ids if i not in drop and i < n and self.types[i] != CONTROL]  # added specials are >= n
        if not ids:
            return ""
        parts = [self.id_bytes[i] for i in ids]
        # sentencepiece strips the dummy-prefix space from the first piece only (never from bytes or <unk>)
        if (self.add_dummy_prefix or self.remove_extra_whitespaces) and self.types[ids[0]] == NORMAL \
                and parts[0][:1] == b" ":
            parts[0] = parts[0][1:]
        return _utf8(b"".join(parts))

    @property
    def vocab_size(self):
        return len(self.pieces) + len(self.added)

    def add_special_tokens(self, names):
        """Appends tokens after the vocabulary (names already present keep their id). Returns their ids."""
        for name in names:
            if name not in self.piece_to_id and name not in self.added:
                self.added[name] = self.vocab_size
        return [self.token_id(name) for name in names]

    def token_id(self, name):
        i = self.added.get(name, self.piece_to_id.get(name))
        if i is None:
            raise KeyError(f"no token named {name!r}")
        return i

    def id_to_piece(self, i):
        if i < len(self.pieces):
            return self.pieces[i]
        return {v: k for k, v in self.added.items()}[i]


@functools.lru_cache(maxsize=4)
def _tables(path, engine, size, mtime_ns):  # size and mtime: a rewritten file is read again
    t = object.__new__(Tokenizer)
    t._build(path, engine)
    return t.__dict__


# ----------------------------------------------------------------------------------------------------------------

class ByteTokenizer:
    """Bytes 0-255, then <s>, </s>, <pad>, then added specials. tiktoken with no merges is the engine."""

    def __init__(self):
        self.specials = {"<s>": 256, "</s>": 257, "<pad>": 258}
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258
        self._build()

    def _build(self):
        # specials are registered (so tiktoken decodes them) but text is encoded with encode_ordinary: never special
        self._enc = tiktoken.Encoding("mmi-bytes", pat_str=r"[^\n]+|\n+",
                                      mergeable_ranks={bytes([b]): b for b in range(256)},
                                      special_tokens=dict(self.specials))

    def encode(self, text, bos=True, eos=False):
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return ([self.bos_id] if bos else []) + self._enc.encode_ordinary(text) + ([self.eos_id] if eos else [])

    def decode(self, ids):
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        _check_ids(ids, self.vocab_size)
        return _utf8(self._enc.decode_bytes([i for i in ids if i < 256]))

    @property
    def vocab_size(self):
        return 256 + len(self.specials)

    def add_special_tokens(self, names):
        new = [n for n in dict.fromkeys(names) if n not in self.specials]
        for name in new:
            self.specials[name] = self.vocab_size
        if new:
            self._build()
        return [self.specials[n] for n in names]

    def token_id(self, name):
        if name in self.specials:
            return self.specials[name]
        m = re.fullmatch(r"<0x([0-9A-F]{2})>", name)
        if m:
            return int(m.group(1), 16)
        raise KeyError(f"no token named {name!r}")

    def id_to_piece(self, i):
        return f"<0x{i:02X}>" if i < 256 else {v: k for k, v in self.specials.items()}[i]


# ----------------------------------------------------------------------------------------------------------------
# The model's tokenizer: the LLM's own, with the two image tokens appended

BOI, IMAGE = "<|beginofimage|>", "<|image|>"
WORLD_MODEL = Path(__file__).resolve().parent / "assets" / "world.model"  # the tiny world's 440-piece BPE


def mmi_tokenizer(kind, vocab_size, pad_id=None, llm_path=None):
    """The tokenizer MM-Interleaved reads and writes with: "byte" (ByteTokenizer), "world" (assets/world.model),
    "llama" (the LLM folder's tokenizer.model) or a tokenizer.model path; BoI and <|image|> appended right after
    the LLM's vocabulary of `vocab_size` ids (official: 32000, 32001). Adds `boi_id` and `image_id` attributes;
    pad_id overrides the tokenizer's own (official: 31999)."""
    if kind == "byte":
        tok = ByteTokenizer()
    else:
        if kind == "llama":
            if llm_path is None:
                raise ValueError("tokenizer 'llama' needs the LLM folder (its tokenizer.model)")
            kind = Path(llm_path) / "tokenizer.model"
        tok = Tokenizer(WORLD_MODEL if kind == "world" else kind)
    if tok.vocab_size != vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids, the LLM {vocab_size}")
    tok.boi_id, tok.image_id = tok.add_special_tokens([BOI, IMAGE])
    if pad_id is not None:
        tok.pad_id = pad_id
    return tok
