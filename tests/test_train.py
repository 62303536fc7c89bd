"""train.py against references: the loss at initialisation (ln of the vocabulary), the whole-val loss
recomputed slowly from the checkpoint, the learning-rate schedule written out, one process (for two DDP
processes; the killed-and-resumed run is in test_resume.py); and runs that must stop with one clear line."""
import math
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import HF_TINY, SHAKESPEARE, error_line, per_iter, read_metrics, run, train_args
from model import model_from_checkpoint


def close(a, b, rel=1e-5):
    return abs(a - b) <= rel * max(abs(a), abs(b))


def test_short_run_lowers_val_loss(char_data, tmp_path):
    out = tmp_path / 'out'
    lr, min_lr, warmup, decay = 3e-3, 3e-4, 5, 100
    p = run(train_args(char_data, out, '--max_iters=40', '--eval_interval=20', '--eval_full_at_end=True',
                       f'--learning_rate={lr}', f'--min_lr={min_lr}', f'--warmup_iters={warmup}',
                       f'--lr_decay_iters={decay}'))
    records = read_metrics(out)
    val, full = per_iter(records, 'val_loss'), per_iter(records, 'full_val_loss')
    assert sorted(val) == [0, 20, 40] and list(full) == [40]
    # at initialisation the model is close to uniform over the 65 characters
    assert abs(val[0] - math.log(65)) < 0.05
    assert full[40] < val[0] - 0.5 and val[40] < val[20] < val[0]

    # the whole-val loss, recomputed slowly: every val token but the first predicted once, in consecutive
    # windows of block_size (the last one shorter), each window on its own
    model, meta = model_from_checkpoint(str(out / 'ckpt.pt'))  # saved at iteration 40, after the last step
    assert meta['iter_num'] == 40
    model.eval()
    data = torch.from_numpy(np.fromfile(char_data / 'shakespeare_char' / 'val.bin', dtype=np.uint16).astype(np.int64))
    T, nll = 32, 0.0
    full_windows = (len(data) - 1) // T
    with torch.no_grad():
        x = data[:full_windows * T].view(-1, T)
        y = data[1:full_windows * T + 1].view(-1, T)
        for i in range(0, len(x), 1000):
            logits, _ = model(x[i:i + 1000], y[i:i + 1000])
            nll += F.cross_entropy(logits.view(-1, logits.size(-1)), y[i:i + 1000].reshape(-1), reduction='sum').double()
        s = full_windows * T
        if s < len(data) - 1:
            logits, _ = model(data[None, s:-1], data[None, s + 1:])
            nll += F.cross_entropy(logits[0], data[s + 1:], reduction='sum').double()
    assert close(full[40], nll.item() / (len(data) - 1))

    # the learning rate: linear warmup to lr, then a cosine from lr down to min_lr at lr_decay_iters
    for it, got in per_iter(records, 'lr').items():
        if it < warmup:
            expected = lr * (it + 1) / (warmup + 1)
        else:
            expected = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (it - warmup) / (decay - warmup)))
        assert close(got, expected, 1e-12)

    # one log line per iteration, with the loss and lr that metrics.jsonl has, and a consistent throughput
    lines = [line for line in p.stdout.splitlines() if line.startswith('iter ')]
    assert len(lines) == 40
    for line, r in zip(lines, [r for r in records if 'loss' in r]):
        assert line.startswith(f"iter {r['iter']}: loss {r['loss']:.4f}, lr {r['lr']:.2e}, ")
        assert f"{r['ms_per_iter']:.1f} ms/iter, {r['tokens_per_s']:,.0f} tok/s; " in line
        done = r['iter'] + 1  # and where the run is: iterations done of max_iters, and the time left
        assert line.split('; ')[-1].startswith(f"{done}/40 ({100 * done / 40:.0f}%), eta ")
        assert close(r['tokens_per_s'] * r['ms_per_iter'] / 1000, 8 * 32, 1e-9)  # batch x block tokens per iter


