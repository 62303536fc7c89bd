"""
Byte-level BPE tokenizer: learn merges on your own text, apply them, and check the result against
the real GPT-2 tokenizer. Read it top to bottom:

  1. text is cut into chunks by a regex (GPT-2's, GPT-4's, or none), so merges never cross a chunk
  2. the two primitives: merge one pair everywhere (training), and apply all merges to one chunk,
     lowest rank first, exactly like tiktoken (encoding)
  3. the Tokenizer: a chunk is its UTF-8 bytes; training repeatedly merges the most frequent
     adjacent pair of tokens into a new token (a slow reference, then the fast version that is
     actually used); special tokens (<|endoftext|>, chat tokens) are added after training and never
     come from text unless the caller allows them; save to a human-readable file; export to tiktoken
  4. loading: our .model files, .tiktoken files, and GPT-2's original vocab.bpe + encoder.json
  5. the command line: train and report, or benchmark

Command line:
  python bpe.py --input=input.txt --vocab_size=4096 --out=out/tokenizer   # train, save, report
  python bpe.py --bench                                                    # speed numbers

Library (prepare.py and tokenizer.py `import bpe`; importing does no work):
  tok = bpe.Tokenizer("gpt2"); tok.train(text, 4096); tok.register_special_tokens(["<|endoftext|>"])
  ids = tok.encode(text, allowed_special="all"); text == tok.decode(ids); tok.save("out/tokenizer")
  tok = bpe.load("out/tokenizer.model")       # or a .tiktoken ranks file
  gpt2 = bpe.from_gpt2_files("vocab.bpe", "encoder.json")
"""
import base64
import heapq
import json
import os
import sys
import time
from collections import defaultdict

import regex  # not `re`: we need Unicode classes like \p{L} (letter) and \p{N} (number)

# -----------------------------------------------------------------------------
# 1. Splitting text into chunks
# Merges are learned and applied only inside a chunk, so "dog." and "dog!" share the token "dog"
# instead of wasting vocabulary on "dog." and "dog!". These are the exact strings tiktoken uses.

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
NO_SPLIT_PATTERN = r"""[\s\S]+"""  # "none": the whole text is one chunk (fine for small demos)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN, "none": NO_SPLIT_PATTERN}

MODEL_MAGIC = "bpe.py tokenizer v1"  # first line of every .model file we write
CACHE_MAX_CHUNK = 64       # longer chunks are rare and not worth remembering
CACHE_MAX_ENTRIES = 1 << 18


