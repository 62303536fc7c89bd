"""
Four ways to turn a reward into a policy gradient, side by side: from one finished `cpu` recipe run's SFT model,
each method with the task checker as the reward and with the learned reward model, every run with the same
rollouts (iterations x replies per iteration), the same prompts, the same PPO passes and the same seed. Then
every model is evaluated by the pipeline's own code (test and val gold accuracy, McNemar against SFT, KL to SFT,
the reward model's score), and the table and the learning curves are written to docs/rl_compare.md and .png.

    python pipeline.py --out_dir=runs/cpu                  # the SFT and reward models (about 15 minutes)
    python rl_compare.py --run_dir=runs/cpu                # the eight runs, then the table (about 40 minutes)
    python rl_compare.py --run_dir=runs/cpu --methods=critic,critic_warmup --rewards=checker   # some of them

The methods (ppo.py's flags on top of the reward's recipe config, config/ppo_tasks_gold.py or
config/ppo_tasks.py, whose KL settings every method of that reward keeps):

  reinforce  REINFORCE with no baseline: every token of a reply weighed by the reply's score (plus the KL
             penalties still ahead). A negative reward-model score pushes its reply down; the checker's 0/1 never does
  positive   thresholded, positive only: max(0, score - score_margin), nothing pushed down (the recipe's rows:
             margin 0.5 for the reward model's standardised score; 0 for the checker, where it is REINFORCE itself,
             run again as a check that the two give the same numbers)
  group      group-relative, as GRPO (Shao et al. 2024): 8 replies per prompt (so 1/8 as many prompts per batch),
             each scored against its group's mean and std, the below-mean replies pushed down
  critic     PPO as InstructGPT ran it: a value model (from the reward model, or from the SFT model with a zero
             head for the checker), GAE (lambda 0.95), whitened advantages

Runs resume: a run whose folder holds done.json from the same command is skipped, and so is its evaluation. The
table has a row for every run in out_dir made at these settings, so a later call with a fix adds its row.
"""
import json
import math
import os
import platform
import runpy
import shutil
import subprocess
import sys
import time

import torch

from common import check_settings, fail, write_text_atomic
from pipeline import evaluate_models, run_stage
from plots import methods_png, read_jsonl, read_run

# -----------------------------------------------------------------------------
run_dir = 'runs/cpu'          # a finished pipeline.py run: its sft/model.pt, reward/reward.pt and data/
out_dir = ''                  # where the runs go; default: run_dir/rl_compare
doc = 'docs/rl_compare.md'    # the table; the learning curves beside it, as .png
methods = 'reinforce,positive,group,critic'
rewards = 'checker,model'
# the budget every run shares: max_iters x batch_size rollouts, each batch used ppo_epochs times in minibatches
max_iters = 100
batch_size = 256
minibatch_size = 64
ppo_epochs = 2
eval_interval = 20            # val gold accuracy (greedy) on eval_tasks prompts every so many iterations: the curves
eval_tasks = 250
noise_prompts = 32            # the noise diagnostic: this many train prompts x 8 replies from the SFT model (0: none)
sampled_prompts = 1000        # pass@1 and pass@8 at T = 0.7 on this many val prompts, 8 replies each (0: none)
device = 'auto'
seed = 1337
# -----------------------------------------------------------------------------

NOTES = '## What the table shows'  # this heading and what follows it in doc are kept when the table is written again
REWARDS = {'checker': 'config/ppo_tasks_gold.py', 'model': 'config/ppo_tasks.py'}
NO_GROUPS = ['--group_size=1', '--critic=False', '--whiten_advantages=False']
METHODS = {  # name: (what it is, ppo.py's flags)
    'reinforce': ('REINFORCE, no baseline', [*NO_GROUPS, '--push_down=True']),
    'positive': ('thresholded, positive only', [*NO_GROUPS, '--push_down=False']),
    'group': ('group-relative (GRPO: 8 per prompt, mean and std)',
              ['--group_size=8', '--group_baseline=mean', '--group_std=True', '--critic=False',
               '--whiten_advantages=False', '--push_down=True']),
    'critic': ('PPO: value model, GAE, whitening',
               ['--group_size=1', '--critic=True', '--whiten_advantages=True', '--push_down=True']),
}
METHODS['group_least_noise'] = ('group-relative, least-noise baseline (8 per prompt, the others weighted by '
                                'surprisal)', ['--group_size=8', '--group_baseline=least_noise', '--group_std=False',
                                               '--critic=False', '--whiten_advantages=False', '--push_down=True'])
