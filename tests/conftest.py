import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared' / 'data'
SHAKESPEARE = SHARED / 'tinyshakespeare' / 'input.txt'
HF_TINY = SHARED / 'hf_tiny_gpt2'
# GPT-2's tokenizer files, so tiktoken.get_encoding('gpt2') works offline
os.environ.setdefault('TIKTOKEN_CACHE_DIR', str(SHARED / 'tiktoken_cache'))
sys.path.insert(0, str(ROOT))


def script_env(env=None):
    """The environment of a script run by the tests."""
    # one thread per process unless the environment says otherwise: the test models are tiny, and on a
    # small shared machine a second thread fighting for the same cores makes them several times slower
    return {'OMP_NUM_THREADS': '1', **os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}


def run(args, check=True, timeout=600, env=None, input=None):
    """Run a repository script with this Python, from the repository root; return the CompletedProcess."""
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=script_env(env), input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope='session')
def char_data(tmp_path_factory):
    """tinyshakespeare prepared at character level into a temporary data_dir; returns that data_dir."""
    data_dir = tmp_path_factory.mktemp('data')
    run(['prepare.py', 'shakespeare_char', f'--input={SHAKESPEARE}', f'--data_dir={data_dir}'])
    return data_dir


# -----------------------------------------------------------------------------
# helpers for the script tests (train.py, sample.py, prepare.py)

# a model small enough that a few dozen iterations take a few seconds on 2 CPU cores
TINY_TRAIN = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8',
              '--gradient_accumulation_steps=1', '--dropout=0.0', '--bias=True', '--device=cpu', '--compile=False',
              '--eval_iters=4', '--log_interval=1', '--learning_rate=3e-3', '--warmup_iters=5',
              '--lr_decay_iters=100', '--min_lr=3e-4', '--eval_full_at_end=False',
              '--plot=False']  # loss.png at every evaluation costs more than these runs' training (drawn in test_train)


def train_args(data_dir, out_dir, *extra, dataset='shakespeare_char'):
    """train.py's arguments for a tiny run; later arguments override earlier ones."""
    return ['train.py', f'--dataset={dataset}', f'--data_dir={data_dir}', f'--out_dir={out_dir}', *TINY_TRAIN, *extra]


def read_metrics(out_dir):
    with open(Path(out_dir) / 'metrics.jsonl') as f:
        return [json.loads(line) for line in f]


def per_iter(records, key):
    """{iteration: value} of the records that have key; a resumed run logs some iterations twice,
    and the later record (the resumed run's) wins."""
    return {r['iter']: r[key] for r in records if key in r}


def error_line(p):
    """The process failed with exactly one 'error:' line, last on stderr, and no traceback: return it."""
    assert p.returncode != 0, f"expected a failure\nstdout:\n{p.stdout[-2000:]}\nstderr:\n{p.stderr[-2000:]}"
    assert 'Traceback' not in p.stderr, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error:')]
    assert len(errors) == 1 and lines[-1] == errors[0], p.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope='session')
def gpt2_data(tmp_path_factory):
    """tinyshakespeare prepared with GPT-2's tokenizer into a temporary data_dir; returns that data_dir."""
    data_dir = tmp_path_factory.mktemp('data_gpt2')
    run(['prepare.py', 'shakespeare', f'--input={SHAKESPEARE}', f'--data_dir={data_dir}'])
    return data_dir


@pytest.fixture(scope='session')
def char_ckpt(char_data, tmp_path_factory):
    """out_dir of a tiny char-level model trained for 20 iterations on char_data."""
    out_dir = tmp_path_factory.mktemp('out_char')
    run(train_args(char_data, out_dir, '--max_iters=20', '--eval_interval=20'))
    return out_dir


# -----------------------------------------------------------------------------
# for the chat-stage tests (dpo, reward, ppo): a byte-level tokenizer with the chat tokens (260 ids,
# nothing to train)

def tiny_tokenizer_meta(tmp_path):
    import bpe
    tok = bpe.Tokenizer('gpt2')
    tok.register_special_tokens(['<|endoftext|>', '<|user|>', '<|assistant|>', '<|end|>'])
    path = tok.save(str(tmp_path / 'bytes'))
    return {'tokenizer': 'bpe', 'vocab_size': tok.n_vocab, 'bpe_model': open(path, encoding='utf-8').read()}


@pytest.fixture(scope='module')
def tok_meta(tmp_path_factory):
    return tiny_tokenizer_meta(tmp_path_factory.mktemp('tok'))


@pytest.fixture(scope='module')
def tokenizer(tok_meta):
    from tokenizer import load_tokenizer
    return load_tokenizer(tok_meta)
