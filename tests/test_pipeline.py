"""pipeline.py's mechanics on smoke runs (every count cut to a handful): every stage wired, the gpu profile end to
end, skipping and forcing stages, and a run killed mid-stage finishing with the uninterrupted run's report and
weights (which is also the same-seed test). The recipe's own claims, on the full cpu run, are in test_recipe.py."""
import json
import os
import random
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch

import model as M
from conftest import ROOT, SHAKESPEARE, error_line, run, script_env
from pipeline import overoptimization_text, rl_method

STAGE_DIRS = {'data': 'data/tasks', 'pretrain': 'pretrain', 'sft': 'sft', 'prefs': 'data/prefs', 'reward': 'reward',
              'dpo': 'dpo', 'ppo': 'ppo', 'ppo_nokl': 'ppo_nokl', 'ppo_gold': 'ppo_gold',
              'reward_shuffled': 'reward_shuffled', 'ppo_shuffled': 'ppo_shuffled', 'report': 'report'}
CHECKPOINTS = ('pretrain/ckpt.pt', 'sft/model.pt', 'reward/reward.pt', 'dpo/model.pt', 'ppo/model.pt',
               'ppo_nokl/model.pt', 'ppo_gold/model.pt', 'reward_shuffled/reward.pt', 'ppo_shuffled/model.pt')


def pipeline_args(run_dir, *extra, profile='cpu', smoke=True, input=None):
    return ['pipeline.py', f'--profile={profile}', f'--smoke={smoke}', f'--input={input or SHAKESPEARE}',
            f'--out_dir={run_dir}', *extra]


def pipeline(run_dir, *extra, check=True, **kw):
    # two threads, as README's command runs: the stages run one at a time
    return run(pipeline_args(run_dir, *extra, **kw), check=check, timeout=3000, env={'OMP_NUM_THREADS': '2'})


def card_without_times(run_dir):
    card = json.loads((run_dir / 'report.json').read_text())
    card.pop('seconds')
    return card


@pytest.fixture(scope='module')
def small_text(tmp_path_factory):
    path = tmp_path_factory.mktemp('text') / 'small.txt'
    path.write_text(SHAKESPEARE.read_text()[:60_000])
    return path


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory, small_text):
    run_dir = tmp_path_factory.mktemp('smoke')
    p = pipeline(run_dir, input=small_text)
    return run_dir, json.loads((run_dir / 'report.json').read_text()), p.stdout


