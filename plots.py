"""
Reading finished runs and drawing them: every picture the project makes (the pipeline's loss curves, a
comparison of PPO runs, the over-optimization plot) and the tables next to them. Each training script
writes out_dir/metrics.jsonl, one JSON record per line; this reads those files and nothing else.
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


def curves_png(run_dir, path):
    """Loss curves of the pipeline's training stages, one panel each, into path."""
    panels = [('pretrain', 'pretraining loss', [('loss', 'train'), ('val_loss', 'val (estimate)')]),
              ('sft', 'SFT loss (assistant tokens)', [('loss', 'train'), ('val_loss', 'val')]),
              ('reward', 'reward model loss', [('loss', 'train'), ('val_loss', 'val')]),
              ('dpo', 'DPO loss', [('loss', 'train'), ('val_loss', 'val')]),
              ('ppo', 'PPO: rollout score and KL', [('score', 'score'), ('kl', 'KL to SFT')]),
              ('ppo_gold', 'PPO-gold: rollout accuracy and KL', [('score', 'accuracy'), ('kl', 'KL to SFT')])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (stage, title, keys) in zip(axes, panels):
        records = read_jsonl(os.path.join(run_dir, stage, 'metrics.jsonl'))
        for key, label in keys:
            pts = [(r['iter'], r[key]) for r in records
                   if isinstance(r.get(key), (int, float)) and 'iter' in r and 'summary' not in r]
            if pts:
                ax.plot(*zip(*pts), label=label, marker='.' if len(pts) < 30 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel('iteration')
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
