"""prepare.py against references: the exact text back from the char ids, tiktoken's own GPT-2 ids over the
whole text however it is streamed, a real download from a local HTTP server; and failures that leave a
previous dataset untouched."""
import functools
import http.server
import json
import shutil
import socket
import threading

import numpy as np
import pytest
import tiktoken

from conftest import SHAKESPEARE, error_line, run

EOT = 50256


def load(data_dir, name):
    """(train ids, val ids, meta) of a prepared dataset."""
    folder = data_dir / name
    meta = json.loads((folder / 'meta.json').read_text(encoding='utf-8'))
    ids = [np.fromfile(folder / f'{s}.bin', dtype=meta['dtype']) for s in ('train', 'val')]
    return ids[0], ids[1], meta


def char_decode(ids, meta):
    return ''.join(meta['vocab'][i] for i in ids)


def snapshot(folder):
    """Every file under folder with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


# text that is hard to cut into blocks: CRLF and lone CR, runs of spaces and newlines, '<|endoftext|>' as
# plain text, contractions right after a newline, digits, non-ASCII, and a long stretch with no newline
TRICKY = ("First line\r\nSecond  line\r\n\r\nthird\rline\n\n\n  indented\n'tis 'll 's\n<|endoftext|>\n"
          "numbers 12345 67890\n\tTab\u00e9 caf\u00e9 \u4e2d\u6587 \U0001F600!\n" + "x" * 300 + "\n"
          "a\nb\nc \n d\n" + "word " * 80 + "\nend\u2028sep\u0085next\n")


def test_char_round_trip_and_meta(char_data):
    text = SHAKESPEARE.read_text(encoding='utf-8')
    train, val, meta = load(char_data, 'shakespeare_char')
    assert char_decode(train, meta) + char_decode(val, meta) == text
    assert meta['tokenizer'] == 'char' and meta['vocab'] == sorted(set(text)) and meta['vocab_size'] == 65
    assert meta['dtype'] == 'uint16' and train.dtype == np.uint16
    assert (meta['train_tokens'], meta['val_tokens']) == (len(train), len(val))
    # the last 10% of the bytes, cut just after the first newline past that point
    train_bytes = len(char_decode(train, meta).encode('utf-8'))
    split_at = int(SHAKESPEARE.stat().st_size * 0.9)
    assert split_at <= train_bytes < split_at + 200 and char_decode(train, meta).endswith('\n')


def test_char_keeps_the_text_exactly(tmp_path):
    src = tmp_path / 'tricky.txt'
    src.write_bytes((TRICKY * 20).encode('utf-8'))
    run(['prepare.py', f'--input={src}', '--dataset=tricky', f'--data_dir={tmp_path}', '--block_bytes=64'])
    train, val, meta = load(tmp_path, 'tricky')
    assert char_decode(train, meta) + char_decode(val, meta) == TRICKY * 20  # CR and CRLF too
    assert meta['vocab'] == sorted(set(TRICKY))


@pytest.mark.parametrize('block_bytes', [300, 5000])
def test_gpt2_ids_equal_tiktoken_over_the_whole_text(block_bytes, tmp_path):
    # tinyshakespeare's first 200 kB plus the tricky text: small blocks put many cuts into both
    text = SHAKESPEARE.read_text(encoding='utf-8')[:200_000] + TRICKY * 5
    src = tmp_path / 'in.txt'
    src.write_bytes(text.encode('utf-8'))
    run(['prepare.py', f'--input={src}', '--dataset=ds', '--tokenizer=gpt2', f'--data_dir={tmp_path}',
         f'--block_bytes={block_bytes}', '--val_fraction=0.2'])
    train, val, meta = load(tmp_path, 'ds')
    enc = tiktoken.get_encoding('gpt2')
    assert np.concatenate([train, val]).tolist() == enc.encode_ordinary(text)
    assert meta['tokenizer'] == 'gpt2' and meta['vocab_size'] == 50257 and meta['dtype'] == 'uint16'
    assert meta['eot_token'] == EOT and EOT not in train and EOT not in val  # one file: no separator
    val_bytes = len(enc.decode(val.tolist()).encode('utf-8'))
    assert abs(val_bytes / len(text.encode('utf-8')) - 0.2) < 0.01


def test_directory_input(tmp_path):
    folder = tmp_path / 'corpus'
    (folder / 'sub').mkdir(parents=True)
    texts = {'a.txt': 'Alpha file.\nIt ends without a newline', 'b.txt': 'Beta\n' * 300,
             'sub/c.txt': 'Gamma caf\u00e9\nline two\n' * 40}
    for name, t in texts.items():
        (folder / name).write_text(t, encoding='utf-8')
    (folder / '.hidden').write_text('not part of the corpus', encoding='utf-8')
    enc = tiktoken.get_encoding('gpt2')
    order = sorted(texts)  # the files in sorted path order
    run(['prepare.py', f'--input={folder}', '--dataset=gpt', '--tokenizer=gpt2', f'--data_dir={tmp_path}'])
    train, val, meta = load(tmp_path, 'gpt')
    expected = []
    for i, name in enumerate(order):
        expected += ([EOT] if i else []) + enc.encode_ordinary(texts[name])  # eot between files
    assert np.concatenate([train, val]).tolist() == expected
    assert len(val) > 0
    run(['prepare.py', f'--input={folder}', '--dataset=chars', f'--data_dir={tmp_path}'])
    train, val, meta = load(tmp_path, 'chars')
    assert char_decode(train, meta) + char_decode(val, meta) == ''.join(texts[n] for n in order)


def test_uint32_when_the_vocabulary_exceeds_uint16(tmp_path):
    # 70,000 distinct characters (no surrogates: they are not valid in UTF-8), 60 to a line
    chars = [chr(c) for c in range(0x20, 0x20 + 75_000) if not 0xD800 <= c < 0xE000][:70_000]
    text = '\n'.join(''.join(chars[i:i + 60]) for i in range(0, len(chars), 60)) + '\n'
    src = tmp_path / 'big_vocab.txt'
    src.write_text(text, encoding='utf-8')
    run(['prepare.py', f'--input={src}', '--dataset=big', f'--data_dir={tmp_path}'])
    train, val, meta = load(tmp_path, 'big')
    assert meta['dtype'] == 'uint32' and train.dtype == np.uint32
    assert meta['vocab_size'] == 70_001 and max(train.max(), val.max()) == 70_000  # ids past 65535 intact
    assert char_decode(train, meta) + char_decode(val, meta) == text


# -----------------------------------------------------------------------------
# downloading tinyshakespeare

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(tmp_path):
    """A local HTTP server over a temporary folder: (folder, base url)."""
    root = tmp_path / 'www'
    root.mkdir()
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_download_from_a_local_server(file_server, tmp_path, char_data):
    root, url = file_server
    shutil.copy(SHAKESPEARE, root / 'input.txt')
    data = tmp_path / 'data'
    run(['prepare.py', 'shakespeare_char', f'--url={url}/input.txt', f'--data_dir={data}'])
    assert (data / 'shakespeare_char' / 'input.txt').read_bytes() == SHAKESPEARE.read_bytes()
    # the same dataset as preparing the shared file directly (char_data)
    for name in ('train.bin', 'val.bin'):
        assert (data / 'shakespeare_char' / name).read_bytes() == (char_data / 'shakespeare_char' / name).read_bytes()
    assert not list(data.rglob('*.part')) and not list(data.rglob('*.tmp'))
    # once downloaded, the file is reused: no server needed
    (root / 'input.txt').unlink()
    run(['prepare.py', 'shakespeare_char', f'--url={url}/input.txt', f'--data_dir={data}'])


@pytest.mark.parametrize('damage,expected', [('flip', 'sha256'), ('truncate', 'bytes')])
def test_download_with_wrong_bytes_is_refused(damage, expected, file_server, tmp_path):
    root, url = file_server
    data = bytearray(SHAKESPEARE.read_bytes())
    if damage == 'flip':
        data[1000] ^= 1  # same size, different hash
    else:
        del data[-10:]
    (root / 'input.txt').write_bytes(bytes(data))
    out = tmp_path / 'data'
    p = run(['prepare.py', 'shakespeare_char', f'--url={url}/input.txt', f'--data_dir={out}'], check=False)
    assert expected in error_line(p)
    assert not [f for f in out.rglob('*') if f.is_file()]  # no input.txt, no .part, no dataset


def closed_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('where', ['nothing listening', '404'])
def test_failed_download_tells_how_to_prepare_offline(where, file_server, tmp_path, char_data):
    _, url = file_server
    url = f'http://127.0.0.1:{closed_port()}/input.txt' if where == 'nothing listening' else f'{url}/missing.txt'
    data = tmp_path / 'data'
    p = run(['prepare.py', 'shakespeare_char', f'--url={url}', f'--data_dir={data}'], check=False)
    msg = error_line(p)
    command = f'python prepare.py shakespeare_char --input=PATH/TO/input.txt --data_dir={data}'
    assert msg.endswith(command) and (where == 'nothing listening' or '404' in msg)
    assert not [f for f in data.rglob('*') if f.is_file()]
    # the command it names works, with the file in place of PATH/TO/input.txt
    run(command.replace('PATH/TO/input.txt', str(SHAKESPEARE)).split()[1:])
    assert (data / 'shakespeare_char' / 'train.bin').read_bytes() == \
        (char_data / 'shakespeare_char' / 'train.bin').read_bytes()


# -----------------------------------------------------------------------------
# bad input: a one-line error, and a dataset prepared before is left exactly as it was

@pytest.fixture(scope='module')
def previous_dataset(tmp_path_factory):
    """A small dataset 'ds' prepared before the failing runs: its folder."""
    data = tmp_path_factory.mktemp('previous')
    src = data / 'old.txt'
    src.write_text('an older dataset\nwith a few lines\n' * 50, encoding='utf-8')
    run(['prepare.py', f'--input={src}', '--dataset=ds', f'--data_dir={data}'])
    return data / 'ds'


def write_input(tmp_path, kind):
    """An input file (or folder) of the given kind; returns its path."""
    path = tmp_path / 'input.txt'
    if kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'empty dir':
        path.mkdir()
    elif kind == 'latin-1':  # valid text up to a late byte that is not UTF-8
        path.write_bytes(('some fine text\n' * 2000).encode() + 'caf\u00e9\n'.encode('latin-1') + b'more\n' * 100)
    elif kind == 'one char':
        path.write_text('x', encoding='utf-8')
    elif kind != 'missing':
        path.write_text('plain text\n' * 100, encoding='utf-8')
    return path


@pytest.mark.parametrize('kind,args,expected', [
    ('empty', [], 'is empty'),
    ('empty dir', [], 'no files'),
    ('missing', [], 'input not found'),
    ('latin-1', [], 'not UTF-8'),
    ('latin-1', ['--tokenizer=gpt2', '--block_bytes=1000'], 'not UTF-8'),  # found while streaming
    ('one char', [], 'too small'),
    ('ok', ['--tokenizer=sentencepiece'], "unknown tokenizer 'sentencepiece'"),
    ('ok', ['--val_fraction=1.0'], 'val_fraction'),
])
def test_bad_input_fails_and_keeps_the_previous_dataset(kind, args, expected, tmp_path, previous_dataset):
    data = tmp_path / 'data'
    shutil.copytree(previous_dataset, data / 'ds')
    before = snapshot(data)
    src = write_input(tmp_path, kind)
    p = run(['prepare.py', f'--input={src}', '--dataset=ds', f'--data_dir={data}', *args], check=False)
    assert expected in error_line(p)
    assert snapshot(data) == before  # untouched, and no .tmp left behind


@pytest.mark.parametrize('args,expected', [
    (['shakespeare_chars'], "unknown dataset 'shakespeare_chars'"),
    ([], 'name the dataset'),
    (['--dataset=mine'], "'mine' is not a known dataset"),
    (['shakespeare_char', '--tokenizer=bogus'], "unknown tokenizer 'bogus'"),  # before any download
])
def test_bad_arguments(args, expected, tmp_path):
    data = tmp_path / 'data'
    p = run(['prepare.py', *args, f'--data_dir={data}', '--url=http://127.0.0.1:9/input.txt'], check=False)
    assert expected in error_line(p)
    assert not data.exists()


@pytest.mark.parametrize('content, message', [(b'', 'is empty'), (b'\xff\xfe\x00bad', 'is not UTF-8 text')])
def test_chat_base_corpus_refuses_an_empty_or_binary_input(tmp_path, content, message):
    bad = tmp_path / 'input.txt'
    bad.write_bytes(content)
    p = run(['prepare.py', 'shakespeare_tasks', f'--input={bad}', f'--data_dir={tmp_path / "data"}'], check=False)
    assert message in error_line(p)
    assert not (tmp_path / 'data' / 'shakespeare_tasks' / 'train.bin').exists()
