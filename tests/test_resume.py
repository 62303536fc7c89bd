"""Kill -9 at random moments: every training script, killed twice and resumed with --init_from=resume,
ends with a loadable checkpoint and, on the CPU in fp32, with exactly the weights of the same run left alone.
(The pipeline's own kill test is in test_pipeline.py.)"""
import random
import subprocess
import sys
import time

import pytest
import torch

import model as M
from conftest import ROOT, SHAKESPEARE, per_iter, read_metrics, run, script_env, train_args
from test_dpo import toy_prefs, write_jsonl, write_sft
from test_ppo import make_toy


def weights(path, key='model'):
    tensors, _ = M.load_checkpoint(str(path))
    return tensors[key]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # equal, not close: the resumed run computed the same floats


def kill_and_resume(args, out_dir, kills=2, seed=0, files=('ckpt.pt',)):
    """Run a script, kill -9 it at a random moment once it has written a checkpoint, resume it with
    --init_from=resume, and again (kills times); then let the last resumed run finish. After every kill,
    each checkpoint file on disk must load. Returns how many kills landed mid-run."""
    rng = random.Random(seed)
    landed = 0
    cmd = args
    for _ in range(kills):
        ckpt = out_dir / 'ckpt.pt'
        stamp = ckpt.stat().st_mtime_ns if ckpt.exists() else None
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 300
            # wait for this run's first new checkpoint, then a random moment more
            while proc.poll() is None and time.time() < deadline and \
                    (not ckpt.exists() or ckpt.stat().st_mtime_ns == stamp):
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.5))  # short: on a fast machine a small run can finish within 1.5 s
            landed += proc.poll() is None
            proc.kill()
        finally:
            proc.wait()
        for name in files:  # whatever was on disk when it died loads
            if (out_dir / name).exists():
                M.load_checkpoint(str(out_dir / name))
        cmd = [a for a in args if not a.startswith('--init_from=')] + ['--init_from=resume']
    run(cmd)
    return landed


def test_finetune_lora_resumes_exactly(tmp_path):
    d = tmp_path
    (d / 'small.txt').write_text(SHAKESPEARE.read_text()[:30_000])
    run(['prepare.py', 'tasks', f'--data_dir={d}', '--n_per_skill=100'])
    run(['prepare.py', 'shakespeare_tasks', f'--data_dir={d}', f'--input={d / "small.txt"}', '--vocab_size=300'])
    run(train_args(d, d / 'base', '--max_iters=5', '--eval_interval=5', dataset='shakespeare_tasks'))
    args = ['finetune_lora.py', f'--init_from={d / "base"}', f'--data_dir={d}', '--max_iters=60', '--eval_interval=5',
            '--eval_iters=2', '--eval_tasks=10', '--batch_size=8', '--lora_dropout=0.1', '--device=cpu']
    run([*args, f'--out_dir={d / "a"}'])
    assert kill_and_resume([*args, f'--out_dir={d / "b"}'], d / 'b', files=('ckpt.pt', 'model.pt', 'adapter.pt')) > 0
    assert_same_weights(weights(d / 'a' / 'model.pt'), weights(d / 'b' / 'model.pt'))
    assert_same_weights(weights(d / 'a' / 'ckpt.pt'), weights(d / 'b' / 'ckpt.pt'))


@pytest.fixture(scope='module')
def prefs_dir(tmp_path_factory, tok_meta):
    d = tmp_path_factory.mktemp('resume')
    write_sft(d / 'sft', tok_meta)
    write_jsonl(d / 'train.jsonl', toy_prefs(200, 0))
    write_jsonl(d / 'val.jsonl', toy_prefs(16, 1))
    return d


@pytest.mark.parametrize('script, extra', [
    ('reward.py', ['--rank_prompts=0', '--lora_rank=4', '--lora_dropout=0.1']),
    ('dpo.py', ['--eval_tasks=0', '--kl_prompts=4', '--lora_rank=0', '--learning_rate=1e-3']),
])
def test_preference_scripts_resume_exactly(prefs_dir, script, extra):
    d = prefs_dir
    name = script.split('.')[0]
    args = [script, f'--init_from={d / "sft"}', f'--data={d / "train.jsonl"}', f'--val_data={d / "val.jsonl"}',
            '--max_iters=80', '--eval_interval=5', '--batch_size=8', '--warmup_iters=2', '--device=cpu', *extra]
    run([*args, f'--out_dir={d / (name + "-a")}'])
    out = d / (name + '-b')
    kept = 'reward.pt' if script == 'reward.py' else 'model.pt'
    assert kill_and_resume([*args, f'--out_dir={out}'], out, files=('ckpt.pt', kept)) > 0
    assert_same_weights(weights(d / (name + '-a') / kept), weights(out / kept))
    assert_same_weights(weights(d / (name + '-a') / 'ckpt.pt'), weights(out / 'ckpt.pt'))


@pytest.mark.parametrize('critic', [True, False])
def test_ppo_resumes_exactly(tmp_path, tok_meta, tokenizer, critic):
    toy = make_toy(tmp_path, tok_meta, tokenizer)
    args = ['ppo.py', f'--init_from={toy / "sft"}', f'--data_dir={toy}', '--reward=gold', '--max_iters=40',
            '--eval_interval=4', '--eval_tasks=5', '--batch_size=16', '--minibatch_size=8', '--ppo_epochs=2',
            '--max_new_tokens=4', '--kl_coef=0.02', '--kl_target=1.0', f'--critic={critic}', '--device=cpu']
    run([*args, f'--out_dir={toy / "a"}'])
    assert kill_and_resume([*args, f'--out_dir={toy / "b"}'], toy / 'b', files=('ckpt.pt', 'model.pt')) > 0
    assert_same_weights(weights(toy / 'a' / 'model.pt'), weights(toy / 'b' / 'model.pt'))
    a, b = M.load_checkpoint(str(toy / 'a' / 'ckpt.pt')), M.load_checkpoint(str(toy / 'b' / 'ckpt.pt'))
    assert_same_weights(a[0]['model'], b[0]['model'])
    if critic:
        assert_same_weights(a[0]['value_model'], b[0]['value_model'])
    assert a[1]['kl_coef'] == b[1]['kl_coef'] and a[1]['before'] == b[1]['before']


def test_train_resumes_exactly_after_random_kills(char_data, tmp_path):
    """Over the kills and resumes the run logs exactly the losses of the same run left alone, iteration by
    iteration (with dropout and gradient accumulation: every micro-batch and mask is drawn from its own seed),
    and ends with exactly its weights."""
    args = train_args(char_data, tmp_path / 'a', '--max_iters=120', '--eval_interval=10', '--dropout=0.1',
                      '--gradient_accumulation_steps=2', '--always_save_checkpoint=True')
    run(args)
    b = [a.replace(str(tmp_path / 'a'), str(tmp_path / 'b')) for a in args]
    assert kill_and_resume(b, tmp_path / 'b') > 0
    assert_same_weights(weights(tmp_path / 'a' / 'ckpt.pt'), weights(tmp_path / 'b' / 'ckpt.pt'))
    logs_a, logs_b = read_metrics(tmp_path / 'a'), read_metrics(tmp_path / 'b')
    assert sum('loss' in r for r in logs_b) > 120  # some iterations really were run twice
    for key in ('loss', 'lr', 'val_loss', 'train_loss'):
        assert per_iter(logs_a, key) == per_iter(logs_b, key), key  # exactly equal, not just close
    assert len(per_iter(logs_a, 'loss')) == 120
