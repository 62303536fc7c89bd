"""ppo.py and rl.py against references: GAE against a loop written from its definition, the clipped objectives and
the value loss against hand-computed numbers, the KL penalty's sign and size (against an exact KL), the
adaptive controller's formula, rollout log-probs against a fresh forward pass per row, a tiny problem
where PPO must raise the reward, and the script end to end on a toy task it must learn."""
import copy
import json
import math
import random
import statistics

import pytest
import torch

import model as M
import tasks as T
import tokenizer as TK
from conftest import error_line, read_metrics, run
from plots import compare_runs
from ppo import ValueModel
from rl import (KLController, advantage_stats, by_length, by_prompt, explained_variance, gae, gradient_noise,
                group_advantages, kl_penalty, leave_one_out, logprobs_and_entropy, logprobs_by_length, masked_mean,
                masked_whiten, pack_by_prompt, packed_logprobs_and_entropy, place_on_mask, policy_loss,
                prefix_advantages, reference_logprobs, rollout, sample_pairs, token_rewards, value_loss,
                weigh_down_pushes)
from test_dpo import tiny_gpt, write_jsonl


# -----------------------------------------------------------------------------
# GAE

def gae_reference(rewards, values, gamma, lam):
    """One reply, plain Python, straight from the definition: delta_t = r_t + gamma V_{t+1} - V_t with V = 0
    after the last token, A_t = sum_k (gamma lam)^k delta_{t+k}."""
    n = len(rewards)
    v = list(values) + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(n)]
    adv = [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]
    return adv, [a + vt for a, vt in zip(adv, values)]


@pytest.mark.parametrize('gamma,lam', [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)])
def test_gae_matches_its_definition(gamma, lam):
    g = torch.Generator().manual_seed(0)
    # rows = (prompt positions, reply length): the reply sits after the prompt, padding after the reply
    rows = [(3, 5), (1, 1), (6, 2), (2, 8)]
    T = max(p + n for p, n in rows) + 2
    rewards = torch.randn(len(rows), T, generator=g, dtype=torch.float64)
    values = torch.randn(len(rows), T, generator=g, dtype=torch.float64)
    mask = torch.zeros(len(rows), T, dtype=torch.float64)
    for i, (p, n) in enumerate(rows):
        mask[i, p:p + n] = 1
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i, (p, n) in enumerate(rows):
        ref_adv, ref_ret = gae_reference(rewards[i, p:p + n].tolist(), values[i, p:p + n].tolist(), gamma, lam)
        assert adv[i, p:p + n].tolist() == pytest.approx(ref_adv, rel=1e-12, abs=1e-12)
        assert ret[i, p:p + n].tolist() == pytest.approx(ref_ret, rel=1e-12, abs=1e-12)
        # nothing outside the reply, whatever rewards and values sit there
        assert adv[i, :p].abs().sum() == 0 and adv[i, p + n:].abs().sum() == 0 and ret[i, p + n:].abs().sum() == 0


def test_gae_special_cases_by_hand():
    # lam = 1, gamma = 1: the advantage is the sum of the rewards still to come minus the value
    r, v, m = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 0.25, 4.0]]), torch.ones(1, 3)
    adv, ret = gae(r, v, m, 1.0, 1.0)
    assert adv.tolist() == [[6.0 - 0.5, 5.0 - 0.25, 3.0 - 4.0]] and ret.tolist() == [[6.0, 5.0, 3.0]]
    # lam = 0: one-step TD errors
    adv, _ = gae(r, v, m, 0.5, 0.0)
    assert adv[0].tolist() == pytest.approx([1 + 0.5 * 0.25 - 0.5, 2 + 0.5 * 4.0 - 0.25, 3 - 4.0])


# -----------------------------------------------------------------------------
# the losses, against hand-computed numbers

def test_policy_loss_by_hand():
    # four reply tokens and one masked-out position (which must not count, however extreme)
    log_ratio = [0.3, -0.5, 0.1, 0.25, 5.0]
    adv = [2.0, -1.0, 1.0, -2.0, 100.0]
    m = [1.0, 1.0, 1.0, 1.0, 0.0]
    old = [-1.0, -2.0, -0.5, -3.0, -1.0]
    new = torch.tensor([o + d for o, d in zip(old, log_ratio)], dtype=torch.float64, requires_grad=True)
    loss, clip_frac, approx_kl = policy_loss(new, torch.tensor(old, dtype=torch.float64),
                                             torch.tensor(adv, dtype=torch.float64), torch.tensor(m), 0.2)
    # token 0: r = e^0.3 = 1.34986 > 1.2 with A > 0: clipped, -2 * 1.2 = -2.4
    # token 1: r = e^-0.5 = 0.60653 < 0.8 with A < 0: clipped, 1 * 0.8 = 0.8
    # token 2: r = e^0.1 = 1.10517 inside [0.8, 1.2]: -1.10517
    # token 3: r = e^0.25 = 1.28403 > 1.2 but A < 0 (the ratio moved the wrong way): not clipped, 2 * 1.28403
    per_token = [-2.4, 0.8, -1.1051709180756477, 2.568050833375483]
    assert loss.item() == pytest.approx(sum(per_token) / 4, rel=1e-12)
    assert clip_frac.item() == pytest.approx(0.5)
    kl_terms = [math.exp(d) - 1 - d for d in log_ratio[:4]]
    assert approx_kl.item() == pytest.approx(sum(kl_terms) / 4, rel=1e-12)
    # the gradient: zero where clipped (and masked), -A r / n where not
    loss.backward()
    assert new.grad.tolist() == pytest.approx([0.0, 0.0, -1.0 * math.exp(0.1) / 4, 2.0 * math.exp(0.25) / 4, 0.0],
                                              rel=1e-12, abs=1e-15)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    adv = torch.tensor([[0.5, -1.5, 2.0]])
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    loss, clip_frac, approx_kl = policy_loss(lp, lp, adv, torch.ones(1, 3), 0.2)
    assert loss.item() == pytest.approx(-1.0 / 3) and clip_frac == 0 and approx_kl == 0


def test_value_loss_by_hand():
    values = torch.tensor([1.0, 0.5, -1.0, 2.0, 9.0], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([0.5, 0.6, 0.0, 1.9, 0.0], dtype=torch.float64)
    returns = torch.tensor([2.0, 0.0, 0.5, 1.0, 0.0], dtype=torch.float64)
    m = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    loss, clip_frac = value_loss(values, old, returns, m, 0.2)
    # token 0: V moved 0.5 up, clipped to 0.7: (1 - 2)^2 = 1 vs (0.7 - 2)^2 = 1.69 -> 1.69 (clipped, worse)
    # token 1: V moved 0.1 down, within the clip: (0.5 - 0)^2 = 0.25 both
    # token 2: V moved 1 down, clipped to -0.2: (-1 - 0.5)^2 = 2.25 vs (-0.2 - 0.5)^2 = 0.49 -> 2.25 (unclipped)
    # token 3: V moved 0.1 up: (2 - 1)^2 = 1 both
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.25 + 2.25 + 1.0) / 4, rel=1e-12)
    assert clip_frac.item() == pytest.approx(0.25)
    loss.backward()  # no gradient where the clipped error was the larger: token 0; masked: token 4
    assert values.grad.tolist() == pytest.approx([0.0, 0.5 * 2 * 0.5 / 4, 0.5 * 2 * -1.5 / 4, 0.5 * 2 * 1.0 / 4, 0.0],
                                                 rel=1e-12, abs=1e-15)


