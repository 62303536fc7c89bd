"""
Turn text into the token files train.py reads: data/<dataset>/train.bin, val.bin (flat arrays of token
ids, uint16 while the vocabulary fits, uint32 beyond) and meta.json (the tokenizer, vocab size, dtype).

    python prepare.py shakespeare_char          # tinyshakespeare, one token per character
    python prepare.py shakespeare               # the same text, GPT-2's BPE tokenizer (tiktoken)
    python prepare.py --input=FILE_OR_DIR --dataset=NAME --tokenizer=char|gpt2|PATH.model

The text is streamed in blocks, so a multi-GB input needs memory for one block, not the whole corpus.
The last val_fraction of the text (by bytes) is the validation split.
"""
import json
import os
import sys

import numpy as np

# -----------------------------------------------------------------------------
dataset = ''          # output folder under data_dir; also picks defaults for the known datasets below
input = ''            # a text file or a directory of them; empty: the known dataset's download
tokenizer = 'char'    # 'char', 'gpt2' (tiktoken) or the path of a tokenizer trained with bpe.py (PREFIX.model)
val_fraction = 0.1
data_dir = 'data'
url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
block_bytes = 1 << 20  # how much text is encoded at a time
# -----------------------------------------------------------------------------
TINYSHAKESPEARE = dict(size=1115394, sha256='86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed')
KNOWN = {'shakespeare_char': 'char', 'shakespeare': 'gpt2'}


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def input_files(path):
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if not f.startswith('.'))
        if not files:
            fail(f"no files in directory {path}")
        return files
    if not os.path.isfile(path):
        fail(f"input not found: {path}")
    return [path]


def text_blocks(files, block_bytes):
    """Yield (text, bytes_before_it, is_last_of_file) in pieces of about block_bytes, each cut just after a
    newline that sits between two non-space characters. GPT-2's (and GPT-4's) split pattern never puts
    such a newline inside a chunk, so encoding block by block gives exactly the ids of encoding it all."""
    offset = 0
    for path in files:
        carry = ''
        with open(path, encoding='utf-8') as f:
            while new := f.read(block_bytes):
                text = carry + new
                cut = last_safe_cut(text)
                if cut < 0 and len(text) < 64 * block_bytes:
                    carry = text  # no safe place yet: read more
                    continue
                cut = len(text) if cut < 0 else cut
                yield text[:cut], offset, False
                offset += len(text[:cut].encode('utf-8'))
                carry = text[cut:]
        yield carry, offset, True
        offset += len(carry.encode('utf-8'))


def is_safe_cut(text, i):
    """A newline at i with non-space characters on both sides."""
    return 0 < i < len(text) - 1 and not text[i - 1].isspace() and not text[i + 1].isspace()


def last_safe_cut(text):
    """Index just after the last safe newline, or -1."""
    i = len(text) - 1
    while (i := text.rfind('\n', 0, i)) > 0:
        if is_safe_cut(text, i):
            return i + 1
    return -1


def first_safe_cut(text, start):
    """Index just after the first safe newline at or after start, or len(text)."""
    i = max(start, 1) - 1
    while (i := text.find('\n', i + 1)) != -1:
        if is_safe_cut(text, i):
            return i + 1
    return len(text)


def build_tokenizer(kind, files):
    """Return (encode, meta) for the tokenizer named by kind."""
    if kind == 'char':
        chars = set()
        for path in files:  # first pass: the character set, streamed
            with open(path, encoding='utf-8') as f:
                while block := f.read(1 << 22):
                    chars.update(block)
        vocab = sorted(chars)
        stoi = {ch: i for i, ch in enumerate(vocab)}
        return (lambda text: [stoi[c] for c in text]), dict(tokenizer='char', vocab=vocab, vocab_size=len(vocab),
                                                            eot_token=None)
    if kind == 'gpt2':
        from model import gpt2_encoding
        try:
            enc = gpt2_encoding()
        except RuntimeError as e:
            fail(str(e))
        # '<|endoftext|>' inside the text is plain text here; the eot id only separates files
        return enc.encode_ordinary, dict(tokenizer='gpt2', vocab_size=enc.n_vocab, eot_token=enc.eot_token)
    if os.path.isfile(kind):
        import bpe
        try:
            tok = bpe.load(kind)
        except (ValueError, OSError) as e:
            fail(f"cannot load tokenizer {kind}: {e}")
        fast = tok.to_tiktoken()  # tiktoken's speed with our merges
        with open(kind, encoding='utf-8') as f:
            model_text = f.read()
        return fast.encode_ordinary, dict(tokenizer='bpe', vocab_size=tok.n_vocab, bpe_model=model_text,
                                          bpe_model_path=os.path.abspath(kind),
                                          eot_token=tok.special_tokens.get('<|endoftext|>'))
    fail(f"unknown tokenizer '{kind}': expected char, gpt2 or the path of a bpe.py .model file")


