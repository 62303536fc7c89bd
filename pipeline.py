"""
From zero to chat in one command: every stage of the recipe in order, then a report card.

    python pipeline.py                          # profile 'cpu': 12-17 minutes on 2 AVX-512 cores
    python pipeline.py --profile=gpu            # one GPU: a bigger model, more steps
    python pipeline.py --input=input.txt        # offline: a local copy of tinyshakespeare
    python pipeline.py --force=dpo              # run dpo again, and every stage after it
    python pipeline.py --profile=gpu --smoke=True --input=small.txt   # every count cut to a handful: checks
                                                # a profile's settings and wiring in a minute, measures nothing

The stages, each one of the repository's scripts run as its own process with a shipped config (the
exact command line is in the stage's log, out_dir/logs/STAGE.log):

  data      prepare.py shakespeare_tasks: the task suite, tinyshakespeare with the train tasks mixed in
            as plain text, and a byte-level BPE trained on it by bpe.py with the chat tokens registered
  pretrain  train.py config/chat_base.py: the base model (it has never seen a chat)
  sft       finetune_lora.py config/sft_tasks.py: supervised fine-tuning on the task suite's chats
  prefs     prepare.py prefs: pairs of the SFT model's own replies, labelled by the gold checkers
  reward    reward.py config/reward_tasks.py: the Bradley-Terry reward model, and best-of-n by it
  dpo       dpo.py config/dpo_tasks.py: DPO from the SFT model
  ppo       ppo.py config/ppo_tasks.py: PPO from the SFT model, with the reward model and a KL penalty;
            --rl_config=config/grpo_tasks.py runs it and its two controls as GRPO (a baseline: 8 replies to each
            prompt, each scored against its group, the ones below its mean pushed down; about 3 minutes more)
  ppo_nokl  the same without the KL penalty (nothing else changed), evaluated often: the over-optimization
            picture
  ppo_gold  ppo.py config/grpo_tasks_gold.py: RL with the task checker as the reward, GRPO (8 replies to each
            prompt, each scored against its group): what RL does when the reward is right, next to a learned one
  reward_shuffled, ppo_shuffled   the control: a reward model trained on the same pairs with chosen and
            rejected swapped at random, and ppo's stage with it: what the learned reward's signal is worth
  report    out_dir/report.md: every model's gold accuracy on the same held-out prompts with a paired test
            against SFT, each stage's metric and wall time, one reply from each model to the same prompts,
            the training curves (curves.png) and the over-optimization plot (overoptimization.png)

Rerunning resumes: a stage whose out_dir/STAGE/done.json exists, written by the same command, is skipped.
A stage writes only its own folder (data and prefs: their folders under out_dir/data), and done.json comes
last, so an interrupted stage is wiped and started again from scratch, and the stages before it are never
touched. Running a stage again (--force) makes every later stage stale: they run again too. The same seed
on the same machine (CPU, fp32, the same number of threads) gives the same report, number for number.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time

from common import check_settings, duration, fail, write_text_atomic
from plots import curves_png, overoptimization_png, read_jsonl, read_run

# -----------------------------------------------------------------------------
profile = 'cpu'        # 'cpu' (2 CPU cores, 12-17 minutes) or 'gpu' (one GPU, a bigger model)
out_dir = ''           # default: runs/<profile>
input = ''             # a local copy of tinyshakespeare (else it is downloaded)
force = ''             # a stage name: run it and every later stage again; 'all': everything
smoke = False          # True: every count cut to a handful (iterations, prompts, batches): proves a profile's
                       # settings and wiring quickly; its numbers mean nothing
device = 'auto'        # passed to every stage
seed = 1337
rl_config = 'config/ppo_tasks.py'  # the learned-reward RL stage and its two controls (ppo, ppo_nokl, ppo_shuffled);
                       # config/grpo_tasks.py: GRPO, with a baseline, at about twice their time (docs/experiments.md)
# -----------------------------------------------------------------------------

STAGES = ('data', 'pretrain', 'sft', 'prefs', 'reward', 'dpo', 'ppo', 'ppo_nokl', 'ppo_gold', 'reward_shuffled',
          'ppo_shuffled', 'report')

# Each profile: arguments added to a stage's command, after its config file and the paths the pipeline
# sets itself. 'cpu' is the shipped configs as they are, 12-17 minutes on 2 AVX-512 cores (README's
# card; the target is 15); 'gpu' is a 6-layer, 384-wide model trained longer (not measured yet: no GPU was lent
# to the sessions that wrote it).
PROFILES = {
    'cpu': dict(
        data=[],
        pretrain=[],
        sft=[],
        prefs=[],
        reward=[],
        dpo=['--eval_test=False'],  # the report evaluates every model on the test split
        # the stage's own curve on 250 val prompts (the report evaluates every model on all of val and test)
        ppo=['--eval_test=False', '--eval_tasks=250'],
        # no KL penalty, everything else as ppo's (so that the difference is the penalty), evaluated more often for
        # the over-optimization plot
        ppo_nokl=['--eval_test=False', '--eval_tasks=250', '--eval_interval=10'],
        ppo_gold=['--eval_test=False'],
        # the control: a reward model trained on the same pairs with their labels shuffled (300 iterations: on noise it
        # sits at chance whatever the length; 1,000 cost 60 s more), then ppo's stage with it
        reward_shuffled=['--rank_prompts=0', '--max_iters=300'],
        ppo_shuffled=['--eval_test=False', '--eval_tasks=250'],
    ),
    'gpu': dict(
        data=['--vocab_size=2048', '--n_per_skill=5000'],
        pretrain=['--n_layer=6', '--n_head=6', '--n_embd=384', '--batch_size=64', '--block_size=256',
                  '--max_iters=3000', '--lr_decay_iters=3000', '--learning_rate=1e-3', '--min_lr=1e-4',
                  '--dropout=0.1', '--compile=True'],
        sft=['--max_iters=1000', '--batch_size=64', '--learning_rate=3e-4', '--min_lr=3e-5'],
        prefs=['--prefs_prompts=20000'],
        reward=['--max_iters=3000'],
        dpo=['--max_iters=1000'],
        ppo=['--max_iters=200', '--batch_size=256', '--minibatch_size=64'],
        ppo_nokl=['--max_iters=200', '--batch_size=256', '--minibatch_size=64'],
        ppo_gold=['--max_iters=200'],
        reward_shuffled=['--max_iters=3000', '--rank_prompts=0'],
        ppo_shuffled=['--max_iters=200', '--batch_size=256', '--minibatch_size=64'],
    ),
}
# --smoke: after the profile's arguments, so these win. A handful of everything; pairs fall back to the task's
# reference answer as the chosen reply, since a model trained for 4 iterations is never right.
SMOKE = dict(
    data=['--n_per_skill=50', '--vocab_size=300'],
    pretrain=['--max_iters=4', '--lr_decay_iters=4', '--warmup_iters=1', '--eval_interval=2', '--eval_iters=1',
              '--batch_size=4', '--compile=False'],
    sft=['--max_iters=4', '--warmup_iters=1', '--eval_interval=2', '--eval_iters=1', '--eval_tasks=5',
         '--batch_size=4'],
    prefs=['--prefs_prompts=10', '--prefs_val_prompts=5', '--prefs_samples=2', '--prefs_reference=True'],
    reward=['--max_iters=4', '--warmup_iters=1', '--eval_interval=2', '--batch_size=4', '--rank_prompts=5',
            '--rank_samples=4'],
    dpo=['--max_iters=4', '--warmup_iters=1', '--eval_interval=2', '--batch_size=4', '--eval_tasks=5',
         '--kl_prompts=4'],
    # batches of 8: whole groups of 8 where rl_config has them
    **{stage: ['--max_iters=2', '--eval_interval=1', '--eval_tasks=5', '--batch_size=8', '--minibatch_size=8',
               '--ppo_epochs=1'] for stage in ('ppo', 'ppo_nokl', 'ppo_shuffled')},
    ppo_gold=['--max_iters=2', '--eval_interval=1', '--eval_tasks=5', '--batch_size=8', '--minibatch_size=8',
              '--group_size=4', '--ppo_epochs=1'],
    reward_shuffled=['--max_iters=4', '--warmup_iters=1', '--eval_interval=2', '--batch_size=4'],
)
# the models the report evaluates, and the checkpoint each stage leaves
KL_TOKENS = 16  # the card's KL to SFT: one reply of at most this many tokens per val prompt (the stages' reply length)
MODELS = {'base': 'pretrain/ckpt.pt', 'SFT': 'sft/model.pt', 'DPO': 'dpo/model.pt', 'PPO': 'ppo/model.pt',
          'PPO, no KL penalty': 'ppo_nokl/model.pt', 'PPO-gold': 'ppo_gold/model.pt',
          'PPO, shuffled reward': 'ppo_shuffled/model.pt'}


def stage_commands(run_dir, data_dir):
    """Each stage's command (None: done in this process), and the folders it writes."""
    d = lambda name: os.path.join(run_dir, name)
    common = [f'--data_dir={data_dir}', f'--seed={seed}', f'--device={device}']
    cuts = SMOKE if smoke else {}
    p = {stage: PROFILES[profile][stage] + cuts.get(stage, []) for stage in PROFILES[profile]}
    ppo = ['ppo.py', rl_config, f'--init_from={d("sft")}', f'--reward_model={d("reward")}', *common]
    return {
        'data': (['prepare.py', 'shakespeare_tasks', f'--data_dir={data_dir}', f'--seed={seed}']
                 + ([f'--input={os.path.abspath(input)}'] if input else []) + p['data'],
                 [os.path.join(data_dir, 'tasks'), os.path.join(data_dir, 'shakespeare_tasks')]),
        'pretrain': (['train.py', 'config/chat_base.py', f'--out_dir={d("pretrain")}', *common] + p['pretrain'],
                     [d('pretrain')]),
        'sft': (['finetune_lora.py', 'config/sft_tasks.py', f'--init_from={d("pretrain")}', f'--out_dir={d("sft")}',
                 *common] + p['sft'], [d('sft')]),
        'prefs': (['prepare.py', 'prefs', f'--sft_dir={d("sft")}', *common] + p['prefs'],
                  [os.path.join(data_dir, 'prefs')]),
        'reward': (['reward.py', 'config/reward_tasks.py', f'--init_from={d("sft")}', f'--out_dir={d("reward")}',
                    *common] + p['reward'], [d('reward')]),
        'dpo': (['dpo.py', 'config/dpo_tasks.py', f'--init_from={d("sft")}', f'--out_dir={d("dpo")}', *common]
                + p['dpo'], [d('dpo')]),
        'ppo': ([*ppo, f'--out_dir={d("ppo")}'] + p['ppo'], [d('ppo')]),
        'ppo_nokl': ([*ppo, f'--out_dir={d("ppo_nokl")}', '--kl_coef=0', '--kl_target=0'] + p['ppo_nokl'],
                     [d('ppo_nokl')]),
        'ppo_gold': (['ppo.py', 'config/grpo_tasks_gold.py', f'--init_from={d("sft")}', f'--out_dir={d("ppo_gold")}',
                      *common] + p['ppo_gold'], [d('ppo_gold')]),
        'reward_shuffled': (['reward.py', 'config/reward_tasks.py', f'--init_from={d("sft")}',
                             f'--out_dir={d("reward_shuffled")}', '--shuffle_labels=True', *common]
                            + p['reward_shuffled'], [d('reward_shuffled')]),
        'ppo_shuffled': (['ppo.py', rl_config, f'--init_from={d("sft")}',
                          f'--reward_model={d("reward_shuffled")}', f'--out_dir={d("ppo_shuffled")}', *common]
                         + p['ppo_shuffled'], [d('ppo_shuffled')]),
        'report': (None, [d('report')]),
    }