CRITIC = METHODS['critic'][1]
METHODS.update({  # the critic's fixes tried (docs/rl_compare.md says why each): --methods=critic,critic_warmup,...
    'critic_warmup': ('PPO, the value model trained alone for 10 iterations first', [*CRITIC, '--value_warmup=10']),
    'critic_lam0': ('PPO, lambda 0 (one-step TD advantages)', [*CRITIC, '--lam=0']),
    'critic_value_lr': ('PPO, value model learning rate 1e-3', [*CRITIC, '--value_learning_rate=1e-3']),
    'critic_no_whiten': ('PPO without whitening (the critic the only baseline)',
                         [*CRITIC, '--whiten_advantages=False']),
    'critic_up_only': ('PPO, pushes up only (advantages below 0 set to 0, no whitening)',
                       [*CRITIC, '--whiten_advantages=False', '--down_weight=0']),
})


def run_command(method, reward, folder):
    """ppo.py's arguments for one run: the reward's recipe config, the shared budget, then the method."""
    return ['ppo.py', REWARDS[reward], f"--init_from={os.path.join(run_dir, 'sft')}",
            f"--reward_model={os.path.join(run_dir, 'reward')}", f"--data_dir={os.path.join(run_dir, 'data')}",
            f'--out_dir={folder}', f'--seed={seed}', f'--device={device}', f'--max_iters={max_iters}',
            f'--batch_size={batch_size}', f'--minibatch_size={minibatch_size}', f'--ppo_epochs={ppo_epochs}',
            f'--eval_interval={eval_interval}', f'--eval_tasks={eval_tasks}', '--eval_test=False',
            *METHODS[method][1]]


def read_json(path):
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def training_stats(folder):
    """What a run's metrics.jsonl says about its training: rollouts' gold accuracy and the controller's KL at the
    start and the end (means of 5 iterations), seconds in the iterations, the critic's explained variance, and
    the advantages (mean and std before whitening, the share of their weight pushing down), over all iterations."""
    iters, evals, summary = read_run(folder)
    ends = lambda key: (mean(r[key] for r in iters[:5]), mean(r[key] for r in iters[-5:]))
    return dict(gold=ends('gold_accuracy'), kl=ends('kl'), beta=iters[-1]['kl_coef'],
                seconds=sum(r['seconds'] for r in iters), explained_variance=ends('explained_variance'),
                advantage_mean=mean(r['advantage_mean'] for r in iters),
                advantage_std=mean(r['advantage_std'] for r in iters),
                push_down_share=mean(r['push_down_share'] for r in iters),
                val_curve=[(e['iter'], e['accuracy']['all']) for e in evals if 'accuracy' in e],
                rollout_gold=[(r['iter'], r['gold_accuracy']) for r in iters])


