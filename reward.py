"""
A reward model trained on pairwise preferences (Bradley-Terry): the supervised model's transformer with a
scalar head read at the last token of prompt + reply, trained so that the preferred reply scores higher,
P(chosen > rejected) = sigmoid(r_chosen - r_rejected), i.e. loss -log sigmoid(r_chosen - r_rejected).

    python prepare.py prefs --sft_dir=out-sft               # gold-labelled pairs of the SFT model's replies
    python reward.py config/reward_tasks.py                 # the recipe (the defaults): every weight trains
    python reward.py config/reward_tasks.py --lora_rank=8   # LoRA adapters and the head train
    python reward.py --data=PATH_OR_URL/train.jsonl.gz --val_data=.../test.jsonl.gz   # HH-RLHF

It reports pairwise accuracy and mean margin on held-out pairs and, on held-out task prompts, how well its
score ranks the SFT model's sampled replies by the gold checker: AUC, and best-of-n (the reply it scores
highest among n) for n = 1, 2, 4, ... rank_samples, the reference curve of the over-optimization plot.
The model with the lowest held-out loss is kept (early stopping): out_dir/reward.pt; out_dir/ckpt.pt is the
training state (--init_from=resume); metrics.jsonl the log. ppo.py imports the model from here:

    from reward import load_reward_model, score
    rm, meta = load_reward_model('out-reward/reward.pt', device)
    rewards = score(rm, tokenizer, prompts, replies)         # one float per reply
"""
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (get_lr, metrics_logger, optimizer_step, progress, seed_everything, set_lr, setup_device,
                    steps_per_process)
from model import (GPT, CheckpointError, GPTConfig, apply_lora, clean_state_dict, load_checkpoint, start_point,
                   merge_lora, pad_batch, parse_lora_targets, save_checkpoint)
from rl import by_length, by_prompt, pack_by_prompt
from tasks import (SKILLS, chat_ids, check_answer, encode_preferences, load_chat_model, pairs_by_length,
                   preference_batch, preference_splits, prompt_lengths, read_tasks, render_prompt, sample_replies)

# -----------------------------------------------------------------------------
init_from = 'out-sft'        # the supervised model: a fine-tuning out_dir (model.pt) or a train.py one (ckpt.pt);
                             # 'resume': continue the run in out_dir from its ckpt.pt
out_dir = 'out-reward'
data = 'prefs'               # 'prefs': data_dir/prefs/{train,val}.jsonl (prepare.py prefs); or a JSONL(.gz)
                             # path or URL, {prompt, chosen, rejected} or HH-RLHF {chosen, rejected} transcripts
val_data = ''                # held-out pairs for data other than 'prefs'; empty: val_fraction of data
data_dir = 'data'
val_fraction = 0.05
shuffle_labels = False       # True: each train pair's chosen and rejected swapped with probability 1/2 (seeded), so
                             # the labels carry nothing: the control for RL against a learned reward (val pairs keep
                             # theirs, so held-out accuracy shows ~50%)
# lora_rank = 0: every weight trains (at 128 wide a step is faster than LoRA's and learns more per step);
# > 0: LoRA adapters and the head train
lora_rank = 0
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = 'attn,proj,mlp_in,mlp_out'
# training
batch_size = 32              # pairs per micro-batch
gradient_accumulation_steps = 1
max_iters = 1000
learning_rate = 5e-4
decay_lr = True
warmup_iters = 20
min_lr = 5e-5
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
center_coef = 0.01           # > 0: plus center_coef * (r_chosen + r_rejected)^2 (as TRL's center_rewards_coefficient):
                             # the pair loss only sees differences, so each prompt's scores could sit anywhere; this
                             # keeps the midpoint of a good and a bad reply near 0, so that a score's sign means
                             # something on its own (PPO without a baseline needs that)
# evaluation
eval_interval = 250
eval_pairs = 1000            # held-out pairs for accuracy and margin (0: all)
rank_prompts = 200           # held-out task prompts whose sampled replies the reward ranks (0 disables)
rank_samples = 64            # replies sampled per prompt from the supervised model; best-of-n for n up to this
rank_temperature = 0.7       # ... at this temperature (ppo.py's, for the over-optimization plot)
rank_split = 'val'           # task split of those prompts
log_interval = 50
# system
device = 'auto'
dtype = 'auto'
seed = 1337
# -----------------------------------------------------------------------------


