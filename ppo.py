"""
RLHF with PPO (Schulman et al. 2017) and a KL penalty, as in Ziegler et al. 2019 and InstructGPT
(Ouyang et al. 2022). Each iteration:

  1. rollouts: the policy (it starts as the supervised model) samples a reply to each of a batch of prompts
     (KV cache, stop at <|end|>; at `temperature`, which then is part of the policy's definition);
  2. reward: the reward model scores each whole reply (reward.py), or with reward='gold' the task suite's
     checker does (1 if correct, else 0). Every reply token t also gets -beta * (log pi(y_t) - log ref(y_t)):
     the KL penalty that keeps the policy near the frozen supervised model ("ref"), whose text the reward
     model was trained on. Summed over a reply it is -beta times an estimate of KL(pi || ref);
  3. advantages: with critic = True (textbook PPO) a value model predicts the return from each position,
     GAE (gamma, lambda) turns rewards and values into advantages, which are whitened. Without one (the
     default) the advantage is the reward-to-go itself, REINFORCE-style, or with group_size > 1 each reply's
     score relative to the other replies to its prompt (RLOO, GRPO; group_train trains only the groups whose
     replies differ, or one pair of each); docs/experiments.md has which won;
  4. PPO: several epochs of minibatches over the rollouts, each step the clipped surrogate objective for the
     policy and a clipped regression for the value model, with gradient clipping. Every pass over the replies
     runs their rows in runs of similar length (rl.by_length): padded to the longest, a batch is ~45% padding;
     the replies to one prompt (group_size > 1) run as one sequence, the prompt once (rl.pack_by_prompt).

beta is fixed (kl_target = 0) or steered by Ziegler et al.'s adaptive controller towards kl_target nats per
reply. With LoRA the reference is the policy with its adapters switched off (model.lora_disabled, no second
copy); with lora_rank = 0 every weight trains and a frozen copy is the reference.

The value model (critic = True) is a separate network: a GPT trunk with a scalar head at every position,
initialised from the reward model (as InstructGPT did; with reward='gold', from the supervised model with a
zero head). Why not a head on the policy's trunk (cheaper: one forward pass for both)? Then the value
loss's gradients would move the policy too (with LoRA: its adapters), so the KL to the reference would no
longer measure only what the reward did, and the two losses would need weighting against each other;
Ziegler et al. also found separate networks more stable. The reward model's trunk already reads "how good
is this reply", so the critic starts out useful. The price is a second forward and backward pass per
minibatch.

    python prepare.py prefs --sft_dir=out-sft && python reward.py config/reward_tasks.py   # the reward model
    python ppo.py config/ppo_tasks.py                                  # learned reward, adaptive KL (the defaults)
    python ppo.py config/ppo_tasks.py --kl_coef=0 --kl_target=0 --out_dir=out-ppo-beta0   # no KL penalty
    python ppo.py config/ppo_tasks_gold.py                                                # the checker
    python ppo.py config/ppo_tasks_gold.py --critic=True --whiten_advantages=True --push_down=True  # textbook PPO
    python plots.py --compare=out-ppo,out-ppo-beta0      # a table of finished runs, and a plot

Logs per iteration (metrics.jsonl): mean score of the rollouts (the reward model's, or gold), their gold
accuracy, KL to the reference, beta, PPO's clip fraction, the approximate KL between the policy before and
after the update, entropy, value loss and explained variance (null with critic = False), the advantages' mean
and std over reply tokens (before whitening) and the share of their weight that pushes replies down. Gold accuracy
per skill on held-out prompts (greedy) before, during and after. Writes out_dir/ckpt.pt (the training
state, --init_from=resume; sample.py loads it) and out_dir/model.pt (the policy with adapters merged:
a plain GPT).
"""
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn

from common import metrics_logger, progress, seed_everything, setup_device
from model import (GPT, CheckpointError, GPTConfig, clean_state_dict, start_point, merged_gpt, model_from_checkpoint,
                   parse_lora_targets, policy_and_reference, save_checkpoint)
from tasks import (chat_ids, check_answer, eval_tasks_from, gold_accuracy, load_chat_model, read_tasks,
                   render_prompt)
from reward import RewardModel, load_reward_model, score_ids
from rl import (KLController, advantage_stats, by_length, by_prompt, explained_variance, gae, group_advantages,
                logprobs_and_entropy, masked_mean, masked_whiten, pack_by_prompt, packed_logprobs_and_entropy,
                place_on_mask, policy_loss, prefix_advantages, reference_logprobs, rollout, sample_pairs,
                token_rewards, value_loss, weigh_down_pushes)

