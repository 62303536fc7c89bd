"""
The arithmetic of policy-gradient RL on a language model, shared by ppo.py and its tests: advantages (a
reply's score relative to its group, GAE), PPO's clipped losses, the KL penalty and its controller, and the
rollouts (sampled replies with the log-probs of the policy that sampled them).

Tensors are (B, T-1), position t holding the action idx[:, t+1] (a reply token) chosen after seeing
idx[:, :t+1]; mask is True at the reply's positions (prompt and padding are False).
"""
import torch
import torch.nn.functional as F

from model import lora_disabled, pad_batch


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked entries; zero elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def advantage_stats(advantages, mask):
    """What the policy gradient is told, over the reply tokens: the advantages' mean and std, and the share of
    their weight that pushes down, sum |A| over the negative ones / sum |A| (0: nothing is pushed down; 0.5: as
    much down as up). A share, not a count: the tiny KL penalties of a reply that scored 0 count for little."""
    mean = masked_mean(advantages, mask)
    std = masked_mean((advantages - mean) ** 2, mask).sqrt()
    weights = advantages * mask
    return mean.item(), std.item(), ((-weights).clamp(min=0).sum() / weights.abs().sum().clamp(min=1e-12)).item()


def kl_penalty(logprobs, ref_logprobs, kl_coef):
    """The per-token reward -beta * (log pi - log ref): negative where the policy makes a token more likely
    than the supervised model did. Its expectation over the policy's samples, summed over a reply, is
    -beta * KL(pi || ref)."""
    return -kl_coef * (logprobs - ref_logprobs)


def leave_one_out(scores, group_size):
    """Each score minus the mean of the other scores in its group (consecutive runs of group_size replies
    to the same prompt). The baseline does not depend on the reply itself, so the policy gradient stays
    unbiased; it removes what the prompt alone explains (easy or hopeless)."""
    g = scores.view(-1, group_size)
    return (g - (g.sum(1, keepdim=True) - g) / (group_size - 1)).view(-1)


def group_advantages(scores, group_size, baseline='leave_one_out', scale_by_std=False, eps=1e-4, weights=None):
    """Group-relative scores, for consecutive runs of group_size replies to the same prompt:
        'leave_one_out' (RLOO, Ahmadian et al. 2024):  s_i - mean_{j != i} s_j  =  k / (k - 1) (s_i - mean_j s_j)
        'mean' (GRPO, Shao et al. 2024; Dr. GRPO):     s_i - mean_j s_j
        'least_noise':                                 s_i - sum_{j != i} s_j q_j / sum_{j != i} q_j
        'none':                                        s_i (a control: groups, no baseline)
    and with scale_by_std, divided by the group's (sample) std + eps, as GRPO does. The baselines differ only in
    scale (RLOO's leaves the gradient unbiased); the std makes a nearly-all-right group as loud as a half-right one.
    'least_noise' weighs the other replies' scores by weights q (a reply's squared gradient length, or a proxy for
    it): the constant baseline of least variance is E[s |g|^2] / E[|g|^2] (Greensmith et al. 2004), so replies with
    long gradients (unlikely ones: often the wrong ones) pull it towards their score and are pushed less; leaving
    reply i out keeps the gradient unbiased."""
    g = scores.view(-1, group_size)
    if baseline == 'none':  # the control: the same groups of replies, no baseline
        return scores
    if baseline == 'least_noise':
        q = weights.view(-1, group_size).to(g.dtype)
        others_s, others_q = (g * q).sum(1, keepdim=True) - g * q, q.sum(1, keepdim=True) - q
        centred = g - others_s / others_q.clamp(min=1e-8)
    else:
        centred = leave_one_out(scores, group_size).view(-1, group_size) if baseline == 'leave_one_out' \
            else g - g.mean(1, keepdim=True)
    if scale_by_std:
        centred = centred / (g.std(1, keepdim=True) + eps)
    return centred.view(-1)


def prefix_advantages(actions, scores, group_size):
    """Token-level credit from a group's replies to one prompt, read as a tree of prefixes: the value of a
    prefix is the mean score of the group's replies that begin with it, and each token's advantage is what it
    changed, A_t = V(y_1..y_t) - V(y_1..y_t-1). Tokens where the replies agree get nothing, and the token where a
    reply leaves its group's right answers takes the blame. Summed over a reply the credit telescopes to
    V(reply) - V(empty prefix): the reply's score minus its group's mean (GRPO's advantage), when no other
    reply in the group is the same. actions: one list of token ids per reply (consecutive runs of group_size
    replies to the same prompt); scores: (B,). Returns one list of advantages per reply, one per action."""
    out = []
    for g in range(0, len(actions), group_size):
        replies, group_scores = actions[g:g + group_size], scores[g:g + group_size].tolist()
        total, count = {}, {}
        for reply, s in zip(replies, group_scores):
            for t in range(len(reply) + 1):
                key = tuple(reply[:t])
                total[key], count[key] = total.get(key, 0.0) + s, count.get(key, 0) + 1
        for reply in replies:
            v = [total[tuple(reply[:t])] / count[tuple(reply[:t])] for t in range(len(reply) + 1)]
            out.append([v[t + 1] - v[t] for t in range(len(reply))])
    return out