def render(b):
    """A token's bytes as readable text: valid UTF-8 as characters, the rest as \\xNN escapes."""
    s = b.decode("utf-8", errors="backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)


def one_line(s, limit=80):
    """For error messages that quote file content: one line, not too long."""
    s = repr(s)
    return s if len(s) <= limit else s[:limit] + "..."

# -----------------------------------------------------------------------------
# 2. The two primitives: merging one pair (training) and applying all merges to a chunk (encoding)


def merge_pair(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids` by `new_id`, scanning left to right
    (so "aaa" with pair (a, a) becomes [aa, a])."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out

# Applying merges to one chunk, tiktoken's way.
# tiktoken (and so GPT-2 as everyone runs it) does not look up pairs of ids: it repeatedly merges
# the adjacent pair whose *concatenated bytes* have the lowest rank, the leftmost one on a tie.
# Our ids are the ranks (256 byte tokens first, then merges in the order they were learned), so
# "lowest rank" means "learned earliest". Doing it with a heap keeps long chunks linear-ish
# instead of quadratic; stale heap entries are skipped when popped.


def bpe_merge(piece, ranks, max_rank=None):
    """Split bytes `piece` into the byte strings of its tokens. `ranks` maps token bytes to rank.
    With max_rank, only tokens ranked below it may be formed (used to recover merges from ranks)."""
    n = len(piece)
    # the tokens form a linked list over byte positions: a token starts at a live position i
    # and ends where the next one starts, nxt[i]; dead positions have nxt = -1
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    heap = []  # (rank, start of left token, end of right token) for each mergeable adjacent pair
    for i in range(n - 1):
        r = ranks.get(piece[i:i + 2])
        if r is not None:
            heap.append((r, i, i + 2))
    heapq.heapify(heap)
    while heap:
        r, i, end = heapq.heappop(heap)
        if max_rank is not None and r >= max_rank:
            break
        j = nxt[i]
        if j == -1 or j >= n or nxt[j] != end:
            continue  # this pair no longer exists: one of its tokens was merged with another
        nxt[i], nxt[j] = end, -1  # the token at i swallows the one at j
        if end < n:
            prv[end] = i
            r = ranks.get(piece[i:nxt[end]])
            if r is not None:
                heapq.heappush(heap, (r, i, nxt[end]))
        if prv[i] >= 0:
            r = ranks.get(piece[prv[i]:end])
            if r is not None:
                heapq.heappush(heap, (r, prv[i], end))
    parts, i = [], 0
    while i < n:
        parts.append(piece[i:nxt[i]])
        i = nxt[i]
    return parts


def split_special(text, specials):
    """Split text around occurrences of the given special strings: [text, special, text, ...].
    Longer specials are tried first, so one that contains another wins."""
    if not specials:
        return [text]
    alternatives = sorted(specials, key=len, reverse=True)
    return regex.split("(" + "|".join(regex.escape(s) for s in alternatives) + ")", text)


# -----------------------------------------------------------------------------
# 3. The Tokenizer


class Tokenizer:
    """A byte-level BPE tokenizer. Token ids: the 256 single bytes get 0..255 (in byte order when we
    train; GPT-2 permutes them), then one id per merge in the order the merges were learned (256,
    257, ...), then special tokens. An id is also the token's rank: lower ids merge first."""

    def __init__(self, pattern="gpt2"):
        """pattern: "gpt2", "gpt4", "none" (no splitting) or your own regex; text that the regex
        does not match is dropped, so a custom one should match every character, as these do."""
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"pattern must be 'gpt2', 'gpt4', 'none' or a regex, got {pattern!r}")
        if regex.fullmatch(r"\w+", pattern) and pattern not in PATTERNS:  # a typo, not a useful regex
            raise ValueError(f"unknown pattern {pattern!r}: use gpt2, gpt4, none or a regex")
        try:
            self.compiled_pattern = regex.compile(PATTERNS.get(pattern, pattern))
        except regex.error as e:
            raise ValueError(f"pattern {one_line(pattern)} is not a valid regex: {e}") from None
        if self.compiled_pattern.groups:
            raise ValueError(f"pattern {one_line(pattern)} has capturing groups; use (?:...) instead")
        self.pattern = pattern  # as given: a name from PATTERNS or a regex string
        self.special_tokens = {}  # str -> id
        self._set_merges(list(range(256)), [])

    @property
    def pattern_regex(self):
        return PATTERNS.get(self.pattern, self.pattern)

    # --- the vocabulary: built from byte ids + merges, and checked while doing so

    def _set_merges(self, byte_ids, merges):
        """byte_ids[b] is the id of byte b; merges is a list of (left id, right id) in rank order."""
        if sorted(byte_ids) != list(range(256)):
            raise ValueError("the 256 single bytes must have ids 0..255")
        self.vocab = {i: bytes([byte_ids.index(i)]) for i in range(256)}  # id -> bytes, in id order
        self.ranks = {b: i for i, b in self.vocab.items()}              # bytes -> id (= rank)
        self.merges = {}                                                # (left, right) -> id
        self._cache = {}                                                # chunk -> ids
        for left, right in merges:
            self._add_merge(left, right)

    def _add_merge(self, left, right):
        new_id = 256 + len(self.merges)
        if left not in self.vocab or right not in self.vocab:
            raise ValueError(f"merge {len(self.merges)} ({left}, {right}) uses an unknown token id")
        token = self.vocab[left] + self.vocab[right]
        if token in self.ranks:  # cannot happen in our training; guards hand-made files
            raise ValueError(f"merge {len(self.merges)} ({left}, {right}) repeats token {render(token)!r}")
        self.merges[(left, right)] = new_id
        self.vocab[new_id] = token
        self.ranks[token] = new_id
        return new_id

    @property
    def n_vocab(self):
        """Number of ids, special tokens included (ids run from 0 to n_vocab - 1)."""
        return max([len(self.vocab)] + [i + 1 for i in self.special_tokens.values()])

    # --- training

    def _start_training(self, text, vocab_size):
        if not isinstance(text, str) or not text:
            raise ValueError("cannot train on an empty text")
        if not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"vocab_size must be an int >= 256 (the byte tokens), got {vocab_size!r}")
        if self.special_tokens:
            raise ValueError("train first, then register special tokens")
        self._set_merges(list(range(256)), [])
        return vocab_size - 256  # number of merges to learn

    def _split(self, text):
        return self.compiled_pattern.findall(text)

    def train_slow(self, text, vocab_size, verbose=False):
        """The reference trainer: recount every pair in the whole text before each merge.
        Tie rule (same as train): highest count, then the smallest (left id, right id)."""
        num_merges = self._start_training(text, vocab_size)
        chunks = [list(chunk.encode("utf-8")) for chunk in self._split(text)]
        for k in range(num_merges):
            counts = defaultdict(int)
            for ids in chunks:
                for pair in zip(ids, ids[1:]):
                    counts[pair] += 1
            if not counts:
                break  # every chunk is a single token: nothing left to merge
            pair = min(counts, key=lambda p: (-counts[p], p))
            new_id = self._add_merge(*pair)
            chunks = [merge_pair(ids, pair, new_id) for ids in chunks]
            if verbose:
                print(f"merge {k + 1}/{num_merges}: {pair} -> {new_id} {render(self.vocab[new_id])!r} ({counts[pair]})")

    def train(self, text, vocab_size, verbose=False):
        """Learn vocab_size - 256 merges from text (fewer if the text runs out of pairs).

        Same result as train_slow, but each merge only touches the places where its pair occurs:
        - identical chunks are stored once, with their count as weight ("the" occurs 100s of times)
        - all chunks are laid out in flat arrays with links to the previous/next live token
        - counts[pair] is the weighted number of occurrences, where[pair] the positions of its left token
        - a heap of (-count, pair) finds the best pair; entries whose count is out of date are skipped
        """
        num_merges = self._start_training(text, vocab_size)
        chunk_counts = defaultdict(int)
        for chunk in self._split(text):
            chunk_counts[chunk] += 1
        tok, weight, nxt, prv = [], [], [], []  # one entry per byte of each distinct chunk
        for chunk, count in chunk_counts.items():
            b, start = chunk.encode("utf-8"), len(tok)
            tok.extend(b)  # a fresh tokenizer's byte ids are the byte values
            weight.extend([count] * len(b))
            nxt.extend(range(start + 1, start + len(b)))
            nxt.append(-1)  # -1: no next token, the chunk ends here
            prv.append(-1)
            prv.extend(range(start, start + len(b) - 1))
        counts, where = defaultdict(int), defaultdict(set)
        for i, j in enumerate(nxt):
            if j != -1:
                counts[tok[i], tok[j]] += weight[i]
                where[tok[i], tok[j]].add(i)
        heap = [(-c, pair) for pair, c in counts.items()]
        heapq.heapify(heap)
        changed = set()  # pairs whose count changed during the current merge

        def add(p, i, w):  # pair p now starts at position i (w > 0), or no longer does (w < 0)
            counts[p] += w
            if w > 0:
                where[p].add(i)
            else:
                where[p].discard(i)
            changed.add(p)

        for k in range(num_merges):
            while heap:  # pop the best pair whose count is current
                c, pair = heapq.heappop(heap)
                if counts.get(pair) == -c:
                    break
            else:
                if verbose:
                    print(f"stopping after {k} merges: no pairs left to merge")
                break
            a, b = pair
            new_id = self._add_merge(a, b)
            changed.clear()
            for i in sorted(where.pop(pair)):  # left to right, like merge_pair
                j = nxt[i]
                if tok[i] != a or j == -1 or tok[j] != b:
                    continue  # gone: in "aaa" the (a, a) at 1 disappears when the one at 0 merges
                w, p, q = weight[i], prv[i], nxt[j]
                if p != -1:  # left neighbour x: (x, a) becomes (x, new)
                    add((tok[p], a), p, -w)
                    add((tok[p], new_id), p, w)
                if q != -1:  # right neighbour y: (b, y) becomes (new, y)
                    add((b, tok[q]), j, -w)
                    add((new_id, tok[q]), i, w)
                counts[pair] -= w
                tok[i], tok[j] = new_id, -1  # position j dies; i now holds the merged token
                nxt[i] = q
                if q != -1:
                    prv[q] = i
            assert counts[pair] == 0, "every occurrence of the pair was merged"
            for p in changed | {pair}:
                if counts[p] > 0:
                    heapq.heappush(heap, (-counts[p], p))
                else:
                    del counts[p]
                    where.pop(p, None)
            if verbose:
                print(f"merge {k + 1}/{num_merges}: {pair} -> {new_id} {render(self.vocab[new_id])!r} ({-c})")

    # --- special tokens

    def register_special_tokens(self, tokens):
        """tokens: {text: id}, or a list of texts that get the next free ids."""
        if isinstance(tokens, str):
            raise ValueError("register_special_tokens takes a dict or a list of strings, not a string")
        items = list(tokens.items()) if isinstance(tokens, dict) else [(s, None) for s in tokens]
        for s, i in items:
            if not isinstance(s, str) or not s:
                raise ValueError(f"a special token must be a non-empty string, got {s!r}")
            if i is None:
                i = self.special_tokens.get(s, self.n_vocab)
            if not isinstance(i, int) or i < 0:
                raise ValueError(f"special token {s!r}: id must be an int >= 0, got {i!r}")
            if s in self.special_tokens:
                if self.special_tokens[s] != i:
                    raise ValueError(f"special token {s!r} already has id {self.special_tokens[s]}")
                continue
            if i in self.vocab or i in self.special_tokens.values():
                raise ValueError(f"special token {s!r}: id {i} is already taken")
            self.special_tokens[s] = i

    # --- encoding and decoding

    def _encode_chunk(self, chunk):
        ids = self._cache.get(chunk)
        if ids is None:
            ids = [self.ranks[part] for part in bpe_merge(chunk.encode("utf-8"), self.ranks)]
            if len(chunk) <= CACHE_MAX_CHUNK:
                if len(self._cache) >= CACHE_MAX_ENTRIES:
                    self._cache.clear()
                self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text):
        """Encode text as plain text: special-token strings are encoded like any other text."""
        try:
            ids = []
            for chunk in self._split(text):
                ids.extend(self._encode_chunk(chunk))
            return ids
        except UnicodeEncodeError:
            # lone surrogates cannot be UTF-8 encoded; like tiktoken, fix pairs and replace the rest
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.encode_ordinary(text)

    def encode(self, text, allowed_special="none", disallowed_special="all"):
        """Encode text, with tiktoken's rules for special tokens:
        allowed_special: "all", "none" or a set of special strings that become their special id
            when they occur in the text ("none_raise", minbpe's name, means the same as "none");
        disallowed_special: "all" (every special not allowed) or a collection of special strings
            that raise ValueError if they occur; pass () to encode them as ordinary text."""
        specials = set(self.special_tokens)
        if isinstance(allowed_special, str):
            if allowed_special not in ("all", "none", "none_raise"):
                raise ValueError(f"allowed_special must be 'all', 'none' or a set of strings, got {allowed_special!r}")
            allowed = specials if allowed_special == "all" else set()
        else:
            allowed = set(allowed_special)
            if allowed - specials:
                raise ValueError(f"not registered as special tokens: {sorted(allowed - specials)}")
        if isinstance(disallowed_special, str):
            if disallowed_special != "all":
                raise ValueError(f"disallowed_special must be 'all' or a collection of strings, "
                                 f"got {disallowed_special!r}")
            disallowed = specials - allowed
        else:
            disallowed = set(disallowed_special)
        if disallowed:
            found = regex.search("|".join(regex.escape(s) for s in disallowed), text)
            if found:
                raise ValueError(f"text contains the special token {found.group()!r}, which is not allowed; "
                                 f"use allowed_special to encode it as a special token or "
                                 f"disallowed_special=() to encode it as ordinary text")
        ids = []
        for k, part in enumerate(split_special(text, allowed)):
            if k % 2:  # odd parts are the allowed specials the split matched
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids):
        out, special = [], None
        for i in ids:
            b = self.vocab.get(i)
            if b is None:
                if special is None:
                    special = {v: s.encode("utf-8") for s, v in self.special_tokens.items()}
                b = special.get(i)
                if b is None:
                    raise ValueError(f"unknown token id {i!r}")
            out.append(b)
        return b"".join(out)

    def decode(self, ids):
        """Token ids to text. A slice of ids can end inside a multi-byte character: such
        invalid UTF-8 becomes U+FFFD, as in tiktoken."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- saving and exporting

    def save(self, prefix):
        """Write PREFIX.model (what load reads) and PREFIX.vocab (for people), atomically."""
        byte_ids = [self.ranks[bytes([b])] for b in range(256)]
        lines = [MODEL_MAGIC, f"pattern {json.dumps(self.pattern)}"]
        lines.append("bytes identity" if byte_ids == list(range(256)) else "bytes " + " ".join(map(str, byte_ids)))
        lines += [f"special {json.dumps(s)} {i}" for s, i in self.special_tokens.items()]
        lines.append(f"merges {len(self.merges)}")
        lines += [f"{a} {b}" for a, b in self.merges]
        write_atomic(prefix + ".model", "\n".join(lines) + "\n")

        # the vocab listing: every id, its text, and for merged tokens the two tokens it came from
        vocab_lines = [f"# {len(self.vocab)} tokens + {len(self.special_tokens)} special; "
                       f"id [token] and, for merges, [left] [right]"]
        for i in range(len(self.vocab)):
            vocab_lines.append(f"{i} [{render(self.vocab[i])}]")
        for (a, b), i in self.merges.items():
            vocab_lines[i + 1] += f" <- [{render(self.vocab[a])}] [{render(self.vocab[b])}]"
        vocab_lines += [f"{i} {s} (special)" for s, i in self.special_tokens.items()]
        write_atomic(prefix + ".vocab", "\n".join(vocab_lines) + "\n")
        return prefix + ".model"

    def to_tiktoken(self, name="bpe"):
        """A tiktoken.Encoding with these merges: same ids, at tiktoken's speed."""
        import tiktoken  # only needed here
        return tiktoken.Encoding(name, pat_str=self.pattern_regex, mergeable_ranks=dict(self.ranks),
                                 special_tokens=dict(self.special_tokens))


def write_atomic(path, text):
    """Write to a temporary file next to path, then rename: readers never see half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

# -----------------------------------------------------------------------------
# 4. Loading: our .model files, tiktoken's .tiktoken files, GPT-2's original files


def read_text_file(path, what="file"):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8 text: {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None


def load(path, pattern="gpt2", special_tokens=None):
    """Load a .model file written by save, or a .tiktoken ranks file (base64 token, rank per line).
    A .tiktoken file holds only ranks, so pattern and special_tokens are for it (a .model file has
    its own); by default <|endoftext|> gets the next free id, as in GPT-2 (50256 for r50k_base)."""
    text = read_text_file(path, "tokenizer file")
    lines = text.split("\n")
    if lines[0] == MODEL_MAGIC:
        return _load_model(path, lines)
    if regex.fullmatch(r"[A-Za-z0-9+/]+=* \d+", lines[0]):
        return _load_tiktoken(path, lines, pattern, special_tokens)
    hint = ""
    if lines[0].startswith(("#version", "{")):
        hint = "; for GPT-2's vocab.bpe + encoder.json use from_gpt2_files"
    raise ValueError(f"{path} is not a tokenizer file: expected first line {MODEL_MAGIC!r} "
                     f"or 'base64 rank', got {one_line(lines[0])}{hint}")


def _load_model(path, lines):
    if lines[-1] == "":
        lines.pop()  # the final newline
    pos = 1

    def take(key):  # the next line, which must start with key; returns the rest of it
        nonlocal pos
        if pos >= len(lines):
            raise ValueError(f"{path}: truncated, expected a '{key}' line at line {pos + 1}")
        line = lines[pos]
        pos += 1
        if not line.startswith(key + " "):
            raise ValueError(f"{path}:{pos}: expected a '{key}' line, got {one_line(line)}")
        return line[len(key) + 1:]

    try:
        tok = Tokenizer(json.loads(take("pattern")))
        rest = take("bytes")
        byte_ids = list(range(256)) if rest == "identity" else [int(x) for x in rest.split(" ")]
        tok._set_merges(byte_ids, [])
        specials = {}
        while pos < len(lines) and lines[pos].startswith("special "):
            s, i = take("special").rsplit(" ", 1)
            specials[json.loads(s)] = int(i)
        n = int(take("merges"))
        if len(lines) - pos != n:
            raise ValueError(f"{path}: header says {n} merges, found {len(lines) - pos} lines")
        for k in range(n):
            pos += 1
            pair = lines[pos - 1].split(" ")
            if len(pair) != 2 or not all(x.isdigit() for x in pair):
                raise ValueError(f"expected a merge 'left_id right_id', got {one_line(lines[pos - 1])}")
            tok._add_merge(int(pair[0]), int(pair[1]))
        tok.register_special_tokens(specials)
    except ValueError as e:  # also json's and int()'s errors; say where it went wrong
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(msg if msg.startswith(path) else f"{path}:{pos}: {msg}") from None
    return tok


def _load_tiktoken(path, lines, pattern, special_tokens):
    ranks = {}
    for k, line in enumerate(lines):
        if not line:
            continue
        try:
            token, rank = line.split(" ")
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:  # binascii.Error is a ValueError too
            raise ValueError(f"{path}:{k + 1}: expected 'base64 rank', got {one_line(line)}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be distinct and run 0, 1, 2, ... without gaps")
    if any(bytes([b]) not in ranks or ranks[bytes([b])] >= 256 for b in range(256)):
        raise ValueError(f"{path}: the 256 single bytes must have ranks 0..255")
    # The file has no merges, only ranks. Recover each token's merge by running BPE on its bytes
    # with only lower-ranked tokens: what remains are the two tokens that merge into it.
    tok = Tokenizer(pattern)
    tok._set_merges([ranks[bytes([b])] for b in range(256)], [])
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])[256:]:
        parts = bpe_merge(token, ranks, max_rank=rank)
        if len(parts) != 2:
            raise ValueError(f"{path}: token {render(token)!r} (rank {rank}) is not a merge of two earlier tokens")
        tok._add_merge(ranks[parts[0]], ranks[parts[1]])
    tok.register_special_tokens({"<|endoftext|>": tok.n_vocab} if special_tokens is None else special_tokens)
    return tok


def gpt2_byte_to_unicode():
    """GPT-2's vocab.bpe/encoder.json write every token as printable text: bytes that are visible
    latin-1 characters stand for themselves, the other 68 (controls, space, ...) are shifted to
    chr(256), chr(257), ... in byte order. So the space byte appears as 'Ġ' (chr(288))."""
    table, shift = {}, 0
    for b in range(256):
        if chr(b).isprintable() and b != ord(" "):
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def from_gpt2_files(vocab_bpe_path, encoder_json_path):
    """GPT-2's original release: vocab.bpe lists the 50,000 merges in order (as pairs of printable
    token strings), encoder.json maps each token string to its id. The id is the rank."""
    merges_text = read_text_file(vocab_bpe_path, "vocab.bpe file")
    try:
        encoder = json.loads(read_text_file(encoder_json_path, "encoder.json file"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{encoder_json_path} is not JSON: {e}") from None
    if not isinstance(encoder, dict) or not all(isinstance(i, int) for i in encoder.values()):
        raise ValueError(f"{encoder_json_path} is not a GPT-2 encoder.json (token -> id)")
    to_char = gpt2_byte_to_unicode()
    to_byte = {c: b for b, c in to_char.items()}
    special = {s: encoder.pop(s) for s in ["<|endoftext|>"] if s in encoder}
    if any(to_char[b] not in encoder for b in range(256)):
        raise ValueError(f"{encoder_json_path} lacks some of the 256 single-byte tokens")
    byte_ids = [encoder[to_char[b]] for b in range(256)]
    merges = []
    for k, line in enumerate(merges_text.splitlines()):
        if not line or (k == 0 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(s in encoder for s in pair + ["".join(pair)]):
            raise ValueError(f"{vocab_bpe_path}:{k + 1}: expected two tokens of encoder.json, got {one_line(line)}")
        merges.append((encoder[pair[0]], encoder[pair[1]]))
        if encoder["".join(pair)] != 255 + len(merges):  # merge number n makes token 256 + n
            raise ValueError(f"{vocab_bpe_path}:{k + 1}: merge {one_line(line)} makes token "
                             f"{encoder[''.join(pair)]} in encoder.json, expected {255 + len(merges)}")
    if len(encoder) != 256 + len(merges):
        raise ValueError(f"{encoder_json_path} has {len(encoder)} ordinary tokens, vocab.bpe makes {256 + len(merges)}")
    tok = Tokenizer("gpt2")
    tok._set_merges(byte_ids, merges)
    # cross-check: each token's bytes, built up by the merges, are its encoder.json string mapped back
    for s, i in encoder.items():
        if any(c not in to_byte for c in s) or bytes(to_byte[c] for c in s) != tok.vocab[i]:
            raise ValueError(f"{encoder_json_path}: token {one_line(s)} does not match its merges in vocab.bpe")
    tok.register_special_tokens(special)
    return tok

# -----------------------------------------------------------------------------
# 5. Command line: train and report, or benchmark


def print_merges(tok, ks):
    merges = list(tok.merges.items())
    for k in ks:
        (a, b), i = merges[k]
        left, right, token = (render(tok.vocab[x]) for x in (a, b, i))
        print(f"  merge {k + 1:5d}: [{left}] + [{right}] -> [{token}] (id {i})")


def train_cli(input, vocab_size, out, pattern, special_tokens, val_fraction):
    specials = [s for s in special_tokens.split(",") if s]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is too small: need 256 byte tokens + {len(specials)} special tokens")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    text = read_text_file(input, "input file")
    if not text:
        raise ValueError(f"input file is empty: {input}")
    n = int(len(text) * (1 - val_fraction))
    train_text, val_text = text[:n], text[n:]
    tok = Tokenizer(pattern)
    t0 = time.time()
    tok.train(train_text, vocab_size - len(specials))
    dt = time.time() - t0
    tok.register_special_tokens(specials)
    model_path = tok.save(out)
    print(f"trained {len(tok.merges)} merges on {len(train_text.encode('utf-8')):,} bytes in {dt:.2f}s "
          f"(pattern {pattern}); vocab {tok.n_vocab} incl. {len(specials)} special")
    print(f"saved {model_path} and {out}.vocab")
    if val_text:
        nbytes, ntok = len(val_text.encode("utf-8")), len(tok.encode_ordinary(val_text))
        print(f"held-out last {val_fraction:.0%}: {nbytes:,} bytes -> {ntok:,} tokens "
              f"= {nbytes / ntok:.2f} bytes/token")
    k = len(tok.merges)
    print("first and last merges:")
    print_merges(tok, sorted(set(range(min(5, k))) | set(range(max(0, k - 5), k))))


def bench_cli(input, gpt2_dir):
    if hasattr(os, "sched_setaffinity"):  # the targets are for one core; tiktoken's encode is single-threaded anyway
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    text = read_text_file(input, "input file")
    if not text:
        raise ValueError(f"input file is empty: {input}")
    mb = len(text.encode("utf-8")) / 1e6
    print(f"input: {input} ({mb:.2f} MB), one CPU core")

    t0 = time.time()
    Tokenizer("gpt2").train_slow(text, 256 + 4)
    per_merge = (time.time() - t0) / 4
    print(f"train_slow (recount everything):  {per_merge:.2f} s per merge, so ~{256 * per_merge:.0f} s for 256 merges")
    for vocab_size in (1024, 4096):  # the 4096 one is kept below, to time encoding with it
        tok = Tokenizer("gpt2")
        t0 = time.time()
        tok.train(text, vocab_size)
        print(f"train to vocab {vocab_size}:           {time.time() - t0:.2f} s ({len(tok.merges)} merges)")

    def speed(encode, fresh=None):  # best of 3, as other programs may share the core
        best = 0
        for _ in range(3):
            if fresh is not None:
                fresh._cache.clear()  # time a first pass: every distinct chunk is merged once
            t0 = time.time()
            ids = encode(text)
            best = max(best, mb / (time.time() - t0))
        return best, ids

    if not gpt2_dir:  # GPT-2's original tokenizer files, fetched once
        from download import CACHE_DIR, download
        gpt2_dir = os.path.join(CACHE_DIR, "gpt2-tokenizer")
        for f in ("vocab.bpe", "encoder.json"):
            if not os.path.exists(os.path.join(gpt2_dir, f)):
                try:
                    download(f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{f}",
                             os.path.join(gpt2_dir, f))
                except RuntimeError as e:
                    raise ValueError(f"{e}. Offline? Pass --gpt2_dir=A_FOLDER_WITH_vocab.bpe_AND_encoder.json")
    paths = [os.path.join(gpt2_dir, f) for f in ("vocab.bpe", "encoder.json")]
    gpt2 = from_gpt2_files(*paths)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", gpt2_dir)  # tiktoken reads its own copies there if present
    import tiktoken
    reference = tiktoken.get_encoding("gpt2")
    for name, encoder in [("bpe.py, GPT-2 ranks", gpt2), ("bpe.py, trained 4096", tok)]:
        cold, ids = speed(encoder.encode, fresh=encoder)
        warm, _ = speed(encoder.encode)  # every chunk found in the cache
        print(f"encode {name}:  {cold:6.2f} MB/s first pass, {warm:6.2f} MB/s cached, {len(ids):,} tokens")
        fast, ids_tt = speed(encoder.to_tiktoken().encode)
        print(f"encode {name} via to_tiktoken(): {fast:6.2f} MB/s, same ids: {ids_tt == ids}")
    fast, ids_tt = speed(reference.encode)
    print(f"encode tiktoken gpt2:  {fast:6.2f} MB/s, same ids as bpe.py: {ids_tt == gpt2.encode(text)}")


if __name__ == "__main__":
    # config, overridable as --key=value (see configurator.py); defaults train on tiny shakespeare
    input = "data/shakespeare_char/input.txt"  # UTF-8 text to train on (python prepare.py shakespeare_char gets it)
    vocab_size = 4096             # including the special tokens
    out = "out/tokenizer"         # writes out/tokenizer.model and out/tokenizer.vocab
    pattern = "gpt2"              # gpt2 | gpt4 | none | a regex
    special_tokens = "<|endoftext|>"  # comma separated, registered after training
    val_fraction = 0.1            # train on the first 90%, report compression on the rest
    bench = False                 # instead of training: time training and encoding
    gpt2_dir = ""                 # for --bench: a folder with GPT-2's vocab.bpe and encoder.json ("": download them)
    from configurator import apply_config
    from common import check_settings
    apply_config(globals())
    check_settings(globals(), positive=('vocab_size',), fractions=('val_fraction',))
    try:
        if bench:
            bench_cli(input, gpt2_dir)
        else:
            train_cli(input, vocab_size, out, pattern, special_tokens, val_fraction)
    except (ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(1)