class RewardModel(nn.Module):
    """A GPT trunk and a scalar head on its final hidden state at each row's last real token."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, 1)
        # zero head: every reward starts at 0, so the first loss is exactly log 2 (no preference yet)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, lengths, prompt_lengths=None):
        """idx (B, T) right-padded, lengths (B,) real tokens per row -> rewards (B,). With prompt_lengths (a list:
        row i's first prompt_lengths[i] tokens are its prompt), the rows that share a prompt run as one sequence,
        the prompt once (rl.pack_by_prompt): the same rewards for fewer tokens."""
        if prompt_lengths is None:
            h = self.gpt.hidden_states(idx)
            last = h[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # padding never reaches it (causal)
        else:
            (p_idx, pos, attn_mask), (_, _, at) = pack_by_prompt(idx, range(idx.size(0)), lengths.tolist(),
                                                                 prompt_lengths, whole_replies=True)
            last = self.gpt.hidden_states(p_idx, pos, attn_mask=attn_mask).flatten(0, 1)[at]
        return self.head(last).squeeze(-1).float()

    def configure_optimizers(self, *args):
        return GPT.configure_optimizers(self, *args)  # it only needs self.parameters()


def reward_loss(r_chosen, r_rejected, center_coef=0.0):
    """Bradley-Terry: -log P(chosen preferred) = -log sigmoid(r_chosen - r_rejected), averaged; plus, with
    center_coef, the mean of center_coef * (r_chosen + r_rejected)^2 (Eisenstein et al. 2023, "reward centering")."""
    loss = -F.logsigmoid(r_chosen - r_rejected).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def shuffled_labels(prefs, seed):
    """The pairs with chosen and rejected swapped for a seeded random half of them: labels that carry nothing."""
    rng = np.random.default_rng([seed, 7])
    swap = rng.random(len(prefs)) < 0.5
    return [dict(p, chosen=p['rejected'], rejected=p['chosen']) if s else p for p, s in zip(prefs, swap)]


def load_reward_model(path, device='cpu'):
    """The reward model saved by reward.py, in eval mode; returns (reward_model, meta). Its tokenizer:
    tokenizer.load_tokenizer(meta['data_meta'])."""
    ckpt, meta = load_checkpoint(path, map_location=device)  # CheckpointError if it is not a checkpoint
    try:
        rm = RewardModel(GPT(GPTConfig(**meta['model_args'])))
        rm.load_state_dict(clean_state_dict(ckpt['model']))
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a reward model of reward.py ({type(e).__name__})") from None
    return rm.to(device).eval(), meta


def reply_ids(prompt, reply, tokenizer, block_size):
    """prompt + reply + <|end|>, cut as tasks.preference_example cuts a pair: the prompt loses its start
    first (keeping at least half the block for the reply), then the reply its end."""
    p = render_prompt(prompt if isinstance(prompt, list) else [{'role': 'user', 'content': prompt}], tokenizer)
    r = tokenizer.encode_ordinary(reply) + [chat_ids(tokenizer)[2]]
    n_prompt = min(len(p), max(block_size - len(r), block_size // 2))
    return p[len(p) - n_prompt:] + r[:block_size - n_prompt]


@torch.no_grad()
def score_ids(reward_model, seqs, batch_size=64, prompt_lengths=None):
    """Rewards (float tensor (N,)) of token sequences of any lengths up to block_size, in batches of sequences of
    similar length, each padded to its longest (replies to prompts of 7-21 tokens: far less padding). With
    prompt_lengths (sequence i begins with prompt_lengths[i] prompt tokens), the replies to one prompt run
    after one copy of it (rl.pack_by_prompt), a batch about batch_size replies."""
    was_training = reward_model.training
    reward_model.eval()
    device = reward_model.head.weight.device
    out = torch.zeros(len(seqs), device=device)
    if not seqs:
        return out
    lengths = [len(s) for s in seqs]
    if prompt_lengths is None:
        runs = by_length(range(len(seqs)), lengths, batch_size)
    else:
        runs = by_prompt(range(len(seqs)), lengths, prompt_lengths, pad_batch(seqs, 0, device), batch_size)
    for rows, _ in runs:
        chunk = pad_batch([seqs[j] for j in rows], 0, device)
        run_lengths = torch.tensor([lengths[j] for j in rows], device=device)
        out[rows] = reward_model(chunk, run_lengths, None if prompt_lengths is None
                                 else [prompt_lengths[j] for j in rows]).float()
    reward_model.train(was_training)
    return out


def score(reward_model, tokenizer, prompts, replies, batch_size=64):
    """Rewards of replies (strings, without <|end|>) to prompts (lists of messages, or strings: one user
    turn): a float tensor (N,)."""
    bs = reward_model.gpt.config.block_size
    return score_ids(reward_model, [reply_ids(p, r, tokenizer, bs) for p, r in zip(prompts, replies)], batch_size)


def ranking_metrics(tasks, replies, rewards):
    """How well rewards order each prompt's sampled replies by the gold checker, per skill and in all:
    auc (of (correct, incorrect) reply pairs of the same prompt, the fraction the reward puts in the right
    order, ties half), best_of_k (accuracy of the reply with the highest reward), random (expected accuracy
    of a random reply) and oracle (a correct reply exists)."""
    per = {}
    for task, rs, scores in zip(tasks, replies, rewards):
        ok = [check_answer(task, r) for r in rs]
        for key in (task['skill'], 'all'):
            m = per.setdefault(key, dict(right=0.0, pairs=0, best=0, random=0.0, oracle=0, prompts=0))
            for sc, c in zip(scores, ok):
                for si, i in zip(scores, ok):
                    if c and not i:
                        m['pairs'] += 1
                        m['right'] += 1.0 if sc > si else 0.5 if sc == si else 0.0
            m['best'] += ok[max(range(len(rs)), key=lambda j: scores[j])]
            m['random'] += sum(ok) / len(ok)
            m['oracle'] += any(ok)
            m['prompts'] += 1
    order = [s for s in SKILLS if s in per] + [k for k in per if k not in SKILLS and k != 'all'] + ['all']
    return {k: dict(auc=per[k]['right'] / per[k]['pairs'] if per[k]['pairs'] else None, pairs=per[k]['pairs'],
                    best_of_k=per[k]['best'] / per[k]['prompts'], random=per[k]['random'] / per[k]['prompts'],
                    oracle=per[k]['oracle'] / per[k]['prompts']) for k in order if k in per}


def best_of_n(tasks, replies, rewards, ns):
    """Best-of-n by the reward, for each n in ns: the gold accuracy and the mean reward of the reply that scores
    highest among n replies to the same prompt, and KL(best-of-n || policy) = log n - (n - 1) / n (Stiennon et
    al. 2020), the distance from the sampling policy that picking costs. From N >= n replies per prompt, without
    the noise of drawing subsets: the best of a random n of them is the i-th lowest-scored with probability
    C(i - 1, n - 1) / C(N, n)."""
    curve = []
    for n in ns:
        accuracy = reward_sum = 0.0
        for task, rs, scores in zip(tasks, replies, rewards):
            N = len(rs)
            for i, j in enumerate(sorted(range(N), key=lambda j: scores[j]), 1):
                p = math.comb(i - 1, n - 1) / math.comb(N, n)
                accuracy += p * check_answer(task, rs[j])
                reward_sum += p * scores[j]
        curve.append(dict(n=n, kl=math.log(n) - (n - 1) / n, gold_accuracy=accuracy / len(tasks),
                          score=reward_sum / len(tasks)))
    return curve


if __name__ == '__main__':
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from common import check_out_dir, check_settings, fail, or_fail
    from configurator import apply_config
    config = apply_config(globals())

    # every check that needs no model comes first
    check_settings(globals(), positive=('batch_size', 'gradient_accumulation_steps', 'learning_rate', 'eval_interval',
                                        'log_interval', 'lora_alpha', 'rank_temperature'),
                   non_negative=('max_iters', 'warmup_iters', 'min_lr', 'weight_decay', 'grad_clip', 'center_coef',
                                 'eval_pairs', 'rank_prompts'),
                   fractions=('val_fraction', 'lora_dropout', 'beta1', 'beta2'),
                   choices={'rank_split': ('train', 'val', 'test')})
    if rank_prompts > 0 and rank_samples < 2:
        fail(f"rank_samples must be >= 2 to rank replies, got {rank_samples}")
    targets = or_fail(parse_lora_targets, lora_rank, lora_targets)
    check_out_dir(out_dir)
    ckpt, ckpt_meta, sft_path = or_fail(start_point, init_from, out_dir)
    train_prefs, val_prefs, report = or_fail(preference_splits, data, data_dir, val_data, val_fraction, seed,
                                             errors=(FileNotFoundError, RuntimeError, ValueError))
    if shuffle_labels:
        train_prefs = shuffled_labels(train_prefs, seed)

    # -------------------------------------------------------------------------
    # processes, devices, precision (common.setup_device, as in train.py)
    ddp, ddp_rank, ddp_world_size, device, device_type, dtype, ctx = setup_device(device, dtype)
    master_process = ddp_rank == 0
    accum_steps = steps_per_process(gradient_accumulation_steps, ddp_world_size)
    seed_everything(seed)  # LoRA's A matrices, the reward head: the same on every run and every process

    # -------------------------------------------------------------------------
    # the supervised model becomes the trunk; its replies (sampled before any training) are what the
    # reward will have to rank
    gpt, sft_meta, tokenizer = load_chat_model(sft_path, device)
    data_meta = sft_meta['data_meta']
    block_size = gpt.config.block_size
    rank_tasks, rank_replies = [], []
    if rank_prompts > 0 and master_process:
        pool = read_tasks(data_dir, rank_split)
        if pool:
            rng = np.random.default_rng(seed)
            rank_tasks = [pool[i] for i in sorted(rng.permutation(len(pool))[:rank_prompts])]
            t_sample = time.time()
            rank_replies = sample_replies(gpt, tokenizer, [t['prompt'] for t in rank_tasks], rank_samples,
                                          rank_temperature, generator=torch.Generator(device).manual_seed(seed))
            print(f"sampled {rank_samples} replies to each of {len(rank_tasks)} {rank_split} task prompts "
                  f"(temperature {rank_temperature}) in {time.time() - t_sample:.1f} s")
        else:
            print(f"no {os.path.join(data_dir, 'tasks', rank_split + '.jsonl')}: ranking of sampled replies skipped")

    lora = dict(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=list(targets)) if lora_rank else None
    if lora:
        apply_lora(gpt, **lora)  # freezes the trunk; adapters train
    model = RewardModel(gpt).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    train_data, truncated, dropped = encode_preferences(train_prefs, tokenizer, block_size)
    val_data_ex, val_truncated, val_dropped = encode_preferences(val_prefs, tokenizer, block_size)
    if eval_pairs:
        val_data_ex = val_data_ex[:eval_pairs]
    if master_process:
        print(f"{'LoRA r=' + str(lora_rank) if lora else 'full training'}: {n_trainable:,} trainable parameters "
              f"of {n_params:,} ({100 * n_trainable / n_params:.2f}%)")
        print(f"{len(train_data)} train and {len(val_data_ex)} val pairs; "
              f"{truncated + val_truncated} truncated to block_size {block_size}, "
              f"{dropped + val_dropped} dropped (identical once truncated)")
        for line in report:
            print(line)
    if not train_data or not val_data_ex:
        fail("no usable train or val pairs after tokenizing")

    # -------------------------------------------------------------------------
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    iter_num, best_val_loss = 0, float('inf')
    if ckpt is not None:
        model.load_state_dict(clean_state_dict(ckpt['model']))
        optimizer.load_state_dict(ckpt['optimizer'])
        iter_num, best_val_loss = ckpt_meta['iter_num'], ckpt_meta['best_val_loss']
        ckpt = None
    raw_model = model
    if ddp:
        model = DDP(model, device_ids=[torch.device(device).index] if device_type == 'cuda' else None)

    log = metrics_logger(out_dir, master_process)

    @torch.no_grad()
    def evaluate(tag, reward_model, rank=False):
        """Held-out pairs: loss, accuracy (r_chosen > r_rejected), mean margin, per skill where records
        name one; with rank=True also the ranking of sampled replies to held-out task prompts."""
        rewards = []
        for i in range(0, len(val_data_ex), 64):
            idx, mask, lengths = preference_batch(val_data_ex[i:i + 64], device)
            reward_model.eval()
            with ctx:
                r = reward_model(idx, lengths, prompt_lengths(mask))
            rewards.append(r.view(2, -1))
        reward_model.train()
        rc, rr = torch.cat(rewards, dim=1)
        result = dict(val_loss=reward_loss(rc, rr).item(), val_accuracy=(rc > rr).float().mean().item(),
                      val_margin=(rc - rr).mean().item(), reward_mean=torch.cat([rc, rr]).mean().item(),
                      reward_std=torch.cat([rc, rr]).std().item())
        skills = [e['skill'] for e in val_data_ex]
        if all(isinstance(s, str) for s in skills):
            result['val_accuracy_per_skill'] = {s: (rc > rr)[[k == s for k in skills]].float().mean().item()
                                                for s in sorted(set(skills), key=lambda s: (SKILLS + (s,)).index(s))}
        text = f"val loss {result['val_loss']:.4f}, pair accuracy {result['val_accuracy']:.1%}, " \
               f"margin {result['val_margin']:.3f}"
        if rank and rank_tasks:
            flat_p = [t['prompt'] for t, rs in zip(rank_tasks, rank_replies) for _ in rs]
            flat_r = [r for rs in rank_replies for r in rs]
            with ctx:
                scores = score(reward_model, tokenizer, flat_p, flat_r).float()
            # standardised as ppo.py standardises them, so the curve and PPO's scores share one axis
            scores = ((scores - result['reward_mean']) / result['reward_std']).tolist()
            scores = [scores[i * rank_samples:(i + 1) * rank_samples] for i in range(len(rank_tasks))]
            result['ranking'] = ranking_metrics(rank_tasks, rank_replies, scores)
            ns = [n for n in (2 ** k for k in range(rank_samples.bit_length())) if n <= rank_samples]
            result['best_of_n'] = best_of_n(rank_tasks, rank_replies, scores, ns)
            a = result['ranking']['all']
            auc = 'undefined' if a['auc'] is None else f"{a['auc']:.3f}"  # no prompt had right and wrong replies
            text += f"; {rank_split} prompts: AUC {auc} over {a['pairs']} (correct, incorrect) pairs; " \
                    f"best-of-n by reward: " + ', '.join(f"n={c['n']} {c['gold_accuracy']:.1%}"
                                                         for c in result['best_of_n']) + \
                    f" (oracle of {rank_samples}: {a['oracle']:.1%})"
        print(f"[{tag}] {text}")
        log({'iter': iter_num, 'eval': tag, **result})
        return result

    def plain_reward_model():
        """The trunk with its adapters merged, and the head: what load_reward_model rebuilds."""
        plain = RewardModel(GPT(GPTConfig(**raw_model.gpt.config.__dict__)))
        if lora:
            apply_lora(plain.gpt, **lora)
        plain.load_state_dict(clean_state_dict(raw_model.state_dict()))
        if lora:
            merge_lora(plain.gpt)
        return plain

    def save(result):
        """reward.pt when the held-out loss is the best so far (written first), then ckpt.pt, the training
        state, at every evaluation: a run killed between the two resumes from the older ckpt.pt and writes
        the same reward.pt again."""
        global best_val_loss
        if result['val_loss'] < best_val_loss:
            best_val_loss = result['val_loss']
            plain = plain_reward_model()
            meta = dict(model_args=plain.gpt.config.__dict__, data_meta=data_meta, lora=lora, iter_num=iter_num,
                        config=config, init_from=sft_path, reward_mean=result['reward_mean'],
                        reward_std=result['reward_std'], val_loss=result['val_loss'])
            save_checkpoint(os.path.join(out_dir, 'reward.pt'), {'model': plain.state_dict()}, meta)
        save_checkpoint(os.path.join(out_dir, 'ckpt.pt'),
                        {'model': clean_state_dict(raw_model.state_dict()), 'optimizer': optimizer.state_dict()},
                        dict(iter_num=iter_num, best_val_loss=best_val_loss, sft_path=sft_path, config=config))

    # -------------------------------------------------------------------------
    if master_process:
        os.makedirs(out_dir, exist_ok=True)
        if iter_num == 0:
            evaluate('init', raw_model)
    t0 = t_log = time.time()
    iter_start = iter_num
    loss_sum = torch.zeros((), device=device)
    acc_sum = torch.zeros((), device=device)
    while iter_num < max_iters:
        lr = get_lr(iter_num, learning_rate, warmup_iters, max_iters, min_lr) if decay_lr else learning_rate
        set_lr(optimizer, lr)
        for micro_step in range(accum_steps):
            rng = np.random.default_rng([seed, iter_num, ddp_rank * accum_steps + micro_step])
            examples = [train_data[i] for i in rng.integers(0, len(train_data), size=batch_size)]
            torch.manual_seed(int(rng.integers(2**62)))  # dropout masks: a function of (seed, iteration, micro-step)
            runs = pairs_by_length(examples)  # two runs of similar length: far less padding, the same mean loss
            for k, (pairs, share) in enumerate(runs):
                idx, mask, lengths = preference_batch(pairs, device)
                if ddp:
                    model.require_backward_grad_sync = (micro_step == accum_steps - 1 and k == len(runs) - 1)
                with ctx:
                    # chosen rows first, then rejected; each pair's prompt runs once (rl.pack_by_prompt)
                    rc, rr = model(idx, lengths, prompt_lengths(mask)).view(2, -1)
                    loss = reward_loss(rc, rr, center_coef) * share / accum_steps
                loss_sum += loss.detach()
                acc_sum += (rc > rr).float().mean().detach() * share / accum_steps
                scaler.scale(loss).backward()
        optimizer_step(optimizer, scaler, [p for p in raw_model.parameters() if p.requires_grad], grad_clip)
        iter_num += 1
        if iter_num % log_interval == 0 or iter_num == max_iters:
            if ddp:
                for s in (loss_sum, acc_sum):
                    dist.all_reduce(s)
                    s /= ddp_world_size
            n = log_interval if iter_num % log_interval == 0 else iter_num % log_interval
            lossf, accf = loss_sum.item() / n, acc_sum.item() / n
            if not math.isfinite(lossf):
                fail(f"loss is NaN or inf at iteration {iter_num}")
            if master_process:
                print(f"iter {iter_num}: loss {lossf:.4f}, train pair accuracy {accf:.1%}, lr {lr:.2e}, "
                      f"{(time.time() - t_log) / n * 1000:.0f} ms/iter; {progress(iter_num, max_iters, t0, iter_start)}")
                log({'iter': iter_num, 'loss': lossf, 'train_accuracy': accf, 'lr': lr})
            loss_sum.zero_()
            acc_sum.zero_()
            t_log = time.time()
        if (iter_num % eval_interval == 0 or iter_num == max_iters) and master_process:
            save(evaluate(f'iter {iter_num}', raw_model))
    if master_process:
        if max_iters == 0:
            save(evaluate('init', raw_model))
        elapsed = time.time() - t0
        # the kept model (the lowest held-out loss), evaluated again with the ranking of sampled replies
        best, best_meta = load_reward_model(os.path.join(out_dir, 'reward.pt'), device)
        final = evaluate(f"best (iter {best_meta['iter_num']})", best, rank=True)
        print(f"trained {iter_num} iterations in {elapsed:.1f} s; reward model (iteration {best_meta['iter_num']}, "
              f"the lowest held-out loss) in {os.path.join(out_dir, 'reward.pt')}")
        log({'summary': dict(mode='lora' if lora else 'full', trainable_params=n_trainable, total_params=n_params,
                             train_seconds=elapsed, train_pairs=len(train_data), val_pairs=len(val_data_ex),
                             best_iter=best_meta['iter_num']),
             'final': final})
    if ddp:
        dist.barrier()  # every process done before the group goes (see train.py)
        dist.destroy_process_group()