def test_every_stage_runs_and_writes_its_outputs(smoke_run):
    run_dir, card, stdout = smoke_run
    for stage, folder in STAGE_DIRS.items():
        assert (run_dir / folder / 'done.json').exists(), stage
    for path in (*CHECKPOINTS, 'data/prefs/train.jsonl', 'data/shakespeare_tasks/tokenizer.model', 'report.md'):
        assert (run_dir / path).exists(), path
    for stage in STAGE_DIRS:
        if stage != 'report':
            assert (run_dir / 'logs' / f'{stage}.log').read_text().startswith('$ python'), stage
    report = (run_dir / 'report.md').read_text()
    for row in ('| data |', '| pretrain |', '| sft |', '| prefs |', '| reward |', '| dpo |', '| ppo |',
                '| ppo_nokl |', '| ppo_gold |', '| base |', '| SFT |', '| DPO |',
                '| PPO: reinforce, no baseline, model reward |', '| PPO-gold: grpo, group baseline, checker reward |',
                '| PPO, no KL penalty: reinforce, no baseline, model reward, no KL |', '| reward_shuffled |',
                '| ppo_shuffled |', '| PPO, shuffled reward: reinforce, no baseline, shuffled-model reward |',
                'bits/char', 'bytes/token', 'KL to SFT', 'p = ', 'smoke test'):
        assert row in report, row
    assert set(card['accuracy']) == {'base', 'SFT', 'DPO', 'PPO', 'PPO, no KL penalty', 'PPO-gold',
                                     'PPO, shuffled reward'}
    # what ran, read from the shipped configs (config/ppo_tasks.py: no critic, no whitening, one reply per prompt,
    # the learned reward; config/grpo_tasks_gold.py: groups of replies, the checker; their KL targets, the nokl
    # stage none)
    m = card['method']
    assert list(m) == list(card['accuracy'])
    assert [m[k]['algorithm'] for k in m] == ['pretrain', 'sft', 'dpo', 'reinforce', 'reinforce', 'grpo', 'reinforce']
    assert [m[k]['baseline'] for k in m] == [None, None, None, 'none', 'none', 'group', 'none']
    assert [m[k]['reward'] for k in m] == [None, None, None, 'model', 'model', 'checker', 'shuffled-model']
    target = {f: runpy.run_path(str(ROOT / 'config' / f))['kl_target'] for f in ('ppo_tasks.py', 'grpo_tasks_gold.py')}
    assert [m[k]['kl_target'] for k in m] == [None, None, None, target['ppo_tasks.py'], None,
                                              target['grpo_tasks_gold.py'], target['ppo_tasks.py']]
    # the controls: the no-KL run is the KL run's command with the penalty off and evaluated more often, nothing
    # else; the shuffled-reward run is the KL run's command with the other reward model
    logs = {s: (run_dir / 'logs' / f'{s}.log').read_text().splitlines()[0].split() for s in ('ppo', 'ppo_nokl',
                                                                                              'ppo_shuffled')}
    strip = lambda cmd, drop: [a for a in cmd if not a.startswith(drop)]
    assert strip(logs['ppo_nokl'], ('--out_dir', '--kl_coef', '--kl_target', '--eval_interval')) == \
        strip(logs['ppo'], ('--out_dir', '--eval_interval'))
    assert strip(logs['ppo_shuffled'], ('--out_dir', '--reward_model')) == strip(logs['ppo'], ('--out_dir', '--reward_model'))
    # one KL estimator for every row (pipeline.evaluate_models: rl.sampled_kl on the val prompts; SFT is the
    # reference), and the method records carry the same numbers
    assert m['base']['kl'] is None and card['kl_to_sft']['base'] is None and card['kl_to_sft']['SFT'] == 0.0
    assert all(m[k]['kl'] == card['kl_to_sft'][k] for k in m if k not in ('base', 'SFT'))
    assert 'KL to SFT, nats/reply (sampled at T = 1, val)' in report
    assert set(card['paired_vs_sft']) == set(card['accuracy']) - {'SFT'}
    for picture in ('curves.png', 'overoptimization.png'):
        assert (run_dir / picture).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        assert f'({picture})' in report
    assert '[3/12, ' in stdout  # where the run is


def test_the_gpu_profile_runs_end_to_end_with_every_count_cut(small_text, tmp_path):
    """The gpu profile has never had a GPU: its settings and wiring are proven here, on the CPU, with every count
    (iterations, prompts, batches) cut to a handful. Its model is the gpu profile's (6 layers, 384 wide)."""
    pipeline(tmp_path / 'gpu', profile='gpu', input=small_text)
    card = json.loads((tmp_path / 'gpu' / 'report.json').read_text())
    assert card['profile'] == 'gpu' and card['smoke'] and len(card['accuracy']) == 7
    meta = M.load_checkpoint(str(tmp_path / 'gpu' / 'pretrain' / 'ckpt.pt'))[1]
    assert (meta['model_args']['n_layer'], meta['model_args']['n_embd']) == (6, 384)