def test_explained_variance_and_whitening_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(returns.clone(), returns, m) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 7.0), returns, m) == pytest.approx(0.0)
    # values [1, 1, 1]: residuals [0, 1, 2], variance 2/3 of returns' 2/3 -> 0; values [2, 2, 2] the same
    assert explained_variance(torch.tensor([[1.0, 2.5, 2.5, 0.0]]), returns, m) == pytest.approx(1 - (1 / 6) / (2 / 3))
    w = masked_whiten(returns, m)
    assert w.tolist()[0] == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5), 0.0], rel=1e-6)
    assert masked_mean(returns, m).item() == 2.0


def test_advantage_stats_by_hand():
    # reply tokens -1, 0, 2, 3 (the padding's -50 does not count): mean 1, variance (4 + 1 + 1 + 4) / 4, and of
    # the weight |-1| + |2| + |3| = 6 the part 1 pushes down
    adv = torch.tensor([[-1.0, 0.0, -50.0], [2.0, 3.0, -50.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    mean, std, down = advantage_stats(adv, m)
    assert mean == pytest.approx(1.0) and std == pytest.approx(math.sqrt(2.5)) and down == pytest.approx(1 / 6)
    assert advantage_stats(torch.zeros(2, 3), m)[2] == 0.0


# -----------------------------------------------------------------------------
# the KL penalty and beta

def test_kl_penalty_sign_and_size():
    logp = torch.tensor([math.log(0.5), math.log(0.1), math.log(0.3)])
    ref = torch.tensor([math.log(0.25), math.log(0.2), math.log(0.3)])
    pen = kl_penalty(logp, ref, 0.1)
    # more likely than under the supervised model: a negative reward of beta * log(0.5 / 0.25)
    assert pen.tolist() == pytest.approx([-0.1 * math.log(2), 0.1 * math.log(2), 0.0], rel=1e-6, abs=1e-9)
    assert kl_penalty(logp, ref, 0.0).abs().sum() == 0
    # its mean over the policy's own samples is -beta * KL(pi || ref), the exact sum over the vocabulary
    g = torch.Generator().manual_seed(0)
    pi = torch.softmax(torch.randn(12, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(12, generator=g, dtype=torch.float64), 0)
    kl_exact = (pi * (pi.log() - q.log())).sum().item()
    y = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    mean_pen = kl_penalty(pi.log()[y], q.log()[y], 0.2).mean().item()
    assert kl_exact > 0.05 and mean_pen == pytest.approx(-0.2 * kl_exact, rel=0.03)


def test_token_rewards_put_the_score_on_the_last_reply_token():
    logp = torch.tensor([[0.0, -1.0, -2.0, -1.0, 0.0], [0.0, -0.5, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -2.0, -1.0, -1.5, 0.0], [0.0, -1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    r = token_rewards(torch.tensor([3.0, -1.0]), logp, ref, mask, 0.5)
    assert r[0].tolist() == pytest.approx([0.0, -0.5, 0.5, -0.25 + 3.0, 0.0])
    assert r[1].tolist() == pytest.approx([0.0, -0.25 - 1.0, 0.0, 0.0, 0.0])


def test_adaptive_kl_controller_follows_ziegler():
    fixed = KLController(0.1)
    assert fixed.update(50.0, 64) == 0.1
    ctl = KLController(0.1, target=2.0, horizon=1000)
    assert ctl.update(2.2, 64) == pytest.approx(0.1 * (1 + 0.1 * 64 / 1000))          # 10% above: grows
    b = ctl.value
    assert ctl.update(20.0, 64) == pytest.approx(b * (1 + 0.2 * 64 / 1000))           # error clipped at +0.2
    b = ctl.value
    assert ctl.update(0.0, 100) == pytest.approx(b * (1 - 0.2 * 100 / 1000))          # and at -0.2
    # it steers: a KL that falls as beta rises settles near the target
    ctl = KLController(0.01, target=2.0, horizon=200)
    for _ in range(400):
        ctl.update(0.05 / ctl.value, 64)  # toy world: KL = 0.05 / beta
    assert 0.05 / ctl.value == pytest.approx(2.0, rel=0.05)


# -----------------------------------------------------------------------------
# rollouts and the reference

def lora_policy(seed, adapter_std, **kw):
    """tiny_gpt with LoRA adapters (r = 4) whose B matrices are not zero: a policy that is not its reference."""
    policy = tiny_gpt(seed=seed, **kw)
    M.apply_lora(policy, rank=4, alpha=8.0)
    with torch.no_grad():
        for layer in M.lora_layers(policy):
            layer.lora_B.normal_(0, adapter_std)
    return policy


def test_rollout_logprobs_equal_a_fresh_forward_pass(tokenizer):
    policy = lora_policy(3, 0.2)
    end = T.chat_ids(tokenizer)[2]
    prompts = [T.render_prompt([{'role': 'user', 'content': t}], tokenizer) for t in ('Hi', 'Reverse: a b c', 'x')]
    ro = rollout(policy, prompts, 12, end, torch.Generator().manual_seed(5), vocab_limit=None)
    # the same tokens the KV-cached generator draws with the same seed
    again = policy.generate(prompts, 12, temperature=1.0, stop_token=end, generator=torch.Generator().manual_seed(5))
    assert ro['replies'] == again
    base = tiny_gpt(seed=3).eval()  # the supervised weights, without adapters
    ref = reference_logprobs(policy, None, ro['idx'])
    for i, (p, r) in enumerate(zip(prompts, ro['replies'])):
        actions = r + [end] if ro['ended'][i] else r
        assert ro['ended'][i] == (len(r) < 12)
        n = len(p) + len(actions)
        assert ro['idx'][i, :n].tolist() == p + actions and ro['lengths'][i] == n
        assert ro['mask'][i].tolist() == [False] * (len(p) - 1) + [True] * len(actions) + [False] * (ro['idx'].size(1) - n)
        alone = torch.tensor([p + actions])
        with torch.no_grad():
            fresh = M.token_logprobs(policy, alone)[0]
            fresh_ref = M.token_logprobs(base, alone)[0]
        assert torch.allclose(ro['logprobs'][i, :n - 1], fresh, atol=1e-5)
        assert torch.allclose(ref[i, :n - 1], fresh_ref, atol=1e-5)
        assert (ro['logprobs'][i, len(p) - 1:n - 1] - ref[i, len(p) - 1:n - 1]).abs().max() > 1e-3
    assert all(layer.enabled for layer in M.lora_layers(policy))


def real_positions(lengths, T):
    """(B, T-1): True at the positions of each row's own tokens (t < length - 1), False in its padding."""
    return torch.arange(T - 1)[None, :] < torch.tensor(lengths)[:, None] - 1


def test_by_length_runs_rows_of_similar_length_and_loses_none():
    lengths = [9, 3, 14, 3, 7, 12, 5, 9, 1, 20, 4]
    rows = [0, 2, 3, 5, 6, 7, 8, 10]  # a minibatch: a subset of the batch, in any order
    runs = by_length(rows, lengths, 3)
    assert sorted(i for run, _ in runs for i in run) == sorted(rows)  # every row once
    assert [len(run) for run, _ in runs] == [3, 3, 2]
    flat = [lengths[i] for run, _ in runs for i in run]
    assert flat == sorted(flat)  # shortest first: each run's rows as alike in length as runs of 3 can be
    assert [T for _, T in runs] == [max(lengths[i] for i in run) for run, _ in runs] == [4, 9, 14]
    assert by_length([], lengths, 3) == []


def test_logprobs_by_length_equal_one_pass_over_the_padded_batch():
    """The reference: logprobs_and_entropy over the whole right-padded batch. In runs of similar length each row's
    own positions get the same numbers (to float rounding: a shorter shape sums in another order); its padding 0."""
    policy = tiny_gpt(seed=4).eval()
    g = torch.Generator().manual_seed(1)
    lengths = [int(n) for n in torch.randint(2, 20, (13,), generator=g)]
    idx = M.pad_batch([torch.randint(0, 250, (n,), generator=g).tolist() for n in lengths])
    with torch.no_grad():
        whole_lp, whole_ent = logprobs_and_entropy(policy, idx, temperature=0.7)
        lp, ent = logprobs_by_length(policy, idx, lengths, temperature=0.7, size=4)
    real = real_positions(lengths, idx.size(1))
    assert torch.allclose(lp[real], whole_lp[real], atol=1e-5)
    assert torch.allclose(ent[real], whole_ent[real], atol=1e-5)
    assert lp[~real].abs().sum() == 0 and ent[~real].abs().sum() == 0


def test_minibatch_in_runs_weighted_by_tokens_has_the_whole_minibatchs_gradient():
    """ppo.py's training step: a minibatch's rows in runs of similar length (by_length), each run trimmed to its
    longest row and its losses weighted by its share of the minibatch's reply tokens. Reference: the clipped loss
    over the whole padded minibatch at once; the gradient must be the same."""
    policy = lora_policy(6, 0.1)
    policy.eval()
    g = torch.Generator().manual_seed(2)
    prompt_lengths = [int(n) for n in torch.randint(2, 12, (10,), generator=g)]
    reply_lengths = [int(n) for n in torch.randint(1, 8, (10,), generator=g)]
    lengths = [p + r for p, r in zip(prompt_lengths, reply_lengths)]
    idx = M.pad_batch([torch.randint(0, 250, (n,), generator=g).tolist() for n in lengths])
    mask = torch.zeros(10, idx.size(1) - 1)
    for i, (p, r) in enumerate(zip(prompt_lengths, reply_lengths)):
        mask[i, p - 1:p - 1 + r] = 1
    with torch.no_grad():
        old = logprobs_and_entropy(policy, idx)[0] + 0.1 * torch.randn(mask.shape, generator=g)  # ratios off 1
    advantages = torch.randn(mask.shape, generator=g)
    params = [p for p in policy.parameters() if p.requires_grad]
    mb = [7, 2, 9, 0, 4, 5, 1]

    T = max(lengths[i] for i in mb)
    loss, _, _ = policy_loss(logprobs_and_entropy(policy, idx[mb, :T])[0], old[mb, :T - 1], advantages[mb, :T - 1],
                             mask[mb, :T - 1], 0.2)
    whole = torch.autograd.grad(loss, params)

    total = 0
    n_tokens = mask[mb].sum()
    for rows, T in by_length(mb, lengths, 3):
        run_mask = mask[rows, :T - 1]
        run_loss, _, _ = policy_loss(logprobs_and_entropy(policy, idx[rows, :T])[0], old[rows, :T - 1],
                                     advantages[rows, :T - 1], run_mask, 0.2)
        total = total + run_loss * run_mask.sum() / n_tokens
    in_runs = torch.autograd.grad(total, params)
    assert torch.allclose(total, loss, atol=1e-6)
    for a, b in zip(in_runs, whole):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def grouped_batch(g, n_prompts=4, group=3, vocab=250):
    """Rows of a group run: each of n_prompts prompts (2-11 tokens) `group` times, each row with its own reply of
    1-7 tokens (a reply of one token is only a target), right-padded; the rows of one prompt are not adjacent."""
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 12, (n_prompts,), generator=g)]
    seqs = [p + torch.randint(0, vocab, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
            for _ in range(group) for p in prompts]
    prompt_lengths = [len(p) for _ in range(group) for p in prompts]
    return M.pad_batch(seqs), [len(s) for s in seqs], prompt_lengths


@pytest.mark.parametrize('pos_emb', ['learned', 'rope'])
def test_packed_prompts_give_each_row_its_own_logprobs(pos_emb):
    """pack_by_prompt runs a prompt once and its replies after it, each seeing the prompt and itself only.
    Reference: logprobs_and_entropy over the whole right-padded batch, every row with its own copy of the prompt."""
    policy = tiny_gpt(seed=4, pos_emb=pos_emb).eval()
    g = torch.Generator().manual_seed(3)
    idx, lengths, prompt_lengths = grouped_batch(g)
    with torch.no_grad():
        whole_lp, whole_ent = logprobs_and_entropy(policy, idx, temperature=0.7)
        rows = [5, 0, 11, 3, 8, 2, 9]  # a minibatch: some of each prompt's rows, in any order
        (p_idx, _, _), _ = packed = pack_by_prompt(idx, rows, lengths, prompt_lengths)
        lp, ent = packed_logprobs_and_entropy(policy, packed, temperature=0.7)
        by_prompt_lp, by_prompt_ent = logprobs_by_length(policy, idx, lengths, temperature=0.7, size=5,
                                                         prompt_lengths=prompt_lengths)
    assert p_idx.size(0) == len({tuple(idx[r, :prompt_lengths[r]].tolist()) for r in rows})  # a sequence a prompt
    assert p_idx.numel() < sum(lengths[r] for r in rows)  # fewer tokens than the rows: the prompts run once
    T = max(lengths[r] for r in rows)
    real = real_positions([lengths[r] for r in rows], T)
    assert torch.allclose(lp[real], whole_lp[rows, :T - 1][real], atol=1e-5)
    assert torch.allclose(ent[real], whole_ent[rows, :T - 1][real], atol=1e-5)
    real = real_positions(lengths, idx.size(1))
    assert torch.allclose(by_prompt_lp[real], whole_lp[real], atol=1e-5)
    assert torch.allclose(by_prompt_ent[real], whole_ent[real], atol=1e-5)
    assert by_prompt_lp[~real].abs().sum() == 0


def test_by_prompt_keeps_a_prompts_rows_together_and_loses_none():
    g = torch.Generator().manual_seed(5)
    idx, lengths, prompt_lengths = grouped_batch(g, n_prompts=6, group=4)
    rows = list(range(0, 24, 2)) + [1, 7]
    runs = by_prompt(rows, lengths, prompt_lengths, idx, 5)
    assert sorted(r for run, _ in runs for r in run) == sorted(rows)  # every row once
    prompt = lambda r: tuple(idx[r, :prompt_lengths[r]].tolist())
    for run, T in runs:
        assert T == max(lengths[r] for r in run)
        others = {prompt(r) for other, _ in runs if other is not run for r in other}
        assert not {prompt(r) for r in run} & others  # a prompt's rows all in one run
    assert all(len(run) >= 5 for run, _ in runs[:-1])


def test_packed_minibatch_has_the_whole_minibatchs_gradient():
    """ppo.py's training step on shared prompts: the clipped loss over packed runs (by_prompt, pack_by_prompt),
    each weighted by its share of the reply tokens, against the loss over the whole padded minibatch."""
    policy = lora_policy(6, 0.1, pos_emb='rope')
    policy.eval()
    g = torch.Generator().manual_seed(2)
    idx, lengths, prompt_lengths = grouped_batch(g, n_prompts=4, group=4)
    mask = torch.zeros(len(lengths), idx.size(1) - 1)
    for i, (p, n) in enumerate(zip(prompt_lengths, lengths)):
        mask[i, p - 1:n - 1] = 1
    with torch.no_grad():
        old = logprobs_and_entropy(policy, idx)[0] + 0.1 * torch.randn(mask.shape, generator=g)  # ratios off 1
    advantages = torch.randn(mask.shape, generator=g)
    params = [p for p in policy.parameters() if p.requires_grad]
    mb = [7, 2, 9, 0, 4, 5, 1, 13, 15, 11]

    T = max(lengths[i] for i in mb)
    loss, _, _ = policy_loss(logprobs_and_entropy(policy, idx[mb, :T])[0], old[mb, :T - 1], advantages[mb, :T - 1],
                             mask[mb, :T - 1], 0.2)
    whole = torch.autograd.grad(loss, params)

    total = 0
    for rows, T in by_prompt(mb, lengths, prompt_lengths, idx, 5):
        run_mask = mask[rows, :T - 1]
        logprobs, _ = packed_logprobs_and_entropy(policy, pack_by_prompt(idx, rows, lengths, prompt_lengths))
        run_loss, _, _ = policy_loss(logprobs, old[rows, :T - 1], advantages[rows, :T - 1], run_mask, 0.2)
        total = total + run_loss * run_mask.sum() / mask[mb].sum()
    packed = torch.autograd.grad(total, params)
    assert torch.allclose(total, loss, atol=1e-6)
    for a, b in zip(packed, whole):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_rollout_of_groups_runs_each_prompt_once_and_gets_each_rows_logprobs(tokenizer):
    policy = lora_policy(3, 0.2)
    end = T.chat_ids(tokenizer)[2]
    prompts = [T.render_prompt([{'role': 'user', 'content': t}], tokenizer) for t in ('Hi', 'Reverse: a b c')] * 4
    ro = rollout(policy, prompts, 8, end, torch.Generator().manual_seed(5))
    assert ro['shared_prompts'] and ro['prompt_lengths'] == [len(p) for p in prompts]
    ref = reference_logprobs(policy, None, ro['idx'], lengths=ro['lengths'], prompt_lengths=ro['prompt_lengths'])
    base = tiny_gpt(seed=3).eval()
    for i, n in enumerate(ro['lengths']):
        alone = ro['idx'][i:i + 1, :n]
        with torch.no_grad():
            assert torch.allclose(ro['logprobs'][i, :n - 1], M.token_logprobs(policy, alone)[0], atol=1e-5)
            assert torch.allclose(ref[i, :n - 1], M.token_logprobs(base, alone)[0], atol=1e-5)
        assert ro['logprobs'][i, n - 1:].abs().sum() == 0 and ref[i, n - 1:].abs().sum() == 0


def test_rollout_with_vocab_limit_samples_and_scores_the_limited_distribution():
    policy = tiny_gpt(seed=4).eval()
    ro = rollout(policy, [[1, 2, 3]] * 8, 10, end_token=250, generator=torch.Generator().manual_seed(0), vocab_limit=251)
    assert max(max(r, default=0) for r in ro['replies']) < 251
    with torch.no_grad():
        logits = policy.lm_head(policy.hidden_states(ro['idx'][:, :-1]))[..., :251]
        expected = torch.log_softmax(logits, -1).gather(2, ro['idx'][:, 1:, None]).squeeze(-1)
    real = real_positions(ro['lengths'], ro['idx'].size(1))
    assert torch.allclose(ro['logprobs'][real], expected[real], atol=1e-5)
    p = torch.softmax(logits, -1)
    assert torch.allclose(ro['entropy'][real], -(p * p.log()).sum(-1)[real], atol=1e-4)


def test_rollout_at_a_temperature_scores_the_tempered_distribution_it_samples():
    """With temperature T the policy is softmax(logits / T): the rollout draws the generator's tokens at T,
    and its log-probs, entropy and the reference's log-probs are all of the tempered distributions."""
    policy = tiny_gpt(seed=4).eval()
    prompts = [[1, 2, 3], [4, 5]] * 4
    ro = rollout(policy, prompts, 10, end_token=250, generator=torch.Generator().manual_seed(0), temperature=0.5)
    again = policy.generate(prompts, 10, temperature=0.5, stop_token=250, generator=torch.Generator().manual_seed(0))
    assert ro['replies'] == again
    with torch.no_grad():
        logits = policy.lm_head(policy.hidden_states(ro['idx'][:, :-1])) / 0.5
    expected = torch.log_softmax(logits, -1).gather(2, ro['idx'][:, 1:, None]).squeeze(-1)
    real = real_positions(ro['lengths'], ro['idx'].size(1))
    assert torch.allclose(ro['logprobs'][real], expected[real], atol=1e-5)
    p = torch.softmax(logits, -1)
    assert torch.allclose(ro['entropy'][real], -(p * p.log()).sum(-1)[real], atol=1e-4)
    ref = reference_logprobs(policy, copy.deepcopy(policy), ro['idx'], temperature=0.5)
    assert torch.allclose(ref, expected, atol=1e-5)
    ref = reference_logprobs(policy, copy.deepcopy(policy), ro['idx'], temperature=0.5, lengths=ro['lengths'])
    assert torch.allclose(ref[real], expected[real], atol=1e-5)


def test_value_model_loads_a_reward_model_and_reads_every_position():
    from reward import RewardModel, score_ids
    rm = RewardModel(tiny_gpt(seed=2)).eval()
    torch.nn.init.normal_(rm.head.weight)
    vm = ValueModel(tiny_gpt(seed=9))
    vm.load_state_dict(rm.state_dict())
    seqs = [[5, 6, 7, 8], [9, 10]]
    with torch.no_grad():
        v = vm(M.pad_batch(seqs))
    assert torch.allclose(torch.stack([v[0, 3], v[1, 1]]), score_ids(rm, seqs), atol=1e-5)


# -----------------------------------------------------------------------------
# a tiny problem: reward 1 for a reply that starts with token 7. A random 16-token model says it 1 time in 16.

def test_ppo_raises_the_reward_of_one_token():
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=True)
    policy = M.GPT(M.GPTConfig(**cfg))
    ref = copy.deepcopy(policy).eval()
    critic = ValueModel(M.GPT(M.GPTConfig(**cfg)))
    opt = torch.optim.Adam(list(policy.parameters()) + list(critic.parameters()), lr=1e-2)
    gen, order_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    end, target, B = 15, 7, 32
    history = []
    for it in range(15):
        prompts = [[1, 2, int(torch.randint(3, 6, (1,), generator=gen))] for _ in range(B)]
        ro = rollout(policy, prompts, 3, end, gen)
        mask = ro['mask'].float()
        scores = torch.tensor([float(r[:1] == [target]) for r in ro['replies']])
        history.append(scores.mean().item())
        with torch.no_grad():
            ref_lp = reference_logprobs(policy, ref, ro['idx'])
            old_v = critic(ro['idx'][:, :-1])
        rewards = token_rewards(scores, ro['logprobs'], ref_lp, mask, 0.01)
        adv, ret = gae(rewards, old_v, mask, 1.0, 0.95)
        adv = masked_whiten(adv, mask)
        for _ in range(2):
            for mb in torch.randperm(B, generator=order_gen).split(16):
                lp, _ = logprobs_and_entropy(policy, ro['idx'][mb])
                pl, _, _ = policy_loss(lp, ro['logprobs'][mb], adv[mb], mask[mb], 0.2)
                vl, _ = value_loss(critic(ro['idx'][mb, :-1]), old_v[mb], ret[mb], mask[mb], 0.2)
                opt.zero_grad()
                (pl + vl).backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                opt.step()
    assert sum(history[:3]) / 3 < 0.2 and sum(history[-3:]) / 3 > 0.7, history


# -----------------------------------------------------------------------------
# the script, end to end: a supervised model that answers a, b, c or d at random; the checker wants one of them

PPO_TINY = ['--device=cpu', '--batch_size=32', '--minibatch_size=16', '--ppo_epochs=2', '--max_new_tokens=4',
            '--eval_interval=100', '--log_interval=1', '--value_learning_rate=1e-3']


def toy_tasks(n, seed, answer='a'):
    rng = random.Random(seed)
    return [{'skill': 'copy', 'prompt': f"Pick a letter: {rng.randint(0, 99)}", 'answer': answer} for _ in range(n)]


@pytest.fixture(scope='module')
def toy(tmp_path_factory, tok_meta, tokenizer):
    return make_toy(tmp_path_factory.mktemp('ppo'), tok_meta, tokenizer)


def make_toy(d, tok_meta, tokenizer):
    """An "SFT" model that answers a, b, c or d at random, and data_dir/tasks whose answer is always the letter
    it likes least (so that its greedy replies are wrong)."""
    torch.manual_seed(0)
    m = tiny_gpt(seed=0, block_size=32)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    rng = random.Random(0)
    for step in range(150):
        rows = [T.chat_example([{'role': 'user', 'content': t['prompt']},
                                {'role': 'assistant', 'content': rng.choice('abcd')}], tokenizer, 32)
                for t in toy_tasks(32, 100 + step)]
        x = M.pad_batch([r[0] for r in rows])
        y = M.pad_batch([r[1] for r in rows], -1)
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    (d / 'sft').mkdir()
    M.save_checkpoint(str(d / 'sft' / 'model.pt'), {'model': m.state_dict()},
                      dict(model_args=m.config.__dict__, data_meta=tok_meta))
    with torch.no_grad():
        prompts = [T.render_prompt([{'role': 'user', 'content': t['prompt']}], tokenizer) for t in toy_tasks(40, 1)]
        probs = torch.stack([m(torch.tensor([p]))[0][0, -1].softmax(-1) for p in prompts]).mean(0)
    answer = min('abcd', key=lambda c: probs[tokenizer.encode_ordinary(c)[0]].item())
    (d / 'tasks').mkdir()
    for split, n, s in (('train', 200, 0), ('val', 20, 1), ('test', 20, 2)):
        write_jsonl(d / 'tasks' / f'{split}.jsonl', toy_tasks(n, s, answer))
    return d


def test_ppo_script_learns_the_gold_answer(toy):
    # textbook PPO (a critic, GAE, whitened advantages, wrong replies pushed down, T = 1), not the recipe's
    # defaults; every weight trains (lora_rank=0): the toy's 32-wide LayerNormed trunk cannot sharpen its letter
    # choice much through LoRA adapters alone
    out = toy / 'out-gold'
    run(['ppo.py', f'--init_from={toy / "sft"}', f'--out_dir={out}', f'--data_dir={toy}', '--reward=gold',
         '--critic=True', '--whiten_advantages=True', '--push_down=True', '--temperature=1.0',
         '--lora_rank=0', '--learning_rate=1e-3', '--max_iters=12', '--kl_coef=0.02', '--kl_target=1.0',
         '--kl_horizon=500', *PPO_TINY])
    records = read_metrics(out)
    iters = [r for r in records if 'kl' in r and 'eval' not in r]
    assert len(iters) == 12
    for key in ('score', 'gold_accuracy', 'kl', 'kl_coef', 'clip_frac', 'approx_kl', 'entropy', 'value_loss',
                'explained_variance', 'advantage_mean', 'advantage_std', 'push_down_share'):
        assert all(isinstance(r[key], float) for r in iters), key
    first, last = iters[0], iters[-1]
    assert first['score'] == first['gold_accuracy'] < 0.3  # the letter it likes least
    assert abs(first['kl']) < 1e-4  # the first rollouts come from the supervised model itself
    assert sum(r['gold_accuracy'] for r in iters[-3:]) / 3 > 0.75 and last['kl'] > 0.3
    assert last['kl_coef'] != first['kl_coef']  # the controller moved beta
    summary = records[-1]
    assert summary['before']['test_accuracy']['all'] < 0.5
    assert summary['after']['test_accuracy']['all'] == 1.0 and summary['after']['accuracy']['copy'] == 1.0
    # both checkpoints load as a plain GPT (sample.py reads ckpt.pt) that gives the answer
    answer = json.loads((toy / 'tasks' / 'val.jsonl').read_text().splitlines()[0])['answer']
    tok = TK.load_tokenizer(M.load_checkpoint(str(out / 'model.pt'))[1]['data_meta'])
    for name in ('model.pt', 'ckpt.pt'):
        gpt, _ = M.model_from_checkpoint(str(out / name))
        acc, _ = T.gold_accuracy(gpt, tok, toy_tasks(10, 5, answer), max_new_tokens=4)
        assert acc['all'] == 1.0


def test_ppo_script_with_a_reward_model_and_resume(toy, tok_meta):
    from reward import RewardModel
    rm = RewardModel(tiny_gpt(seed=5, block_size=32))
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    (toy / 'rm').mkdir(exist_ok=True)
    M.save_checkpoint(str(toy / 'rm' / 'reward.pt'), {'model': rm.state_dict()},
                      dict(model_args=rm.gpt.config.__dict__, data_meta=tok_meta, reward_mean=0.5, reward_std=2.0))
    out = toy / 'out-rm'
    common = [f'--out_dir={out}', f'--data_dir={toy}', f'--reward_model={toy / "rm"}', '--lora_rank=0',
              '--learning_rate=1e-3', '--eval_tasks=5', *PPO_TINY]
    run(['ppo.py', f'--init_from={toy / "sft"}', '--max_iters=2', *common])
    run(['ppo.py', '--init_from=resume', '--max_iters=3', *common])
    records = read_metrics(out)
    iters = [r for r in records if 'kl' in r and 'eval' not in r]
    assert [r['iter'] for r in iters] == [1, 2, 3]
    assert all(r['score'] == r['rm_score'] and r['gold_accuracy'] is not None for r in iters)
    evals = [r for r in records if 'eval' in r]
    assert [e['eval'] for e in evals] == ['sft', 'iter 2', 'iter 3']  # a resumed run does not evaluate again
    assert 'score' in evals[0] and 'test_score' in evals[0]
    table = compare_runs([str(out)])
    assert str(out) in table and 'SFT' in table
    # the same table from the command line (plots.py), with its plot
    p = run(['plots.py', f'--compare={out}', f'--compare_plot={toy / "cmp.png"}'])
    assert p.stdout.startswith(table) and (toy / 'cmp.png').read_bytes()[:4] == b'\x89PNG'
    p = run(['plots.py', f'--compare={toy / "no-such-run"}'], check=False)
    assert p.returncode == 1 and 'cannot compare' in error_line(p)


@pytest.mark.parametrize('args,message', [
    (['--reward=human'], "reward must be one of model, gold; got 'human'"),
    (['--reward_model=/nonexistent'], 'no reward model at /nonexistent'),
    (['--reward=gold', '--prompts=NOANSWER'], "needs an 'answer' for every prompt"),
    (['--reward=gold', '--group_size=3'], 'group_size must divide batch_size'),
    (['--reward=gold', '--temperature=0'], 'temperature must be > 0'),
    (['--reward=gold', '--token_credit=prefix'], "token_credit='prefix' needs groups"),
    (['--reward=gold', '--group_train=pairs'], "group_train must be one of all, spread, pair; got 'pairs'"),
    (['--reward=gold', '--group_train=spread'], "group_train='spread' needs groups"),
    (['--reward=gold', '--group_size=4', '--group_train=spread', '--minibatch_size=2'], "a multiple of 4"),
])
def test_ppo_bad_input_fails_with_one_line_before_work(toy, args, message):
    write_jsonl(toy / 'noanswer.jsonl', ['"What is 2 + 2?"', {'prompt': 'Copy: a'}])
    args = [a.replace('NOANSWER', str(toy / 'noanswer.jsonl')) for a in args]
    p = run(['ppo.py', f'--init_from={toy / "sft"}', f'--out_dir={toy / "never"}', f'--data_dir={toy}', *PPO_TINY,
             *args], check=False)
    assert message in error_line(p)
    assert not (toy / 'never').exists()


def test_leave_one_out_baseline_against_a_loop():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 3.0, 0.0])
    k = 4
    expected = []
    for i, s in enumerate(scores.tolist()):
        group = scores[i // k * k:(i // k + 1) * k].tolist()
        others = group[:i % k] + group[i % k + 1:]
        expected.append(s - sum(others) / len(others))
    assert torch.allclose(leave_one_out(scores, k), torch.tensor(expected))
    assert leave_one_out(scores, k)[4:8].abs().max() == 0  # all replies alike: no signal from that prompt


@pytest.mark.parametrize('baseline', ['leave_one_out', 'mean', 'none'])
@pytest.mark.parametrize('scale_by_std', [False, True])
def test_group_advantages_against_a_loop(baseline, scale_by_std):
    """Written out per group with the statistics module: RLOO's leave-one-out or GRPO's mean, then GRPO's std."""
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 3.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    k, expected = 4, []
    for start in range(0, len(scores), k):
        group = scores[start:start + k].tolist()
        for i, s in enumerate(group):
            others = group[:i] + group[i + 1:]
            if baseline == 'none':
                expected.append(s)
                continue
            a = s - (statistics.mean(others) if baseline == 'leave_one_out' else statistics.mean(group))
            expected.append(a / (statistics.stdev(group) + 1e-4) if scale_by_std else a)
    got = group_advantages(scores, k, baseline, scale_by_std)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    if baseline == 'none':
        return
    assert got[4:8].abs().max() == 0  # all replies alike: no signal from that prompt, with or without the std


def test_least_noise_group_baseline_against_a_loop():
    """'least_noise': each reply minus the other replies' scores averaged with weights q, written out per group;
    equal weights give RLOO; a reply's own score and weight never move its baseline (unbiased); a group that
    scores alike teaches nothing."""
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    q = torch.tensor([0.2, 3.0, 1.0, 0.4, 1.0, 2.0, 0.1, 5.0])
    expected = []
    for start in range(0, 8, 4):
        for i in range(start, start + 4):
            others = [j for j in range(start, start + 4) if j != i]
            expected.append(scores[i].item() - sum(scores[j].item() * q[j].item() for j in others)
                            / sum(q[j].item() for j in others))
    got = group_advantages(scores, 4, 'least_noise', weights=q)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6) and got[4:].abs().max() < 1e-6
    assert torch.allclose(group_advantages(scores, 4, 'least_noise', weights=torch.ones(8)),
                          group_advantages(scores, 4, 'leave_one_out'), atol=1e-6)
    moved_s, moved_q = scores.clone(), q.clone()
    moved_s[1], moved_q[1] = 1.0, 50.0  # reply 1 changes: its own baseline stays
    baseline = lambda s, w: s - group_advantages(s, 4, 'least_noise', weights=w)
    assert baseline(moved_s, moved_q)[1].item() == pytest.approx(baseline(scores, q)[1].item(), abs=1e-5)
    # the wrong replies' long gradients (q 3.0 and 1.0) hold the right replies' baseline low: they are pushed up
    # almost fully, and the wrong ones are pushed down by less than RLOO's 2/3
    assert got[0] > 0.7 and got[3] > 0.7 and -0.5 < got[1] < 0 and -0.5 < got[2] < 0


def test_prefix_advantages_on_a_tree_worked_by_hand():
    """Four replies to one prompt: [1, 2] right, [1, 3] wrong, [1, 2] right, [4] wrong. Prefix values (the mean
    score of the replies that begin so): V() = 1/2, V(1) = 2/3, V(1, 2) = 1, V(1, 3) = 0, V(4) = 0."""
    got = prefix_advantages([[1, 2], [1, 3], [1, 2], [4]], torch.tensor([1.0, 0.0, 1.0, 0.0]), 4)
    expected = [[1 / 6, 1 / 3], [1 / 6, -2 / 3], [1 / 6, 1 / 3], [-1 / 2]]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e)


def test_prefix_advantages_sum_to_the_group_relative_score_and_spare_the_shared_tokens():
    """Random groups: a reply's credit summed over its tokens is its score minus its group's mean (GRPO's
    advantage, here with distinct replies), and a prefix every reply of the group shares gets no credit."""
    rng = random.Random(0)
    for _ in range(20):
        k = rng.choice([2, 4, 8])
        shared = [rng.randrange(5) for _ in range(rng.randrange(3))]
        replies = [shared + [10 + i] + [rng.randrange(5) for _ in range(rng.randrange(3))] for i in range(k)]
        scores = torch.tensor([float(rng.random() < 0.5) for _ in range(k)])
        credit = prefix_advantages(replies, scores, k)
        mean = scores.mean().item()
        for c, s in zip(credit, scores.tolist()):
            assert sum(c) == pytest.approx(s - mean)
            assert all(a == 0 for a in c[:len(shared)])


def test_weigh_down_pushes_scales_only_the_negative_advantages():
    adv = torch.tensor([[0.5, -1.0, 0.0], [-0.2, 2.0, -3.0]])
    for w in (0.0, 0.25, 1.0):
        expected = torch.tensor([[a if a >= 0 else w * a for a in row] for row in adv.tolist()])
        assert torch.equal(weigh_down_pushes(adv, w), expected)


def test_place_on_mask_puts_each_rows_values_at_its_masked_positions():
    mask = torch.tensor([[False, True, True, False], [False, False, True, True]])
    got = place_on_mask([[0.5, -1.0], [2.0, 3.0]], mask)
    assert torch.equal(got, torch.tensor([[0.0, 0.5, -1.0, 0.0], [0.0, 0.0, 2.0, 3.0]]))


def group_policy_step(scores, lr=0.1):
    """One prompt answered four ways, each reply scored; the group-relative advantages (GRPO: mean and std)
    through the critic-free path (no KL: every reply token's advantage is its reply's), PPO's loss at ratio 1, one
    SGD step. Returns the policy's gradients and each reply's log-probability before and after the step."""
    torch.manual_seed(0)
    policy = M.GPT(M.GPTConfig(block_size=16, vocab_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0))
    idx = torch.tensor([[1, 2, 3, r, 9, 15] for r in (4, 5, 6, 7)])
    mask = torch.zeros(4, 5)
    mask[:, 2:] = 1  # the actions: the reply tokens after the prompt [1, 2, 3]
    lp, _ = logprobs_and_entropy(policy, idx)
    adv, _ = gae(token_rewards(group_advantages(scores, 4, 'mean', True), lp.detach(), lp.detach(), mask, 0.0),
                 torch.zeros_like(lp), mask, 1.0, 1.0)
    loss, _, _ = policy_loss(lp, lp.detach(), adv, mask, 0.2)
    loss.backward()
    grads = [p.grad.clone() for p in policy.parameters()]
    with torch.no_grad():
        for p in policy.parameters():
            p -= lr * p.grad
    after, _ = logprobs_and_entropy(policy, idx)
    return grads, (lp * mask).sum(1).detach(), (after * mask).sum(1).detach()


def test_group_gradient_raises_the_replies_above_their_group_and_lowers_those_below():
    _, before, after = group_policy_step(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert after[0] > before[0] and after[2] > before[2]  # right: above the group's mean
    assert after[1] < before[1] and after[3] < before[3]  # wrong: below it, pushed down


def test_a_group_whose_replies_all_score_the_same_gives_no_gradient():
    for score in (0.0, 1.0):
        grads, before, after = group_policy_step(torch.full((4,), score))
        assert all(g.abs().max() == 0 for g in grads) and torch.equal(before, after)


def test_sample_pairs_is_an_unbiased_estimate_of_the_group_gradient():
    """Each reply i of a group carries a stand-in gradient g_i; the group's policy gradient is sum_i A_i g_i
    (A: the scores minus the group's mean). Trained on the pair alone, with advantages +S and -S, the estimate
    averages to it over many draws; groups whose replies score alike give no pair."""
    torch.manual_seed(0)
    k = 4
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0,  0.0, 0.0, 0.0, 0.0,  0.3, -1.2, 0.5, 2.0,  1.0, 1.0, 1.0, 0.0])
    adv = group_advantages(scores, k, 'mean')
    g = torch.randn(len(scores), 3)
    gen = torch.Generator().manual_seed(1)
    draws, total = 20000, torch.zeros(len(scores) // k, 3)
    for _ in range(draws):
        rows, w = sample_pairs(adv, k, gen)
        for r, a in zip(rows.tolist(), w.tolist()):
            total[r // k] += a * g[r]
    for group in range(len(scores) // k):
        exact = sum(adv[i].item() * g[i] for i in range(group * k, group * k + k))
        assert torch.allclose(total[group] / draws, exact, atol=0.03), group
    rows, w = sample_pairs(adv, k, gen)
    assert not any(r // k == 1 for r in rows.tolist())  # all wrong: nothing to contrast
    for up, down, w_up, w_down in zip(rows[0::2].tolist(), rows[1::2].tolist(), w[0::2].tolist(), w[1::2].tolist()):
        assert up // k == down // k and adv[up] > 0 > adv[down]  # one pair from one group: above, below
        assert w_up == pytest.approx(-w_down)
        group = scores[up // k * k: up // k * k + k]
        if set(group.tolist()) <= {0.0, 1.0}:  # 0/1 scores: S = right x wrong / k
            right = group.sum().item()
            assert w_up == pytest.approx(right * (k - right) / k)
    empty_rows, empty_w = sample_pairs(torch.zeros(8), 4, gen)
    assert len(empty_rows) == 0 and len(empty_w) == 0


@pytest.mark.parametrize('token_credit,baseline,train', [('reply', 'mean', 'all'), ('prefix', 'mean', 'all'),
                                                         ('reply', 'least_noise', 'all'), ('reply', 'mean', 'spread')])
def test_ppo_script_learns_the_gold_answer_with_group_relative_advantages(toy, token_credit, baseline, train):
    """GRPO on the toy: 8 prompts x 4 replies per iteration, advantages from the group's mean and std (for
    the whole reply, or token by token from the group's tree of prefixes; or the least-noise baseline; or only
    the groups whose replies differ trained), wrong replies pushed down, no critic: the least-liked letter is
    learned within a dozen iterations."""
    out = toy / f'out-grpo-{token_credit}-{baseline}-{train}'
    run(['ppo.py', f'--init_from={toy / "sft"}', f'--out_dir={out}', f'--data_dir={toy}', '--reward=gold',
         f'--token_credit={token_credit}', f'--group_train={train}',
         '--group_size=4', f'--group_baseline={baseline}', '--group_std=True', '--push_down=True', '--critic=False',
         '--whiten_advantages=False', '--lora_rank=0', '--learning_rate=1e-3', '--max_iters=12', '--kl_coef=0.02',
         '--kl_target=0', '--temperature=1.0', *PPO_TINY])
    records = read_metrics(out)
    iters = [r for r in records if 'kl' in r and 'eval' not in r]
    assert iters[0]['gold_accuracy'] < 0.3 and sum(r['gold_accuracy'] for r in iters[-3:]) / 3 > 0.75
    assert all(r['value_loss'] is None for r in iters)
    assert records[-1]['after']['test_accuracy']['all'] == 1.0


def test_ppo_script_with_groups_of_replies_per_prompt(toy):
    """--group_size=4: each iteration's rollouts are batch_size / 4 prompts, each answered 4 times, and the
    rewards PPO sees are centred per prompt (leave-one-out), while the logged score stays the raw one."""
    out = toy / 'out-group'
    run(['ppo.py', f'--init_from={toy / "sft"}', f'--out_dir={out}', f'--data_dir={toy}', '--reward=gold',
         '--group_size=4', '--temperature=0.7', '--max_iters=2', '--eval_tasks=0', *PPO_TINY])
    iters = [r for r in read_metrics(out) if 'kl' in r and 'eval' not in r and 'summary' not in r]
    assert len(iters) == 2
    for r in iters:  # gold reward: the raw score is the accuracy (centred scores would average 0)
        assert r['score'] == r['gold_accuracy']


def test_without_a_critic_the_advantage_is_the_reward_to_go():
    """critic=False runs gae with V = 0 and lambda = 1: each reply token's advantage is the sum of the rewards
    from it to the reply's end (the score plus the KL penalties still ahead), written out here as a loop."""
    rewards = torch.tensor([[0.0, 0.0, -0.1, 0.2, 1.0, 0.0], [0.0, 0.3, -0.2, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.float)
    for gamma in (1.0, 0.9):
        adv, ret = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
        for b in range(2):
            for t in range(6):
                to_go = sum(gamma ** (k - t) * rewards[b, k].item() * mask[b, k].item() for k in range(t, 6))
                assert adv[b, t].item() == pytest.approx(to_go * mask[b, t].item(), abs=1e-6)
        assert torch.equal(adv, ret)


def test_value_warmup_trains_the_critic_alone_first(toy):
    """--value_warmup=N: for the first N iterations the value model learns and the policy stays the SFT model."""
    out = toy / 'out-warmup'
    common = [f'--out_dir={out}', f'--data_dir={toy}', '--reward=gold', '--critic=True', '--lora_rank=0',
              '--learning_rate=1e-3', '--eval_tasks=0', *PPO_TINY]
    run(['ppo.py', f'--init_from={toy / "sft"}', '--max_iters=2', '--value_warmup=2', *common])
    sft = M.load_checkpoint(str(toy / 'sft' / 'model.pt'))[0]['model']
    ckpt, _ = M.load_checkpoint(str(out / 'ckpt.pt'))
    assert all(torch.equal(ckpt['model'][k], v) for k, v in sft.items())
    assert not torch.equal(ckpt['value_model']['head.weight'], torch.zeros_like(ckpt['value_model']['head.weight']))
    iters = [r for r in read_metrics(out) if 'kl' in r and 'eval' not in r]
    assert all(r['kl'] == 0 for r in iters)  # the rollouts came from the SFT model itself
    run(['ppo.py', '--init_from=resume', '--max_iters=3', '--value_warmup=2', *common])  # then the policy moves
    ckpt, _ = M.load_checkpoint(str(out / 'ckpt.pt'))
    assert not all(torch.equal(ckpt['model'][k], v) for k, v in sft.items())
    p = run(['ppo.py', f'--init_from={toy / "sft"}', f'--out_dir={toy / "never"}', f'--data_dir={toy}',
             '--reward=gold', '--value_warmup=2', *PPO_TINY], check=False)
    assert 'value_warmup trains the value model alone first: it needs --critic=True' in error_line(p)


def test_ppo_script_without_a_critic_learns_and_resumes(toy):
    """--critic=False --whiten_advantages=False: no value model at all (none in the checkpoint, no value
    statistics), a 0/1 reward only pushes correct replies up, and the toy's answer is still learned."""
    out = toy / 'out-nocritic'
    common = [f'--out_dir={out}', f'--data_dir={toy}', '--reward=gold', '--critic=False',
              '--whiten_advantages=False', '--lora_rank=0', '--learning_rate=1e-3', '--kl_coef=0.02',
              '--kl_target=1.0', '--kl_horizon=500', '--score_margin=0', '--temperature=1.0', *PPO_TINY]
    p = run(['ppo.py', f'--init_from={toy / "sft"}', '--max_iters=10', *common])
    assert 'no value model' in p.stdout
    ckpt, _ = M.load_checkpoint(str(out / 'ckpt.pt'))
    assert 'value_model' not in ckpt and 'value_optimizer' not in ckpt
    run(['ppo.py', '--init_from=resume', '--max_iters=12', *common])
    records = read_metrics(out)
    iters = [r for r in records if 'kl' in r and 'eval' not in r]
    assert [r['iter'] for r in iters] == list(range(1, 13))
    assert all(r['value_loss'] is None and r['explained_variance'] is None for r in iters)
    assert iters[0]['gold_accuracy'] < 0.3
    assert sum(r['gold_accuracy'] for r in iters[-3:]) / 3 > 0.75
    assert records[-1]['after']['test_accuracy']['all'] == 1.0
    # a run that had no critic cannot silently resume with a fresh one
    p = run(['ppo.py', '--init_from=resume', '--max_iters=13', '--critic=True',
             *[a for a in common if a != '--critic=False']], check=False)
    assert 'trained with --critic=False' in error_line(p)


def test_gradient_noise_against_stacked_per_reply_gradients():
    """rl.gradient_noise against the slow path: every reply's gradient of its summed log-probs (from the model's own
    logits, log_softmax written out), stacked into a matrix, then the mean and covariance by numpy."""
    import numpy as np
    model = tiny_gpt(seed=3)
    model.eval()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 300, (6, 9), generator=g)
    mask = torch.zeros(6, 8, dtype=torch.bool)
    for i, (start, end) in enumerate([(2, 8), (3, 6), (1, 4), (4, 8), (2, 3), (5, 7)]):
        mask[i, start:end] = True  # reply tokens; the rest is prompt or padding
    R = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    weightings = {'none': R, 'mean': R - R.mean(), 'other': torch.tensor([0.5, -2.0, 1.0, 0.0, 3.0, -1.0])}
    stats, norms = gradient_noise(model, idx, mask, weightings, temperature=0.7)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(6):
        logits = model(idx[i:i + 1, :-1], targets=idx[i:i + 1, 1:])[0][0] / 0.7  # logits at every position
        logp = logits - logits.exp().sum(-1, keepdim=True).log()
        total = sum(logp[t, idx[i, t + 1]] for t in range(8) if mask[i, t])
        rows.append(torch.cat([x.flatten() for x in torch.autograd.grad(total, params)]).numpy())
    G = np.stack(rows).astype(np.float64)  # (replies, weights)
    assert norms.numpy() == pytest.approx((G ** 2).sum(1), rel=1e-4)
    for name, w in weightings.items():
        est = w.numpy()[:, None] * G
        mean = est.mean(0)
        assert stats[name]['signal'] == pytest.approx((mean ** 2).sum(), rel=1e-4)
        assert stats[name]['noise'] == pytest.approx(((est - mean) ** 2).sum(1).mean(), rel=1e-4)
