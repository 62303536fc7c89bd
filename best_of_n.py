"""
Best-of-n distillation: RL from a reward with no policy gradient at all. Each round

  1. samples n replies at `temperature` to each of `prompts_per_round` train prompts from the current model
     (a new random set of prompts each round);
  2. keeps, for each prompt, the reply the reward scores highest: the learned reward model's pick, whatever its
     score; or with reward='gold' a reply the task checker passes (prompts with none are dropped);
  3. fine-tunes the current model on the kept chats with finetune_lora.py (every weight, as SFT trains).

The next round samples from the model the last one made. This is expert iteration, RAFT (Dong et al. 2023) and
Llama 2's "rejection sampling fine-tuning" (Touvron et al. 2023), which ran it before PPO. Seen as RL it is
REINFORCE with the reward "best of its group" (1 for the pick, 0 for the rest: nothing pushed down), each batch
trained to convergence instead of one step. Best-of-n with the reward model (reward.py) is the same pick made at
answer time; distilling it makes it the policy's own. docs/experiments.md compares it with PPO on the same
reward model ("Best-of-n distillation with the learned reward").

    python best_of_n.py --init_from=runs/cpu/sft --reward_model=runs/cpu/reward --data_dir=runs/cpu/data
    python best_of_n.py --init_from=runs/cpu/sft --data_dir=runs/cpu/data --reward=gold --rounds=1

Writes out_dir/round_K/ for each round (samples.jsonl: every prompt's replies, their scores, whether each is right,
and the pick; picked.jsonl: the kept chats as Alpaca records; finetune_lora.py's
model.pt, ckpt.pt and metrics.jsonl; finetune.log), out_dir/model.pt (the last round's model) and
out_dir/metrics.jsonl: per round the sampled replies' gold accuracy, the picked ones', the picked replies' mean
reward, and the new model's greedy gold accuracy on eval_tasks val prompts.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import time

import torch

from common import check_out_dir, check_settings, fail, seed_everything, write_text_atomic

# -----------------------------------------------------------------------------
init_from = 'out-sft'         # the supervised model's out_dir (its model.pt): round 1 samples from it
reward_model = 'out-reward'   # reward.py's out_dir (reward.pt); unused with reward='gold'
reward = 'model'              # 'model': the reward model picks; 'gold': the task checker does
data_dir = 'data'             # prepare.py's: the task suite's train prompts and val prompts
out_dir = 'out-bon'
rounds = 4                    # chosen on val: + 3.6, 6.8, 8.4, 11.0 val over rounds 1-4, then level (docs)
n = 8                         # replies per prompt: best of 16 was no better than best of 8
prompts_per_round = 4000
temperature = 0.7             # PPO's rollout temperature
max_new_tokens = 16
# each round's fine-tuning (finetune_lora.py, every weight): two passes over 4,000 chats in batches of 32
learning_rate = 2e-4
min_lr = 2e-5
max_iters = 250
batch_size = 32
eval_tasks = 1000             # val prompts for each round's greedy gold accuracy (0: none)
device = 'auto'               # 'auto': CUDA where there is one, else the CPU
seed = 1337
# -----------------------------------------------------------------------------


def pick_best(scores, min_score=None):
    """scores: one list of floats per prompt. The index of each prompt's highest score (the first among ties),
    or None where even that is below min_score."""
    picks = []
    for row in scores:
        best = max(range(len(row)), key=lambda i: (row[i], -i))
        picks.append(None if min_score is not None and row[best] < min_score else best)
    return picks


def finetune_command(round_dir, start, dev):
    """finetune_lora.py on round_dir/picked.jsonl, from start (an out_dir with model.pt), into round_dir; every
    round's fine-tuning has the same seed (its data differ)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [sys.executable, os.path.join(here, 'finetune_lora.py'), f'--init_from={start}',
            f'--data={os.path.join(round_dir, "picked.jsonl")}', f'--data_dir={round_dir}', f'--out_dir={round_dir}',
            '--lora_rank=0', f'--learning_rate={learning_rate}', f'--min_lr={min_lr}', f'--max_iters={max_iters}',
            f'--batch_size={batch_size}', f'--eval_interval={max_iters}', '--eval_tasks=0', f'--device={dev}',
            f'--seed={seed}']