def pass_at_k(n, c, k):
    """The chance that k of n sampled replies, c of them right, drawn without replacement, hold a right one:
    1 - C(n - c, k) / C(n, k) (Chen et al. 2021's unbiased estimator of pass@k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sampled_accuracy(model_path, data_dir, dev, seed, n_prompts, n=8, temperature=0.7):
    """Replies sampled as the rollouts are (T = 0.7), n to each of the first n_prompts val prompts: pass@1 and
    pass@n, and the distinct replies among the n. Whether a method kept the policy's spread: Zhu et al. 2025
    find pushes down keep pass@k where pushes up raise pass@1 and lower it."""
    from tasks import check_answer, eval_tasks_from, load_chat_model, sample_replies
    model, _, tok = load_chat_model(model_path, dev)
    tasks = eval_tasks_from(data_dir, n_prompts)
    replies = sample_replies(model, tok, [t['prompt'] for t in tasks], k=n, temperature=temperature,
                             max_new_tokens=16, generator=torch.Generator(dev).manual_seed(seed))
    right = [sum(check_answer(t, r) for r in rs) for t, rs in zip(tasks, replies)]
    return {'pass@1': mean(pass_at_k(n, c, 1) for c in right), f'pass@{n}': mean(pass_at_k(n, c, n) for c in right),
            'distinct': mean(len(set(rs)) for rs in replies)}


def cpu_model():
    """The machine, as lscpu names it, and what its vector units have (the speed of every number here)."""
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
        name = next(line.split(':', 1)[1].strip() for line in out.splitlines() if line.startswith('Model name'))
        flags = next(line.split(':', 1)[1].split() for line in out.splitlines() if line.startswith('Flags'))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or 'unknown CPU'
    have = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags]
    return f"{name} ({', '.join(have) or 'no AVX2'})"


def gradient_noise_rows(sft_path, data_dir, dev, n_prompts, group=8):
    """Why a baseline can lose: at the SFT model, n_prompts train prompts x `group` replies sampled as the checker
    runs sample them, their 0/1 scores weighted by each baseline, and rl.gradient_noise over every weight. A
    baseline leaves the expected gradient as it is; what it changes is the noise, mean (R - b)^2 |g|^2, which
    falls only if the replies it weighs most have small gradients. Returns (the table's rows, a sentence)."""
    import numpy as np
    from rl import gradient_noise, group_advantages, rollout
    from tasks import chat_ids, check_answer, load_chat_model, render_prompt
    checker = runpy.run_path(REWARDS['checker'])
    T, max_new = checker['temperature'], checker.get('max_new_tokens', 16)
    model, _, tokenizer = load_chat_model(sft_path, dev)
    model.eval()
    vocab_limit = min(tokenizer.n_vocab, model.config.vocab_size)
    records = read_jsonl(os.path.join(data_dir, 'tasks', 'train.jsonl'))
    picks = [records[i] for i in np.random.default_rng(seed).choice(len(records), n_prompts, replace=False)
             for _ in range(group)]
    prompts = [render_prompt([{'role': 'user', 'content': r['prompt']}], tokenizer)
               [-(model.config.block_size - max_new - 1):] for r in picks]
    ro = rollout(model, prompts, max_new, chat_ids(tokenizer)[2], torch.Generator(dev).manual_seed(seed),
                 vocab_limit, T)
    R = torch.tensor([float(check_answer(r, tokenizer.decode(y))) for r, y in zip(picks, ro['replies'])])
    _, norms = gradient_noise(model, ro['idx'], ro['mask'], {}, vocab_limit, T)
    b_opt = ((R * norms).sum() / norms.sum()).item()  # the constant baseline of least noise (Greensmith et al.)
    weightings = {'none: R (REINFORCE)': R, 'the batch mean: R - mean R': R - R.mean(),
                  f'the least-noise constant: R - {b_opt:.2f} (sum R g^2 / sum g^2)': R - b_opt,
                  'the group mean, leave one out (RLOO)': group_advantages(R, group, 'leave_one_out'),
                  "the group's mean and std (GRPO)": group_advantages(R, group, 'mean', True)}
    stats, _ = gradient_noise(model, ro['idx'], ro['mask'], weightings, vocab_limit, T)
    n = len(R)
    rows = ['| weighting (baseline) | noise per reply: tr Cov[w g] | signal: the mean gradient\'s squared length '
            '(unbiased) | signal-to-noise of a batch of ' + str(n) + ' |', '|---|---|---|---|']
    for name, s in stats.items():
        noise = s['noise'] * n / (n - 1)  # the sample covariance, unbiased
        signal = s['signal'] - noise / n  # |mean|^2 overestimates |mu|^2 by the noise of the mean
        rows.append(f"| {name} | {noise:.4g} | {signal:.4g} | "
                    + (f"{signal / (noise / n):.2f} |" if noise > 0 else "- (every reply weighed 0) |"))
    right, lengths = R.bool(), ro['mask'].sum(1).float()
    said = (f"{n_prompts} train prompts x {group} replies from the SFT model at T = {T}: {right.float().mean():.0%} "
            f"right. |g|^2, the squared length of a reply's gradient of log pi over every weight: "
            f"{norms[right].mean():.4g} for a right reply, {norms[~right].mean():.4g} for a wrong one (replies "
            f"{lengths[right].mean():.1f} and {lengths[~right].mean():.1f} tokens long).")
    surprisal = -(ro['logprobs'].float() * ro['mask']).sum(1)  # least_noise's proxy for |g|^2 (ppo.py)
    if (surprisal > 0).all():
        r = np.corrcoef(surprisal.log().numpy(), norms.log().numpy())[0, 1]
        said += (f" A reply's surprisal, -log pi(reply), the least-noise group baseline's proxy for |g|^2: "
                 f"log-log correlation {r:.2f} with |g|^2 over these {n} replies.")
    return rows, said


def table(runs, evals, sft, sampled=None):
    """The Markdown table: one row per run, SFT first; with sampled (sampled_accuracy per run, 'SFT' too), a
    column of pass@1 / pass@8 and the distinct replies of 8."""
    from tasks import mcnemar
    pct = lambda x: f"{100 * x:.1f}%"

    def vs_sft(e, key):
        fixed, broken, p = mcnemar(sft[key], e[key])
        return f"{fixed} / {broken}, p = {p:.2g}"
    head = ['reward', 'method', 'test', 'test vs SFT: fixed / broken, p', 'val', 'val vs SFT', 'KL to SFT',
            'reward-model score', 'rollout gold acc (first 5 -> last 5)', "controller's KL (last 5), beta",
            'train s', 'explained variance (first 5 -> last 5)', 'advantage mean / std; share pushing down']
    spread = lambda e: f"{pct(e['pass@1'])} / {pct(e['pass@8'])}, {e['distinct']:.1f}"
    if sampled:
        head.insert(6, 'val sampled at T = 0.7: pass@1 / pass@8, distinct of 8')
    rows = ['| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|',
            f"| - | SFT (the start) | **{pct(sft['accuracy']['all'])}** | - | {pct(sft['val_accuracy']['all'])} | - | "
            + (f"{spread(sampled['SFT'])} | " if sampled else '') + f"0 | {sft['rm_score']:+.3f} | - | - | - | - | - |"]
    for (m, r), s in runs.items():
        e = evals[m, r]
        ev = s['explained_variance']
        rows.append(
            f"| {r} | {METHODS[m][0]} | **{pct(e['accuracy']['all'])}** | {vs_sft(e, 'correct')} | "
            f"{pct(e['val_accuracy']['all'])} | {vs_sft(e, 'val_correct')} | "
            + (f"{spread(sampled[f'{r}_{m}'])} | " if sampled else '') + f"{e['kl']:.2f} | {e['rm_score']:+.3f} | "
            f"{pct(s['gold'][0])} -> {pct(s['gold'][1])} | {s['kl'][1]:.2f}, {s['beta']:.3g} | {s['seconds']:.0f} | "
            + (f"{ev[0]:.2f} -> {ev[1]:.2f}" if ev[0] is not None else '-') + ' | '
            f"{s['advantage_mean']:+.3f} / {s['advantage_std']:.3f}; {pct(s['push_down_share'])} |")
    return '\n'.join(rows)


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    from configurator import apply_config
    apply_config(globals())
    check_settings(globals(), positive=('max_iters', 'batch_size', 'minibatch_size', 'ppo_epochs', 'eval_interval',
                                        'eval_tasks'))
    methods_list, rewards_list = methods.split(','), rewards.split(',')
    for name, given, known in (('method', methods_list, METHODS), ('reward', rewards_list, REWARDS)):
        unknown = [x for x in given if x not in known]
        if unknown or not given:
            fail(f"unknown {name} '{','.join(unknown)}'; choose from {', '.join(known)}")
    for need in ('sft/model.pt', 'reward/reward.pt', 'data/tasks/test.jsonl'):
        if not os.path.isfile(os.path.join(run_dir, need)):
            fail(f"{run_dir} is not a finished recipe run: no {need} (run python pipeline.py --out_dir={run_dir})")
    if batch_size % minibatch_size or batch_size % 8:
        fail(f"batch_size must be a multiple of minibatch_size and of 8 (the group method's groups); got {batch_size}")
    run_dir = os.path.abspath(run_dir)
    dev = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    out_dir = os.path.abspath(out_dir or os.path.join(run_dir, 'rl_compare'))
    os.makedirs(out_dir, exist_ok=True)

    # 1. the runs, one at a time (each its own process, as the pipeline's stages)
    def finished(m, r):
        """Whether out_dir holds this run, made by the command these settings give."""
        marker = os.path.join(out_dir, f'{r}_{m}', 'done.json')
        return os.path.exists(marker) and read_json(marker)['command'] == command_line(m, r)

    def command_line(m, r):
        return ' '.join([os.path.basename(sys.executable), *run_command(m, r, os.path.join(out_dir, f'{r}_{m}'))])

    t_start, pairs = time.time(), [(m, r) for r in rewards_list for m in methods_list]
    for i, (m, r) in enumerate(pairs):
        folder = os.path.join(out_dir, f'{r}_{m}')
        cmd, line, marker = run_command(m, r, folder), command_line(m, r), os.path.join(folder, 'done.json')
        if finished(m, r):
            print(f"=== {r}_{m}: done ({read_json(marker)['seconds']:.0f} s); skipped")
            continue
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted run starts again from scratch, as a stage does
        t0 = time.time()
        run_stage(f'{r}_{m}', f"[{i + 1}/{len(pairs)}] {line}", line, cmd,
                  os.path.join(out_dir, 'logs', f'{r}_{m}.log'))
        write_text_atomic(marker, json.dumps(dict(seconds=time.time() - t0, command=line)))

    # 2. every model evaluated by the pipeline's code (cached in each folder: eval.json): these runs, and those an
    # earlier call left in out_dir at the same budget (a fix tried later adds its row to the table)
    pairs = [(m, r) for r in REWARDS for m in METHODS if finished(m, r)]
    keep = ('accuracy', 'val_accuracy', 'correct', 'val_correct', 'rm_score', 'kl')
    todo = {'SFT': os.path.join(run_dir, 'sft', 'model.pt')}
    todo.update({f'{r}_{m}': os.path.join(out_dir, f'{r}_{m}', 'model.pt') for m, r in pairs
                 if not os.path.exists(os.path.join(out_dir, f'{r}_{m}', 'eval.json'))})
    if len(todo) > 1 or not os.path.exists(os.path.join(out_dir, 'sft_eval.json')):
        results = evaluate_models(run_dir, os.path.join(run_dir, 'data'), device, seed, models=todo)[0]
        for name, res in results.items():
            path = os.path.join(out_dir, 'sft_eval.json' if name == 'SFT' else os.path.join(name, 'eval.json'))
            write_text_atomic(path, json.dumps({k: res[k] for k in keep}))
    sft = read_json(os.path.join(out_dir, 'sft_eval.json'))
    evals = {(m, r): read_json(os.path.join(out_dir, f'{r}_{m}', 'eval.json')) for m, r in pairs}
    runs = {(m, r): training_stats(os.path.join(out_dir, f'{r}_{m}')) for m, r in pairs}
    # and sampled as the rollouts are: pass@1, pass@8 and the replies' spread (cached: sampled.json in each folder)
    sampled = {}
    if sampled_prompts:
        key = dict(prompts=sampled_prompts, seed=seed, n=8, temperature=0.7)
        for name, path in {'SFT': os.path.join(run_dir, 'sft', 'model.pt'),
                           **{f'{r}_{m}': os.path.join(out_dir, f'{r}_{m}', 'model.pt') for m, r in pairs}}.items():
            cache = os.path.join(out_dir, 'sft_sampled.json' if name == 'SFT' else os.path.join(name, 'sampled.json'))
            if not (os.path.exists(cache) and read_json(cache)['key'] == key):
                write_text_atomic(cache, json.dumps(dict(key=key, **sampled_accuracy(
                    path, os.path.join(run_dir, 'data'), dev, seed, sampled_prompts))))
            sampled[name] = read_json(cache)

    # 3. the gradient's noise at the SFT model under each baseline (cached: noise.json)
    noise_path, noise = os.path.join(out_dir, 'noise.json'), None
    if noise_prompts:
        key = dict(sft=os.path.join(run_dir, 'sft', 'model.pt'), prompts=noise_prompts, seed=seed)
        if os.path.exists(noise_path) and read_json(noise_path)['key'] == key:
            noise = read_json(noise_path)
        else:
            rows, said = gradient_noise_rows(key['sft'], os.path.join(run_dir, 'data'), dev, noise_prompts)
            noise = dict(key=key, rows=rows, said=said)
            write_text_atomic(noise_path, json.dumps(noise))

    # 4. the table and the curves
    png = os.path.splitext(doc)[0] + '.png'
    methods_png({(METHODS[m][0], r): s for (m, r), s in runs.items()}, rewards_list, eval_tasks, png)
    # the commands that make every row: one per reward, naming its methods (the same budget flags as this call)
    budget = [a for a in sys.argv[1:] if not a.startswith(('--methods=', '--rewards=', '--run_dir='))]
    commands = [' '.join(['python rl_compare.py', f'--run_dir={run_dir}', *budget, f'--rewards={r}', '--methods='
                          + ','.join(m for m, r2 in pairs if r2 == r)])
                for r in REWARDS if any(r2 == r for _, r2 in pairs)]
    about_sampled = (f" Sampled: 8 replies at T = 0.7 to each of the first {sampled_prompts} val prompts; pass@1, "
                     "pass@8 (Chen et al. 2021's estimator) and the distinct replies among the 8." if sampled else '')
    lines = ['# RL methods side by side: REINFORCE, positive-only, group-relative, PPO with a critic', '',
             'Made by ' + ' and '.join(f"`{c}`" for c in commands) + f" ({time.strftime('%Y-%m-%d')}), on "
             f"{cpu_model()}, torch {torch.__version__} with {torch.get_num_threads()} threads, one run at a time.",
             f"From {run_dir}'s SFT model; every run "
             f"{max_iters} iterations of {batch_size} rollouts ({max_iters * batch_size:,} replies, T = 0.7), "
             f"{ppo_epochs} passes in minibatches of {minibatch_size}, seed {seed}; each method on top of the "
             f"reward's recipe config ({', '.join(f'{k}: {v}' for k, v in REWARDS.items())}).", '',
             "Test and val: greedy gold accuracy on every test and val prompt, McNemar's exact test against SFT. "
             "KL to SFT: nats per reply sampled at T = 1 on the val prompts (the report card's estimator). "
             "Reward-model score: the learned reward model's standardised score of the greedy test replies. "
             "Train s: the iterations' seconds (evaluations excluded). Advantages: the mean and std over reply "
             "tokens before whitening, and the share of their weight (sum of |A|) on tokens pushed down, "
             "averaged over iterations." + about_sampled, '', table(runs, evals, sft, sampled), '',
             f"![learning curves]({os.path.basename(png)})", '']
    if noise:
        lines += ['## The policy gradient\'s noise under each baseline, at the SFT model', '', noise['said'], '',
                  *noise['rows'], '']
    if os.path.exists(doc):  # what was written by hand below the table stays
        with open(doc, encoding='utf-8') as f:
            old = f.read()
        if NOTES in old:
            lines.append(old[old.index(NOTES):].rstrip('\n'))
    write_text_atomic(doc, '\n'.join(lines) + '\n')
    print('\n'.join(lines))
    print(f"{len(pairs)} runs compared ({time.time() - t_start:.0f} s this call): {doc}, {png}")