def sample_pairs(advantages, group_size, generator=None):
    """One reply above its group's baseline and one below, from each group that has both, for the policy
    gradient at 2/k of its cost. With the group's mean as the baseline, sum_i A_i grad log pi(y_i) =
    S (E_+[grad log pi(y+)] - E_-[grad log pi(y-)]), S = sum of the positive A_i = minus the sum of the negative
    ones, where y+ is drawn among the replies above the mean with probability A_i / S and y- among those below
    with |A_i| / S. So y+ trained with advantage S and y- with -S is an unbiased estimate of the whole group's
    gradient (for 0/1 scores: one right and one wrong reply at random, S = right x wrong / k). A group whose
    replies all score the same has no pair and costs nothing. Returns (rows, advantages): the chosen replies'
    indices (pairs in turn: above, below) and their advantages +S, -S (for other baselines +S+ and -S-)."""
    g = advantages.view(-1, group_size).float()
    up, down = g.clamp(min=0), (-g).clamp(min=0)
    has_pair = (up.sum(1) > 0) & (down.sum(1) > 0)
    if not has_pair.any():
        return torch.zeros(0, dtype=torch.long, device=advantages.device), advantages.new_zeros(0)
    up, down = up[has_pair], down[has_pair]
    pick_up = torch.multinomial(up.cpu(), 1, generator=generator).squeeze(1).to(g.device)  # a CPU generator
    pick_down = torch.multinomial(down.cpu(), 1, generator=generator).squeeze(1).to(g.device)
    base = has_pair.nonzero().squeeze(1) * group_size
    rows = torch.stack([base + pick_up, base + pick_down], 1).view(-1)
    weights = torch.stack([up.sum(1), -down.sum(1)], 1).view(-1).to(advantages.dtype)
    return rows, weights


