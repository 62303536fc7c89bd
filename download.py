"""
Downloads, done once and checked: tinyshakespeare, GPT-2's weights, Alpaca, HH-RLHF. Every download streams
to a temp file and is renamed only when complete, so a failed one never leaves half a file behind.
"""
import hashlib
import os
import sys
HF_ENDPOINT = os.environ.get('HF_ENDPOINT', 'https://huggingface.co')
CACHE_DIR = os.environ.get('GPT_CACHE_DIR', os.path.join(os.path.expanduser('~'), '.cache', 'gpt-recipe'))
GPT2_NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')


def download(url, path, expected_sha256=None, expected_size=None, timeout=30):
    """Stream url to path with a progress line; write to a temp file and rename, so a failed download
    never leaves a half-written file behind. Raises RuntimeError with a readable message on failure."""
    import requests
    tmp = path + '.part'
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with requests.get(url, stream=True, timeout=timeout) as r:
            r.raise_for_status()
            total = int(r.headers.get('content-length', 0))
            done, sha = 0, hashlib.sha256()
            with open(tmp, 'wb') as f:
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    sha.update(chunk)
                    done += len(chunk)
                    if total:
                        print(f"\rdownloading {os.path.basename(path)}: {done / 2**20:.1f}/{total / 2**20:.1f} MiB",
                              end='', file=sys.stderr, flush=True)
        if total:
            print(file=sys.stderr)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(f"download of {url} failed: {e}") from None
    if expected_size is not None and done != expected_size:
        os.remove(tmp)
        raise RuntimeError(f"download of {url} failed: got {done} bytes, expected {expected_size}")
    if expected_sha256 is not None and sha.hexdigest() != expected_sha256:
        os.remove(tmp)
        raise RuntimeError(f"download of {url} failed: sha256 {sha.hexdigest()} is not {expected_sha256}")
    os.replace(tmp, path)
    return path


def download_gpt2(name):
    """Fetch an HF GPT-2 (config.json + model.safetensors) once into the cache; return its folder."""
    if name not in GPT2_NAMES:
        raise ValueError(f"unknown model '{name}': expected one of {', '.join(GPT2_NAMES)} or a local directory")
    folder = os.path.join(CACHE_DIR, name)
    for fname in ('config.json', 'model.safetensors'):
        path = os.path.join(folder, fname)
        if not os.path.exists(path):
            try:
                download(f"{HF_ENDPOINT}/openai-community/{name}/resolve/main/{fname}", path)
            except RuntimeError as e:
                raise RuntimeError(f"{e}. Offline? Put config.json and model.safetensors of {name} in a "
                                   f"directory and pass that directory instead of '{name}'") from None
    return folder
