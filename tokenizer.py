"""
Tokenizers as the scripts use them: prepare.py records in a dataset's meta.json which tokenizer made it
(characters, GPT-2's BPE via tiktoken, or a bpe.py model), and load_tokenizer rebuilds that one. The chat
format's special tokens are named here. (How a BPE is trained and applied: bpe.py.)
"""
import os

CHAT_TOKENS = ('<|user|>', '<|assistant|>', '<|end|>')  # the chat format's special tokens (see render_chat)


class CharTokenizer:
    def __init__(self, vocab):
        self.vocab = vocab
        self.stoi = {ch: i for i, ch in enumerate(vocab)}
        self.n_vocab = len(vocab)
        self.special_tokens = {}

    def encode_ordinary(self, text):
        missing = sorted(set(text) - set(self.stoi))
        if missing:
            raise ValueError(f"characters not in the vocabulary: {''.join(missing)!r}")
        return [self.stoi[c] for c in text]

    encode = encode_ordinary

    def decode(self, ids):
        return ''.join(self.vocab[i] for i in ids)


def load_tokenizer(meta):
    """An object with encode(text) -> ids, encode_ordinary, decode(ids) -> text, n_vocab and a
    special_tokens dict, from a dataset's meta.json."""
    kind = meta['tokenizer']
    if kind == 'char':
        return CharTokenizer(meta['vocab'])
    if kind == 'gpt2':
        return GPT2Tokenizer()
    if kind == 'bpe':
        import tempfile
        import bpe
        with tempfile.TemporaryDirectory() as d:  # the model text travels inside meta.json
            path = os.path.join(d, 'tokenizer.model')
            with open(path, 'w', encoding='utf-8') as f:
                f.write(meta['bpe_model'])
            return bpe.load(path)
    raise ValueError(f"unknown tokenizer '{kind}' in dataset meta")


def gpt2_encoding():
    """tiktoken's GPT-2 encoding; its files are downloaded once, or read from TIKTOKEN_CACHE_DIR offline."""
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:
        raise RuntimeError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}). Offline? Set TIKTOKEN_CACHE_DIR "
                           f"to a folder holding tiktoken's cached GPT-2 files") from None


class GPT2Tokenizer:
    """GPT-2's BPE (tiktoken) plus the chat tokens at ids 50257.., which fit in the padded vocabulary of a
    model trained from scratch (50304); GPT-2's own weights get rows for them with resize_vocab.
    encode() treats '<|endoftext|>' in text as plain text."""
    def __init__(self):
        import tiktoken
        base = gpt2_encoding()
        specials = {'<|endoftext|>': base.eot_token}
        specials.update({t: base.n_vocab + i for i, t in enumerate(CHAT_TOKENS)})
        self.enc = tiktoken.Encoding('gpt2_chat', pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                     special_tokens=specials)
        self.special_tokens, self.n_vocab = specials, self.enc.n_vocab

    def encode_ordinary(self, text):
        return self.enc.encode_ordinary(text)

    encode = encode_ordinary

    def decode(self, ids):
        return self.enc.decode(ids)