def test_rerun_skips_finished_stages_and_force_reruns_from_a_stage(smoke_run, small_text):
    run_dir, card, _ = smoke_run
    ckpt = run_dir / 'pretrain' / 'ckpt.pt'
    stamp = ckpt.stat().st_mtime_ns
    p = pipeline(run_dir, input=small_text)
    assert p.stdout.count('); skipped') == len(STAGE_DIRS)
    assert ckpt.stat().st_mtime_ns == stamp
    # an interrupted stage: its marker is missing and it left a half-written file behind
    (run_dir / 'report' / 'done.json').unlink()
    (run_dir / 'report' / 'half-written.tmp').write_text('x')
    p = pipeline(run_dir, input=small_text)
    assert p.stdout.count('); skipped') == len(STAGE_DIRS) - 1
    assert not (run_dir / 'report' / 'half-written.tmp').exists()
    assert ckpt.stat().st_mtime_ns == stamp
    assert card_without_times(run_dir)['accuracy'] == card['accuracy']  # the same models evaluated again
    p = pipeline(run_dir, '--force=ppo_shuffled', input=small_text)
    assert p.stdout.count('); skipped') == len(STAGE_DIRS) - 2
    # a stage made by a different command (another profile, input or setting) is not taken as done
    marker = run_dir / 'report' / 'done.json'
    marker.write_text(json.dumps({**json.loads(marker.read_text()), 'command': 'python pipeline.py --profile=x'}))
    p = pipeline(run_dir, input=small_text)
    assert 'report [12/12, ' in p.stdout and 'made by a different command' in p.stdout
    assert json.loads(marker.read_text())['command'] == 'report'
    # every other stage recorded the exact command it ran, as its log shows it
    for stage, folder in STAGE_DIRS.items():
        if stage != 'report':
            command = json.loads((run_dir / folder / 'done.json').read_text())['command']
            assert (run_dir / 'logs' / f'{stage}.log').read_text().splitlines()[0] == f'$ {command}'


def test_rl_config_runs_the_learned_reward_stage_and_both_controls_with_that_config(small_text, tmp_path):
    """--rl_config=config/grpo_tasks.py: the ppo stage and its two controls (no KL, shuffled reward) run GRPO, and
    the card names what ran."""
    run_dir = tmp_path / 'run'
    pipeline(run_dir, '--rl_config=config/grpo_tasks.py', input=small_text)
    for stage in ('ppo', 'ppo_nokl', 'ppo_shuffled'):
        command = (run_dir / 'logs' / f'{stage}.log').read_text().splitlines()[0].split()
        assert command[command.index('ppo.py') + 1] == 'config/grpo_tasks.py', stage
    card = json.loads((run_dir / 'report.json').read_text())
    m = card['method']
    for name, reward in (('PPO', 'model'), ('PPO, no KL penalty', 'model'), ('PPO, shuffled reward', 'shuffled-model')):
        assert (m[name]['algorithm'], m[name]['baseline'], m[name]['reward']) == ('grpo', 'group', reward), name
    target = runpy.run_path(str(ROOT / 'config' / 'grpo_tasks.py'))['kl_target']
    assert (m['PPO']['kl_target'], m['PPO, no KL penalty']['kl_target']) == (target, None)
    assert '| PPO: grpo, group baseline, model reward |' in (run_dir / 'report.md').read_text()


def test_a_run_killed_mid_stage_finishes_with_the_same_report_and_weights(smoke_run, small_text, tmp_path):
    """kill -9 of the whole pipeline (the script and the stage it runs) at random moments; each rerun wipes
    the half-done stage and never touches a finished one; the end is the uninterrupted run's report.
    Every stage here ran in other processes than the uninterrupted run's, so this is also "the same command
    gives the same numbers" (CPU, fp32, the same threads): every number of the report and every weight of
    every stage's model equal. Breaks if any stage stops being reproducible."""
    run_dir, _, _ = smoke_run
    out = tmp_path / 'killed'
    rng = random.Random(1)
    # each kill lands a random moment after a stage has started, four stages picked at random up to ppo: timed
    # by the run's own progress, not the clock, so that on a fast machine too the kills land mid-run
    targets = sorted(rng.sample(['pretrain', 'sft', 'prefs', 'reward', 'dpo', 'ppo'], 4), key=list(STAGE_DIRS).index)
    finished = {}  # stage -> mtimes of its files when it was first seen done
    for target in targets:
        proc = subprocess.Popen([sys.executable, *pipeline_args(out, input=small_text)], cwd=ROOT,
                                env=script_env({'OMP_NUM_THREADS': '2'}), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 300
        while not (out / 'logs' / f'{target}.log').exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 1.5))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for stage, folder in STAGE_DIRS.items():
            files = sorted((out / folder).rglob('*')) if (out / folder / 'done.json').exists() else []
            stamps = {str(f): f.stat().st_mtime_ns for f in files if f.is_file()}
            if stage in finished:
                assert stamps == finished[stage], f"{stage} was finished and then touched"
            elif stamps:
                finished[stage] = stamps
    assert 0 < len(finished) < len(STAGE_DIRS), "the kills should land mid-run"
    pipeline(out, input=small_text)
    assert card_without_times(out) == card_without_times(run_dir)
    for path in CHECKPOINTS:
        a, b = M.load_checkpoint(str(run_dir / path))[0], M.load_checkpoint(str(out / path))[0]
        assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model']), path