if __name__ == '__main__':
    from configurator import apply_config
    apply_config(globals())
    check_settings(globals(), positive=('rounds', 'n', 'prompts_per_round', 'max_new_tokens', 'max_iters',
                                        'batch_size', 'learning_rate'),
                   non_negative=('min_lr', 'eval_tasks', 'temperature'), choices={'reward': ('model', 'gold')})
    check_out_dir(out_dir)
    if not os.path.isfile(os.path.join(init_from, 'model.pt')):
        fail(f"no model.pt in init_from='{init_from}': run finetune_lora.py first")
    if reward == 'model' and not os.path.isfile(os.path.join(reward_model, 'reward.pt')):
        fail(f"no reward.pt in reward_model='{reward_model}': run reward.py first (or --reward=gold)")
    if not os.path.isfile(os.path.join(data_dir, 'tasks', 'train.jsonl')):
        fail(f"no tasks/train.jsonl in data_dir='{data_dir}': run python prepare.py tasks --data_dir={data_dir}")

    from reward import load_reward_model, score
    from tasks import check_answer, eval_tasks_from, gold_accuracy, load_chat_model, read_tasks, sample_replies
    dev = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    os.makedirs(out_dir, exist_ok=True)
    train_tasks, val_tasks = read_tasks(data_dir, 'train'), eval_tasks_from(data_dir, eval_tasks)
    rm = load_reward_model(os.path.join(reward_model, 'reward.pt'), dev)[0] if reward == 'model' else None
    start, log, t0 = os.path.abspath(init_from), [], time.time()
    model, _, tokenizer = load_chat_model(os.path.join(start, 'model.pt'), dev)  # each round then loads its own
    for r in range(1, rounds + 1):
        round_seed, round_dir = seed + r - 1, os.path.abspath(os.path.join(out_dir, f'round_{r}'))
        shutil.rmtree(round_dir, ignore_errors=True)
        os.makedirs(round_dir)
        seed_everything(round_seed)
        # 1. n replies to each of a fresh sample of train prompts, from the current model
        tasks = list(train_tasks)
        random.Random(round_seed).shuffle(tasks)
        tasks = tasks[:prompts_per_round]
        replies = sample_replies(model, tokenizer, [t['prompt'] for t in tasks], k=n, temperature=temperature,
                                 max_new_tokens=max_new_tokens, generator=torch.Generator(dev).manual_seed(round_seed))
        right = [[check_answer(t, y) for y in ys] for t, ys in zip(tasks, replies)]
        # 2. the reward's pick for each prompt
        if reward == 'model':
            prompts_n, replies_n = [t['prompt'] for t in tasks for _ in range(n)], [y for ys in replies for y in ys]
            flat = score(rm, tokenizer, prompts_n, replies_n, batch_size=256).view(len(tasks), n).tolist()
            picks = pick_best(flat)
        else:
            flat = [[float(ok) for ok in row] for row in right]
            picks = pick_best(flat, min_score=1.0)
        kept = [(t, ys[i], sc[i], ok[i]) for t, ys, sc, ok, i in zip(tasks, replies, flat, right, picks)
                if i is not None and ys[i].strip()]
        write_text_atomic(os.path.join(round_dir, 'samples.jsonl'), ''.join(
            json.dumps(dict(prompt=t['prompt'], replies=ys, scores=sc, right=ok, pick=i)) + '\n'
            for t, ys, sc, ok, i in zip(tasks, replies, flat, right, picks)))
        if len(kept) < 2:
            fail(f"round {r}: {len(kept)} prompts with a reply to keep; nothing to fine-tune on")
        write_text_atomic(os.path.join(round_dir, 'picked.jsonl'), ''.join(
            json.dumps(dict(instruction=t['prompt'], input='', output=y)) + '\n' for t, y, _, _ in kept))
        # 3. fine-tune the current model on the picks; the next round samples from the result
        with open(os.path.join(round_dir, 'finetune.log'), 'w') as f:
            code = subprocess.run(finetune_command(round_dir, start, dev), stdout=f,
                                  stderr=subprocess.STDOUT).returncode
        if code != 0:
            fail(f"round {r}: finetune_lora.py failed (exit {code}); see {os.path.join(round_dir, 'finetune.log')}")
        start = round_dir
        model = load_chat_model(os.path.join(start, 'model.pt'), dev)[0]
        val = gold_accuracy(model, tokenizer, val_tasks)[0]['all'] if val_tasks else None
        log.append(dict(round=r, sampled_gold=sum(map(sum, right)) / (len(tasks) * n), kept=len(kept),
                        kept_gold=sum(k[3] for k in kept) / len(kept), kept_reward=sum(k[2] for k in kept) / len(kept),
                        val_accuracy=val, seconds=time.time() - t0))
        write_text_atomic(os.path.join(out_dir, 'metrics.jsonl'), ''.join(json.dumps(x) + '\n' for x in log))
        print(f"round {r}: sampled replies right {log[-1]['sampled_gold']:.1%}, kept {len(kept)} "
              f"({log[-1]['kept_gold']:.1%} right), val gold accuracy {val if val is None else f'{val:.1%}'} "
              f"({time.time() - t0:.0f} s)", flush=True)
    shutil.copyfile(os.path.join(start, 'model.pt'), os.path.join(out_dir, 'model.pt.tmp'))
    os.replace(os.path.join(out_dir, 'model.pt.tmp'), os.path.join(out_dir, 'model.pt'))
    print(f"{rounds} rounds in {time.time() - t0:.0f} s: {os.path.join(out_dir, 'model.pt')}")
