"""Tests for bpe.py: hand-checked merges, fast trainer == slow trainer, round trips on random text,
special tokens, save/load, corrupt files, the command line, and exact equality with tiktoken's GPT-2.

Run from the repo root: python -m pytest tests/test_bpe.py
Tests that compare with GPT-2 read ../shared (tiktoken's files, tiny shakespeare) and are skipped
when it is missing.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TIKTOKEN_CACHE = SHARED / "data" / "tiktoken_cache"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
# must be set before tiktoken is imported anywhere, so tiktoken.get_encoding("gpt2") works offline
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bpe  # noqa: E402

needs_gpt2 = pytest.mark.skipif(not (TIKTOKEN_CACHE / "vocab.bpe").exists(), reason="needs ../shared GPT-2 files")
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.exists(), reason="needs ../shared tiny shakespeare")

# A small corpus that needs nothing from ../shared: prose, code, numbers, several scripts, emoji.
CORPUS = """\
First Citizen: Before we proceed any further, hear me speak. We're all resolved rather to die than
to famish? You know Caius Marcius is chief enemy to the people. Let us kill him, and we'll have corn
at our own price. Is't a verdict?   No more talking on't; let it be done: away, away!

def train(text, vocab_size=4096):
    for i in range(vocab_size - 256):  # 3840 merges
        counts[pair] += 1\r\n    return {"merges": merges, 'ok': True}

