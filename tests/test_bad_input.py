"""A user's mistakes, across the scripts: each gets one line naming what is wrong, a non-zero exit, no traceback
and nothing written; a checkpoint holding code is refused without running it and without suggesting
weights_only=False. (README's "When things go wrong" table lists some.)"""
import os

import pytest
import torch

from conftest import error_line, run, train_args


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope='module')
def bad_checkpoints(tmp_path_factory, char_ckpt):
    d = tmp_path_factory.mktemp('bad')
    marker = d / 'the-payload-ran'
    (d / 'evil').mkdir()
    torch.save({'model': Payload(marker), 'meta_json': '{}'}, d / 'evil' / 'ckpt.pt')
    (d / 'truncated').mkdir()
    good = (char_ckpt / 'ckpt.pt').read_bytes()
    (d / 'truncated' / 'ckpt.pt').write_bytes(good[:len(good) // 2])
    (d / 'text').mkdir()
    (d / 'text' / 'model.pt').write_text('not a checkpoint')
    (d / 'a-file').write_text('x')
    (d / 'prefs.jsonl').write_text('{"prompt": "Say yes", "chosen": "yes", "rejected": "no"}\n' * 30)
    return d, marker


@pytest.mark.parametrize('case, args, message', [
    ('code in a checkpoint, to sample.py', ['sample.py', '--out_dir=BAD/evil'], 'refused to load'),
    ('code in a checkpoint, to train.py --init_from=resume', ['TRAIN', '--out_dir=BAD/evil', '--init_from=resume'],
     'refused to load'),
    ('a truncated checkpoint, to sample.py', ['sample.py', '--out_dir=BAD/truncated'], 'truncated/ckpt.pt is not a readable'),
    ('a truncated checkpoint, to train.py --init_from=resume',
     ['TRAIN', '--out_dir=BAD/truncated', '--init_from=resume'], 'truncated/ckpt.pt is not a readable'),
    ('not a checkpoint, as the SFT model of dpo.py', ['dpo.py', '--init_from=BAD/text', '--out_dir=BAD/never',
                                                                  '--data=BAD/prefs.jsonl'],
     'text/model.pt is not a readable checkpoint'),
    ('out_dir is a file, train.py', ['TRAIN', '--out_dir=BAD/a-file'], "out_dir 'BAD/a-file' exists and is not a dir"),
    ('out_dir is a file, finetune_lora.py', ['finetune_lora.py', '--out_dir=BAD/a-file'], 'is not a directory'),
    ('out_dir is a file, reward.py', ['reward.py', '--out_dir=BAD/a-file'], 'is not a directory'),
    ('out_dir is a file, dpo.py', ['dpo.py', '--out_dir=BAD/a-file'], 'is not a directory'),
    ('out_dir is a file, ppo.py', ['ppo.py', '--out_dir=BAD/a-file'], 'is not a directory'),
    ('negative iterations', ['TRAIN', '--out_dir=BAD/never', '--max_iters=-5'], 'max_iters must be >= 0, got -5'),
    ('negative learning rate', ['TRAIN', '--out_dir=BAD/never', '--learning_rate=-1'], 'learning_rate must be > 0'),
    ('no heads', ['TRAIN', '--out_dir=BAD/never', '--n_head=0'], 'n_head must be > 0, got 0'),
    ("heads that don't divide the width", ['TRAIN', '--out_dir=BAD/never', '--n_head=3', '--n_embd=32'],
     'n_head must divide n_embd'),
    ('negative rate, finetune_lora.py', ['finetune_lora.py', '--out_dir=BAD/never', '--learning_rate=-1'],
     'learning_rate must be > 0'),
    ('zero batch, reward.py', ['reward.py', '--out_dir=BAD/never', '--batch_size=0'], 'batch_size must be > 0'),
    ('negative beta, dpo.py', ['dpo.py', '--out_dir=BAD/never', '--beta=-1'], 'beta must be > 0'),
    ('a fraction out of range, ppo.py', ['ppo.py', '--out_dir=BAD/never', '--clip_range=1.5'],
     'clip_range must be in [0, 1)'),
    ('negative tokens, sample.py', ['sample.py', '--out_dir=BAD/evil', '--max_new_tokens=-3'],
     'max_new_tokens must be >= 0'),
    ('zero samples, bench.py', ['bench.py', '--repeats=0'], 'repeats must be > 0'),
    ('no chat model, bench.py', ['bench.py', '--chat_model=BAD/never'], 'cannot read checkpoint'),
    ('an unknown optimizer, mlp.py', ['mlp.py', '--out_dir=BAD/never', '--optimizers=sgd,lion'],
     'optimizers must name some of sgd, momentum, adam, adamw'),
    ('a negative learning rate, mlp.py', ['mlp.py', '--out_dir=BAD/never', '--lr_adam=-1'], 'lr_adam must be > 0'),
    ('no context, mlp.py', ['mlp.py', '--out_dir=BAD/never', '--context=0'], 'context must be > 0'),
    ('no prepared data, mlp.py', ['mlp.py', '--out_dir=BAD/never', '--data_dir=BAD/none'], 'run python prepare.py'),
    ('a bad fraction, prepare.py', ['prepare.py', 'tasks', '--data_dir=BAD/never', '--val_fraction=2'],
     'val_fraction must be in [0, 1)'),
    ('a bad fraction, bpe.py', ['bpe.py', '--out=BAD/never/tok', '--val_fraction=1.5'], 'val_fraction must be in [0, 1)'),
    ('no vocabulary, bpe.py', ['bpe.py', '--out=BAD/never/tok', '--vocab_size=0'], 'vocab_size must be > 0'),
])
def test_bad_input_is_one_clear_line(bad_checkpoints, char_data, case, args, message):
    d, marker = bad_checkpoints
    if args[0] == 'TRAIN':
        args = [a for a in train_args(char_data, 'unused') if not a.startswith('--out_dir=')] + args[1:]
    args = [a.replace('BAD', str(d)) for a in args]
    p = run(args, check=False)
    line = error_line(p)
    assert message.replace('BAD', str(d)) in line, (case, line)
    assert 'weights_only=False' not in p.stderr + p.stdout
    assert not marker.exists(), "the checkpoint's code ran"
    assert not (d / 'never').exists()
