"""pipeline.py: the whole recipe end to end (the integration test), skipping and restarting stages."""
import json
import math

import pytest

from conftest import SHAKESPEARE, error_line, run

STAGE_DIRS = {'data': 'data/tasks', 'pretrain': 'pretrain', 'sft': 'sft', 'prefs': 'data/prefs', 'reward': 'reward',
              'dpo': 'dpo', 'ppo': 'ppo', 'ppo_gold': 'ppo_gold', 'report': 'report'}


def pipeline(run_dir, *extra, check=True):
    # two threads: the stages run one at a time, and pretraining is most of the time
    return run(['pipeline.py', '--profile=ci', f'--input={SHAKESPEARE}', f'--out_dir={run_dir}', *extra],
               check=check, timeout=1200, env={'OMP_NUM_THREADS': '2'})


@pytest.fixture(scope='module')
def ci_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp('pipeline')
    p = pipeline(run_dir)
    with open(run_dir / 'report.json') as f:
        return run_dir, json.load(f), p.stdout


def test_every_stage_ran_and_wrote_its_outputs(ci_run):
    run_dir, card, _ = ci_run
    for stage, folder in STAGE_DIRS.items():
        assert (run_dir / folder / 'done.json').exists(), stage
    for path in ('pretrain/ckpt.pt', 'sft/model.pt', 'sft/adapter.pt', 'reward/reward.pt', 'dpo/model.pt',
                 'ppo/model.pt', 'ppo_gold/model.pt', 'data/prefs/train.jsonl',
                 'data/shakespeare_tasks/tokenizer.model', 'report.md'):
        assert (run_dir / path).exists(), path
    for stage in ('data', 'pretrain', 'sft', 'prefs', 'reward', 'dpo', 'ppo', 'ppo_gold'):
        assert (run_dir / 'logs' / f'{stage}.log').read_text().startswith('$ python'), stage
    report = (run_dir / 'report.md').read_text()
    for row in ('| data |', '| pretrain |', '| sft |', '| prefs |', '| reward |', '| dpo |', '| ppo |',
                '| ppo_gold |', '| base |', '| SFT |', '| DPO |', '| PPO |', '| PPO-gold |', 'bits/char',
                'bytes/token', 'KL to SFT'):
        assert row in report, row
    assert set(card['accuracy']) == {'base', 'SFT', 'DPO', 'PPO', 'PPO-gold'}
    assert card['n_test'] > 0


def test_each_stage_beats_the_one_before(ci_run):
    """The recipe's claims, measured by the report's own evaluation on held-out prompts and pairs.
    Gold accuracy of DPO and PPO over SFT is printed in the report but not asserted: at this scale (an SFT
    model that only learned to count) neither raises it reliably; on the cpu profile DPO and PPO with the
    checker as reward do (README). Each is held to its own objective instead: DPO ranks held-out pairs as
    the labels do, PPO raises the reward model's score of its greedy replies above the SFT model's, and
    PPO with the checker as reward stays within its KL target and does not lose gold accuracy."""
    _, card, _ = ci_run
    acc = {name: a['all'] for name, a in card['accuracy'].items()}
    # the tokenizer compresses held-out text; pretraining beats a uniform guess over the vocabulary by far
    assert card['tokenizer']['bytes_per_token'] > 1.5
    assert card['pretrain']['val_loss'] < 0.7 * math.log(card['tokenizer']['vocab_size'])
    # fine-tuning teaches the base (which never saw a chat) to answer
    assert acc['base'] == 0 and acc['SFT'] > 0.03, acc
    # the reward model ranks held-out pairs better than chance (it never saw the base's Shakespearean
    # replies, so how it scores those is not a claim of the recipe)
    assert card['reward']['pair_accuracy'] > 0.55
    # DPO: its implicit reward ranks held-out pairs better than chance
    assert card['dpo']['reward_accuracy'] > 0.55
    # PPO: what it maximises went up, on held-out prompts, within a bounded distance of the SFT model
    assert card['rm_score']['PPO'] > card['rm_score']['SFT'] + 0.1, card['rm_score']
    assert 0 < card['dpo']['kl'] < 15 and 0 < card['ppo']['kl'] < 15  # nats per reply; PPO's target is 1
    # PPO with the true reward: near its KL target of 1 nat, and no worse than SFT (it only pushes correct
    # replies up; 2 points of slack for float-sum differences between runs on CPU)
    assert 0 < card['ppo_gold']['kl'] < 2
    assert acc['PPO-gold'] >= acc['SFT'] - 0.02, acc