@pytest.mark.parametrize('args, message', [
    (['--profile=huge'], "profile must be one of cpu, gpu; got 'huge'"),
    (['--force=nope'], "force must be a stage"),
    (['--input=/no/such/file.txt'], 'input not found'),
    (['--device=cpu', '--bogus=1'], 'bogus'),
    (['--rl_config=config/nope.py'], 'rl_config not found: config/nope.py'),
])
def test_bad_arguments_fail_before_any_work(tmp_path, args, message):
    run_dir = tmp_path / 'run'
    p = run(['pipeline.py', f'--out_dir={run_dir}', *args], check=False)
    assert message in error_line(p)
    assert not run_dir.exists()


def test_a_failing_stage_stops_the_run_and_keeps_earlier_stages(tmp_path):
    """A stage that fails (here: prepare.py on an empty input) exits non-zero with its log named."""
    empty = tmp_path / 'empty.txt'
    empty.write_text('')
    run_dir = tmp_path / 'run'
    p = pipeline(run_dir, input=empty, check=False)
    assert 'stage data failed' in error_line(p) and 'logs/data.log' in error_line(p)
    assert not (run_dir / 'pretrain').exists()


def test_every_profile_passes_only_settings_its_scripts_have():
    """Each --key=value a profile (or the smoke cuts) adds must name a config global of the script that stage
    runs, or that script would refuse it."""
    import re
    import pipeline
    commands = pipeline.stage_commands('RUN', 'DATA')
    for name, stages in [*pipeline.PROFILES.items(), ('smoke', pipeline.SMOKE)]:
        assert set(stages) == set(pipeline.STAGES) - {'report'}, name
        for stage, args in stages.items():
            script = (ROOT / commands[stage][0][0]).read_text()
            for arg in args:
                key = arg[2:].split('=')[0]
                assert re.search(rf'^\s*{key} = ', script, re.M), (name, stage, key)


@pytest.mark.parametrize('config,expected', [
    (dict(critic=True, group_size=1, whiten_advantages=True, reward='model'), ('ppo', 'critic', 'model')),
    (dict(critic=False, group_size=1, whiten_advantages=False, reward='gold'), ('reinforce', 'none', 'checker')),
    (dict(critic=False, group_size=1, whiten_advantages=True, reward='gold'), ('reinforce', 'batch', 'checker')),
    (dict(critic=False, group_size=8, group_baseline='leave_one_out', group_std=False, whiten_advantages=False,
          reward='gold'), ('rloo', 'group', 'checker')),
    (dict(critic=False, group_size=8, group_baseline='mean', group_std=True, whiten_advantages=False,
          reward='gold'), ('grpo', 'group', 'checker')),
    (dict(critic=False, group_size=8, group_baseline='mean', group_std=False, whiten_advantages=False,
          reward='model'), ('dr_grpo', 'group', 'model')),
    (dict(critic=False, group_size=8, group_baseline='least_noise', group_std=False, whiten_advantages=False,
          reward='gold'), ('least_noise', 'group', 'checker')),
    (dict(critic=False, group_size=8, group_baseline='none', group_std=False, whiten_advantages=False,
          reward='gold'), ('reinforce', 'none', 'checker')),
])
def test_rl_method_names_what_ppo_ran(config, expected):
    m = rl_method(config)
    assert (m['algorithm'], m['baseline'], m['reward']) == expected


