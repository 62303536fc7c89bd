"""sample.py against references: greedy text from a plain argmax loop over the checkpoint's model, and the
streamed text of one sample against the whole sample decoded at once."""
import numpy as np
import pytest
import tiktoken
import torch

from conftest import error_line, run, train_args
from model import model_from_checkpoint
from tokenizer import load_tokenizer


def sample(out_dir, *args, check=True):
    return run(['sample.py', f'--out_dir={out_dir}', '--device=cpu', *args], check=check)


def greedy_reference(ckpt, prompt, n):
    """The greedy continuation, by a plain loop: the whole context (its last block_size tokens) through
    model(idx) at every step, and the argmax of the last position's logits."""
    model, meta = model_from_checkpoint(str(ckpt))
    model.eval()
    tok = load_tokenizer(meta['data_meta'])
    idx = tok.encode(prompt)
    bs = model.config.block_size
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([idx[-bs:]]))
            idx.append(int(logits[0, -1, :tok.n_vocab].argmax()))
    return tok.decode(idx[len(tok.encode(prompt)):])


@pytest.mark.parametrize('num_samples', [1, 2])
def test_temperature_zero_is_the_argmax_loop(char_ckpt, num_samples):
    prompt = 'ROMEO:\nBut soft, what light'
    n = 80  # longer than block_size 32: the context must slide
    expected = greedy_reference(char_ckpt / 'ckpt.pt', prompt, n)
    p = sample(char_ckpt, f'--start={prompt}', '--temperature=0', f'--max_new_tokens={n}',
               f'--num_samples={num_samples}')
    if num_samples == 1:  # streamed
        assert p.stdout == prompt + expected + '\n'
    else:
        assert p.stdout == (prompt + expected + '\n---------------\n') * 2


def test_start_from_file(char_ckpt, tmp_path):
    prompt = 'KING RICHARD:\nWhat say you, sir?\n\n'
    f = tmp_path / 'prompt.txt'
    f.write_text(prompt, encoding='utf-8')
    p = sample(char_ckpt, f'--start=FILE:{f}', '--temperature=0', '--max_new_tokens=40', '--num_samples=1')
    assert p.stdout == prompt + greedy_reference(char_ckpt / 'ckpt.pt', prompt, 40) + '\n'


@pytest.fixture(scope='module')
def gpt2_ckpt(gpt2_data, tmp_path_factory):
    """A tiny model on GPT-2 tokens: barely trained, so it samples all over the 50k vocabulary, including
    tokens that are only part of a UTF-8 character."""
    out = tmp_path_factory.mktemp('out_gpt2')
    run(train_args(gpt2_data, out, '--max_iters=2', '--eval_interval=2', '--eval_iters=1', dataset='shakespeare'))
    return out


def test_streaming_prints_the_text_of_the_whole_sample(gpt2_ckpt):
    prompt = 'Caf\u00e9 \u2713 na\u00efve'
    n, seed = 300, 7
    p = sample(gpt2_ckpt, f'--start={prompt}', '--num_samples=1', '--temperature=1.0', '--top_k=0',
               f'--max_new_tokens={n}', f'--seed={seed}')
    # the same sample drawn at once with the library's batched generation, decoded in one piece
    model, meta = model_from_checkpoint(str(gpt2_ckpt / 'ckpt.pt'))
    model.eval()
    enc = tiktoken.get_encoding('gpt2')
    rows = model.generate([enc.encode_ordinary(prompt)], n, temperature=1.0, top_k=None, top_p=1.0,
                          generator=torch.Generator().manual_seed(seed), vocab_limit=enc.n_vocab)
    assert p.stdout == prompt + enc.decode(rows[0]) + '\n'
    # the sample did have tokens that are not whole UTF-8 characters, so the streaming had to wait for them
    partial = [t for t in rows[0] if not is_utf8(enc.decode_single_token_bytes(t))]
    assert partial


def is_utf8(b):
    try:
        b.decode('utf-8')
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize('args,expected', [
    (['--out_dir=MISSING'], 'no checkpoint (ckpt.pt or model.pt)'),
    (['--start=FILE:MISSING/prompt.txt'], 'cannot read the prompt file'),
    (['--start=\u00c6sop'], 'not in the vocabulary'),
    (['--num_samples=0'], 'num_samples must be > 0, got 0'),
    (['--temperature=-1'], 'temperature'),
])
def test_errors_are_one_line(args, expected, char_ckpt, tmp_path):
    args = [a.replace('MISSING', str(tmp_path / 'nothing')) for a in args]
    p = sample(char_ckpt, *args, check=False)
    assert expected in error_line(p)
    assert p.stdout == ''


def test_bpe_tokenizer_through_prepare_train_and_sample(tmp_path):
    """A tokenizer trained with bpe.py: prepare.py encodes with it and records it in meta.json, and
    sample.py decodes with it, giving the text of the greedy reference loop."""
    import json
    import bpe
    from conftest import SHAKESPEARE
    text = SHAKESPEARE.read_text()[:60_000]
    (tmp_path / 'in.txt').write_text(text)
    run(['bpe.py', f'--input={tmp_path / "in.txt"}', '--vocab_size=400', f'--out={tmp_path / "tok"}'])
    run(['prepare.py', f'--input={tmp_path / "in.txt"}', '--dataset=mybpe', f'--data_dir={tmp_path}',
         f'--tokenizer={tmp_path / "tok.model"}'])
    meta = json.loads((tmp_path / 'mybpe' / 'meta.json').read_text())
    tok = bpe.load(str(tmp_path / 'tok.model'))
    assert meta['tokenizer'] == 'bpe' and meta['vocab_size'] == tok.n_vocab
    assert meta['bpe_model'] == (tmp_path / 'tok.model').read_text()
    ids = [int(i) for split in ('train', 'val')
           for i in np.fromfile(tmp_path / 'mybpe' / f'{split}.bin', dtype=meta['dtype'])]
    assert ids == tok.encode_ordinary(text)
    run(train_args(tmp_path, tmp_path / 'out', '--max_iters=20', dataset='mybpe'))
    prompt = 'ROMEO:'
    expected = greedy_reference(tmp_path / 'out' / 'ckpt.pt', prompt, 40)
    p = sample(tmp_path / 'out', f'--start={prompt}', '--temperature=0', '--max_new_tokens=40', '--num_samples=2')
    assert p.stdout == (prompt + expected + '\n---------------\n') * 2