def test_two_ddp_processes_match_one(char_data, tmp_path):
    """torchrun with 2 gloo processes x 2 micro-steps sees the same batches as 1 process x 4 micro-steps."""
    args = ['--max_iters=8', '--eval_interval=4', '--gradient_accumulation_steps=4', '--dropout=0.1',
            '--eval_full_at_end=True', '--eval_iters=5']  # an odd eval_iters: the ranks get unequal shares
    run(train_args(char_data, tmp_path / 'one', *args))
    p = run(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
             *train_args(char_data, tmp_path / 'two', *args)])
    assert '4 micro-steps x 8 x 32, 2 process(es)' in p.stdout
    one, two = read_metrics(tmp_path / 'one'), read_metrics(tmp_path / 'two')
    for key in ('loss', 'val_loss', 'train_loss', 'full_val_loss'):
        a, b = per_iter(one, key), per_iter(two, key)
        assert a.keys() == b.keys() and a, key
        for it in a:
            assert close(a[it], b[it]), (key, it, a[it], b[it])
    assert len(two) == len(one)  # only rank 0 logs


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_nonfinite_loss_stops_and_keeps_the_checkpoint(char_data, char_ckpt, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(char_ckpt, out)
    before = (out / 'ckpt.pt').read_bytes()
    # resume with an absurd learning rate: the weights blow up to inf within a step or two
    p = run(train_args(char_data, out, '--init_from=resume', '--learning_rate=1e9', '--max_iters=60',
                       '--eval_interval=20'), check=False)
    msg = error_line(p)
    assert 'NaN or inf' in msg and str(out / 'ckpt.pt') in msg
    assert (out / 'ckpt.pt').read_bytes() == before  # byte for byte the last good one
    assert not list(out.glob('*.tmp'))


def test_missing_dataset_names_the_prepare_command(tmp_path):
    data, out = tmp_path / 'data', tmp_path / 'out'
    p = run(train_args(data, out, dataset='my_corpus'), check=False)
    msg = error_line(p)
    assert f'python prepare.py --input=YOUR_TEXT --dataset=my_corpus --tokenizer=gpt2 --data_dir={data}' in msg
    assert not out.exists()


def test_resume_refuses_data_with_another_vocabulary(char_ckpt, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(char_ckpt, out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    # a char vocabulary of the same size (64 letters and the newline), but other characters
    text = ''.join(chr(0x400 + i % 64) + ('\n' if i % 50 == 49 else '') for i in range(20000))
    src = tmp_path / 'cyrillic.txt'
    src.write_text(text, encoding='utf-8')
    run(['prepare.py', f'--input={src}', '--dataset=other', f'--data_dir={tmp_path}'])
    p = run(train_args(tmp_path, out, '--init_from=resume', '--max_iters=30', dataset='other'), check=False)
    msg = error_line(p)
    assert 'vocabulary of 65' in msg and 'other' in msg
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


@pytest.mark.parametrize('init_from,data,expected', [
    (str(HF_TINY), 'gpt2', "model vocabulary 1000 is smaller than the data's 50257"),
    (str(HF_TINY), 'char', 'need data prepared with --tokenizer=gpt2'),
    ('gpt3', 'char', "init_from must be 'scratch', 'resume', one of gpt2,"),
    ('gpt2-tiny', 'char', "init_from must be"),
    ('resume', 'char', "no checkpoint at"),
])
def test_init_from_refused(init_from, data, expected, tmp_path, request):
    data_dir = request.getfixturevalue('gpt2_data' if data == 'gpt2' else 'char_data')
    out = tmp_path / 'out'
    p = run(train_args(data_dir, out, f'--init_from={init_from}', '--max_iters=5',
                       dataset='shakespeare' if data == 'gpt2' else 'shakespeare_char'), check=False)
    assert expected in error_line(p)
    assert not out.exists()


@pytest.mark.parametrize('arg,expected', [('--batch_size=0', 'batch_size must be > 0, got 0'),
                                          ('--warmup_iters=100', 'must be greater than warmup_iters'),
                                          ('--block_size=200000', 'not more than block_size'),
                                          ('--dtype=fp8', 'dtype must be auto, float32, bfloat16 or float16')])
def test_bad_settings_fail_before_work(arg, expected, char_data, tmp_path):
    out = tmp_path / 'out'
    p = run(train_args(char_data, out, '--lr_decay_iters=100', arg), check=False)
    assert expected in error_line(p)
    assert not out.exists()


def test_first_run_offline_names_the_command_then_the_cpu_config_works(tmp_path):
    """The README's first command, from a fresh data_dir: offline it must fail with the one prepare.py
    command to run; once that has run, config/shakespeare_cpu.py trains end to end."""
    data, out = tmp_path / 'data', tmp_path / 'out'
    args = ['train.py', 'config/shakespeare_cpu.py', f'--data_dir={data}', f'--out_dir={out}', '--max_iters=50']
    # every download fails fast through a proxy where nothing listens, with or without internet
    proxy = f'http://127.0.0.1:{free_port()}'
    offline = {'https_proxy': proxy, 'HTTPS_PROXY': proxy, 'http_proxy': proxy, 'HTTP_PROXY': proxy,
               'no_proxy': '', 'NO_PROXY': ''}
    p = run(args, check=False, env=offline)
    msg = error_line(p)
    command = f'python prepare.py shakespeare_char --input=PATH/TO/input.txt --data_dir={data}'
    assert msg.endswith(command)
    assert not out.exists() and not [f for f in data.rglob('*') if f.is_file()]
    run(command.replace('PATH/TO/input.txt', str(SHAKESPEARE)).split()[1:])
    run(args)
    records = read_metrics(out)
    val, full = per_iter(records, 'val_loss'), per_iter(records, 'full_val_loss')
    assert sorted(val) == [0, 50] and list(full) == [50]
    assert abs(val[0] - math.log(65)) < 0.05 and full[50] < val[0] - 1.0
    assert (out / 'ckpt.pt').exists()
    assert (out / 'loss.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'  # plot=True, the default