@pytest.mark.parametrize('name,reward', [('grpo_tasks_gold.py', 'checker'), ('grpo_tasks.py', 'model')])
def test_the_shipped_grpo_configs_are_named_grpo(name, reward):
    """config/grpo_tasks_gold.py and config/grpo_tasks.py (the group-relative runs of docs/experiments.md) are what
    the card would call them."""
    config = runpy.run_path(str(ROOT / 'config' / name))
    m = rl_method(config)
    assert (m['algorithm'], m['baseline'], m['reward']) == ('grpo', 'group', reward)
    assert config['push_down']
    assert config['batch_size'] % config['minibatch_size'] == config['minibatch_size'] % config['group_size'] == 0
    assert config['group_train'] == 'spread'  # a minibatch holds whole groups


def test_overoptimization_text_reads_the_points():
    """The report's over-optimization sentences come from the plot's points: where the gold accuracy peaked and
    ended, the proxy there, and which of the three readings the numbers support."""
    pt = lambda kl, gold, score: dict(kl=kl, gold_accuracy=gold, score=score)
    runs = {'A': [pt(0, 0.30, 0.0), pt(0.5, 0.40, 0.2), pt(2.0, 0.33, 0.9)],   # truth turned down, proxy rose on
            'B': [pt(0, 0.30, 0.0), pt(0.3, 0.35, 0.1), pt(0.6, 0.38, 0.3)],   # still climbing at the end
            'C': [pt(0, 0.30, 0.0), pt(0.5, 0.40, 0.5), pt(1.0, 0.20, 0.1)],   # both fell
            'D': [pt(0, 0.30, 0.0)]}                                            # one point: nothing to say
    best = [dict(n=1, kl=0.0, gold_accuracy=0.3), dict(n=16, kl=1.84, gold_accuracy=0.6),
            dict(n=64, kl=3.16, gold_accuracy=0.55)]
    text = overoptimization_text(best, runs)
    a, b, c = (text[text.index(k + ':'):] for k in 'ABC')
    assert a.startswith('A: gold accuracy 30.0% at the start, highest 40.0% at KL 0.50, 33.0% at the end (KL 2.00); '
                        "the reward model's score +0.000, +0.200, +0.900 at the same points: the proxy kept rising "
                        'after the truth peaked: over-optimization.')
    assert 'highest 38.0% at KL 0.60, 38.0% at the end' in b
    assert 'no over-optimization in this range' in b.split('C:')[0]
    assert 'both fell after the peak' in c.split('Best-of-n')[0]
    assert 'D:' not in text
    assert text.endswith('Best-of-n by the reward model: gold accuracy 30.0% at n = 1, highest 60.0% at n = 16 '
                         '(KL 1.84), 55.0% at n = 64 (KL 3.16).')