Prices rose 12.5% in 2023, from $1,000 to $1,125.00 (see table 3b); x=42, y = -7e10.
Ça va très bien, merci ! Größe, Straße, naïve café, señor. Ελληνικά κείμενα. Русский текст тоже.
日本語のテキストと中文文本，还有한국어 문장。 Emoji: 🙂🙃👍🏽 👨‍👩‍👧 🇫🇷 ❤️ — “quotes” ‘too’…
Combining: e\u0301 a\u0308 o\u0302\u0323 Z\u0335\u0321a\u0337l\u0336g\u0334o\u0338.
\t\ttabs\t and    runs   of     spaces\n\n\n\nand newlines\r\n\r\nand more.
"""
rng = random.Random(1234)
WORDS = CORPUS.split()
CORPUS += " ".join(rng.choice(WORDS) for _ in range(3000))

# code point ranges for random text; surrogates (U+D800..U+DFFF) are left out: str can hold them,
# UTF-8 cannot (encode maps them to U+FFFD like tiktoken, tested separately)
RANGES = [
    (0x00, 0x7F),        # ASCII, control characters included
    (0x80, 0x24F),       # Latin-1, Latin extended
    (0x300, 0x36F),      # combining diacritical marks
    (0x370, 0x52F),      # Greek, Cyrillic
    (0x590, 0x6FF),      # Hebrew, Arabic
    (0x900, 0x97F),      # Devanagari
    (0x1100, 0x11FF),    # Hangul jamo
    (0x2000, 0x206F),    # general punctuation: odd spaces, ZWJ, line/paragraph separators
    (0x3000, 0x30FF),    # CJK punctuation, kana
    (0x4E00, 0x9FFF),    # CJK ideographs
    (0xAC00, 0xD7A3),    # Hangul syllables
    (0xE000, 0xFFFF),    # private use, specials, variation selectors, BOM, U+FFFD
    (0x1F300, 0x1FAFF),  # emoji
    (0x10000, 0x10FFFF),  # anything beyond the BMP
]
WHITESPACE = " \t\n\r\x0b\x0c\x1c\x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000"


def random_text(r, max_len=40):
    out = []
    for _ in range(r.randint(0, max_len)):
        kind = r.random()
        if kind < 0.2:
            out.append(r.choice(WHITESPACE))
        elif kind < 0.45:
            out.append(r.choice("abcdefghijklmnopqrstuvwxyz'ABC0123456789.,!?-"))
        else:
            lo, hi = r.choice(RANGES)
            out.append(chr(r.randint(lo, hi)))
    return "".join(out)


def random_texts(seed, n, max_len=40):
    r = random.Random(seed)
    return [random_text(r, max_len) for _ in range(n)]


TRICKY = [
    "", " ", "  ", "\n", "\n\n\n", "\r\n", "\r\n\r\n", "a\r\nb", "\t", " \t \n ", "x  ", "x \n", "   x",
    "hello world", "Hello, World!", "I'm", "I'M", "don't", "DON'T", "we'll've", "'s", "''s's", "'ll",
    "12345", "1,000,000.50", "3.14159", "x=1;y=22;z=333", "2023-01-01T00:00:00Z", "0x1F600",
    "def f(x):\n    return x**2  # square\n", "if (a && b) { c(); }\n\t}", "<html><body>&amp;</body></html>",
    "🙂", "🙂🙂🙂", "👨‍👩‍👧‍👦", "🇫🇷🇩🇪", "👍🏽", "❤️", "e\u0301", "a\u0308\u0323", "\u0301start",
    "日本語", "中文文本，还有", "한국어", "Ελληνικά", "Привет", "مرحبا", "नमस्ते", "ＡＢＣ", "ﬁ",
    "\u00a0", "\u3000x", "\u2028", "\u200b", "\ufeffBOM", "\x00\x01\x7f", "\ufffd", "   \n\n  x  \n",
    "a" * 1000, " " * 1000, "\n" * 100, "ab" * 500, "😀" * 300, "\u0301" * 50,
]


@pytest.fixture(scope="module")
def trained():
    """One small tokenizer per pattern, trained on CORPUS (no ../shared needed)."""
    out = {}
    for pattern in ["gpt2", "gpt4", "none"]:
        tok = bpe.Tokenizer(pattern)
        tok.train(CORPUS, 256 + 400)
        out[pattern] = tok
    return out


# -----------------------------------------------------------------------------
# training


def test_hand_example_aaabdaaabac():
    # "aaabdaaabac" = a a a b d a a a b a c (a=97, b=98, c=99, d=100), pattern none, 3 merges.
    # Tie rule: highest count, then the smallest pair (left id, right id).
    # 1. counts: (a,a)=4 (at positions 0-1, 1-2, 5-6, 6-7), (a,b)=2, (b,d) (d,a) (b,a) (a,c)=1
    #    -> (97, 97) becomes 256; merging left to right turns each "aaab" into [256, a, b]:
    #    256 a b d 256 a b a c
    # 2. counts: (256,a)=2, (a,b)=2, (b,d)=1, (d,256)=1, (b,a)=1, (a,c)=1
    #    tie at 2: (97, 98) < (256, 97), so (97, 98) becomes 257:  256 257 d 256 257 a c
    # 3. counts: (256,257)=2, the rest 1 -> (256, 257) becomes 258:  258 d 258 a c
    # (the same merges as the textbook example: Z=aa, Y=ab, X=ZY)
    for train in ("train", "train_slow"):
        tok = bpe.Tokenizer("none")
        getattr(tok, train)("aaabdaaabac", 256 + 3)
        assert tok.merges == {(97, 97): 256, (97, 98): 257, (256, 257): 258}
        assert [tok.vocab[i] for i in (256, 257, 258)] == [b"aa", b"ab", b"aaab"]
        assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
        assert tok.decode([258, 100, 258, 97, 99]) == "aaabdaaabac"


def test_tie_rule_prefers_smallest_pair_not_first_seen():
    # "cdab": (c,d), (d,a), (a,b) all occur once; the smallest pair (97, 98) wins
    for train in ("train", "train_slow"):
        tok = bpe.Tokenizer("none")
        getattr(tok, train)("cdab", 257)
        assert tok.merges == {(97, 98): 256}


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "none", r"\w+|\W+"])
def test_fast_trainer_equals_slow_trainer(pattern):
    text = CORPUS[:4000]
    fast, slow = bpe.Tokenizer(pattern), bpe.Tokenizer(pattern)
    fast.train(text, 256 + 150)
    slow.train_slow(text, 256 + 150)
    assert len(fast.merges) == 150
    assert fast.merges == slow.merges


def test_fast_trainer_equals_slow_trainer_many_ties_and_overlaps():
    # tiny alphabets make ties and overlapping pairs ("aaaa") common; train until no pairs are left
    r = random.Random(7)
    for _ in range(300):
        text = "".join(r.choice(r.choice(["ab", "a b", "abc", "aab ", "ab\n"])) for _ in range(r.randint(1, 80)))
        pattern = r.choice(["none", "gpt2"])
        fast, slow = bpe.Tokenizer(pattern), bpe.Tokenizer(pattern)
        fast.train(text, 256 + 100)
        slow.train_slow(text, 256 + 100)
        assert fast.merges == slow.merges, (pattern, text)
        assert fast.decode(fast.encode(text)) == text


def test_training_segmentation_is_reproduced_by_encode():
    # encoding applies merges by rank of the merged bytes (tiktoken's rule); on the training text it
    # must give the same tokens as applying the learned merges in order (the training procedure)
    tok = bpe.Tokenizer("gpt2")
    tok.train(CORPUS, 256 + 300)
    for chunk in set(tok._split(CORPUS)):
        ids = list(chunk.encode("utf-8"))
        for pair, new_id in tok.merges.items():
            ids = bpe.merge_pair(ids, pair, new_id)
        assert tok.encode_ordinary(chunk) == ids


def test_train_stops_when_no_pairs_are_left():
    tok = bpe.Tokenizer("gpt2")
    tok.train("ab ab ab", 1000)
    assert tok.merges == {(97, 98): 256, (32, 256): 257}
    assert tok.n_vocab == 258


@pytest.mark.parametrize("text, vocab_size", [("", 300), ("hello", 255), ("hello", 300.0), (None, 300)])
def test_train_rejects_bad_arguments(text, vocab_size):
    with pytest.raises(ValueError):
        bpe.Tokenizer().train(text, vocab_size)


def test_train_after_special_tokens_is_an_error():
    tok = bpe.Tokenizer()
    tok.register_special_tokens(["<|endoftext|>"])
    with pytest.raises(ValueError, match="special"):
        tok.train("hello world", 300)


@pytest.mark.parametrize("pattern", ["gpt3", "(a)", "[", 5, ""])
def test_bad_patterns(pattern):
    with pytest.raises(ValueError):
        bpe.Tokenizer(pattern)


# -----------------------------------------------------------------------------
# encoding and decoding


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "none"])
def test_round_trip_random_unicode(trained, pattern):
    tok = trained[pattern]
    for s in random_texts(seed=len(pattern), n=1500) + TRICKY + [CORPUS]:
        ids = tok.encode_ordinary(s)
        assert tok.decode(ids) == s
        assert tok.decode_bytes(ids) == s.encode("utf-8")
        assert tok.encode(s) == ids  # no special tokens registered: encode == encode_ordinary


def test_round_trip_random_bytes(trained):
    # random byte strings made valid UTF-8 (invalid sequences become U+FFFD), then round-tripped
    r = random.Random(5)
    tok = trained["gpt2"]
    for _ in range(1000):
        raw = bytes(r.randrange(256) for _ in range(r.randint(0, 30)))
        valid = raw.decode("utf-8", errors="replace").encode("utf-8")
        assert tok.decode_bytes(tok.encode_ordinary(valid.decode("utf-8"))) == valid
    # and valid UTF-8 built from random code points of every length (1 to 4 bytes)
    for s in random_texts(seed=6, n=500):
        b = s.encode("utf-8")
        assert tok.decode_bytes(tok.encode(b.decode("utf-8"))) == b


def test_decode_replaces_invalid_utf8(trained):
    tok = trained["gpt2"]
    ids = tok.encode("日本")  # 6 bytes of UTF-8
    raw = tok.decode_bytes(ids)
    assert tok.decode([tok.ranks[raw[:1]]]) == "\ufffd"
    for k in range(len(ids) + 1):  # any prefix decodes without raising
        assert tok.decode(ids[:k]) == tok.decode_bytes(ids[:k]).decode("utf-8", errors="replace")
    with pytest.raises(ValueError, match="unknown token id"):
        tok.decode([tok.n_vocab])


def test_lone_surrogates_are_replaced_like_tiktoken(trained):
    tok = trained["gpt2"]
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
    assert tok.decode(tok.encode("\ud83d\ude00")) == "😀"  # a surrogate pair is the character it encodes


def test_bpe_merge_on_long_chunks_matches_pairwise_reference():
    # bpe_merge uses a heap; compare with the obvious quadratic loop on long, repetitive chunks
    def reference(piece, ranks):
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while True:
            found = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
            if not found:
                return parts
            _, i = min(found)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]

    tok = bpe.Tokenizer("none")
    tok.train("aaaa abab aaab " * 20 + "abababa", 256 + 30)
    r = random.Random(3)
    for _ in range(200):
        piece = bytes(r.choice(b"ab ") for _ in range(r.randint(0, 300)))
        assert bpe.bpe_merge(piece, tok.ranks) == reference(piece, tok.ranks)


# -----------------------------------------------------------------------------
# special tokens

SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>"]


@pytest.fixture
def chat_tok():
    tok = bpe.Tokenizer("gpt2")
    tok.train(CORPUS, 256 + 200)
    tok.register_special_tokens(SPECIALS)
    return tok


def test_register_special_tokens_list_gives_next_free_ids(chat_tok):
    assert chat_tok.special_tokens == {"<|endoftext|>": 456, "<|user|>": 457, "<|assistant|>": 458}
    assert chat_tok.n_vocab == 459
    chat_tok.register_special_tokens(["<|user|>", "<|system|>"])  # re-registering is a no-op
    assert chat_tok.special_tokens["<|system|>"] == 459
    chat_tok.register_special_tokens({"<|pad|>": 1000})  # explicit ids may leave a gap
    assert chat_tok.n_vocab == 1001


@pytest.mark.parametrize("tokens", [{"<|x|>": 3}, {"<|x|>": 456}, {"<|user|>": 999}, {"": 999}, "<|x|>",
                                    {"<|x|>": -1}, [5]])
def test_register_special_tokens_rejects_conflicts(chat_tok, tokens):
    with pytest.raises(ValueError):
        chat_tok.register_special_tokens(tokens)


def test_special_token_encoding(chat_tok):
    tok = chat_tok
    text = "<|user|>Hi there<|endoftext|><|assistant|>Hello!<|endoftext|>"
    ids = tok.encode(text, allowed_special="all")
    assert ids[0] == 457 and ids.count(456) == 2 and 458 in ids
    assert tok.decode(ids) == text
    # a set allows just those; the others still raise by default (tiktoken's disallowed_special="all")
    with pytest.raises(ValueError, match="endoftext"):
        tok.encode(text, allowed_special={"<|user|>", "<|assistant|>"})
    with pytest.raises(ValueError, match="not allowed"):
        tok.encode("hi <|endoftext|>")
    for none in ("none", "none_raise", set(), ()):
        with pytest.raises(ValueError):
            tok.encode("hi <|endoftext|>", allowed_special=none)
    # disallowed_special=() encodes special-looking text as ordinary text, like encode_ordinary
    ordinary = tok.encode(text, disallowed_special=())
    assert ordinary == tok.encode_ordinary(text)
    assert not set(ordinary) & set(tok.special_tokens.values())
    assert tok.decode(ordinary) == text
    mixed = tok.encode(text, allowed_special={"<|user|>"}, disallowed_special=())
    assert mixed.count(457) == 1 and 456 not in mixed and tok.decode(mixed) == text
    # only the listed ones raise
    assert tok.encode("<|user|>", disallowed_special={"<|endoftext|>"}) == tok.encode_ordinary("<|user|>")
    with pytest.raises(ValueError):
        tok.encode("<|endoftext|>", disallowed_special={"<|endoftext|>"})
    assert tok.encode("no specials here") == tok.encode_ordinary("no specials here")


def test_encode_ordinary_never_produces_special_ids(chat_tok):
    specials = set(chat_tok.special_tokens.values())
    for s in random_texts(seed=11, n=200) + [t + s for t in SPECIALS for s in ("", "x", " ")]:
        ids = chat_tok.encode_ordinary(s)
        assert not set(ids) & specials
        assert chat_tok.decode(ids) == s


@pytest.mark.parametrize("kwargs", [{"allowed_special": "al"}, {"allowed_special": "<|user|>"},
                                    {"allowed_special": {"<|nope|>"}}, {"disallowed_special": "none"}])
def test_encode_rejects_bad_special_arguments(chat_tok, kwargs):
    with pytest.raises(ValueError):
        chat_tok.encode("hi", **kwargs)


# -----------------------------------------------------------------------------
# save and load


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "none", r"\p{L}+|[^\p{L}]"])
def test_save_load_round_trip(tmp_path, pattern):
    tok = bpe.Tokenizer(pattern)
    tok.train(CORPUS, 256 + 120)
    tok.register_special_tokens(SPECIALS)
    tok.register_special_tokens({"<|pad|>": 2000})
    prefix = str(tmp_path / "sub" / "tok")  # the folder is created
    assert tok.save(prefix) == prefix + ".model"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["tok.model", "tok.vocab"]  # no temp files left
    loaded = bpe.load(prefix + ".model")
    assert loaded.pattern == pattern
    assert loaded.merges == tok.merges and loaded.vocab == tok.vocab
    assert loaded.special_tokens == tok.special_tokens and loaded.n_vocab == 2001
    text = "<|user|>" + CORPUS[:2000] + "<|endoftext|>"
    assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    for s in random_texts(seed=2, n=200):
        assert loaded.encode_ordinary(s) == tok.encode_ordinary(s)


def test_model_and_vocab_files_are_readable(tmp_path):
    tok = bpe.Tokenizer("none")
    tok.train("aaabdaaabac", 259)
    tok.register_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "t"))
    model = (tmp_path / "t.model").read_text().splitlines()
    assert model == [bpe.MODEL_MAGIC, 'pattern "none"', "bytes identity", 'special "<|endoftext|>" 259',
                     "merges 3", "97 97", "97 98", "256 257"]
    vocab = (tmp_path / "t.vocab").read_text().splitlines()
    assert "97 [a]" in vocab and "10 [\\n]" in vocab and "0 [\\x00]" in vocab
    assert "258 [aaab] <- [aa] [ab]" in vocab and "259 <|endoftext|> (special)" in vocab


def test_save_is_atomic(tmp_path, monkeypatch):
    tok = bpe.Tokenizer()
    tok.train(CORPUS, 300)
    prefix = str(tmp_path / "tok")
    tok.save(prefix)
    before = (tmp_path / "tok.model").read_bytes()
    tok.train(CORPUS, 400)

    def crash(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(bpe.os, "replace", crash)
    with pytest.raises(OSError):
        tok.save(prefix)
    assert (tmp_path / "tok.model").read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.model", "tok.vocab"]  # and no temp file


GOOD_MODEL = (f'{bpe.MODEL_MAGIC}\npattern "gpt2"\nbytes identity\nspecial "<|endoftext|>" 258\n'
              'merges 2\n97 98\n256 99\n')


@pytest.mark.parametrize("content", [
    "",
    "hello world\n",
    '{"!": 0, "a": 1}\n',
    "#version: 0.2\nĠ t\n",
    bpe.MODEL_MAGIC + "\n",
    GOOD_MODEL.replace("merges 2", "merges 3"),
    GOOD_MODEL.replace("256 99", "257 99"),     # refers to a token that does not exist yet
    GOOD_MODEL.replace("256 99", "97 98"),      # the same merge twice
    GOOD_MODEL.replace("256 99", "256 x"),
    GOOD_MODEL.replace("256 99", "256 99 1"),
    GOOD_MODEL.replace('"gpt2"', "gpt2"),       # not JSON
    GOOD_MODEL.replace('"gpt2"', '"gpt3"'),
    GOOD_MODEL.replace("identity", "1 2 3"),
    GOOD_MODEL.replace("258", "97"),            # special id taken by an ordinary token
    GOOD_MODEL.replace("bytes identity\n", ""),
    GOOD_MODEL[:-8],                            # truncated
    "IQ== 0\nIg== 1\n",                         # .tiktoken-like, but not 256 byte tokens
    "IQ== 0\n!!!! 1\n",
    b"\x80\x81\xfe\xff garbage",
])
def test_corrupt_or_foreign_files_are_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.model"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as e:
        bpe.load(str(path))
    msg = str(e.value)
    assert msg and "\n" not in msg and str(path) in msg


def test_good_model_loads_and_missing_file_is_a_value_error(tmp_path):
    (tmp_path / "good.model").write_text(GOOD_MODEL)
    tok = bpe.load(str(tmp_path / "good.model"))
    assert tok.encode("abc abd <|endoftext|>", allowed_special="all") == [257, 32, 256, 100, 32, 258]
    with pytest.raises(ValueError, match="not found"):
        bpe.load(str(tmp_path / "missing.model"))


def write_gpt2_style_files(tok, folder, permute=True):
    """Write tok as GPT-2's vocab.bpe + encoder.json (printable-unicode token strings), with the byte
    tokens' ids shuffled the way GPT-2 orders them."""
    to_char = bpe.gpt2_byte_to_unicode()
    order = sorted(range(256), key=lambda b: (to_char[b] != chr(b), b)) if permute else list(range(256))
    remap = {b: i for i, b in enumerate(order)}  # old id of byte -> new id
    name = {}
    for i in range(256):
        name[i] = to_char[i]
    for (a, b), i in tok.merges.items():
        name[i] = name[a] + name[b]
        remap[i] = i
    encoder = {name[i]: remap[i] for i in name}
    encoder["<|endoftext|>"] = len(encoder)
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{name[a]} {name[b]}" for a, b in tok.merges]
    (folder / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_from_gpt2_files_on_a_small_vocabulary(tmp_path, trained):
    tok = trained["gpt2"]
    write_gpt2_style_files(tok, tmp_path)
    loaded = bpe.from_gpt2_files(str(tmp_path / "vocab.bpe"), str(tmp_path / "encoder.json"))
    assert loaded.special_tokens == {"<|endoftext|>": tok.n_vocab}
    assert loaded.vocab[0] == b"!" and loaded.ranks[b"a"] != ord("a")  # byte ids permuted like GPT-2's
    assert {v: k for k, v in loaded.vocab.items()} == loaded.ranks
    assert sorted(loaded.vocab.values()) == sorted(tok.vocab.values())
    for s in random_texts(seed=8, n=300) + TRICKY:
        assert loaded.decode(loaded.encode_ordinary(s)) == s
        # same tokens as the original, under GPT-2's id numbering for the single bytes
        assert [loaded.vocab[i] for i in loaded.encode_ordinary(s)] == [tok.vocab[i] for i in tok.encode_ordinary(s)]
    # saving keeps the permuted byte ids
    loaded.save(str(tmp_path / "again"))
    assert bpe.load(str(tmp_path / "again.model")).vocab == loaded.vocab


def test_from_gpt2_files_rejects_inconsistent_files(tmp_path, trained):
    write_gpt2_style_files(trained["gpt2"], tmp_path)
    vocab_bpe, encoder_json = tmp_path / "vocab.bpe", tmp_path / "encoder.json"
    lines = vocab_bpe.read_text(encoding="utf-8").splitlines()
    vocab_bpe.write_text("\n".join([lines[0], lines[2], lines[1]] + lines[3:]), encoding="utf-8")  # merges swapped
    with pytest.raises(ValueError, match="vocab.bpe:2"):
        bpe.from_gpt2_files(str(vocab_bpe), str(encoder_json))
    encoder_json.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="encoder.json"):
        bpe.from_gpt2_files(str(vocab_bpe), str(encoder_json))
    with pytest.raises(ValueError, match="not found"):
        bpe.from_gpt2_files(str(tmp_path / "nope.bpe"), str(encoder_json))