# -----------------------------------------------------------------------------
# The defaults are the recipe's run with the learned reward (config/ppo_tasks.py spells them out).
init_from = 'out-sft'        # the supervised model (a fine-tuning out_dir: model.pt), or 'resume' (out_dir/ckpt.pt)
out_dir = 'out-ppo'
reward = 'model'             # 'model': reward_model's score of the reply; 'gold': 1 if the checker accepts it, else 0
reward_model = 'out-reward'  # reward.py's out_dir (reward.pt) or the file itself
prompts = 'tasks'            # 'tasks': data_dir/tasks/train.jsonl; or a JSONL file, one {"prompt": str or
                             # [messages], "answer": str (optional; needed for gold), "skill": str} per line
data_dir = 'data'
# rollouts
batch_size = 256             # rollouts (replies) per iteration, per process: a learned reward this noisy needs
                             # the bigger batch (128 in minibatches of 32 gained far less)
group_size = 1               # replies per prompt. > 1: each reply's score relative to the other replies to its
                             # prompt (group_advantages): a prompt whose replies all score the same then teaches
                             # nothing, instead of pushing all of its (say, all wrong) replies down
group_baseline = 'leave_one_out'  # 'leave_one_out': minus the mean of the others (RLOO); 'mean': minus the
                             # group's mean (GRPO, Dr. GRPO); 'least_noise': minus the others' scores weighted
                             # by their surprisal, -log pi(reply), a proxy for their gradients' squared length
                             # (docs/rl_compare.md); 'none': no baseline (a control)
group_std = False            # True: divided by the group's std as well (GRPO; TRL's scale_rewards)
token_credit = 'reply'       # 'reply': every token of a reply gets its group-relative score; 'prefix': the replies
                             # of a group as a tree, each token credited with how it changed the mean score of the
                             # replies that begin as it does (rl.prefix_advantages; group_baseline is then 'mean')
push_down = False            # False: a negative score (after the baseline) becomes 0, so only the replies that
                             # beat their baseline are pushed up and none is pushed down (docs/experiments.md)
down_weight = 1.0            # with push_down: a negative advantage is multiplied by this (1: as the maths has it;
                             # below 1 the pushes down are weaker than the pushes up)
group_train = 'all'          # which replies of the groups train: 'all'; 'spread': only the groups whose replies
                             # differ in score (the others' advantages are 0, so with kl_coef = 0 a whole batch's
                             # gradient points the same way, at less cost: DAPO's dynamic sampling, without
                             # resampling); 'pair': of each group one reply above its mean and one below, drawn
                             # in proportion to how far and weighted by the group's whole push (rl.sample_pairs):
                             # the same expected gradient from 2 of the k replies (docs/experiments.md: far noisier)
score_margin = 0.5           # subtracted from every score before that: with push_down = False, a reply must beat its
                             # group's mean by more than this to be pushed up at all (0.5: the reward model's
                             # standardised score is fairly sure)
max_new_tokens = 16          # a reply that has not said <|end|> by then is cut (and scored as it is)
temperature = 0.7            # the policy PPO trains is softmax(logits / temperature): rollouts sample from it
                             # and every log-prob (ratio, KL, entropy) is taken from it, so the math is exact.
                             # Below 1 the rollouts sit nearer the greedy reply that evaluation uses
# the KL penalty
kl_coef = 0.1                # beta (its start value with the adaptive controller); 0: no penalty
kl_target = 0.1              # > 0: adapt beta so that the KL (nats per reply) approaches this; 0: beta stays fixed.
                             # Chosen on val: targets 0.1 / 0.2 / 0.4 / 1 gave 49.6 / 47.8 / 48.1 / 48.1%
kl_horizon = 10000           # the controller's horizon, in rollouts: how fast beta moves (slowly)
# PPO
ppo_epochs = 2               # passes over each rollout batch
minibatch_size = 64
clip_range = 0.2             # epsilon: the ratio pi_new / pi_old is clipped to [1 - eps, 1 + eps], and a value
                             # prediction may move at most this far from the rollout's (OpenAI baselines' cliprange)
gamma = 1.0                  # discount (1: a reply is short and only its end matters)
lam = 0.95                   # GAE's lambda: 0 is one-step TD (low variance, biased), 1 is Monte Carlo
critic = False               # False: no value model; each reply token's advantage is its reward-to-go (the reply's
                             # score, plus the KL penalties still ahead), as in REINFORCE. With a 0/1 reward and
                             # whiten_advantages = False only the replies that scored are pushed up, none down
whiten_advantages = False    # True: standardise the advantages over each batch (this subtracts their mean: a baseline)
value_warmup = 0             # with a critic: for this many first iterations only the value model trains (the policy
                             # waits for a baseline that is better than the one it starts with)
# optimisation: the policy (LoRA, or every weight with lora_rank = 0) and the value model (every weight)
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.0           # dropout would make the policy differ from the reference at step 0
lora_targets = 'attn,proj,mlp_in,mlp_out'
learning_rate = 5e-4
value_learning_rate = 1e-4
max_iters = 50
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# evaluation
eval_interval = 25
eval_tasks = 250             # val task prompts for gold accuracy during training (0 disables); test at the ends
eval_test = True             # and the whole test split before and after (pipeline.py evaluates every model there)
log_interval = 1
# system
device = 'auto'
dtype = 'auto'
seed = 1337
# -----------------------------------------------------------------------------
# -----------------------------------------------------------------------------
# The models