def test_rl_compare_runs_each_method_from_a_finished_run_at_one_budget(smoke_run, tmp_path):
    """rl_compare.py: eight ppo.py runs from the run's SFT model, each the reward's recipe config with the shared
    budget and its method's settings; every model evaluated as the card evaluates; a rerun skips them all."""
    import rl_compare
    run_dir, card, _ = smoke_run
    out, doc = tmp_path / 'cmp', tmp_path / 'cmp.md'
    args = ['rl_compare.py', f'--run_dir={run_dir}', f'--out_dir={out}', f'--doc={doc}', '--max_iters=2',
            '--batch_size=8', '--minibatch_size=8', '--ppo_epochs=1', '--eval_interval=1', '--eval_tasks=5',
            '--sampled_prompts=20']
    run(args, timeout=1200)
    config = {d.name: next(r for r in reversed((d / 'metrics.jsonl').read_text().splitlines())
                           if '"summary"' in r) for d in out.iterdir() if (d / 'metrics.jsonl').exists()}
    config = {name: json.loads(r)['summary']['config'] for name, r in config.items()}
    assert sorted(config) == sorted(f'{r}_{m}' for r in ('checker', 'model') for m in rl_compare.methods.split(','))
    for name, c in config.items():
        reward, method = name.split('_')
        recipe = runpy.run_path(str(ROOT / rl_compare.REWARDS[reward]))
        assert (c['max_iters'], c['batch_size'], c['minibatch_size'], c['ppo_epochs'], c['seed']) == (2, 8, 8, 1, 1337)
        assert (c['reward'], c['kl_coef'], c['kl_target'], c['temperature']) == (
            recipe['reward'], recipe['kl_coef'], recipe['kl_target'], recipe['temperature'])
        assert rl_method(c)['algorithm'] == {'reinforce': 'reinforce', 'positive': 'reinforce', 'group': 'grpo',
                                             'critic': 'ppo'}[method]
        assert c['push_down'] == (method != 'positive') and c['whiten_advantages'] == (method == 'critic')
    assert config['model_positive']['score_margin'] == 0.5  # the recipe's thresholded learned-reward row
    # thresholding the checker's 0/1 score at 0 changes nothing: REINFORCE's run, weight for weight
    a, b = (M.load_checkpoint(str(out / f'checker_{m}' / 'model.pt'))[0]['model'] for m in ('reinforce', 'positive'))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the SFT row is the card's SFT row: the same evaluation code on the same model
    sft = json.loads((out / 'sft_eval.json').read_text())
    assert sft['accuracy'] == card['accuracy']['SFT'] and sft['val_accuracy'] == card['val_accuracy']['SFT']
    assert sft['rm_score'] == pytest.approx(card['rm_score']['SFT'])
    text = doc.read_text()
    rows = [line for line in text.splitlines() if line.startswith('| checker') or line.startswith('| model')]
    assert len(rows) == 8 and (tmp_path / 'cmp.png').read_bytes()[:4] == b'\x89PNG'
    assert rows[3].split(' | ')[12] != '-' and rows[0].split(' | ')[12] == '-'  # explained variance: critic only
    # sampled at the rollouts' temperature: pass@1 <= pass@8, as cached, in each row
    for line, name in zip(rows, [f'{r}_{m}' for r in ('checker', 'model') for m in rl_compare.methods.split(',')]):
        s = json.loads((out / name / 'sampled.json').read_text())
        assert s['key']['prompts'] == 20 and 0 <= s['pass@1'] <= s['pass@8'] <= 1 and 1 <= s['distinct'] <= 8
        assert line.split(' | ')[6] == f"{100 * s['pass@1']:.1f}% / {100 * s['pass@8']:.1f}%, {s['distinct']:.1f}"
    doc.write_text(text + '\n## What the table shows\n\nWritten by hand.\n')
    again = run(args, timeout=1200)
    assert again.stdout.count('skipped') == 8 and 'evaluated' not in again.stdout
    assert [line for line in doc.read_text().splitlines() if line.startswith('|')] == \
        [line for line in text.splitlines() if line.startswith('|')]
    assert doc.read_text().endswith('\n## What the table shows\n\nWritten by hand.\n')  # kept