def run_stage(name, heading, line, cmd, log_path):
    """Run one script, its output both on the console and in log_path; exit if it fails."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print(f"\n=== {name} {heading}", flush=True)
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    with open(log_path, 'w', encoding='utf-8') as log:
        log.write(f"$ {line}\n")
        proc = subprocess.Popen([sys.executable, *cmd], cwd=os.path.dirname(os.path.abspath(__file__)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for out in proc.stdout:  # line by line, so that a long stage shows its progress as it goes
            sys.stdout.write(out)
            sys.stdout.flush()
            log.write(out)
            log.flush()
        rc = proc.wait()
    if rc != 0:
        fail(f"stage {name} failed (exit {rc}); its log: {log_path}. Fix it and run the same command again: "
             f"the stages before it are kept")


# -----------------------------------------------------------------------------
# The report card

def summary(stage_dir):
    """The 'summary' record a stage script writes last in its metrics.jsonl."""
    return next(r for r in reversed(read_jsonl(os.path.join(stage_dir, 'metrics.jsonl'))) if 'summary' in r)


def val_text_stats(data_dir):
    """Bytes and characters per token on the pretraining corpus's val split: text the BPE never saw
    (prepare.py trains it on the train part only)."""
    import numpy as np
    from tokenizer import load_tokenizer
    folder = os.path.join(data_dir, 'shakespeare_tasks')
    with open(os.path.join(folder, 'meta.json'), encoding='utf-8') as f:
        meta = json.load(f)
    ids = np.fromfile(os.path.join(folder, 'val.bin'), dtype=np.dtype(meta['dtype']))
    text = load_tokenizer(meta).decode(ids.tolist())
    return len(text.encode('utf-8')) / len(ids), len(text) / len(ids), meta


def evaluate_models(run_dir, data_dir, device, seed, models=MODELS, n_examples=5):
    """Every model's (models: {name: its checkpoint, under run_dir or absolute}, 'SFT' among them) greedy gold
    accuracy on the whole test split, evaluated here by the same code in the same order (so the numbers compare
    exactly); whether each reply was right (for the paired test); the reward model's mean score of those replies
    (standardised as PPO sees it: the proxy next to the truth); and each model's reply to the same few prompts; and
    KL(model || SFT) on the val prompts, one estimator for every row (rl.sampled_kl: a reply sampled at
    temperature 1, at most KL_TOKENS, the log-ratio summed over it; seeded from seed)."""
    import torch
    from model import model_from_checkpoint
    from rl import sampled_kl
    from tasks import SKILLS, chat_ids, check_answer, gold_accuracy, render_prompt
    from tokenizer import load_tokenizer
    from reward import load_reward_model, score
    dev = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    rm, rm_meta = load_reward_model(os.path.join(run_dir, 'reward', 'reward.pt'), dev)
    rm_mean, rm_std = rm_meta.get('reward_mean') or 0.0, rm_meta.get('reward_std') or 1.0
    tasks = read_jsonl(os.path.join(data_dir, 'tasks', 'test.jsonl'))
    val_tasks = read_jsonl(os.path.join(data_dir, 'tasks', 'val.jsonl'))  # where the configs were chosen
    examples = [next(t for t in tasks if t['skill'] == s) for s in SKILLS][:n_examples]
    results, t0 = {}, time.time()
    sft, _ = model_from_checkpoint(os.path.join(run_dir, models['SFT']), dev)
    for i, (name, path) in enumerate(models.items()):
        model, meta = model_from_checkpoint(os.path.join(run_dir, path), dev)
        tokenizer = load_tokenizer(meta['data_meta'])
        kl = 0.0 if name == 'SFT' else None  # SFT is the reference; the base model is not a chat model
        if name not in ('base', 'SFT'):
            prompts = [render_prompt([{'role': 'user', 'content': t['prompt']}], tokenizer)
                       [-(model.config.block_size - KL_TOKENS - 1):] for t in val_tasks]
            kl = sampled_kl(model, sft, prompts, KL_TOKENS, chat_ids(tokenizer)[2],
                            torch.Generator(dev).manual_seed(seed), tokenizer.n_vocab)
        acc, replies = gold_accuracy(model, tokenizer, tasks)
        with torch.no_grad():
            rm_score = (score(rm, tokenizer, [t['prompt'] for t in tasks], replies) - rm_mean) / rm_std
        _, examples_replies = gold_accuracy(model, tokenizer, examples)
        val_acc, val_replies = gold_accuracy(model, tokenizer, val_tasks)
        results[name] = dict(accuracy=acc, rm_score=rm_score.mean().item(), examples=examples_replies, kl=kl,
                             correct=[check_answer(t, r) for t, r in zip(tasks, replies)], val_accuracy=val_acc,
                             val_correct=[check_answer(t, r) for t, r in zip(val_tasks, val_replies)])
        print(f"evaluated {name}: gold accuracy {acc['all']:.1%} on {len(tasks)} test prompts "
              f"({i + 1}/{len(models)}, {time.time() - t0:.0f} s)", flush=True)
    return results, examples, len(tasks)


def rl_method(config):
    """What ppo.py ran, named from its config: 'ppo' with a critic (the value model is the baseline); with groups of
    replies, 'rloo' (leave-one-out mean), 'least_noise' (the others' scores weighted by surprisal) or 'grpo' (the
    group's mean and std; 'dr_grpo' without the std); else 'reinforce' (each reply's own reward-to-go, PPO's
    clipped ratio on top): no baseline, or the batch's whitening as one."""
    group_baseline = config.get('group_baseline', 'leave_one_out')  # runs older than the option were RLOO
    if config['critic']:
        algorithm, baseline = 'ppo', 'critic'
    elif config['group_size'] > 1 and group_baseline != 'none':
        algorithm = ('rloo' if group_baseline == 'leave_one_out' else 'least_noise' if group_baseline == 'least_noise'
                     else 'grpo' if config.get('group_std') else 'dr_grpo')
        baseline = 'group'
    else:
        algorithm, baseline = 'reinforce', 'batch' if config['whiten_advantages'] else 'none'
    return dict(algorithm=algorithm, baseline=baseline, reward='checker' if config['reward'] == 'gold' else 'model')


