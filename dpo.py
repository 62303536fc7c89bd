"""
Direct Preference Optimization (Rafailov et al. 2023): learn from preference pairs with no reward model
and no RL loop. The policy starts as the supervised model; the reference is the supervised model frozen.
With h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)), each log-probability
summed over the reply's tokens only, the loss is

    sigmoid (DPO):   -log sigmoid(beta * h)
    label_smoothing: (1 - eps) * -log sigmoid(beta * h) + eps * -log sigmoid(-beta * h)   (conservative DPO)
    ipo:             (h' - 1 / (2 * beta))^2, h' with each log-ratio a mean over its tokens (Azar et al. 2023)
    sft_weight:      plus sft_weight * the chosen reply's mean token NLL                    (RPO, Pang et al. 2024)

beta * (log pi - log ref) of a reply is its "implicit reward"; small beta lets the policy move further
from the reference.

    python prepare.py prefs --sft_dir=out-sft      # pairs of the SFT model's own replies, gold-labelled
    python dpo.py config/dpo_tasks.py              # LoRA: the reference is the same network, adapters off
    python dpo.py config/dpo_tasks.py --lora_rank=0 --learning_rate=1e-4   # full: a frozen copy is the reference
    python dpo.py --data=PATH_OR_URL/train.jsonl.gz --val_data=.../test.jsonl.gz   # HH-RLHF

Logs loss, implicit-reward accuracy and margin, chosen and rejected rewards on held-out pairs, and an
estimate of KL(policy || reference): the mean over replies sampled from the policy to held-out prompts of
sum over their tokens of log pi - log ref. Gold accuracy per skill on val task prompts during training
and on the test prompts before and after (tasks.gold_accuracy, as in fine-tuning). Writes out_dir/model.pt
(merged: a plain GPT that sample.py and ppo.py load) and metrics.jsonl.
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
from model import (clean_state_dict, start_point, lora_disabled, merged_gpt, parse_lora_targets,
                   policy_and_reference, save_checkpoint)
from rl import pack_by_prompt, packed_logprobs_and_entropy, sampled_kl
from tasks import (chat_ids, encode_preferences, eval_tasks_from, gold_accuracy, load_chat_model, pairs_by_length,
                   preference_batch, preference_splits, prompt_lengths, read_tasks, render_prompt)

# -----------------------------------------------------------------------------
init_from = 'out-sft'        # the supervised model: a fine-tuning out_dir (model.pt) or a train.py one (ckpt.pt);
                             # 'resume': continue the run in out_dir from its ckpt.pt
out_dir = 'out-dpo'
data = 'prefs'               # 'prefs': data_dir/prefs/{train,val}.jsonl (prepare.py prefs); or a JSONL(.gz)
                             # path or URL, {prompt, chosen, rejected} or HH-RLHF {chosen, rejected} transcripts
val_data = ''                # held-out pairs for data other than 'prefs'; empty: val_fraction of data
data_dir = 'data'
val_fraction = 0.05
# the objective
loss_type = 'sigmoid'        # 'sigmoid' (DPO) or 'ipo'
beta = 0.1
label_smoothing = 0.0        # conservative DPO: the probability that a label is flipped (sigmoid loss only)
sft_weight = 0.0             # > 0: plus this times the chosen reply's mean token NLL (RPO, Pang et al. 2024),
                             # which keeps the chosen replies likely while the rejected ones are pushed down
# LoRA: only adapters train and the reference is the same network with them switched off;
# lora_rank = 0: every weight trains and a frozen copy is the reference
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.0           # dropout would make policy != reference at step 0
lora_targets = 'attn,proj,mlp_in,mlp_out'
# training
batch_size = 32              # pairs per micro-batch
gradient_accumulation_steps = 1
max_iters = 200
learning_rate = 5e-4
decay_lr = True
warmup_iters = 10
min_lr = 5e-5
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
# evaluation
eval_interval = 50
eval_pairs = 500             # held-out pairs for loss / reward accuracy / margin (0: all)
eval_tasks = 250             # val task prompts for gold accuracy during training (0 disables; needs data_dir/tasks)
eval_test = True             # and the whole test split before and after (pipeline.py evaluates every model there)
kl_prompts = 128             # held-out prompts whose sampled replies estimate KL to the reference
log_interval = 10
# system
device = 'auto'
dtype = 'auto'
seed = 1337
# -----------------------------------------------------------------------------


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type='sigmoid',
             label_smoothing=0.0, sft_weight=0.0, chosen_tokens=None, rejected_tokens=None):
    """Per-pair losses from summed reply log-probs (each (B,)), and the implicit rewards
    beta * (log pi - log ref) of the chosen and the rejected replies (no gradient). With sft_weight, each
    loss also gets sft_weight * -policy_chosen / chosen_tokens (the chosen reply's mean token NLL)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == 'sigmoid':
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == 'ipo':
        # IPO regresses the log-ratio gap onto a fixed target, 1 / (2 beta). As in TRL, each reply's log-ratio
        # is its mean over the reply's tokens: with sums, a long reply's gap would be held to the same target
        # as a short one's, though it adds up many more tokens' changes
        h = (policy_chosen - ref_chosen) / chosen_tokens - (policy_rejected - ref_rejected) / rejected_tokens
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: expected 'sigmoid' or 'ipo'")
    if sft_weight:
        losses = losses + sft_weight * -policy_chosen / chosen_tokens
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def pair_logprobs(model, idx, mask, lengths):
    """model.response_logprobs of preference_batch's rows (lengths: each row's tokens), with the chosen and the
    rejected reply to one prompt run as one sequence, the prompt once (rl.pack_by_prompt): the same sums at about
    two thirds of the tokens."""
    packed = pack_by_prompt(idx, range(idx.size(0)), lengths.tolist(), prompt_lengths(mask))
    logprobs, _ = packed_logprobs_and_entropy(model, packed)
    return (logprobs * mask[:, 1:]).sum(dim=1)


class ReplyLogprobs(nn.Module):
    """forward(idx, mask, lengths): each row's log-probability summed over its reply tokens (mask True), as a
    module so that DDP can wrap it."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx, mask, lengths):
        return pair_logprobs(self.gpt, idx, mask, lengths)


@torch.no_grad()
def reference_reply_logprobs(policy, ref_model, idx, mask, lengths):
    """Summed reply log-probs under the frozen supervised model, never with a gradient: ref_model if there
    is one (full training), else the policy with its LoRA adapters switched off."""
    if ref_model is not None:
        return pair_logprobs(ref_model, idx, mask, lengths)
    was_training = policy.training
    policy.eval()
    with lora_disabled(policy):
        out = pair_logprobs(policy, idx, mask, lengths)
    policy.train(was_training)
    return out


def pair_stats(losses, chosen_rewards, rejected_rewards):
    return dict(loss=losses.mean().item(), reward_accuracy=(chosen_rewards > rejected_rewards).float().mean().item(),
                margin=(chosen_rewards - rejected_rewards).mean().item(), chosen_reward=chosen_rewards.mean().item(),
                rejected_reward=rejected_rewards.mean().item())


if __name__ == '__main__':
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from common import check_out_dir, check_settings, fail, or_fail
    from configurator import apply_config
    config = apply_config(globals())

    # every check that needs no model comes first (common.check_settings: the same rules in every script)
    check_settings(globals(), positive=('beta', 'batch_size', 'gradient_accumulation_steps', 'learning_rate',
                                        'eval_interval', 'log_interval', 'lora_alpha'),
                   non_negative=('sft_weight', 'max_iters', 'warmup_iters', 'min_lr', 'weight_decay', 'grad_clip',
                                 'eval_pairs', 'eval_tasks', 'kl_prompts'),
                   fractions=('val_fraction', 'lora_dropout', 'beta1', 'beta2'),
                   choices={'loss_type': ('sigmoid', 'ipo')})
    if not 0 <= label_smoothing < 0.5:
        fail(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != 'sigmoid':
        fail("label_smoothing applies to the sigmoid loss only")
    targets = or_fail(parse_lora_targets, lora_rank, lora_targets)
    check_out_dir(out_dir)
    ckpt, ckpt_meta, sft_path = or_fail(start_point, init_from, out_dir)
    train_prefs, val_prefs, report = or_fail(preference_splits, data, data_dir, val_data, val_fraction, seed,
                                             errors=(FileNotFoundError, RuntimeError, ValueError))

    # -------------------------------------------------------------------------
    # processes, devices, precision (common.setup_device, as in train.py)
    ddp, ddp_rank, ddp_world_size, device, device_type, dtype, ctx = setup_device(device, dtype)
    master_process = ddp_rank == 0
    accum_steps = steps_per_process(gradient_accumulation_steps, ddp_world_size)
    seed_everything(seed)  # LoRA's A matrices, the reward head: the same on every run and every process

    # -------------------------------------------------------------------------
    # policy and reference: both start as the supervised model
    policy, sft_meta, tokenizer = load_chat_model(sft_path, device)
    data_meta = sft_meta['data_meta']
    end_token = chat_ids(tokenizer)[2]
    block_size = policy.config.block_size
    lora = dict(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=list(targets)) if lora_rank else None
    ref_model = policy_and_reference(policy, lora)  # with LoRA: None, the policy with its adapters off

    def reference_logprobs(idx, mask, lengths):
        return reference_reply_logprobs(policy, ref_model, idx, mask, lengths)

    n_params = sum(p.numel() for p in policy.parameters())
    n_trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    train_data, truncated, dropped = encode_preferences(train_prefs, tokenizer, block_size)
    val_pairs, val_truncated, val_dropped = encode_preferences(val_prefs, tokenizer, block_size)
    if eval_pairs:
        val_pairs = val_pairs[:eval_pairs]
    if master_process:
        print(f"{'LoRA r=' + str(lora_rank) if lora else 'full training'}: {n_trainable:,} trainable parameters "
              f"of {n_params:,} ({100 * n_trainable / n_params:.2f}%); loss {loss_type}, beta {beta}"
              + (f", label smoothing {label_smoothing}" if label_smoothing else '')
              + (f", plus {sft_weight} x chosen NLL" if sft_weight else ''))
        print(f"{len(train_data)} train and {len(val_pairs)} val pairs; {truncated + val_truncated} truncated to "
              f"block_size {block_size}, {dropped + val_dropped} dropped (identical once truncated)")
        for line in report:
            print(line)
    if not train_data or not val_pairs:
        fail("no usable train or val pairs after tokenizing")

    # task prompts for gold accuracy (the suite's val and test splits); preference data of other kinds
    # has no gold checker, and then only the KL is measured, on the val pairs' prompts
    val_tasks = eval_tasks_from(data_dir, eval_tasks)
    test_tasks = read_tasks(data_dir, 'test') if eval_tasks and eval_test else []
    kl_source = [[{'role': 'user', 'content': t['prompt']}] for t in val_tasks] or [p['prompt'] for p in val_prefs]
    kl_set = [kl_source[i] for i in np.random.default_rng(seed).permutation(len(kl_source))[:kl_prompts]]

    # -------------------------------------------------------------------------
    model = ReplyLogprobs(policy)
    optimizer = policy.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    iter_num, before = 0, {}
    if ckpt is not None:  # resume: the adapters (or all weights) and the optimizer where the run stopped
        policy.load_state_dict(clean_state_dict(ckpt['model']))
        optimizer.load_state_dict(ckpt['optimizer'])
        iter_num, before = ckpt_meta['iter_num'], ckpt_meta['before']
        ckpt = None
    if ddp:
        model = DDP(model, device_ids=[torch.device(device).index] if device_type == 'cuda' else None)

    log = metrics_logger(out_dir, master_process)

    def kl_to_reference(prompts, max_new_tokens=16):
        """KL(policy || reference) per reply, measured as the report card measures every model's (rl.sampled_kl:
        one reply per prompt sampled at temperature 1, the log-ratio summed over its tokens)."""
        ids = [render_prompt(p, tokenizer)[-(block_size - max_new_tokens - 1):] for p in prompts]
        with ctx:
            return sampled_kl(policy, ref_model, ids, max_new_tokens, end_token,
                              torch.Generator(device).manual_seed(seed), tokenizer.n_vocab)

    @torch.no_grad()
    def evaluate(tag, tasks, test=False):
        """Held-out pairs (loss, implicit-reward accuracy, margin, chosen / rejected rewards), the sampled
        KL to the reference, gold accuracy per skill on val prompts and, with test=True, test prompts."""
        policy.eval()
        stats = []
        for i in range(0, len(val_pairs), 64):
            idx, mask, lengths = preference_batch(val_pairs[i:i + 64], device)
            with ctx:
                pc, pr = pair_logprobs(policy, idx, mask, lengths).float().view(2, -1)
                rc, rr = reference_logprobs(idx, mask, lengths).float().view(2, -1)
            n_chosen, n_rejected = mask[:, 1:].sum(1).view(2, -1)  # reply tokens of each row
            stats.append(torch.stack(dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing, sft_weight, n_chosen,
                                              n_rejected)))
        result = {'val_' + k: v for k, v in pair_stats(*torch.cat(stats, dim=1)).items()}
        result['kl'] = kl_to_reference(kl_set) if kl_set else None
        text = f"val loss {result['val_loss']:.4f}, reward accuracy {result['val_reward_accuracy']:.1%}, " \
               f"margin {result['val_margin']:.3f} (chosen {result['val_chosen_reward']:.3f}, rejected " \
               f"{result['val_rejected_reward']:.3f})" + (f", KL {result['kl']:.3f}" if kl_set else '')
        if tasks:
            result['accuracy'], replies = gold_accuracy(policy, tokenizer, tasks)
            result['example'] = {'prompt': tasks[0]['prompt'], 'reply': replies[0]}
            text += '; gold accuracy: ' + ', '.join(f"{k} {v:.0%}" for k, v in result['accuracy'].items())
        if test and test_tasks:
            result['test_accuracy'], _ = gold_accuracy(policy, tokenizer, test_tasks)
            text += '; test: ' + ', '.join(f"{k} {v:.0%}" for k, v in result['test_accuracy'].items())
        policy.train()
        print(f"[{tag}] {text}")
        log({'iter': iter_num, 'eval': tag, **result})
        return result

    def save():
        """model.pt: the policy with its adapters merged, a plain GPT; then ckpt.pt, the training state
        (--init_from=resume). Each is written atomically; a run killed between the two resumes from the
        older ckpt.pt and writes the same model.pt again."""
        sd = clean_state_dict(policy.state_dict())
        merged = merged_gpt(sd, policy.config.__dict__, lora)
        base = dict(init_from=sft_path, **{k: v for k, v in sft_meta.items() if k not in ('model_args', 'data_meta')})
        save_checkpoint(os.path.join(out_dir, 'model.pt'), {'model': merged.state_dict()},
                        dict(model_args=merged.config.__dict__, data_meta=data_meta, dpo=config, lora=None,
                             iter_num=iter_num, base=base))
        save_checkpoint(os.path.join(out_dir, 'ckpt.pt'), {'model': sd, 'optimizer': optimizer.state_dict()},
                        dict(iter_num=iter_num, sft_path=sft_path, before=before, config=config))

    # -------------------------------------------------------------------------
    if master_process:
        os.makedirs(out_dir, exist_ok=True)
    if master_process and iter_num == 0:
        before = evaluate('sft', val_tasks, test=True)
    after = before
    t0 = t_log = time.time()
    iter_start = iter_num
    sums = torch.zeros(5, device=device)  # loss, reward accuracy, margin, chosen and rejected reward
    policy.train()
    while iter_num < max_iters:
        lr = get_lr(iter_num, learning_rate, warmup_iters, max_iters, min_lr) if decay_lr else learning_rate
        set_lr(optimizer, lr)
        for micro_step in range(accum_steps):
            rng = np.random.default_rng([seed, iter_num, ddp_rank * accum_steps + micro_step])
            examples = [train_data[i] for i in rng.integers(0, len(train_data), batch_size)]
            torch.manual_seed(int(rng.integers(2**62)))  # dropout masks: a function of (seed, iteration, micro-step)
            runs = pairs_by_length(examples)  # two runs of similar length: far less padding, the same mean loss
            for k, (pairs, share) in enumerate(runs):
                idx, mask, lengths = preference_batch(pairs, device)
                if ddp:
                    model.require_backward_grad_sync = (micro_step == accum_steps - 1 and k == len(runs) - 1)
                with ctx:
                    ref_c, ref_r = reference_logprobs(idx, mask, lengths).float().view(2, -1)
                    pol_c, pol_r = model(idx, mask, lengths).float().view(2, -1)  # chosen rows first, then rejected
                    n_chosen, n_rejected = mask[:, 1:].sum(1).view(2, -1)  # reply tokens of each row
                    losses, chosen_rewards, rejected_rewards = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta, loss_type,
                                                                        label_smoothing, sft_weight, n_chosen,
                                                                        n_rejected)
                    loss = losses.mean() * share / accum_steps
                s = pair_stats(losses.detach(), chosen_rewards, rejected_rewards)
                sums += torch.tensor(list(s.values()), device=device) * share / accum_steps
                scaler.scale(loss).backward()
        optimizer_step(optimizer, scaler, [p for p in policy.parameters() if p.requires_grad], grad_clip)
        iter_num += 1
        if iter_num % log_interval == 0 or iter_num == max_iters:
            if ddp:
                dist.all_reduce(sums)
                sums /= ddp_world_size
            n = log_interval if iter_num % log_interval == 0 else iter_num % log_interval
            loss_f, acc, margin, rc, rr = (sums / n).tolist()
            if not math.isfinite(loss_f):
                fail(f"loss is NaN or inf at iteration {iter_num}")
            if master_process:
                print(f"iter {iter_num}: loss {loss_f:.4f}, reward accuracy {acc:.1%}, margin {margin:.3f} "
                      f"(chosen {rc:.3f}, rejected {rr:.3f}), lr {lr:.2e}, "
                      f"{(time.time() - t_log) / n * 1000:.0f} ms/iter; {progress(iter_num, max_iters, t0, iter_start)}")
                log({'iter': iter_num, 'loss': loss_f, 'reward_accuracy': acc, 'margin': margin,
                     'chosen_reward': rc, 'rejected_reward': rr, 'lr': lr})
            sums.zero_()
            t_log = time.time()
        if (iter_num % eval_interval == 0 or iter_num == max_iters) and master_process:
            after = evaluate(f'iter {iter_num}', val_tasks, test=iter_num == max_iters)
            save()
    if master_process:
        if max_iters == 0:
            save()
        elapsed = time.time() - t0
        print(f"trained {iter_num} iterations in {elapsed:.1f} s; policy in {os.path.join(out_dir, 'model.pt')}")
        log({'summary': dict(mode='lora' if lora else 'full', trainable_params=n_trainable, total_params=n_params,
                             train_seconds=elapsed, train_pairs=len(train_data), val_pairs=len(val_pairs)),
             'before': before, 'after': after})
    if ddp:
        dist.barrier()  # every process done before the group goes (see train.py)
        dist.destroy_process_group()