def test_rerun_skips_finished_stages_and_force_reruns_from_a_stage(ci_run):
    run_dir, card, _ = ci_run
    ckpt = run_dir / 'pretrain' / 'ckpt.pt'
    stamp = ckpt.stat().st_mtime_ns
    p = pipeline(run_dir)
    assert p.stdout.count('); skipped') == len(STAGE_DIRS)
    assert ckpt.stat().st_mtime_ns == stamp
    # an interrupted stage: its marker is missing and it left a half-written file behind
    (run_dir / 'report' / 'done.json').unlink()
    (run_dir / 'report' / 'half-written.tmp').write_text('x')
    p = pipeline(run_dir)
    assert p.stdout.count('); skipped') == len(STAGE_DIRS) - 1
    assert not (run_dir / 'report' / 'half-written.tmp').exists()
    assert (run_dir / 'report' / 'done.json').exists()
    assert ckpt.stat().st_mtime_ns == stamp
    with open(run_dir / 'report.json') as f:
        assert json.load(f)['accuracy'] == card['accuracy']  # the same models, evaluated again: same numbers
    p = pipeline(run_dir, '--force=report')
    assert p.stdout.count('); skipped') == len(STAGE_DIRS) - 1
    # a stage made by a different command (another profile, input or setting) is not taken as done
    marker = run_dir / 'report' / 'done.json'
    marker.write_text(json.dumps({**json.loads(marker.read_text()), 'command': 'python pipeline.py --profile=x'}))
    p = pipeline(run_dir)
    assert 'report: made by a different command' in p.stdout
    assert p.stdout.count('); skipped') == len(STAGE_DIRS) - 1
    assert json.loads(marker.read_text())['command'] == 'report'
    # every other stage recorded the exact command it ran, as its log shows it
    for stage, folder in STAGE_DIRS.items():
        if stage != 'report':
            command = json.loads((run_dir / folder / 'done.json').read_text())['command']
            assert (run_dir / 'logs' / f'{stage}.log').read_text().splitlines()[0] == f'$ {command}'


@pytest.mark.parametrize('args, message', [
    (['--profile=huge'], "unknown profile 'huge'"),
    (['--force=nope'], "unknown stage 'nope'"),
    (['--input=/no/such/file.txt'], 'input not found'),
    (['--device=cpu', '--bogus=1'], 'bogus'),
])
def test_bad_arguments_fail_before_any_work(tmp_path, args, message):
    run_dir = tmp_path / 'run'
    p = run(['pipeline.py', f'--out_dir={run_dir}', *args], check=False)
    assert p.returncode != 0
    assert message in error_line(p)
    assert not run_dir.exists()


def test_a_failing_stage_stops_the_run_and_keeps_earlier_stages(tmp_path):
    """A stage that fails (here: prepare.py on an empty input) exits non-zero with its log named."""
    empty = tmp_path / 'empty.txt'
    empty.write_text('')
    run_dir = tmp_path / 'run'
    p = run(['pipeline.py', '--profile=ci', f'--input={empty}', f'--out_dir={run_dir}'], check=False)
    assert p.returncode != 0
    assert 'stage data failed' in error_line(p) and 'logs/data.log' in error_line(p)
    assert not (run_dir / 'pretrain').exists()


def test_loss_curves_are_drawn(ci_run):
    run_dir, _, _ = ci_run
    assert (run_dir / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert '![loss curves](curves.png)' in (run_dir / 'report.md').read_text()


def test_every_profile_passes_only_settings_its_scripts_have():
    """The gpu profile cannot run on a CPU machine: at least each of its --key=value arguments (and every
    other profile's) must name a config global of the script that stage runs, or that script would refuse."""
    import re
    import pipeline
    from conftest import ROOT
    commands = pipeline.stage_commands('RUN', 'DATA')
    for profile, stages in pipeline.PROFILES.items():
        assert set(stages) == set(pipeline.STAGES) - {'report'}, profile
        for stage, args in stages.items():
            script = (ROOT / commands[stage][0][0]).read_text()
            for arg in args:
                key = arg[2:].split('=')[0]
                assert re.search(rf'^\s*{key} = ', script, re.M), (profile, stage, key)


@pytest.mark.slow
def test_cpu_profile_dpo_and_ppo_gold_beat_sft(tmp_path):
    """The cpu profile end to end (12-15 minutes on 2 cores: python -m pytest -m slow), where the models are
    big enough for the recipe's claims about gold accuracy: SFT over base, DPO and PPO with the checker as
    reward over SFT (each on the same 1,000 held-out test prompts), each PPO within a bounded KL, and PPO with
    the reward model raising the reward model's score (the proxy; its gold accuracy falls, README)."""
    run_dir = tmp_path / 'cpu'
    run(['pipeline.py', '--profile=cpu', f'--input={SHAKESPEARE}', f'--out_dir={run_dir}'], timeout=3000,
        env={'OMP_NUM_THREADS': '2'})
    card = json.loads((run_dir / 'report.json').read_text())
    acc = {name: a['all'] for name, a in card['accuracy'].items()}
    assert acc['base'] == 0 and acc['SFT'] > 0.15, acc
    assert acc['DPO'] > acc['SFT'] and acc['PPO-gold'] > acc['SFT'] + 0.02, acc
    assert 0 < card['ppo_gold']['kl'] < 2 and 0 < card['dpo']['kl'] < 5
    assert card['rm_score']['PPO'] > card['rm_score']['SFT']