def prepare(dataset, input, tokenizer, val_fraction, data_dir, url):
    out_dir = os.path.join(data_dir, dataset)
    if not input:
        if dataset not in KNOWN:
            fail(f"no --input given and '{dataset}' is not a known dataset ({', '.join(KNOWN)})")
        input = os.path.join(out_dir, 'input.txt')
        if not os.path.exists(input):
            from model import download
            try:
                download(url, input, expected_sha256=TINYSHAKESPEARE['sha256'], expected_size=TINYSHAKESPEARE['size'])
            except RuntimeError as e:
                fail(f"{e}. Offline? Get tinyshakespeare's input.txt and run: "
                     f"python prepare.py {dataset} --input=PATH/TO/input.txt")
    if not 0.0 <= val_fraction < 1.0:
        fail(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = input_files(input)
    total = sum(os.path.getsize(p) for p in files)
    if total == 0:
        fail(f"input {input} is empty")
    try:
        encode, meta = build_tokenizer(tokenizer, files)
    except UnicodeDecodeError as e:
        fail(f"input is not UTF-8 text: {e}")
    dtype = np.uint16 if meta['vocab_size'] <= 2**16 else np.uint32
    split_at = int(total * (1 - val_fraction))  # byte offset where the val split begins

    os.makedirs(out_dir, exist_ok=True)
    paths = {s: os.path.join(out_dir, f'{s}.bin') for s in ('train', 'val')}
    outs = {s: open(p + '.tmp', 'wb') for s, p in paths.items()}
    counts = {'train': 0, 'val': 0}

    def write(split, ids):
        np.asarray(ids, dtype=dtype).tofile(outs[split])
        counts[split] += len(ids)

    try:
        for text, offset, last_of_file in text_blocks(files, block_bytes):
            end = offset + len(text.encode('utf-8'))
            if offset >= split_at:
                write('val', encode(text))
            elif end <= split_at:
                write('train', encode(text))
            else:  # this block straddles the split: cut it at a safe newline after the split point
                n_chars = len(text.encode('utf-8')[:split_at - offset].decode('utf-8', errors='ignore'))
                cut = first_safe_cut(text, n_chars)
                write('train', encode(text[:cut]))
                write('val', encode(text[cut:]))
            if last_of_file and len(files) > 1 and meta['eot_token'] is not None:
                write('val' if end > split_at else 'train', [meta['eot_token']])
    except (UnicodeDecodeError, KeyError) as e:
        for f in outs.values():
            f.close()
            os.remove(f.name)
        fail(f"cannot encode input: {e}")
    for f in outs.values():
        f.close()
    if counts['train'] == 0 or (val_fraction > 0 and counts['val'] == 0):
        for p in paths.values():
            os.remove(p + '.tmp')
        fail(f"input too small to split: {counts['train']} train and {counts['val']} val tokens")
    meta.update(dtype=np.dtype(dtype).name, train_tokens=counts['train'], val_tokens=counts['val'],
                source=os.path.abspath(input), val_fraction=val_fraction)
    with open(os.path.join(out_dir, 'meta.json.tmp'), 'w', encoding='utf-8') as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    # all three files appear together, so a crash never leaves a mix of old and new
    for p in paths.values():
        os.replace(p + '.tmp', p)
    os.replace(os.path.join(out_dir, 'meta.json.tmp'), os.path.join(out_dir, 'meta.json'))
    print(f"{out_dir}: {counts['train']:,} train and {counts['val']:,} val tokens, "
          f"vocab {meta['vocab_size']:,} ({meta['tokenizer']}), {meta['dtype']}")
    return meta


if __name__ == '__main__':
    from configurator import apply_config
    argv = sys.argv[1:]
    if argv and not argv[0].startswith('--') and not os.path.isfile(argv[0]):
        name = argv.pop(0)  # `python prepare.py shakespeare_char`: a known dataset by name
        if name not in KNOWN:
            fail(f"unknown dataset '{name}': expected {', '.join(KNOWN)}, or --input=PATH --dataset=NAME")
        argv = [f'--dataset={name}', f'--tokenizer={KNOWN[name]}'] + argv
    apply_config(globals(), argv)
    if not dataset:
        fail("name the dataset: python prepare.py shakespeare_char, or --input=PATH --dataset=NAME")
    prepare(dataset, input, tokenizer, val_fraction, data_dir, url)