def rl_description(m):
    """What an RL run's method record says, in words: 'reinforce, no baseline, checker reward'."""
    baseline = 'no baseline' if m['baseline'] == 'none' else f"{m['baseline']} baseline"
    return f"{m['algorithm']}, {baseline}, {m['reward']} reward" + (', no KL' if not m['kl_coef'] else '')


def method_label(name, m):
    """A model's row label on the card: its name, and for an RL run what ran ('PPO-gold: reinforce, ...')."""
    return name if m['algorithm'] in ('pretrain', 'sft', 'dpo') else f"{name}: {rl_description(m)}"


def overoptimization_text(best_of_n, runs):
    """What the over-optimization plot shows, in sentences read from its points: for each run (label: its
    evaluations' sampled replies, in order), where the gold accuracy started, peaked and ended, at what KL, and
    the reward model's score at the same three points; then which reading they support; and best-of-n's ends and
    peak."""
    pct = lambda x: f"{100 * x:.1f}%"
    lines = []
    for label, points in runs.items():
        pts = [p for p in points if p.get('gold_accuracy') is not None and p.get('score') is not None]
        if len(pts) < 2:
            continue
        first, last = pts[0], pts[-1]
        peak = max(pts, key=lambda p: p['gold_accuracy'])
        if peak is not last and last['gold_accuracy'] < peak['gold_accuracy'] - 0.01:
            reading = ("the proxy kept rising after the truth peaked: over-optimization"
                       if last['score'] > peak['score'] else "both fell after the peak")
        else:
            reading = "the truth had not turned down by the end: no over-optimization in this range"
        lines.append(f"{label}: gold accuracy {pct(first['gold_accuracy'])} at the start, highest "
                     f"{pct(peak['gold_accuracy'])} at KL {peak['kl']:.2f}, {pct(last['gold_accuracy'])} at the end "
                     f"(KL {last['kl']:.2f}); the reward model's score {first['score']:+.3f}, {peak['score']:+.3f}, "
                     f"{last['score']:+.3f} at the same points: {reading}.")
    if len(best_of_n) > 1:
        a, b = best_of_n[0], best_of_n[-1]
        peak = max(best_of_n, key=lambda c: c['gold_accuracy'])
        lines.append(f"Best-of-n by the reward model: gold accuracy {pct(a['gold_accuracy'])} at n = {a['n']}, "
                     f"highest {pct(peak['gold_accuracy'])} at n = {peak['n']} (KL {peak['kl']:.2f}), "
                     f"{pct(b['gold_accuracy'])} at n = {b['n']} (KL {b['kl']:.2f}).")
    return ' '.join(lines)