class PolicyLogprobs(nn.Module):
    """logprobs_and_entropy as a module, so that DDP can wrap it."""

    def __init__(self, gpt, vocab_limit=None, temperature=1.0):
        super().__init__()
        self.gpt, self.vocab_limit, self.temperature = gpt, vocab_limit, temperature

    def forward(self, idx=None, packed=None):
        if packed is not None:  # rows that share prompts, packed by rl.pack_by_prompt
            return packed_logprobs_and_entropy(self.gpt, packed, self.vocab_limit, self.temperature)
        return logprobs_and_entropy(self.gpt, idx, self.vocab_limit, self.temperature)


class ValueModel(RewardModel):
    """The critic: reward.py's RewardModel (a GPT trunk and a zero-initialised scalar head, so it loads a reward
    model's weights as they are), read at every position: V(prompt + reply so far)."""

    def forward(self, idx):
        return self.head(self.gpt.hidden_states(idx)).squeeze(-1).float()


# -----------------------------------------------------------------------------
# Prompts

def load_prompt_file(path):
    """Records {'prompt': [messages], 'answer'?: str, 'skill'?: str} from a JSONL file; a line may also be a
    plain JSON string (the prompt). Raises ValueError naming the first bad line."""
    records = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not JSON ({e.msg})") from None
            if isinstance(r, str):
                r = {'prompt': r}
            if not isinstance(r, dict) or 'prompt' not in r:
                raise ValueError(f"{path} line {n}: expected a string or an object with a 'prompt'")
            p = r['prompt']
            if isinstance(p, str):
                p = [{'role': 'user', 'content': p}]
            if not (isinstance(p, list) and p and all(isinstance(m, dict) and m.get('role') in ('user', 'assistant')
                                                      and isinstance(m.get('content'), str) for m in p)
                    and p[-1]['role'] == 'user' and any(m['content'].strip() for m in p)):
                raise ValueError(f"{path} line {n}: the prompt must be a non-empty string or a list of messages "
                                 f"ending with a user turn")
            if 'answer' in r and not isinstance(r['answer'], str):
                raise ValueError(f"{path} line {n}: answer is not a string")
            records.append({**r, 'prompt': p})
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from common import check_out_dir, check_settings, fail, or_fail
    from configurator import apply_config
    config = apply_config(globals())

    # every check that needs no model comes first (common.check_settings: the same rules in every script)
    check_settings(globals(), positive=('batch_size', 'group_size', 'max_new_tokens', 'temperature', 'kl_horizon',
                                        'ppo_epochs', 'minibatch_size', 'clip_range',
                                        'learning_rate', 'eval_interval', 'log_interval', 'lora_alpha'),
                   non_negative=('kl_coef', 'kl_target', 'score_margin', 'down_weight', 'value_learning_rate',
                                 'value_warmup', 'max_iters', 'weight_decay', 'grad_clip', 'eval_tasks'),
                   fractions=('lora_dropout', 'beta1', 'beta2', 'clip_range'),
                   choices={'reward': ('model', 'gold'), 'token_credit': ('reply', 'prefix'),
                            'group_baseline': ('leave_one_out', 'mean', 'least_noise', 'none'),
                            'group_train': ('all', 'spread', 'pair')})
    if token_credit == 'prefix' and (group_size < 2 or critic):
        fail("token_credit='prefix' needs groups (group_size > 1) and no critic (--critic=False)")
    if value_warmup and not critic:
        fail("value_warmup trains the value model alone first: it needs --critic=True")
    if kl_target > 0 and kl_coef == 0:
        fail("the adaptive controller multiplies beta: with kl_target > 0 start from kl_coef > 0")
    if batch_size % minibatch_size:
        fail(f"minibatch_size must divide batch_size; got {minibatch_size} and {batch_size}")
    unit = {'all': 1, 'spread': group_size, 'pair': 2}[group_train]  # rows that stay in one minibatch
    if group_train != 'all' and (group_size < 2 or critic or token_credit != 'reply' or minibatch_size % unit):
        fail(f"group_train='{group_train}' needs groups (group_size > 1), no critic, token_credit='reply' and a "
             f"minibatch_size that is a multiple of {unit}")
    if batch_size % group_size:
        fail(f"group_size must divide batch_size; got {group_size} and {batch_size}")
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        fail(f"gamma and lam must be in [0, 1]; got {gamma} and {lam}")
    targets = or_fail(parse_lora_targets, lora_rank, lora_targets)
    check_out_dir(out_dir)
    resume = init_from == 'resume'
    ckpt, ckpt_meta, sft_path = or_fail(start_point, init_from, out_dir)
    if resume and critic and 'value_model' not in ckpt:
        fail(f"{os.path.join(out_dir, 'ckpt.pt')} was trained with --critic=False: resume it so")
    rm_path = None
    if reward == 'model':
        rm_path = os.path.join(reward_model, 'reward.pt') if os.path.isdir(reward_model) else reward_model
        if not os.path.isfile(rm_path):
            fail(f"no reward model at {rm_path}: run reward.py first, or use --reward=gold")
    try:
        if prompts == 'tasks':
            path = os.path.join(data_dir, 'tasks', 'train.jsonl')
            if not os.path.exists(path):
                raise ValueError(f"no task prompts at {path}: run python prepare.py tasks")
            with open(path, encoding='utf-8') as f:
                train_records = [json.loads(line) for line in f]
            for r in train_records:
                r['prompt'] = [{'role': 'user', 'content': r['prompt']}]
        elif os.path.isfile(prompts):
            train_records = load_prompt_file(prompts)
        else:
            raise ValueError(f"prompts must be 'tasks' or a JSONL file; {prompts} not found")
    except ValueError as e:
        fail(str(e))
    has_answers = all(isinstance(r.get('answer'), str) for r in train_records)
    if reward == 'gold' and not has_answers:
        fail("reward='gold' needs an 'answer' for every prompt")

    # -------------------------------------------------------------------------
    # processes, devices, precision (common.setup_device, as in train.py)
    ddp, ddp_rank, ddp_world_size, device, device_type, dtype, ctx = setup_device(device, dtype)
    master_process = ddp_rank == 0
    if ddp and group_train != 'all':  # each process would take its own number of steps, and DDP would wait forever
        fail(f"group_train='{group_train}' runs on one process: its number of optimizer steps depends on the rollouts")
    seed_everything(seed)  # LoRA's A matrices, the reward head: the same on every run and every process

    # -------------------------------------------------------------------------
    # the policy and the reference: both start as the supervised model
    policy, sft_meta, tokenizer = load_chat_model(sft_path, device)
    data_meta = sft_meta['data_meta']
    end_token = chat_ids(tokenizer)[2]
    block_size = policy.config.block_size
    if max_new_tokens + 2 > block_size:
        fail(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in block_size {block_size}")
    vocab_limit = min(tokenizer.n_vocab, policy.config.vocab_size)  # never sample a padded vocabulary row
    lora = dict(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=list(targets)) if lora_rank else None
    ref_model = policy_and_reference(policy, lora)  # with LoRA: None, the policy with its adapters off

    # the reward model (frozen) and the value model (initialised from it: InstructGPT)
    rm, rm_meta, rm_mean, rm_std = None, None, 0.0, 1.0
    if reward == 'model':
        try:
            rm, rm_meta = load_reward_model(rm_path, device)
        except CheckpointError as e:
            fail(str(e))
        if rm_meta['data_meta'] != data_meta:
            fail(f"the reward model {rm_path} uses a different tokenizer than the policy {sft_path}")
        for p in rm.parameters():
            p.requires_grad = False
        if rm_meta.get('reward_mean') is not None and rm_meta.get('reward_std'):  # standardised scores
            rm_mean, rm_std = rm_meta['reward_mean'], rm_meta['reward_std']
    value_model = None
    if critic:
        if rm is not None:
            value_model = ValueModel(GPT(GPTConfig(**rm_meta['model_args'])))
            value_model.load_state_dict(rm.state_dict())
            with torch.no_grad():  # the critic predicts standardised scores: rescale its head the same way
                value_model.head.weight /= rm_std
                value_model.head.bias.sub_(rm_mean).div_(rm_std)
        else:
            value_model = ValueModel(model_from_checkpoint(sft_path, device)[0])
        value_model.to(device)

    # the policy's distribution is over the tokens sampling may draw, everywhere: ratio, KL and entropy
    policy_module = PolicyLogprobs(policy, vocab_limit, temperature)

    def score_rollouts(batch_prompts, ro):
        """The reward model's (normalised) score of each whole reply, read at its <|end|>, and whether the
        gold checker accepts it (None where a prompt has no answer)."""
        texts = [tokenizer.decode(r) for r in ro['replies']]
        gold = [check_answer(rec, t) if isinstance(rec.get('answer'), str) else None
                for rec, t in zip(batch_prompts, texts)]
        rm_scores = None
        if rm is not None:
            seqs = [ro['idx'][i, :n].tolist() for i, n in enumerate(ro['lengths'])]
            seqs = [s if ended else s + [end_token] for s, ended in zip(seqs, ro['ended'])]  # as reward.py scores
            with ctx:
                rm_scores = (score_ids(rm, seqs, prompt_lengths=ro['prompt_lengths'] if ro['shared_prompts'] else None)
                             - rm_mean) / rm_std
        return texts, gold, rm_scores

    # prompts: train records for rollouts; held-out task prompts (val during training, test at the ends)
    def encode_prompt(messages):
        return render_prompt(messages, tokenizer)[-(block_size - max_new_tokens - 1):]

    val_tasks = eval_tasks_from(data_dir, eval_tasks)
    test_tasks = read_tasks(data_dir, 'test') if eval_tasks and eval_test else []

    # -------------------------------------------------------------------------
    policy_optimizer = policy.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    value_optimizer = GPT.configure_optimizers(value_model, weight_decay, value_learning_rate, (beta1, beta2),
                                               device_type) if critic else None
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    kl_ctl = KLController(kl_coef, kl_target, kl_horizon)
    iter_num, before = 0, {}
    if ckpt is not None:
        policy.load_state_dict(clean_state_dict(ckpt['model']))
        policy_optimizer.load_state_dict(ckpt['optimizer'])
        if critic:
            value_model.load_state_dict(clean_state_dict(ckpt['value_model']))
            value_optimizer.load_state_dict(ckpt['value_optimizer'])
        iter_num, kl_ctl.value, before = ckpt_meta['iter_num'], ckpt_meta['kl_coef'], ckpt_meta['before']
        ckpt = None
    n_params = sum(p.numel() for p in policy.parameters())
    n_trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    policy_ddp, value_ddp = policy_module, value_model
    if ddp:
        ids = [torch.device(device).index] if device_type == 'cuda' else None
        policy_ddp = DDP(policy_module, device_ids=ids)
        value_ddp = DDP(value_model, device_ids=ids) if critic else None
    if master_process:
        print(f"policy: {'LoRA r=' + str(lora_rank) if lora else 'full training'}, {n_trainable:,} trainable "
              f"parameters of {n_params:,}; " + (f"value model: {sum(p.numel() for p in value_model.parameters()):,} "
              f"parameters, from {'the reward model' if rm else 'the supervised model'}" if critic else
              "no value model: advantages are rewards-to-go"))
        print(f"reward: {'reward model ' + rm_path if rm else 'gold checker'}"
              + (f" (scores standardised: mean {rm_mean:.3f}, std {rm_std:.3f})" if rm else '')
              + f"; beta {kl_coef}" + (f", adaptive towards KL {kl_target}" if kl_target else ' (fixed)')
              + f"; {len(train_records)} rollout prompts")

    log = metrics_logger(out_dir, master_process)

    @torch.no_grad()
    def evaluate(tag, tasks, test=False):
        """Gold accuracy per skill of greedy replies to held-out prompts, and the reward model's mean score
        of those replies (the proxy next to the truth); with test=True also on the test prompts."""
        result = {}
        for key, ts in (('', tasks), ('test_', test_tasks if test else [])):
            if not ts:
                continue
            acc, replies = gold_accuracy(policy, tokenizer, ts, max_new_tokens=max_new_tokens)
            result[key + 'accuracy'] = acc
            if rm is not None:
                seqs = [render_prompt([{'role': 'user', 'content': t['prompt']}], tokenizer)
                        + tokenizer.encode_ordinary(r) + [end_token] for t, r in zip(ts, replies)]
                with ctx:
                    result[key + 'score'] = ((score_ids(rm, [s[-block_size:] for s in seqs]) - rm_mean)
                                             / rm_std).mean().item()
            if not key:
                result['example'] = {'prompt': ts[0]['prompt'], 'reply': replies[0]}
        if tasks:
            result['sampled'] = sampled_eval(tasks)
        if result:
            text = '; '.join(f"{'test' if k.startswith('test') else 'val'} gold accuracy: " + ', '.join(
                f"{s} {v:.0%}" for s, v in result[k].items()) for k in ('accuracy', 'test_accuracy') if k in result)
            text += ''.join(f"; {'test' if k.startswith('test') else 'val'} reward-model score {result[k]:.3f}"
                            for k in ('score', 'test_score') if k in result)
            if 'sampled' in result:
                s = result['sampled']
                text += (f"; sampled: gold accuracy {s['gold_accuracy']:.1%}, KL {s['kl']:.3f}"
                         + (f", reward-model score {s['score']:.3f}" if s['score'] is not None else ''))
            print(f"[{tag}] {text}")
        log({'iter': iter_num, 'eval': tag, **result})
        return result

    @torch.no_grad()
    def sampled_eval(tasks):
        """One reply per held-out prompt sampled as the rollouts are (same temperature, a fixed seed): its gold
        accuracy, the reward model's score and KL(policy || reference) (the summed log-ratio, averaged). One
        point of the over-optimization plot: the proxy and the truth against the distance travelled."""
        records = [{'prompt': [{'role': 'user', 'content': t['prompt']}], 'answer': t['answer']} for t in tasks]
        gen = torch.Generator(device).manual_seed(seed)
        with ctx:
            ro = rollout(policy, [encode_prompt(r['prompt']) for r in records], max_new_tokens, end_token, gen,
                         vocab_limit, temperature)
            ref = reference_logprobs(policy, ref_model, ro['idx'], vocab_limit, temperature, ro['lengths'])
        _, gold, rm_scores = score_rollouts(records, ro)
        return dict(kl=((ro['logprobs'] - ref) * ro['mask']).sum(1).mean().item(),
                    gold_accuracy=sum(gold) / len(gold),
                    score=rm_scores.mean().item() if rm_scores is not None else None)

    def save():
        """model.pt: the policy with adapters merged; then ckpt.pt: the training state (policy with its adapters,
        value model, optimizers, beta), which sample.py and model_from_checkpoint also load as a plain GPT.
        Each file is written atomically, ckpt.pt last: a run killed between the two resumes from the older
        ckpt.pt and writes the same model.pt again."""
        sd = clean_state_dict(policy.state_dict())
        merged = merged_gpt(sd, policy.config.__dict__, lora)
        save_checkpoint(os.path.join(out_dir, 'model.pt'), {'model': merged.state_dict()},
                        dict(model_args=merged.config.__dict__, data_meta=data_meta, ppo=config, iter_num=iter_num,
                             base=dict(init_from=sft_path)))
        meta = dict(model_args=policy.config.__dict__, lora=lora, data_meta=data_meta, iter_num=iter_num,
                    kl_coef=kl_ctl.value, config=config, sft_path=sft_path, reward_model=rm_path, before=before)
        state = {'model': sd, 'optimizer': policy_optimizer.state_dict()}
        if critic:
            state.update(value_model=clean_state_dict(value_model.state_dict()),
                         value_optimizer=value_optimizer.state_dict())
        save_checkpoint(os.path.join(out_dir, 'ckpt.pt'), state, meta)

    # -------------------------------------------------------------------------
    if master_process:
        os.makedirs(out_dir, exist_ok=True)
    if master_process and iter_num == 0:
        before = evaluate('sft', val_tasks, test=True)
    after = before
    t0, iter_start = time.time(), iter_num
    # The policy always runs in eval mode: PPO's ratio compares two forward passes, and dropout would make
    # them differ for no reason (gradients flow in eval mode all the same).
    policy.eval()
    if critic:
        value_model.eval()
    def relative_scores(scores, ro):
        """Each reply's score against its baseline, what the policy gradient weighs it by: with groups its group's
        (group_advantages: leave-one-out, mean, with or without the std); with push_down = False the part above
        score_margin only. Returns the score at each reply's end and, with token_credit='prefix', a credit per
        reply token from the group's tree of prefixes instead (the end scores are then 0); else None."""
        if token_credit == 'prefix':  # the score goes to the tokens, not to the reply's end
            scale = scores.view(-1, group_size).std(1, keepdim=True) + 1e-4 if group_std else 1.0
            actions = [ro['idx'][i, 1:][ro['mask'][i]].tolist() for i in range(len(scores))]
            credit = place_on_mask(prefix_advantages(actions, (scores.view(-1, group_size) / scale).view(-1),
                                                     group_size), ro['mask'])
            credit = credit if push_down else (credit - score_margin).clamp(min=0) * ro['mask'].float()
            return torch.zeros_like(scores), credit
        if group_size > 1:
            surprisal = -(ro['logprobs'].float() * ro['mask']).sum(1) if group_baseline == 'least_noise' else None
            scores = group_advantages(scores, group_size, group_baseline, group_std, weights=surprisal)
        return (scores if push_down else (scores - score_margin).clamp(min=0)), None

    while iter_num < max_iters:
        t_iter = time.time()
        # 1. rollouts: this process's own prompts, seeded by iteration (a resumed run repeats them exactly)
        rng = np.random.default_rng([seed, iter_num, ddp_rank])
        batch_prompts = [train_records[i] for i in rng.integers(0, len(train_records), size=batch_size // group_size)
                         for _ in range(group_size)]  # each prompt group_size times in a row
        gen = torch.Generator(device).manual_seed(int(rng.integers(2**62)))
        with ctx:
            ro = rollout(policy, [encode_prompt(r['prompt']) for r in batch_prompts], max_new_tokens, end_token,
                         gen, vocab_limit, temperature)
        t_rollout = time.time() - t_iter
        idx, mask = ro['idx'], ro['mask'].float()

        # 2. score: the reward model or the checker, then each reply against its baseline (its group, a margin)
        texts, gold, rm_scores = score_rollouts(batch_prompts, ro)
        raw_scores = rm_scores if reward == 'model' else torch.tensor([float(g) for g in gold], device=device)
        scores, credit = relative_scores(raw_scores, ro)

        # 3. advantages: per-token rewards (the score at the reply's end, -beta * the log-ratio to the reference at
        # every token), values, GAE (no gradient: these are the targets)
        with torch.no_grad(), ctx:
            old_logprobs = ro['logprobs']
            ref_logprobs = reference_logprobs(policy, ref_model, idx, vocab_limit, temperature, ro['lengths'],
                                              ro['prompt_lengths'] if ro['shared_prompts'] else None)
        kl_per_reply = ((old_logprobs - ref_logprobs) * mask).sum(1)  # a sample of KL(pi || ref) per reply
        lengths, prompt_lengths = ro['lengths'], ro['prompt_lengths']
        if group_train != 'all':  # from here on only the groups that differ, or one pair of each (rl.sample_pairs)
            if group_train == 'pair':
                rows, scores = sample_pairs(scores, group_size,
                                            torch.Generator().manual_seed(int(rng.integers(2**62))))
            else:
                spread = raw_scores.view(-1, group_size)
                spread = (spread.max(1).values > spread.min(1).values).repeat_interleave(group_size)
                rows = spread.nonzero().squeeze(1)
                scores = scores[rows]
            idx, mask, old_logprobs, ref_logprobs = idx[rows], mask[rows], old_logprobs[rows], ref_logprobs[rows]
            lengths = [lengths[i] for i in rows.tolist()]
            prompt_lengths = [prompt_lengths[i] for i in rows.tolist()]
        with torch.no_grad(), ctx:
            # no critic: V = 0 and lambda = 1, so that GAE's advantage is the (discounted) reward-to-go
            old_values = value_model(idx[:, :-1]).float() if critic else torch.zeros_like(old_logprobs)
        beta = kl_ctl.value
        rewards = token_rewards(scores, old_logprobs, ref_logprobs, mask, beta)
        advantages, returns = gae(rewards, old_values, mask, gamma, lam if critic else 1.0)
        if credit is not None:
            advantages = advantages + credit  # plus the KL penalties still ahead, as for a whole reply's score
        if push_down and down_weight != 1.0:
            advantages = weigh_down_pushes(advantages, down_weight)
        adv_mean, adv_std, _ = advantage_stats(advantages, mask)  # before whitening: the scale the rewards gave
        if whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        push_down_share = advantage_stats(advantages, mask)[2]  # after: how much of the push is downwards

        # 4. PPO: ppo_epochs passes of minibatches over the rollouts, each step the clipped objective
        stats = []
        train_policy = iter_num >= value_warmup  # else the critic alone learns from these rollouts
        order_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        n_train = len(lengths)
        packed = ro['shared_prompts'] and not critic  # replies that share a prompt: the prompt runs once per run
        for epoch in range(ppo_epochs):
            order = (torch.randperm(n_train // unit, generator=order_gen)[:, None] * unit + torch.arange(unit))
            order = order.view(-1).tolist()
            for start in range(0, n_train, minibatch_size):
                mb = order[start:start + minibatch_size]
                # in two runs of rows of similar length, each trimmed to its longest row (rl.by_length: a minibatch
                # of replies padded to its longest row is ~45% padding; two runs were faster than 1, 4 or 8), each
                # run's losses weighted by its share of the minibatch's reply tokens: the whole minibatch's gradient.
                # With groups, a run's replies to one prompt as one sequence (rl.pack_by_prompt)
                runs = (by_prompt(mb, lengths, prompt_lengths, idx, (len(mb) + 1) // 2) if packed
                        else by_length(mb, lengths, (len(mb) + 1) // 2))
                n_tokens = mask[mb].sum()
                mb_stats = 0
                for k, (rows, T) in enumerate(runs):
                    run_idx, run_mask = idx[rows, :T], mask[rows, :T - 1]
                    share = run_mask.sum() / n_tokens
                    with ctx:
                        with torch.set_grad_enabled(train_policy):  # no graph to wait for a backward (DDP would)
                            logprobs, entropy = (policy_ddp(packed=pack_by_prompt(idx, rows, lengths, prompt_lengths))
                                                 if packed else policy_ddp(run_idx))
                        pg_loss, clip_frac, approx_kl = policy_loss(logprobs.float(), old_logprobs[rows, :T - 1],
                                                                    advantages[rows, :T - 1], run_mask, clip_range)
                        ent = masked_mean(entropy.float(), run_mask)
                        vf_loss = vf_clip_frac = torch.zeros((), device=device)
                        if critic:
                            values = value_ddp(run_idx[:, :-1]).float()
                            vf_loss, vf_clip_frac = value_loss(values, old_values[rows, :T - 1],
                                                               returns[rows, :T - 1], run_mask, clip_range)
                        # two separate networks: one backward pass serves both, each its own optimizer
                        loss = (pg_loss if train_policy else 0) + vf_loss
                    if ddp:  # the processes average their gradients once, in the minibatch's last backward
                        for m in (policy_ddp, value_ddp):
                            if m is not None:
                                m.require_backward_grad_sync = k == len(runs) - 1
                    scaler.scale(loss * share).backward()
                    mb_stats = mb_stats + share * torch.stack([pg_loss.detach(), vf_loss.detach(), clip_frac,
                                                               approx_kl, vf_clip_frac, ent.detach()])
                optimizers = ([policy_optimizer] if train_policy else []) + ([value_optimizer] if critic else [])
                if grad_clip > 0:
                    for opt in optimizers:
                        scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], grad_clip)
                    if critic:
                        torch.nn.utils.clip_grad_norm_(value_model.parameters(), grad_clip)
                for opt in optimizers:
                    scaler.step(opt)
                scaler.update()
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                stats.append(mb_stats)
        iter_num += 1

        # 5. KL control (beta's update) and the log, statistics averaged over processes
        gold_known = [g for g in gold if g is not None]
        ro_mask = ro['mask'].float()  # every rollout's (with group_train the trained ones may be fewer)
        ro_stats = torch.tensor([raw_scores.float().mean().item(), kl_per_reply.mean().item(),
                                 masked_mean(ro['entropy'], ro_mask).item(), ro_mask.sum(1).mean().item(),
                                 sum(ro['ended']) / batch_size, rewards.sum(1).mean().item() if len(rewards) else 0.0,
                                 sum(gold_known) / max(1, len(gold_known)),
                                 rm_scores.mean().item() if rm_scores is not None else 0.0,
                                 explained_variance(old_values, returns, mask) if critic else 0.0], device=device)
        ppo_stats = torch.stack(stats).mean(0) if stats else torch.zeros(6, device=device)  # no pair: no step
        if ddp:
            for s in (ro_stats, ppo_stats):
                dist.all_reduce(s)
                s /= ddp_world_size
        (score_mean, kl, rollout_entropy, reply_len, ended_frac, total_reward, gold_acc, rm_mean_score,
         expl_var) = ro_stats.tolist()
        pg_l, vf_l, clip_f, approx_kl_f, vf_clip_f, ent_f = ppo_stats.tolist()
        kl_ctl.update(kl, batch_size * ddp_world_size)
        if not all(math.isfinite(v) for v in (pg_l, vf_l, kl)):
            fail(f"loss or KL is NaN or inf at iteration {iter_num}")
        dt = time.time() - t_iter
        record = dict(iter=iter_num, score=score_mean, rm_score=rm_mean_score if rm is not None else None,
                      gold_accuracy=gold_acc if gold_known else None, kl=kl, kl_coef=beta,
                      reward_total=total_reward, clip_frac=clip_f, approx_kl=approx_kl_f, entropy=rollout_entropy,
                      policy_loss=pg_l, value_loss=vf_l if critic else None,
                      value_clip_frac=vf_clip_f if critic else None, explained_variance=expl_var if critic else None,
                      advantage_mean=adv_mean, advantage_std=adv_std, push_down_share=push_down_share,
                      reply_tokens=reply_len, ended=ended_frac, trained_replies=n_train, seconds=dt,
                      rollout_seconds=t_rollout,
                      example={'prompt': batch_prompts[0]['prompt'][-1]['content'], 'reply': texts[0]})
        if master_process and (iter_num % log_interval == 0 or iter_num == max_iters):
            print(f"iter {iter_num}: score {score_mean:.3f}"
                  + (f", gold {gold_acc:.0%}" if gold_known else '')
                  + f", KL {kl:.3f} (beta {beta:.4f}), clip {clip_f:.3f}, approx KL {approx_kl_f:.4f}, "
                  f"entropy {rollout_entropy:.3f}, "
                  + (f"value loss {vf_l:.4f}, expl. var {expl_var:.2f}, " if critic else '') +
                  f"reply {reply_len:.1f} tokens, " + (f"{n_train} trained, " if group_train != 'all' else '') +
                  f"{dt:.1f} s ({t_rollout:.1f} rollout); "
                  f"{progress(iter_num, max_iters, t0, iter_start)}")
            log(record)
        if (iter_num % eval_interval == 0 or iter_num == max_iters) and master_process:
            after = evaluate(f'iter {iter_num}', val_tasks, test=iter_num == max_iters)
            save()
    if master_process:
        if max_iters == 0 or iter_num == 0:
            save()
        elapsed = time.time() - t0
        print(f"trained {iter_num} iterations in {elapsed:.1f} s; policy in {os.path.join(out_dir, 'model.pt')}")
        log({'summary': dict(mode='lora' if lora else 'full', trainable_params=n_trainable, total_params=n_params,
                             train_seconds=elapsed, config=config, final_kl_coef=kl_ctl.value),
             'before': before, 'after': after})
    if ddp:
        dist.barrier()  # every process done before the group goes (see train.py)
        dist.destroy_process_group()