def test_pass_at_k_is_the_share_of_k_subsets_holding_a_right_reply():
    """rl_compare.pass_at_k against the slow count: every k-subset of n replies, c of them right."""
    from itertools import combinations
    from rl_compare import pass_at_k
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(combinations([True] * c + [False] * (n - c), k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_every_rl_compare_method_passes_only_settings_ppo_has():
    import re
    import rl_compare
    script = (ROOT / 'ppo.py').read_text()
    for name, (_, args) in rl_compare.METHODS.items():
        for arg in args:
            assert re.search(rf'^{arg[2:].split("=")[0]} = ', script, re.M), (name, arg)


@pytest.mark.parametrize('args,message', [
    (['--methods=reinforce,ppo2'], "unknown method 'ppo2'"),
    (['--rewards=human'], "unknown reward 'human'"),
    (['--batch_size=12', '--minibatch_size=4'], 'multiple of minibatch_size and of 8'),
])
def test_rl_compare_bad_input_fails_before_any_work(smoke_run, tmp_path, args, message):
    run_dir = smoke_run[0]
    p = run(['rl_compare.py', f'--run_dir={run_dir}', f'--out_dir={tmp_path / "cmp"}', *args], check=False)
    assert message in error_line(p) and not (tmp_path / 'cmp').exists()
    p = run(['rl_compare.py', f'--run_dir={tmp_path}', f'--out_dir={tmp_path / "cmp"}'], check=False)
    assert 'is not a finished recipe run: no sft/model.pt' in error_line(p)


def test_pick_best_takes_each_prompts_highest_score_first_among_ties():
    """best_of_n.pick_best against the slow reading: the first index holding the row's maximum; None where that
    maximum is below min_score."""
    import random
    from best_of_n import pick_best
    rng = random.Random(0)
    rows = [[rng.choice([0.0, 0.5, 1.0, -1.0]) for _ in range(rng.randint(1, 6))] for _ in range(300)]
    assert pick_best(rows) == [row.index(max(row)) for row in rows]
    assert pick_best(rows, min_score=1.0) == [row.index(1.0) if 1.0 in row else None for row in rows]


def test_best_of_n_keeps_the_reward_models_pick_and_starts_each_round_from_the_last(smoke_run, tmp_path):
    """best_of_n.py from the smoke run's SFT model: each prompt's kept reply is the one the reward model, scored
    again here, ranks first among its replies; round 2 fine-tunes round 1's model; with the checker only right
    replies are kept."""
    from reward import load_reward_model, score
    from tasks import check_answer, load_chat_model, read_tasks
    run_dir = smoke_run[0]
    small = ['--n=3', '--prompts_per_round=12', '--max_iters=2', '--batch_size=4', '--eval_tasks=5', '--device=cpu']
    out = tmp_path / 'bon'
    run(['best_of_n.py', f'--init_from={run_dir / "sft"}', f'--reward_model={run_dir / "reward"}',
         f'--data_dir={run_dir / "data"}', f'--out_dir={out}', '--rounds=2', *small], timeout=600)
    log = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['round'] for r in log] == [1, 2] and (out / 'model.pt').exists()
    assert f"config: init_from = '{out / 'round_1'}'" in (out / 'round_2' / 'finetune.log').read_text()
    rm, _ = load_reward_model(str(run_dir / 'reward' / 'reward.pt'))
    _, _, tok = load_chat_model(str(run_dir / 'sft' / 'model.pt'), 'cpu')
    samples = [json.loads(line) for line in (out / 'round_1' / 'samples.jsonl').read_text().splitlines()]
    picked = [json.loads(line) for line in (out / 'round_1' / 'picked.jsonl').read_text().splitlines()]
    assert len(samples) == 12 and all(len(s['replies']) == 3 for s in samples)
    kept = [s for s in samples if s['replies'][s['pick']].strip()]
    assert [(p['instruction'], p['output']) for p in picked] == [(s['prompt'], s['replies'][s['pick']]) for s in kept]
    for s in samples:
        again = score(rm, tok, [s['prompt']] * 3, s['replies']).tolist()
        assert again == pytest.approx(s['scores'], abs=1e-4)
        assert again[s['pick']] == pytest.approx(max(again), abs=1e-4)
    out = tmp_path / 'bon_gold'
    run(['best_of_n.py', f'--init_from={run_dir / "sft"}', f'--data_dir={run_dir / "data"}', f'--out_dir={out}',
         '--reward=gold', '--rounds=1', '--temperature=1.0', *small[:1], '--prompts_per_round=200', *small[2:]],
        timeout=600, check=False)
    tasks = {t['prompt']: t for t in read_tasks(str(run_dir / 'data'), 'train')}
    samples = [json.loads(line) for line in (out / 'round_1' / 'samples.jsonl').read_text().splitlines()]
    for s in samples:
        assert s['right'] == [check_answer(tasks[s['prompt']], y) for y in s['replies']]
        assert (s['pick'] is None) == (not any(s['right'])) and (s['pick'] is None or s['right'][s['pick']])


@pytest.mark.parametrize('args,message', [
    (['--reward=human'], "reward must be one of model, gold"),
    (['--rounds=0'], 'rounds must be > 0'),
    (['--reward_model=nowhere'], "no reward.pt in reward_model='nowhere'"),
])
def test_best_of_n_bad_input_fails_before_any_work(smoke_run, tmp_path, args, message):
    run_dir = smoke_run[0]
    p = run(['best_of_n.py', f'--init_from={run_dir / "sft"}', f'--reward_model={run_dir / "reward"}',
             f'--data_dir={run_dir / "data"}', f'--out_dir={tmp_path / "bon"}', *args], check=False)
    assert message in error_line(p) and not (tmp_path / 'bon').exists()
