"""
Reading finished runs and drawing them: every picture the project makes (the pipeline's loss curves, a
comparison of PPO runs, the over-optimization plot) and the tables next to them. Each training script
writes out_dir/metrics.jsonl, one JSON record per line; this reads those files and nothing else.

    python plots.py --compare=out-ppo,out-ppo-nokl    # finished ppo.py runs: a table, and ppo_compare.png
"""
import json
import os

import matplotlib
matplotlib.use('Agg')  # files only: no window, no display needed
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def read_run(out_dir):
    """A ppo.py run's metrics: (per-iteration records, evaluation records, the closing summary or None)."""
    records = read_jsonl(os.path.join(out_dir, 'metrics.jsonl'))
    iters = [r for r in records if 'kl' in r and 'eval' not in r and 'summary' not in r]
    evals = [r for r in records if 'eval' in r]
    summary = next((r for r in reversed(records) if 'summary' in r), None)
    return iters, evals, summary


def compare_runs(out_dirs, plot_path=None, smooth=5):
    """A Markdown table of finished runs: the supervised model (the first run's starting point) and each run's
    end; rollout columns average the first and the last 5 iterations (single batches are noisy). With
    plot_path, also plots the rollouts' score, gold accuracy and KL (moving averages of `smooth` iterations)
    and the held-out gold accuracy at each evaluation."""
    def avg(key, recs):
        vals = [r[key] for r in recs if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    def fmt(x, spec):
        return '-' if x is None else format(x, spec)

    head = ["run", "reward", "beta (start -> end)", "KL target", "iters", "rollout score (first 5 -> last 5)",
            "rollout gold acc", "KL to SFT (last 5)", "val acc (greedy)", "test acc (greedy)",
            "val reward-model score (greedy)", "train s"]
    rows = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    runs = {}
    for d in out_dirs:
        iters, evals, summary = read_run(d)
        if not iters or summary is None:
            raise ValueError(f"{d}: not a finished ppo.py run (no per-iteration records or no summary)")
        runs[d] = (iters, [e for e in evals if 'accuracy' in e])
        cfg, before, after = summary['summary']['config'], summary['before'], summary['after']
        if d == out_dirs[0]:
            rows.append(f"| SFT (start of {d}) | - | - | - | 0 | {fmt(avg('score', iters[:1]), '.3f')} | "
                        f"{fmt(avg('gold_accuracy', iters[:1]), '.1%')} | 0 | "
                        f"{fmt(before.get('accuracy', {}).get('all'), '.1%')} | "
                        f"{fmt(before.get('test_accuracy', {}).get('all'), '.1%')} | {fmt(before.get('score'), '.3f')} | - |")
        rows.append(f"| {d} | {cfg['reward']} | {cfg['kl_coef']:.3g} -> {iters[-1]['kl_coef']:.3g} | "
                    f"{cfg['kl_target'] or '-'} | {iters[-1]['iter']} | {fmt(avg('score', iters[:5]), '.3f')} -> "
                    f"{fmt(avg('score', iters[-5:]), '.3f')} | {fmt(avg('gold_accuracy', iters[:5]), '.1%')} -> "
                    f"{fmt(avg('gold_accuracy', iters[-5:]), '.1%')} | {fmt(avg('kl', iters[-5:]), '.2f')} | "
                    f"{fmt(after.get('accuracy', {}).get('all'), '.1%')} | "
                    f"{fmt(after.get('test_accuracy', {}).get('all'), '.1%')} | {fmt(after.get('score'), '.3f')} | "
                    f"{summary['summary']['train_seconds']:.0f} |")
    table = '\n'.join(rows)
    if not plot_path:
        return table
    keys = [('score', 'rollout score (the reward used)'), ('gold_accuracy', 'rollout gold accuracy (sampled)'),
            ('kl', 'KL(policy || SFT), nats per reply')]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.5 * (len(keys) + 1), 3.6))
    for ax, (key, title) in zip(axes, keys):
        for d, (iters, _) in runs.items():
            pts = [(r['iter'], r[key]) for r in iters if r.get(key) is not None]
            ys = [sum(y for _, y in pts[max(0, i - smooth + 1):i + 1]) / len(pts[max(0, i - smooth + 1):i + 1])
                  for i in range(len(pts))]
            ax.plot([x for x, _ in pts], ys, label=d)
        ax.set_title(title + (f', mean of {smooth}' if smooth > 1 else ''), fontsize=9)
        ax.set_xlabel('iteration')
    for d, (_, evals) in runs.items():
        axes[-1].plot([e['iter'] for e in evals], [e['accuracy']['all'] for e in evals], marker='o', label=d)
    axes[-1].set_title('held-out gold accuracy (greedy, val)', fontsize=9)
    axes[-1].set_xlabel('iteration')
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot_path, dpi=120)
    plt.close(fig)
    return table


def moving_average(ys, n):
    return [sum(ys[max(0, i - n + 1):i + 1]) / len(ys[max(0, i - n + 1):i + 1]) for i in range(len(ys))]


