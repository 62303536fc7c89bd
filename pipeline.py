"""
From zero to chat in one command: every stage of the recipe in order, then a report card.

    python pipeline.py                          # profile 'cpu': about 14 minutes on 2 cores
    python pipeline.py --profile=gpu            # one GPU: a bigger model, more steps
    python pipeline.py --input=input.txt        # offline: a local copy of tinyshakespeare
    python pipeline.py --force=dpo              # run dpo again, and every stage after it

The stages, each one of the repository's scripts run as its own process with a shipped config (the
exact command line is in the stage's log, out_dir/logs/STAGE.log):

  data      prepare.py shakespeare_tasks: the task suite, tinyshakespeare with the train tasks mixed in
            as plain text, and a byte-level BPE trained on it by bpe.py with the chat tokens registered
  pretrain  train.py config/chat_base.py: the base model (it has never seen a chat)
  sft       finetune_lora.py config/sft_tasks.py: supervised fine-tuning with LoRA
  prefs     prepare.py prefs: pairs of the SFT model's own replies, labelled by the gold checkers
  reward    reward.py config/reward_tasks.py: the Bradley-Terry reward model
  dpo       dpo.py config/dpo_tasks.py: DPO from the SFT model
  ppo       ppo.py config/ppo_tasks.py: PPO from the SFT model, with the reward model and a KL penalty
  ppo_gold  ppo.py config/ppo_tasks_gold.py: PPO from the SFT model with the task checker as the reward
            (and no critic): what PPO does when the reward is right, next to a learned one
  report    out_dir/report.md: every model's gold accuracy on the same held-out prompts, each stage's
            metric and wall time, one reply from each model to the same prompts; loss curves as
            out_dir/curves.png

Rerunning resumes: a stage whose out_dir/STAGE/done.json exists, written by the same command, is skipped.
A stage writes only its own folder (data and prefs: their folders under out_dir/data), and done.json comes
last, so an interrupted stage is wiped and started again from scratch, and the stages before it are never
touched. Running a
stage again (--force) makes every later stage stale: they run again too.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time

from common import write_text_atomic
from plots import curves_png, read_jsonl, read_run

# -----------------------------------------------------------------------------
profile = 'cpu'        # 'cpu', 'gpu' or 'ci' (the smallest: the integration test)
out_dir = ''           # default: runs/<profile>
input = ''             # a local copy of tinyshakespeare (else it is downloaded)
force = ''             # a stage name: run it and every later stage again; 'all': everything
device = 'auto'        # passed to every stage
seed = 1337
# -----------------------------------------------------------------------------

STAGES = ('data', 'pretrain', 'sft', 'prefs', 'reward', 'dpo', 'ppo', 'ppo_gold', 'report')

# Each profile: arguments added to a stage's command, after its config file and the paths the pipeline
# sets itself. 'cpu' is the configs as shipped, with fewer preference prompts and 30 iterations of PPO with
# the reward model, to fit in 15 minutes on 2 cores. 'gpu' is a 6-layer, 384-wide model trained longer (not
# measured yet: no GPU was lent to the sessions that wrote it). 'ci' is small enough for the test suite
# (about 6 minutes on 2 cores) and still runs every stage.
PROFILES = {
    'cpu': dict(
        data=[],
        pretrain=[],
        sft=[],
        prefs=['--prefs_prompts=1000', '--prefs_val_prompts=250'],
        reward=['--rank_prompts=100'],
        dpo=['--sft_weight=1.0', '--beta=0.1'],
        ppo=['--max_iters=30'],
        ppo_gold=[],
    ),
    'gpu': dict(
        data=['--vocab_size=2048', '--n_per_skill=5000'],
        pretrain=['--n_layer=6', '--n_head=6', '--n_embd=384', '--batch_size=64', '--block_size=256',
                  '--max_iters=3000', '--lr_decay_iters=3000', '--learning_rate=1e-3', '--min_lr=1e-4',
                  '--dropout=0.1', '--compile=True'],
        sft=['--max_iters=1000', '--batch_size=64'],
        prefs=['--prefs_prompts=5000', '--prefs_val_prompts=500'],
        reward=['--max_iters=600'],
        dpo=['--sft_weight=1.0', '--beta=0.1', '--max_iters=400'],
        ppo=['--max_iters=200', '--batch_size=128'],
        ppo_gold=['--max_iters=200', '--batch_size=256', '--minibatch_size=64'],
    ),
    'ci': dict(
        data=[],
        pretrain=['--max_iters=500', '--lr_decay_iters=500', '--eval_interval=250', '--warmup_iters=50'],
        sft=['--max_iters=150', '--eval_interval=75', '--eval_tasks=100'],
        prefs=['--prefs_prompts=500', '--prefs_val_prompts=100'],
        reward=['--max_iters=100', '--eval_interval=50', '--rank_prompts=50'],
        dpo=['--sft_weight=1.0', '--beta=0.1', '--max_iters=60', '--eval_interval=30', '--eval_tasks=100'],
        ppo=['--max_iters=20', '--eval_interval=10', '--eval_tasks=100'],
        ppo_gold=['--max_iters=30', '--eval_interval=15', '--eval_tasks=100'],
    ),
}


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def stage_commands(run_dir, data_dir):
    """Each stage's command (None: done in this process), and the folders it writes."""
    d = lambda name: os.path.join(run_dir, name)
    dev = [f'--device={device}']
    p = PROFILES[profile]
    return {
        'data': (['prepare.py', 'shakespeare_tasks', f'--data_dir={data_dir}', f'--seed={seed}']
                 + ([f'--input={os.path.abspath(input)}'] if input else []) + p['data'],
                 [os.path.join(data_dir, 'tasks'), os.path.join(data_dir, 'shakespeare_tasks')]),
        'pretrain': (['train.py', 'config/chat_base.py', f'--data_dir={data_dir}', f'--out_dir={d("pretrain")}',
                      f'--seed={seed}', *dev] + p['pretrain'], [d('pretrain')]),
        'sft': (['finetune_lora.py', 'config/sft_tasks.py', f'--init_from={d("pretrain")}', f'--data_dir={data_dir}',
                 f'--out_dir={d("sft")}', f'--seed={seed}', *dev] + p['sft'], [d('sft')]),
        'prefs': (['prepare.py', 'prefs', f'--sft_dir={d("sft")}', f'--data_dir={data_dir}', f'--seed={seed}', *dev]
                  + p['prefs'], [os.path.join(data_dir, 'prefs')]),
        'reward': (['reward.py', 'config/reward_tasks.py', f'--init_from={d("sft")}', f'--data_dir={data_dir}',
                    f'--out_dir={d("reward")}', f'--seed={seed}', *dev] + p['reward'], [d('reward')]),
        'dpo': (['dpo.py', 'config/dpo_tasks.py', f'--init_from={d("sft")}', f'--data_dir={data_dir}',
                 f'--out_dir={d("dpo")}', f'--seed={seed}', *dev] + p['dpo'], [d('dpo')]),
        'ppo': (['ppo.py', 'config/ppo_tasks.py', f'--init_from={d("sft")}', f'--reward_model={d("reward")}',
                 f'--data_dir={data_dir}', f'--out_dir={d("ppo")}', f'--seed={seed}', *dev] + p['ppo'], [d('ppo')]),
        'ppo_gold': (['ppo.py', 'config/ppo_tasks_gold.py', f'--init_from={d("sft")}', f'--data_dir={data_dir}',
                      f'--out_dir={d("ppo_gold")}', f'--seed={seed}', *dev] + p['ppo_gold'], [d('ppo_gold')]),
        'report': (None, [d('report')]),
    }