# -----------------------------------------------------------------------------
# export to tiktoken


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "none"])
def test_to_tiktoken_matches_encode(pattern):
    tok = bpe.Tokenizer(pattern)
    tok.train(CORPUS, 256 + 400)
    tok.register_special_tokens(SPECIALS)
    enc = tok.to_tiktoken()
    assert enc.n_vocab == tok.n_vocab
    for s in random_texts(seed=9, n=1000) + TRICKY + [CORPUS]:
        assert enc.encode_ordinary(s) == tok.encode_ordinary(s)
    text = "<|user|>" + CORPUS[:500] + "<|endoftext|><|assistant|>ok"
    assert enc.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    assert enc.decode(tok.encode(text, allowed_special="all")) == text


@needs_shakespeare
def test_to_tiktoken_matches_encode_on_tinyshakespeare():
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tok = bpe.Tokenizer("gpt2")
    tok.train(text[:len(text) * 9 // 10], 1024)
    assert tok.to_tiktoken().encode(text) == tok.encode(text)


# -----------------------------------------------------------------------------
# GPT-2's own files: exactly tiktoken's ids


@pytest.fixture(scope="module")
def gpt2():
    return bpe.from_gpt2_files(str(TIKTOKEN_CACHE / "vocab.bpe"), str(TIKTOKEN_CACHE / "encoder.json"))


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    import tiktoken
    return tiktoken.get_encoding("gpt2")


@needs_gpt2
def test_gpt2_files_and_tiktoken_file_give_the_same_tokenizer(gpt2):
    r50k = bpe.load(str(TIKTOKEN_CACHE / "r50k_base.tiktoken"))
    assert gpt2.n_vocab == r50k.n_vocab == 50257
    assert gpt2.special_tokens == r50k.special_tokens == {"<|endoftext|>": 50256}
    assert gpt2.merges == r50k.merges and gpt2.vocab == r50k.vocab
    assert gpt2.vocab[0] == b"!" and gpt2.vocab[220] == b" " and gpt2.vocab[256] == b" t"


@needs_gpt2
def test_gpt2_tricky_strings_match_tiktoken(gpt2, tiktoken_gpt2):
    for s in TRICKY + [CORPUS]:
        assert gpt2.encode(s) == tiktoken_gpt2.encode(s), s
    for s in ["a\ud800b", "\udfff", "\ud83d\ude00"]:  # surrogates: both replace/fix them the same way
        assert gpt2.encode(s) == tiktoken_gpt2.encode(s)
    assert gpt2.encode("hello world") == [31373, 995]
    text = "Hi!<|endoftext|>Bye <|endoftext|>"
    assert gpt2.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.encode(text, allowed_special={"<|endoftext|>"}).count(50256) == 2
    assert gpt2.encode(text, disallowed_special=()) == tiktoken_gpt2.encode(text, disallowed_special=())
    for enc in (gpt2, tiktoken_gpt2):
        with pytest.raises(ValueError):
            enc.encode(text)


@needs_gpt2
def test_gpt2_random_unicode_matches_tiktoken(gpt2, tiktoken_gpt2):
    for s in random_texts(seed=10, n=3000):
        ids = gpt2.encode_ordinary(s)
        assert ids == tiktoken_gpt2.encode_ordinary(s), s
        assert gpt2.decode(ids) == s
    r = random.Random(12)  # decoding arbitrary ids (often invalid UTF-8) agrees too
    for _ in range(300):
        ids = [r.randrange(50257) for _ in range(r.randint(0, 6))]
        assert gpt2.decode(ids) == tiktoken_gpt2.decode(ids)
        assert gpt2.decode_bytes(ids) == tiktoken_gpt2.decode_bytes(ids)


@needs_gpt2
@needs_shakespeare
def test_gpt2_tinyshakespeare_matches_tiktoken(gpt2, tiktoken_gpt2):
    text = SHAKESPEARE.read_text(encoding="utf-8")
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode(text)
    assert gpt2.decode(ids) == text
    assert gpt2.to_tiktoken().encode(text) == ids


@needs_gpt2
def test_gpt2_save_load_round_trip(gpt2, tmp_path):
    gpt2.save(str(tmp_path / "gpt2"))
    loaded = bpe.load(str(tmp_path / "gpt2.model"))
    assert loaded.merges == gpt2.merges and loaded.vocab == gpt2.vocab
    assert loaded.special_tokens == gpt2.special_tokens
    text = CORPUS + "<|endoftext|>"
    assert loaded.encode(text, allowed_special="all") == gpt2.encode(text, allowed_special="all")
    assert "256 [ t] <- [ ] [t]" in (tmp_path / "gpt2.vocab").read_text(encoding="utf-8").splitlines()


# -----------------------------------------------------------------------------
# command line


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "bpe.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_trains_saves_and_reports(tmp_path):
    (tmp_path / "in.txt").write_text(CORPUS, encoding="utf-8")
    out = tmp_path / "model" / "tok"
    p = run_cli(f"--input={tmp_path / 'in.txt'}", "--vocab_size=320", f"--out={out}",
                "--special_tokens=<|endoftext|>,<|user|>", "--pattern=gpt4")
    assert p.returncode == 0, p.stderr
    assert "bytes/token" in p.stdout and "merge     1:" in p.stdout
    tok = bpe.load(str(out) + ".model")
    assert tok.n_vocab == 320 and tok.pattern == "gpt4"
    assert tok.special_tokens == {"<|endoftext|>": 318, "<|user|>": 319}


@pytest.mark.parametrize("args, message", [
    (["--input=/nonexistent/input.txt"], "not found"),
    (["--input={tmp}"], "cannot read"),                # a folder
    (["--input={empty}"], "empty"),
    (["--input={binary}"], "UTF-8"),
    (["--input={text}", "--vocab_size=256"], "too small"),   # 256 bytes + 1 special does not fit
    (["--input={text}", "--vocab_size=100", "--special_tokens="], "too small"),
    (["--input={text}", "--pattern=gpt3"], "unknown pattern"),
    (["--input={text}", "--pattern=("], "regex"),
    (["--input={text}", "--val_fraction=1.0"], "val_fraction"),
    (["--input={text}", "--vocab_sise=300"], "unknown config key"),
    (["--bench", "--input=/nonexistent/input.txt"], "not found"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x80" * 10)
    (tmp_path / "text.txt").write_text("hello world " * 10)
    paths = {"tmp": tmp_path, "empty": tmp_path / "empty.txt", "binary": tmp_path / "binary.txt",
             "text": tmp_path / "text.txt"}
    p = run_cli(*[a.format(**paths) for a in args], f"--out={tmp_path / 'o'}", cwd=tmp_path)
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if not line.startswith("config:")]  # configurator's echo
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "o.model").exists()


def test_import_does_no_work():
    code = "import sys; sys.argv = ['x', '--vocab_size=oops', '--bench']; import bpe; print('ok')"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "ok\n" and p.stderr == ""


@needs_gpt2
def test_cli_bench_runs_on_a_small_input(tmp_path):
    (tmp_path / "in.txt").write_text(CORPUS[:5000], encoding="utf-8")
    p = run_cli("--bench", f"--input={tmp_path / 'in.txt'}", f"--gpt2_dir={TIKTOKEN_CACHE}")
    assert p.returncode == 0, p.stderr
    assert "train to vocab 4096" in p.stdout and "encode tiktoken gpt2" in p.stdout
    assert "same ids: False" not in p.stdout and "same ids as bpe.py: True" in p.stdout