def place_on_mask(values, mask):
    """(B, T-1) tensor holding row i's list of values at row i's masked positions, in order; zero elsewhere."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for i, v in enumerate(values):
        pos = mask[i].nonzero().squeeze(1)
        out[i, pos] = torch.tensor(v, dtype=torch.float32, device=mask.device)
    return out


def weigh_down_pushes(advantages, down_weight):
    """Negative advantages (the pushes down) multiplied by down_weight, positive ones kept: 1 is the policy
    gradient as it is, 0 pushes nothing down (biased: both are the maths only at 1)."""
    return torch.where(advantages < 0, down_weight * advantages, advantages)


def token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """Per-token rewards: the KL penalty on every reply token, plus the reply's score on its last token."""
    rewards = kl_penalty(logprobs, ref_logprobs, kl_coef) * mask
    last = mask.size(1) - 1 - mask.flip(1).float().argmax(dim=1)  # each row's last True position
    rewards[torch.arange(mask.size(0), device=mask.device), last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded rows:
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = sum_k (gamma * lam)^k delta_{t+k},
    the reply ending after its last token (V = 0 beyond it). Returns (advantages, returns = A + V), zero off
    the mask. Zeroing rewards and values off the mask makes padding contribute nothing, and prompt positions
    come before the reply, so they never reach it (the sum only looks ahead)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.size(1)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    """PPO's clipped surrogate, to minimise: mean over reply tokens of max(-A r, -A clip(r, 1-eps, 1+eps)),
    r = pi_new / pi_old. Once r has moved eps in the direction the advantage favours, the gradient stops:
    the policy cannot go far from the one that sampled the data in one batch. Also returns the fraction
    of tokens where the clipped term was chosen and an estimate of KL(old || new), E[(r - 1) - log r]."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clip_frac.detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, clip_range_value):
    """0.5 * mean of max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -c, c): as for the
    policy, the value prediction is kept near the one made at rollout time. Also the clipped fraction."""
    v_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    err, err_clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
    return loss, masked_mean((err_clipped > err).float(), mask).detach()


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over the reply tokens: 1 is a perfect critic, 0 no better than a constant."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return (1 - var_d / var_r).item() if var_r > 0 else float('nan')


class KLController:
    """beta for the KL penalty. target = 0: fixed. Otherwise Ziegler et al. 2019's adaptive controller:
        e = clip(KL / target - 1, -0.2, 0.2),   beta <- beta * (1 + e * n / horizon)
    after each batch of n rollouts: beta grows while the KL is above target and shrinks while below."""

    def __init__(self, init, target=0.0, horizon=10000):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl, n_steps):
        if self.target > 0:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon
        return self.value


def logprobs_and_entropy(model, idx, vocab_limit=None, temperature=1.0):
    """log pi(idx[:, t+1] | idx[:, :t+1]) and the entropy of pi(. | idx[:, :t+1]) for every t: (B, T-1) each.
    vocab_limit: the distribution over the first vocab_limit tokens only, the one sampling draws from;
    temperature: pi = softmax(logits / temperature), the distribution sampling draws from."""
    logits = model.lm_head(model.hidden_states(idx[:, :-1])).float() / temperature
    if vocab_limit is not None:
        logits = logits[..., :vocab_limit]
    logp_all = F.log_softmax(logits, dim=-1)
    logprobs = torch.gather(logp_all, 2, idx[:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logprobs, entropy


def gradient_noise(model, idx, mask, weightings, vocab_limit=None, temperature=1.0):
    """How noisy a policy-gradient estimate is under several weightings of the same replies (the advantages that
    different baselines give them). With g_i the gradient of log pi(reply i) over every trainable weight and w_i a
    reply's weight, the estimate is mean_i w_i g_i. Returns, per weighting, 'signal': the squared length of that
    mean, and 'noise': the trace of the covariance of w_i g_i (mean_i w_i^2 |g_i|^2 - signal), what one reply adds
    and a batch of n divides by n; and every |g_i|^2. A baseline b leaves the expected gradient as it is and the
    noise at mean_i (R_i - b)^2 |g_i|^2 - signal: it lowers the noise only where the replies it weighs most have
    small gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    sums = {name: [torch.zeros_like(p) for p in params] for name in weightings}
    norms = []
    for i in range(idx.shape[0]):  # one reply at a time: per-reply gradients, never stored
        T = int(mask[i].nonzero().max()) + 2
        logprobs, _ = logprobs_and_entropy(model, idx[i:i + 1, :T], vocab_limit, temperature)
        grads = torch.autograd.grad((logprobs * mask[i:i + 1, :T - 1]).sum(), params)
        norms.append(sum((g.float() ** 2).sum() for g in grads))
        for name, w in weightings.items():
            for s, g in zip(sums[name], grads):
                s.add_(g, alpha=float(w[i]))
    norms, n = torch.stack(norms), idx.shape[0]
    stats = {}
    for name, w in weightings.items():
        signal = sum(((s / n).float() ** 2).sum() for s in sums[name]).item()
        stats[name] = dict(signal=signal, noise=(w.float() ** 2 * norms).mean().item() - signal)
    return stats, norms


def by_length(rows, lengths, size):
    """rows (indices into a batch) in runs of at most `size` rows of similar length, shortest first, each with
    the longest length in it: [(rows, T)]. A batch of replies to prompts of 7-21 tokens, every row padded to the
    longest, is ~45% padding; a run trimmed to its own longest row skips most of it."""
    rows = sorted(rows, key=lambda i: lengths[i])
    runs = [rows[s:s + size] for s in range(0, len(rows), size)]
    return [(run, max(lengths[i] for i in run)) for run in runs]