def run_stage(name, line, cmd, log_path):
    """Run one script, its output both on the console and in log_path; exit if it fails."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print(f"\n=== {name}: {line}", flush=True)
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


def evaluate_models(run_dir, data_dir, n_examples=5):
    """Every model's greedy gold accuracy on the whole test split, evaluated here by the same code in the same
    order (so the numbers compare exactly); the reward model's mean score of those replies (standardised as
    PPO sees it: the proxy next to the truth); and each model's reply to the same few prompts."""
    import torch
    from model import model_from_checkpoint
    from tasks import SKILLS, gold_accuracy
    from tokenizer import load_tokenizer
    from reward import load_reward_model, score
    dev = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    rm, rm_meta = load_reward_model(os.path.join(run_dir, 'reward', 'reward.pt'), dev)
    rm_mean, rm_std = rm_meta.get('reward_mean') or 0.0, rm_meta.get('reward_std') or 1.0
    tasks = read_jsonl(os.path.join(data_dir, 'tasks', 'test.jsonl'))
    examples = [next(t for t in tasks if t['skill'] == s) for s in SKILLS][:n_examples]
    models = {'base': os.path.join(run_dir, 'pretrain', 'ckpt.pt'), 'SFT': os.path.join(run_dir, 'sft', 'model.pt'),
              'DPO': os.path.join(run_dir, 'dpo', 'model.pt'), 'PPO': os.path.join(run_dir, 'ppo', 'model.pt'),
              'PPO-gold': os.path.join(run_dir, 'ppo_gold', 'model.pt')}
    results = {}
    for name, path in models.items():
        model, meta = model_from_checkpoint(path, dev)
        tokenizer = load_tokenizer(meta['data_meta'])
        acc, replies = gold_accuracy(model, tokenizer, tasks)
        with torch.no_grad():
            rm_score = (score(rm, tokenizer, [t['prompt'] for t in tasks], replies) - rm_mean) / rm_std
        _, examples_replies = gold_accuracy(model, tokenizer, examples)
        results[name] = dict(accuracy=acc, rm_score=rm_score.mean().item(), examples=examples_replies)
    return results, examples, len(tasks)


