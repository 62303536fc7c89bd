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


def run(args, check=True, timeout=600, env=None):
    """Run a repository script with this Python, from the repository root; return the CompletedProcess."""
    full_env = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope='session')
def char_data(tmp_path_factory):
    """tinyshakespeare prepared at character level into a temporary data_dir; returns that data_dir."""
    data_dir = tmp_path_factory.mktemp('data')
    run(['prepare.py', 'shakespeare_char', f'--input={SHAKESPEARE}', f'--data_dir={data_dir}'])
    return data_dir