def rows_by_prompt(idx, rows, prompt_lengths):
    """{prompt tokens: the rows that begin with them}, in the order first seen."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(idx[r, :prompt_lengths[r]].tolist()), []).append(r)
    return groups


def by_prompt(rows, lengths, prompt_lengths, idx, size):
    """rows in runs of about `size` rows, a prompt's rows never split, runs of similar packed length (shortest
    first): [(rows, T)] as by_length gives, for pack_by_prompt."""
    groups = rows_by_prompt(idx, rows, prompt_lengths)
    packed_length = lambda g: prompt_lengths[g[0]] + sum(lengths[r] - prompt_lengths[r] - 1 for r in g)
    runs, run = [], []
    for g in sorted(groups.values(), key=packed_length):
        run += g
        if len(run) >= size:
            runs.append(run)
            run = []
    runs += [run] if run else []
    return [(run, max(lengths[r] for r in run)) for run in runs]


def pack_by_prompt(idx, rows, lengths, prompt_lengths, whole_replies=False):
    """The rows of a right-padded batch (row i: prompt_lengths[i] prompt tokens, then its reply, lengths[i] in
    all) as one sequence per distinct prompt: the prompt once, then each of its replies in turn (all but the last
    token, which only is predicted), each reply at the positions it has after the prompt alone, and an attention
    mask that lets a reply's tokens see the prompt and their own reply's earlier tokens only. The k replies
    sampled to one prompt then cost one prompt, not k (Prefix Grouper, Liu et al. 2025); every logit is the one
    the row alone gives. Returns (idx, pos, attn_mask) to run, each (n, L) or (n, 1, L, L), and (src, target),
    (len(rows), T-1) each with T the rows' longest length: the flat (n * L) position whose logits predict row
    rows[k]'s token t + 1, and that token. whole_replies=True packs each reply's last token too (a reward model
    reads its hidden state there) and adds `last`, (len(rows),): the flat position of each row's last token."""
    groups = rows_by_prompt(idx, rows, prompt_lengths)
    seqs, where = [], {}  # where[r]: (packed sequence, offset of the reply's first token minus the prompt length)
    for g, (prompt, members) in enumerate(groups.items()):
        toks, pos, owner = list(prompt), list(range(len(prompt))), [-1] * len(prompt)  # -1: the prompt
        for r in members:
            reply = idx[r, len(prompt):lengths[r] - (not whole_replies)].tolist()  # the tokens seen as context
            where[r] = (g, len(toks) - len(prompt))
            toks += reply
            pos += range(len(prompt), len(prompt) + len(reply))
            owner += [r] * len(reply)
        seqs.append((toks, pos, owner))
    L, device = max(len(s[0]) for s in seqs), idx.device
    p_idx = pad_batch([s[0] for s in seqs], 0, device)
    p_pos = pad_batch([s[1] for s in seqs], 0, device)
    owner = pad_batch([s[2] for s in seqs], -2, device)  # -2: padding, which sees the prompt and itself only
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    attn_mask = causal & ((owner[:, None, :] == -1) | (owner[:, None, :] == owner[:, :, None]))
    T = max(lengths[r] for r in rows)
    src = []
    for r in rows:
        g, shift = where[r]
        n_prompt = prompt_lengths[r]
        # position t -> its packed position: the prompt's own, then the reply's after the shift
        at = list(range(min(n_prompt, lengths[r] - 1))) + list(range(n_prompt + shift, lengths[r] - 1 + shift))
        src.append([g * L + a for a in at] + [g * L] * (T - lengths[r]))  # past the row's end: anything
    src = torch.tensor(src, dtype=torch.long, device=device)
    packed = (p_idx, p_pos, attn_mask.unsqueeze(1)), (src, idx[rows, 1:T])
    if not whole_replies:
        return packed
    last = [where[r][0] * L + lengths[r] - 1 + (where[r][1] if lengths[r] > prompt_lengths[r] else 0) for r in rows]
    return packed[0], packed[1] + (torch.tensor(last, dtype=torch.long, device=device),)


def packed_logprobs_and_entropy(model, packed, vocab_limit=None, temperature=1.0):
    """logprobs_and_entropy of the rows pack_by_prompt packed, in their own (rows, T-1) frame (past a row's end:
    whatever the padding gives; mask it)."""
    (p_idx, pos, attn_mask), (src, target) = packed
    logits = model.lm_head(model.hidden_states(p_idx, pos, attn_mask=attn_mask)).float() / temperature
    if vocab_limit is not None:
        logits = logits[..., :vocab_limit]
    logp_all = F.log_softmax(logits, dim=-1).flatten(0, 1)
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logp_all[src, target], entropy[src]


def logprobs_by_length(model, idx, lengths, vocab_limit=None, temperature=1.0, size=64, prompt_lengths=None):
    """logprobs_and_entropy of a right-padded batch (row i: lengths[i] real tokens), in runs of rows of similar
    length (by_length), each trimmed to its longest row: the same (B, T-1) tensors, 0 past a row's end, at
    about half the cost on a batch of replies (another shape may sum in another order: the last bits can differ).
    With prompt_lengths (row i's first prompt_lengths[i] tokens are its prompt), the rows that share a prompt
    run as one sequence (pack_by_prompt): a group of k replies to one prompt costs its prompt once."""
    logprobs = torch.zeros(idx.shape[0], idx.shape[1] - 1, device=idx.device)
    entropy = torch.zeros_like(logprobs)
    if prompt_lengths is None:
        runs = by_length(range(idx.shape[0]), lengths, size)
    else:
        runs = by_prompt(range(idx.shape[0]), lengths, prompt_lengths, idx, size)
    for rows, T in runs:
        if prompt_lengths is None:
            lp, ent = logprobs_and_entropy(model, idx[rows, :T], vocab_limit, temperature)
        else:
            lp, ent = packed_logprobs_and_entropy(model, pack_by_prompt(idx, rows, lengths, prompt_lengths),
                                                  vocab_limit, temperature)
        logprobs[rows, :T - 1], entropy[rows, :T - 1] = lp.float(), ent.float()
    real = torch.arange(idx.shape[1] - 1, device=idx.device) < torch.tensor(lengths, device=idx.device)[:, None] - 1
    return logprobs * real, entropy * real