def report(run_dir, data_dir, done):
    """out_dir/report.md, out_dir/report.json (the same numbers, for the tests), curves.png and
    overoptimization.png."""
    from tasks import SKILLS, mcnemar
    bytes_per_token, chars_per_token, data_meta = val_text_stats(data_dir)
    pre = [r for r in read_jsonl(os.path.join(run_dir, 'pretrain', 'metrics.jsonl')) if 'full_val_loss' in r][-1]
    sft, rm, dpo = (summary(os.path.join(run_dir, s)) for s in ('sft', 'reward', 'dpo'))
    ppo_runs = {s: read_run(os.path.join(run_dir, s)) for s in ('ppo', 'ppo_nokl', 'ppo_gold', 'ppo_shuffled')}
    rm_shuffled = summary(os.path.join(run_dir, 'reward_shuffled'))
    with open(os.path.join(data_dir, 'prefs', 'meta.json'), encoding='utf-8') as f:
        prefs = json.load(f)['stats']
    last5 = lambda iters, key: sum(r[key] for r in iters[-5:]) / max(1, len(iters[-5:]))
    models, examples, n_test = evaluate_models(run_dir, data_dir, device, seed)
    acc = {name: r['accuracy'] for name, r in models.items()}
    paired, paired_val = ({name: dict(zip(('fixed', 'broken', 'p'), mcnemar(models['SFT'][key], r[key])))
                           for name, r in models.items() if name != 'SFT'} for key in ('correct', 'val_correct'))
    t = {s: done[s]['seconds'] for s in done}
    bpc = pre['full_val_loss'] / math.log(2) / chars_per_token
    ppo_card = {s: dict(rollout_kl=last5(iters, 'kl'), kl_target=summ['summary']['config']['kl_target'],
                        kl_coef=summ['summary']['final_kl_coef'], iters=len(iters),
                        rollout_score=[last5(iters[:5], 'score'), last5(iters, 'score')])
                for s, (iters, _, summ) in ppo_runs.items()}
    card = dict(
        profile=profile, smoke=smoke, n_test=n_test, accuracy=acc, paired_vs_sft=paired,
        val_accuracy={name: r['val_accuracy'] for name, r in models.items()}, paired_vs_sft_val=paired_val,
        rm_score={name: r['rm_score'] for name, r in models.items()},
        kl_to_sft={name: r['kl'] for name, r in models.items()},
        tokenizer=dict(vocab_size=data_meta['vocab_size'], bytes_per_token=bytes_per_token),
        pretrain=dict(val_loss=pre['full_val_loss'], bits_per_char=bpc, iters=pre['iter']),
        sft=dict(val_loss=sft['after']['val_loss'], mode=sft['summary']['mode'],
                 trainable_pct=sft['summary'].get('trainable_pct')),
        prefs=dict(train_pairs=prefs['train']['all']['pairs'], val_pairs=prefs['val'].get('all', {}).get('pairs', 0)),
        reward=dict(pair_accuracy=rm['final']['val_accuracy'], margin=rm['final']['val_margin'],
                    auc=rm['final'].get('ranking', {}).get('all', {}).get('auc'), best_iter=rm['summary']['best_iter'],
                    best_of_n=rm['final'].get('best_of_n', [])),
        dpo=dict(reward_accuracy=dpo['after']['val_reward_accuracy']),
        **ppo_card, seconds=t)
    # what each model is: the card's row labels, and report.json's 'method' (the same keys as 'accuracy')
    none = dict(baseline=None, reward=None, kl=None, kl_target=None)
    card['method'] = {'base': dict(algorithm='pretrain', **none), 'SFT': dict(algorithm='sft', **none),
                      'DPO': dict(none, algorithm='dpo', kl=card['kl_to_sft']['DPO'])}
    for name, stage in (('PPO', 'ppo'), ('PPO, no KL penalty', 'ppo_nokl'), ('PPO-gold', 'ppo_gold'),
                        ('PPO, shuffled reward', 'ppo_shuffled')):
        config = ppo_runs[stage][2]['summary']['config']
        card['method'][name] = dict(rl_method(config), kl=card['kl_to_sft'][name],
                                    kl_target=config['kl_target'] or None, kl_coef=config['kl_coef'])
    card['method']['PPO, shuffled reward']['reward'] = 'shuffled-model'
    card['reward_shuffled'] = dict(pair_accuracy=rm_shuffled['final']['val_accuracy'],
                                   margin=rm_shuffled['final']['val_margin'])
    pct = lambda x: f"{100 * x:.1f}%"

    def vs_sft(name, paired=paired):
        if name == 'SFT':
            return '-'
        q = paired[name]
        return f"{q['fixed']} / {q['broken']}, p = {q['p']:.2g}"

    def ppo_row(stage, what):
        c = card[stage]
        return (f"| {stage} | {what}, {c['iters']} iterations (beta ends at {c['kl_coef']:.3g}) | {t[stage]:.0f} s | "
                f"the controller's KL on its rollouts (T = 0.7) {c['rollout_kl']:.2f} nats/reply (last 5 iterations"
                + (f"; target {c['kl_target']:g}" if c['kl_target'] else '') + f"); rollout score "
                f"{c['rollout_score'][0]:.3f} -> {c['rollout_score'][1]:.3f} (first / last 5) |")
    lines = [f"# Report card: profile `{profile}`" + (' (smoke test: numbers mean nothing)' if smoke else ''), '',
             f"`python pipeline.py --profile={profile}`, {time.strftime('%Y-%m-%d %H:%M')}; "
             f"stage wall times are this run's (a skipped stage keeps the time of the run that made it).", '',
             '| stage | what ran | wall time | metric |', '|---|---|---|---|',
             f"| data | task suite, tinyshakespeare + train tasks; BPE trained by bpe.py | {t['data']:.0f} s | "
             f"tokenizer: {data_meta['vocab_size']} tokens, {bytes_per_token:.2f} bytes/token on held-out text |",
             f"| pretrain | {pre['iter']} iterations (config/chat_base.py) | {t['pretrain']:.0f} s | val loss "
             f"{pre['full_val_loss']:.3f} (whole val split), {bpc:.2f} bits/char |",
             f"| sft | {sft['summary']['mode']}, {sft['summary'].get('trainable_pct', 100):.1f}% of weights trained | "
             f"{t['sft']:.0f} s | val loss {sft['after']['val_loss']:.3f} |",
             f"| prefs | SFT replies, gold-labelled | {t['prefs']:.0f} s | {card['prefs']['train_pairs']} train, "
             f"{card['prefs']['val_pairs']} val pairs |",
             f"| reward | Bradley-Terry, {rm['summary']['mode']}; kept: iteration {rm['summary']['best_iter']} "
             f"(lowest val loss) | {t['reward']:.0f} s | held-out pair accuracy {pct(card['reward']['pair_accuracy'])}"
             + (f", ranking AUC {card['reward']['auc']:.2f}" if card['reward']['auc'] is not None else '') + ' |',
             f"| dpo | from SFT, reference = SFT | {t['dpo']:.0f} s | "
             f"implicit-reward accuracy {pct(card['dpo']['reward_accuracy'])} on held-out pairs |",
             ppo_row('ppo', 'from SFT, ' + rl_description(card['method']['PPO'])),
             ppo_row('ppo_nokl', 'from SFT, ' + rl_description(card['method']['PPO, no KL penalty'])),
             ppo_row('ppo_gold', 'from SFT, ' + rl_description(card['method']['PPO-gold'])),
             f"| reward_shuffled | the control: Bradley-Terry on the same pairs, labels shuffled | "
             f"{t['reward_shuffled']:.0f} s | held-out pair accuracy {pct(card['reward_shuffled']['pair_accuracy'])} |",
             ppo_row('ppo_shuffled', 'from SFT, ' + rl_description(card['method']['PPO, shuffled reward'])),
             f"| all | | {sum(t.values()):.0f} s | |", '',
             f"Gold accuracy per skill on all {n_test} test prompts (greedy replies, checked by the task suite's "
             f"checkers; evaluated here, every model by the same code). Against SFT: prompts fixed / broken, and "
             f"McNemar's exact p (small: the difference is not noise):", '',
             '| model | ' + ' | '.join(SKILLS) + ' | all | vs SFT: fixed / broken, p | reward-model score | '
             'val (all) | val vs SFT | KL to SFT, nats/reply (sampled at T = 1, val) |',
             '|---' * (len(SKILLS) + 7) + '|']
    for name, a in acc.items():
        lines.append(f"| {method_label(name, card['method'][name])} | " + ' | '.join(pct(a.get(s, 0)) for s in SKILLS)
                     + f" | **{pct(a['all'])}** | {vs_sft(name)} | {card['rm_score'][name]:+.3f} | "
                     f"{pct(card['val_accuracy'][name]['all'])} | {vs_sft(name, paired_val)} | "
                     + ('-' if name in ('base', 'SFT') else f"{card['kl_to_sft'][name]:.2f}") + ' |')
    lines += ['', "(The reward-model score is the mean over the same replies, standardised by the reward model's "
              "mean and std on held-out pairs: what PPO maximises, next to the gold truth. Val: the same on all "
              f"{len(models['SFT']['val_correct'])} val prompts, where the configs were chosen.)"]
    lines += ['', 'One reply from each model to the same test prompts (greedy):', '']
    for i, ex in enumerate(examples):
        lines.append(f"- **{ex['prompt']}** (answer: `{ex['answer']}`)")
        for name, r in models.items():
            lines.append(f"  - {name}: `{r['examples'][i]!r}`")
    curves_png(run_dir, os.path.join(run_dir, 'curves.png'))
    sampled = {label: [e['sampled'] for e in ppo_runs[s][1] if 'sampled' in e]
               for label, s in (('PPO, KL penalty', 'ppo'), ('PPO, no KL penalty', 'ppo_nokl'))}
    overoptimization_png(card['reward']['best_of_n'], sampled, os.path.join(run_dir, 'overoptimization.png'))
    lines += ['', '## Over-optimization', '',
              "Replies sampled (at PPO's temperature) to held-out val prompts, at each evaluation of the two PPO "
              "runs, against their KL to the SFT model; the dashed line picks the best of n SFT samples by the "
              "reward model instead. " + overoptimization_text(card['reward']['best_of_n'], sampled), '',
              '![over-optimization](overoptimization.png)',
              '', '## Training curves', '', '![training curves](curves.png)']
    os.makedirs(os.path.join(run_dir, 'report'), exist_ok=True)
    write_text_atomic(os.path.join(run_dir, 'report.json'), json.dumps(card, indent=1))
    write_text_atomic(os.path.join(run_dir, 'report.md'), '\n'.join(lines) + '\n')
    print('\n'.join(lines))


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    from configurator import apply_config
    apply_config(globals())
    check_settings(globals(), choices={'profile': tuple(PROFILES)})
    if force and force != 'all' and force not in STAGES:
        fail(f"force must be a stage ({', '.join(STAGES)}) or 'all'; got '{force}'")
    if input and not os.path.isfile(input):
        fail(f"input not found: {input}")
    if not os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), rl_config)):  # where stages run
        fail(f"rl_config not found: {rl_config} (a config file for ppo.py, e.g. config/grpo_tasks.py)")
    run_dir = os.path.abspath(out_dir or os.path.join('runs', profile))  # the stages run from the repository root
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        fail(f"out_dir '{run_dir}' exists and is not a directory")
    data_dir = os.path.join(run_dir, 'data')
    commands = stage_commands(run_dir, data_dir)
    os.makedirs(run_dir, exist_ok=True)
    first_forced = 0 if force == 'all' else STAGES.index(force) if force else len(STAGES)
    done, stale = {}, False
    t_start = time.time()
    for i, name in enumerate(STAGES):
        cmd, folders = commands[name]
        marker = os.path.join(folders[0], 'done.json')
        if i >= first_forced:
            stale = True
        line = ' '.join([os.path.basename(sys.executable), *cmd]) if cmd else 'report'
        where = f"[{i + 1}/{len(STAGES)}, {duration(time.time() - t_start)} so far]"
        if os.path.exists(marker) and not stale:
            with open(marker, encoding='utf-8') as f:
                finished = json.load(f)
            if finished['command'] == line:
                done[name] = finished
                print(f"=== {name} {where}: done ({finished['seconds']:.0f} s, {marker}); skipped")
                continue
            print(f"=== {name} {where}: made by a different command (another profile or setting): run again")
        stale = True  # everything after a stage that runs was made from its old outputs
        for folder in folders:  # start clean: an interrupted run may have left half a stage behind
            shutil.rmtree(folder, ignore_errors=True)
        t0 = time.time()
        if cmd is None:
            print(f"\n=== {name} {where}")
            report(run_dir, data_dir, done)
        else:
            run_stage(name, f"{where} {line}", line, cmd, os.path.join(run_dir, 'logs', f'{name}.log'))
        done[name] = dict(seconds=time.time() - t0, command=line)
        os.makedirs(folders[0], exist_ok=True)
        write_text_atomic(marker, json.dumps(done[name]))
    print(f"\nall stages done in {time.time() - t_start:.0f} s this run; report card: "
          f"{os.path.join(run_dir, 'report.md')}")