def loss_png(out_dir, path=None):
    """train.py's loss curve: out_dir/metrics.jsonl -> out_dir/loss.png (train loss per logged iteration,
    val loss at each evaluation)."""
    records = read_jsonl(os.path.join(out_dir, 'metrics.jsonl'))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label in (('loss', 'train'), ('val_loss', 'val')):
        pts = [(r['iter'], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=label, marker='o' if key == 'val_loss' else None, ms=3)
    ax.set_xlabel('iteration', fontsize=9)
    ax.set_ylabel('cross-entropy (nats per token)', fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path or os.path.join(out_dir, 'loss.png'), dpi=100)
    plt.close(fig)


def curves_png(run_dir, path, smooth=5):
    """The pipeline's training curves, one panel per stage, into path (PPO's per-batch numbers as moving
    averages of `smooth` iterations: single batches are noisy)."""
    panels = [('pretrain', 'pretraining: loss', [('loss', 'train'), ('val_loss', 'val (estimate)')]),
              ('sft', 'SFT: loss on reply tokens', [('loss', 'train'), ('val_loss', 'val')]),
              ('reward', 'reward model: pair loss', [('loss', 'train'), ('val_loss', 'val')]),
              ('dpo', 'DPO: loss', [('loss', 'train'), ('val_loss', 'val')]),
              ('ppo', 'PPO, reward model: rollouts', [('score', 'reward-model score'), ('kl', 'KL to SFT (nats)')]),
              ('ppo_gold', 'PPO, checker: rollouts', [('score', 'gold accuracy'), ('kl', 'KL to SFT (nats)')])]
    panels = [p for p in panels if os.path.exists(os.path.join(run_dir, p[0], 'metrics.jsonl'))]
    fig, axes = plt.subplots(2, (len(panels) + 1) // 2, figsize=(11, 6.5), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis('off')
    for ax, (stage, title, keys) in zip(axes.flat, panels):
        records = read_jsonl(os.path.join(run_dir, stage, 'metrics.jsonl'))
        for key, label in keys:
            pts = [(r['iter'], r[key]) for r in records if isinstance(r.get(key), (int, float)) and 'iter' in r
                   and 'summary' not in r and not (stage.startswith('ppo') and 'eval' in r)]  # PPO: rollouts only
            if pts:
                xs, ys = zip(*pts)
                if stage.startswith('ppo'):
                    ys, label = moving_average(ys, smooth), f"{label}, mean of {smooth}"
                ax.plot(xs, ys, label=label, marker='.' if len(pts) < 30 else None)
        if stage == 'sft':
            ax.set_yscale('log')  # the base starts near 11 (it has never seen a chat): a log axis shows the rest
        styled(ax, title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def styled(ax, title, xlabel='iteration'):
    """The look every training-curve panel shares."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def methods_png(runs, reward_names, eval_tasks, path, smooth=5):
    """rl_compare.py's learning curves: runs {(method label, reward): {'val_curve': [(iter, accuracy)],
    'rollout_gold': [(iter, accuracy)]}}; one column per reward, the val gold accuracy (greedy) at each evaluation
    above, the rollouts' gold accuracy (moving averages of `smooth` iterations) below."""
    fig, axes = plt.subplots(2, len(reward_names), figsize=(6 * len(reward_names), 7), squeeze=False)
    for col, reward in enumerate(reward_names):
        top, bottom = axes[0][col], axes[1][col]
        for (label, r), s in runs.items():
            if r == reward:
                top.plot(*zip(*s['val_curve']), marker='o', ms=3, label=label)
                xs, ys = zip(*s['rollout_gold'])
                bottom.plot(xs, moving_average(ys, smooth), label=label)
        styled(top, f"{reward} reward: val gold accuracy (greedy, {eval_tasks} prompts)")
        styled(bottom, f"{reward} reward: the rollouts' gold accuracy (T = 0.7, mean of {smooth})")
        top.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def overoptimization_png(best_of_n, runs, path):
    """Gao et al. 2022's picture: the gold accuracy (left) and the reward model's score (right) of replies
    sampled from each policy to held-out prompts, against KL(policy || SFT). best_of_n: reward.py's curve
    (the SFT model's samples, picked by the reward model: KL = log n - (n-1)/n); runs: {label: the 'sampled'
    records of a ppo.py run's evaluations}. A proxy that keeps rising while the truth levels off or falls is
    over-optimization."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], 'gold_accuracy', 'gold accuracy (the truth)'),
                           (axes[1], 'score', "reward model's score (the proxy, standardised)")):
        ax.plot([c['kl'] for c in best_of_n], [c[key] for c in best_of_n], 'k--', marker='o', ms=4,
                label='best-of-n of the SFT model, n = ' + ', '.join(str(c['n']) for c in best_of_n))
        for label, points in runs.items():  # in the order of the run: where its evaluations went
            pts = [(p['kl'], p[key]) for p in points if p.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker='o', ms=4, label=label + ' (its evaluations, in order)')
        ax.set_xlabel('KL(policy || SFT), nats per reply', fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    from common import fail
    from configurator import apply_config
    compare = ''                    # comma-separated ppo.py out_dirs: print a table of their results and plot them
    compare_plot = 'ppo_compare.png'
    apply_config(globals())
    if not compare:
        fail("nothing to do: name the runs, --compare=out-ppo,out-ppo-nokl")
    try:
        table = compare_runs([d for d in compare.split(',') if d], compare_plot)
    except (OSError, ValueError, KeyError) as e:
        fail(f"cannot compare {compare}: {e}")
    print(table)
    print(f"plot: {compare_plot}")