@torch.no_grad()
def reference_logprobs(policy, ref_model, idx, vocab_limit=None, temperature=1.0, lengths=None,
                       prompt_lengths=None):
    """Log-probs under the frozen supervised model (at the same temperature as the policy): ref_model if there
    is one (full training), else the policy with its LoRA adapters switched off. With each row's length, in
    runs of similar length (logprobs_by_length), and with its prompt's length too, a shared prompt run once."""
    def logprobs(model):
        if lengths is None:
            return logprobs_and_entropy(model, idx, vocab_limit, temperature)[0]
        return logprobs_by_length(model, idx, lengths, vocab_limit, temperature, prompt_lengths=prompt_lengths)[0]
    if ref_model is not None:
        return logprobs(ref_model)
    with lora_disabled(policy):
        return logprobs(policy)


@torch.no_grad()
def rollout(policy, prompts, max_new_tokens, end_token, generator=None, vocab_limit=None, temperature=1.0):
    """One reply per prompt (lists of token ids) sampled at `temperature` with the KV cache, stopping at
    end_token; the batch PPO trains on:
      idx (B, T): prompt + reply (+ end_token if it stopped), right-padded with 0
      mask (B, T-1): True at t where idx[:, t+1] is a reply token: the actions
      logprobs, entropy (B, T-1): of the policy that sampled them (a forward pass over idx: logprobs_by_length)
      replies: the reply tokens without end_token; ended: whether each reply stopped by itself;
      lengths, prompt_lengths: each row's tokens, and its prompt's. Where a prompt appears more than once (k replies
      to each), the log-probs pass runs each prompt once (pack_by_prompt)."""
    was_training = policy.training
    policy.eval()
    device = policy.lm_head.weight.device
    replies = policy.generate(prompts, max_new_tokens, temperature=temperature, stop_token=end_token,
                              generator=generator, vocab_limit=vocab_limit)
    seqs, masks, ended = [], [], []
    for p, r in zip(prompts, replies):
        stopped = len(r) < max_new_tokens  # generate drops the stop token itself
        actions = r + [end_token] if stopped else r
        seqs.append(list(p) + actions)
        masks.append([False] * (len(p) - 1) + [True] * len(actions))
        ended.append(stopped)
    idx = pad_batch(seqs, 0, device)
    mask = pad_batch(masks, 0, device).bool()
    lengths, prompt_lengths = [len(s) for s in seqs], [len(p) for p in prompts]
    shared = len(set(map(tuple, prompts))) < len(prompts)
    logprobs, entropy = logprobs_by_length(policy, idx, lengths, vocab_limit, temperature,
                                           prompt_lengths=prompt_lengths if shared else None)
    policy.train(was_training)
    return dict(idx=idx, mask=mask, logprobs=logprobs, entropy=entropy, replies=replies, ended=ended,
                lengths=lengths, prompt_lengths=prompt_lengths, shared_prompts=shared)


@torch.no_grad()
def sampled_kl(policy, ref_model, prompts, max_new_tokens, end_token, generator=None, vocab_limit=None,
               batch_size=64):
    """KL(policy || ref) per reply, the one estimator the report card uses for every model: one reply sampled
    from the policy at temperature 1 for each prompt (token ids), E_y[log pi(y) - log ref(y)] as the mean over
    them of the log-ratio summed over the reply's tokens (with <|end|> where it stopped). ref_model None: the
    policy with its LoRA adapters off (reference_logprobs)."""
    kls = []
    for i in range(0, len(prompts), batch_size):
        ro = rollout(policy, prompts[i:i + batch_size], max_new_tokens, end_token, generator, vocab_limit)
        ref = reference_logprobs(policy, ref_model, ro['idx'], vocab_limit, lengths=ro['lengths'])
        kls.append(((ro['logprobs'].float() - ref.float()) * ro['mask']).sum(1))
    return torch.cat(kls).mean().item() if kls else 0.0