def report(run_dir, data_dir, done):
    """out_dir/report.md and out_dir/report.json (the same numbers, for the integration test)."""
    from tasks import SKILLS
    bytes_per_token, chars_per_token, data_meta = val_text_stats(data_dir)
    pre = [r for r in read_jsonl(os.path.join(run_dir, 'pretrain', 'metrics.jsonl')) if 'full_val_loss' in r][-1]
    pre_iters = pre['iter']
    sft, rm, dpo = (summary(os.path.join(run_dir, s)) for s in ('sft', 'reward', 'dpo'))
    ppo_iters, _, ppo = read_run(os.path.join(run_dir, 'ppo'))
    gold_iters, _, ppo_gold = read_run(os.path.join(run_dir, 'ppo_gold'))
    with open(os.path.join(data_dir, 'prefs', 'meta.json'), encoding='utf-8') as f:
        prefs = json.load(f)['stats']
    last5_kl = lambda iters: sum(r['kl'] for r in iters[-5:]) / max(1, len(iters[-5:]))
    ppo_kl, gold_kl = last5_kl(ppo_iters), last5_kl(gold_iters)
    models, examples, n_test = evaluate_models(run_dir, data_dir)
    acc = {name: r['accuracy'] for name, r in models.items()}
    rm_scores = {name: r['rm_score'] for name, r in models.items()}
    t = {s: done[s]['seconds'] for s in done}
    bpc = pre['full_val_loss'] / math.log(2) / chars_per_token
    pct = lambda x: f"{100 * x:.1f}%"
    card = dict(
        profile=profile, n_test=n_test, accuracy=acc, rm_score=rm_scores,
        tokenizer=dict(vocab_size=data_meta['vocab_size'], bytes_per_token=bytes_per_token),
        pretrain=dict(val_loss=pre['full_val_loss'], bits_per_char=bpc, iters=pre_iters),
        sft=dict(val_loss=sft['after']['val_loss'], trainable_pct=sft['summary'].get('trainable_pct')),
        prefs=dict(train_pairs=prefs['train']['all']['pairs'], val_pairs=prefs['val'].get('all', {}).get('pairs', 0)),
        reward=dict(pair_accuracy=rm['final']['val_accuracy'], margin=rm['final']['val_margin'],
                    auc=rm['final'].get('ranking', {}).get('all', {}).get('auc')),
        dpo=dict(kl=dpo['after']['kl'], reward_accuracy=dpo['after']['val_reward_accuracy']),
        ppo=dict(kl=ppo_kl, kl_coef=ppo['summary']['final_kl_coef']),
        ppo_gold=dict(kl=gold_kl, kl_coef=ppo_gold['summary']['final_kl_coef'],
                      rollout_accuracy=[sum(r['score'] for r in it) / max(1, len(it))
                                        for it in (gold_iters[:5], gold_iters[-5:])]),
        seconds=t)
    lines = [f"# Report card: profile `{profile}`", '',
             f"`python pipeline.py --profile={profile}`, {time.strftime('%Y-%m-%d %H:%M')}; "
             f"stage wall times are this run's (a skipped stage keeps the time of the run that made it).", '',
             '| stage | what ran | wall time | metric |', '|---|---|---|---|',
             f"| data | task suite, tinyshakespeare + train tasks; BPE trained by bpe.py | {t['data']:.0f} s | "
             f"tokenizer: {data_meta['vocab_size']} tokens, {bytes_per_token:.2f} bytes/token on held-out text |",
             f"| pretrain | {pre_iters} iterations (config/chat_base.py) | {t['pretrain']:.0f} s | val loss "
             f"{pre['full_val_loss']:.3f} (whole val split), {bpc:.2f} bits/char |",
             f"| sft | {sft['summary']['mode']}, {sft['summary'].get('trainable_pct', 100):.1f}% of weights trained | "
             f"{t['sft']:.0f} s | gold accuracy {pct(acc['base']['all'])} -> {pct(acc['SFT']['all'])}; "
             f"val loss {sft['after']['val_loss']:.3f} |",
             f"| prefs | SFT replies, gold-labelled | {t['prefs']:.0f} s | {card['prefs']['train_pairs']} train, "
             f"{card['prefs']['val_pairs']} val pairs |",
             f"| reward | Bradley-Terry, {rm['summary']['mode']} | {t['reward']:.0f} s | held-out pair accuracy "
             f"{pct(card['reward']['pair_accuracy'])}"
             + (f", ranking AUC {card['reward']['auc']:.2f}" if card['reward']['auc'] is not None else '') + ' |',
             f"| dpo | from SFT, reference = SFT | {t['dpo']:.0f} s | gold accuracy {pct(acc['DPO']['all'])}; "
             f"KL to SFT {card['dpo']['kl']:.2f} nats/reply; implicit-reward accuracy "
             f"{pct(card['dpo']['reward_accuracy'])} |",
             f"| ppo | from SFT, reward model, KL penalty (beta ends at {card['ppo']['kl_coef']:.3f}) | "
             f"{t['ppo']:.0f} s | gold accuracy {pct(acc['PPO']['all'])}; KL to SFT {ppo_kl:.2f} nats/reply "
             f"(last 5 iterations) |",
             f"| ppo_gold | from SFT, the checker as reward, no critic (beta ends at "
             f"{card['ppo_gold']['kl_coef']:.3f}) | {t['ppo_gold']:.0f} s | gold accuracy "
             f"{pct(acc['PPO-gold']['all'])}; KL to SFT {gold_kl:.2f} nats/reply; rollout accuracy "
             f"{pct(card['ppo_gold']['rollout_accuracy'][0])} -> {pct(card['ppo_gold']['rollout_accuracy'][1])} "
             f"(first / last 5 iterations) |",
             f"| all | | {sum(t.values()):.0f} s | |", '',
             f"Gold accuracy per skill on all {n_test} test prompts (greedy replies, checked by the task suite's "
             f"checkers; evaluated here, every model by the same code):", '',
             '| model | ' + ' | '.join(SKILLS) + ' | all | reward-model score |', '|---' * (len(SKILLS) + 3) + '|']
    for name, a in acc.items():
        lines.append(f"| {name} | " + ' | '.join(pct(a.get(s, 0)) for s in SKILLS)
                     + f" | {pct(a['all'])} | {rm_scores[name]:+.3f} |")
    lines += ['', "(The reward-model score is the mean over the same replies, standardised by the reward model's "
              "mean and std on its training replies: what PPO maximises, next to the gold truth.)"]
    lines += ['', 'One reply from each model to the same test prompts (greedy):', '']
    for i, ex in enumerate(examples):
        lines.append(f"- **{ex['prompt']}** (answer: `{ex['answer']}`)")
        for name, r in models.items():
            lines.append(f"  - {name}: `{r['examples'][i]!r}`")
    curves_png(run_dir, os.path.join(run_dir, 'curves.png'))
    lines += ['', '![loss curves](curves.png)']
    os.makedirs(os.path.join(run_dir, 'report'), exist_ok=True)
    write_text_atomic(os.path.join(run_dir, 'report.json'), json.dumps(card, indent=1))
    write_text_atomic(os.path.join(run_dir, 'report.md'), '\n'.join(lines) + '\n')
    print('\n'.join(lines))


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    from configurator import apply_config
    apply_config(globals())
    if profile not in PROFILES:
        fail(f"unknown profile '{profile}': expected one of {', '.join(PROFILES)}")
    if force and force != 'all' and force not in STAGES:
        fail(f"unknown stage '{force}' for --force: expected one of {', '.join(STAGES)} or 'all'")
    if input and not os.path.isfile(input):
        fail(f"input not found: {input}")
    run_dir = os.path.abspath(out_dir or os.path.join('runs', profile))  # the stages run from the repository root
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
        if os.path.exists(marker) and not stale:
            with open(marker, encoding='utf-8') as f:
                finished = json.load(f)
            if finished['command'] == line:
                done[name] = finished
                print(f"=== {name}: done ({finished['seconds']:.0f} s, {marker}); skipped")
                continue
            print(f"=== {name}: made by a different command (another profile or setting): run again")
        stale = True  # everything after a stage that runs was made from its old outputs
        for folder in folders:  # start clean: an interrupted run may have left half a stage behind
            shutil.rmtree(folder, ignore_errors=True)
        t0 = time.time()
        if cmd is None:
            print(f"\n=== {name}")
            report(run_dir, data_dir, done)
        else:
            run_stage(name, line, cmd, os.path.join(run_dir, 'logs', f'{name}.log'))
        done[name] = dict(seconds=time.time() - t0, command=line)
        os.makedirs(folders[0], exist_ok=True)
        write_text_atomic(marker, json.dumps(done[name]))
    print(f"\nall stages done in {time.time() - t_start:.0f} s this run; report card: "
          f"{os.path.join(run_dir, 'report.md')}")
