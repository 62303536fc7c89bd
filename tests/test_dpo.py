"""dpo.py against references: the losses against their formulas in plain Python, step 0 (policy ==
reference: loss log 2, gradient only into the policy), reply-only log-probabilities against a per-token
loop, and a tiny end-to-end run that must move the policy towards the chosen replies."""
import copy
import json
import math
import random

import pytest
import torch

import model as M
import tasks as T
from conftest import error_line, read_metrics, run
from dpo import dpo_loss, pair_logprobs, reference_reply_logprobs
from model import GPT, GPTConfig


# -----------------------------------------------------------------------------
# helpers shared with test_reward.py and test_ppo.py: a tiny GPT and a tiny "supervised model" checkpoint
# that the scripts load as init_from (the tokenizer and its fixtures are in conftest.py)

def tiny_gpt(seed=0, block_size=64, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=block_size, vocab_size=320, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def write_sft(out_dir, data_meta, seed=0, **kw):
    """out_dir/model.pt as finetune_lora.py writes it (a plain GPT and the tokenizer's meta)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    m = tiny_gpt(seed, **kw)
    M.save_checkpoint(str(out_dir / 'model.pt'), {'model': m.state_dict()},
                      dict(model_args=m.config.__dict__, data_meta=data_meta))
    return m


def write_jsonl(path, records):
    with open(path, 'w', encoding='utf-8') as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + '\n')
    return path


# -----------------------------------------------------------------------------
# the losses, against plain Python

def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def random_logps(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(-20 * torch.rand(n, generator=g, dtype=torch.float64)) for _ in range(4)]


@pytest.mark.parametrize('beta', [0.05, 0.1, 0.5, 2.0])
def test_dpo_loss_matches_hand_formula(beta):
    pc, pr, rc, rr = random_logps(seed=int(beta * 100))
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(len(pc)):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert losses[i].item() == pytest.approx(-log_sigmoid(beta * h), rel=1e-9, abs=1e-12)
        assert chosen_r[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), rel=1e-9)
        assert rejected_r[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()), rel=1e-9)


@pytest.mark.parametrize('beta,eps', [(0.1, 0.1), (0.5, 0.3), (1.0, 0.0)])
def test_label_smoothing_matches_conservative_dpo(beta, eps):
    pc, pr, rc, rr = random_logps(seed=7)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, 'sigmoid', eps)
    for i in range(len(pc)):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        ref = (1 - eps) * -log_sigmoid(beta * h) + eps * -log_sigmoid(-beta * h)
        assert losses[i].item() == pytest.approx(ref, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize('beta', [0.1, 1.0])
def test_ipo_loss_matches_hand_formula(beta):
    pc, pr, rc, rr = random_logps(seed=3)
    nc, nr = torch.randint(1, 9, (len(pc),)), torch.randint(1, 9, (len(pc),))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, 'ipo', chosen_tokens=nc, rejected_tokens=nr)
    for i in range(len(pc)):  # as TRL: each reply's log-ratio averaged over its tokens
        h = (pc[i].item() - rc[i].item()) / nc[i].item() - (pr[i].item() - rr[i].item()) / nr[i].item()
        assert losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-9)


def test_sft_weight_adds_chosen_mean_token_nll():
    pc, pr, rc, rr = random_logps(seed=11)
    n_tokens = torch.arange(1, len(pc) + 1, dtype=torch.float64)
    beta, w = 0.2, 0.7
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, 'sigmoid', 0.0, w, n_tokens)
    for i in range(len(pc)):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        ref = -log_sigmoid(beta * h) + w * -pc[i].item() / (i + 1)
        assert losses[i].item() == pytest.approx(ref, rel=1e-9)


def test_dpo_loss_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr, rc, rr = [t.clone().requires_grad_(i < 2) for i, t in enumerate(random_logps(seed=5))]
    beta = 0.2
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta)
    losses.sum().backward()
    for i in range(len(pc)):  # d/d pc of -log sigmoid(beta h) = -beta sigmoid(-beta h)
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert pc.grad[i].item() == pytest.approx(-beta / (1 + math.exp(beta * h)), rel=1e-9)
        assert pr.grad[i].item() == pytest.approx(beta / (1 + math.exp(beta * h)), rel=1e-9)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match='ipo'):
        dpo_loss(*random_logps(), 0.1, 'hinge')


# -----------------------------------------------------------------------------
# reply-only log-probabilities

PAIRS = [
    {'prompt': 'Say yes or no: 1', 'chosen': 'yes', 'rejected': 'no, never'},
    {'prompt': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'},
                {'role': 'user', 'content': 'Reverse: a b c'}], 'chosen': 'c b a', 'rejected': 'a b c'},
    {'prompt': 'Count: x', 'chosen': '1', 'rejected': 'one, I think'},
]


def test_response_logprobs_sum_reply_tokens_only(tokenizer, monkeypatch):
    model = tiny_gpt().eval()
    examples = [T.preference_example(T.check_preference(p), tokenizer, 64) for p in PAIRS]
    idx, mask, lengths = T.preference_batch(examples)
    with torch.no_grad():
        batched = M.response_logprobs(model, idx, mask)
        # reference: each sequence alone, each reply token's probability from a forward pass over its prefix
        seqs = [e['chosen'] for e in examples] + [e['rejected'] for e in examples]
        masks = [e['chosen_mask'] for e in examples] + [e['rejected_mask'] for e in examples]
        for row, (s, m) in enumerate(zip(seqs, masks)):
            total = 0.0
            for t in range(1, len(s)):
                if m[t]:
                    logits, _ = model(torch.tensor([s[:t]]))
                    total += torch.log_softmax(logits[0, -1].double(), -1)[s[t]].item()
            assert batched[row].item() == pytest.approx(total, abs=1e-4)
            assert lengths[row].item() == len(s)
        # dpo.py's pair_logprobs: a pair's prompt runs once, both replies after it; the same sums
        assert torch.allclose(pair_logprobs(model, idx, mask, lengths), batched, atol=1e-5)
        # changing the log-probabilities of prompt and padding positions changes nothing
        real = M.token_logprobs
        monkeypatch.setattr(M, 'token_logprobs', lambda mdl, x: real(mdl, x) + 100.0 * (~mask[:, 1:]).float())
        assert torch.equal(M.response_logprobs(model, idx, mask), batched)
        monkeypatch.setattr(M, 'token_logprobs', lambda mdl, x: real(mdl, x) + 1.0 * mask[:, 1:].float())
        assert torch.allclose(M.response_logprobs(model, idx, mask), batched + mask[:, 1:].sum(1))


# -----------------------------------------------------------------------------
# step 0: the policy is the reference

def step0(policy, ref_model, tokenizer, beta=0.1):
    examples = [T.preference_example(T.check_preference(p), tokenizer, 64) for p in PAIRS]
    idx, mask, lengths = T.preference_batch(examples)
    ref_c, ref_r = reference_reply_logprobs(policy, ref_model, idx, mask, lengths).view(2, -1)
    pol_c, pol_r = pair_logprobs(policy, idx, mask, lengths).view(2, -1)
    losses, rc, rr = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta)
    losses.mean().backward()
    return losses, rc, rr, ref_c


def test_step0_lora_loss_is_log2_and_only_adapters_get_gradient(tokenizer):
    policy = tiny_gpt()
    M.apply_lora(policy, rank=4, alpha=8.0)
    losses, rc, rr, ref_c = step0(policy, None, tokenizer)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-6)
    assert rc.abs().max() < 1e-6 and rr.abs().max() < 1e-6
    assert not ref_c.requires_grad and ref_c.grad_fn is None
    for name, p in policy.named_parameters():
        if 'lora_' in name:
            assert p.grad is not None
        else:
            assert p.grad is None, name  # the frozen base, which is the reference, gets nothing
    assert any(p.grad.abs().sum() > 0 for n, p in policy.named_parameters() if n.endswith('lora_B'))
    assert all(m.enabled for m in M.lora_layers(policy))  # adapters back on after the reference pass


def test_step0_full_loss_is_log2_and_reference_gets_no_gradient(tokenizer):
    policy = tiny_gpt()
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad = False
    losses, _, _, _ = step0(policy, ref, tokenizer)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-6)
    assert all(p.grad is None for p in ref.parameters())
    assert sum(p.grad.abs().sum().item() for p in policy.parameters() if p.grad is not None) > 0


# -----------------------------------------------------------------------------
# the script, end to end on a toy preference: always answer "yes", never "no"

def toy_prefs(n, seed):
    rng = random.Random(seed)
    return [{'prompt': f"Say yes or no: {rng.randint(0, 999)}", 'chosen': 'yes', 'rejected': 'no'} for _ in range(n)]


DPO_TINY = ['--device=cpu', '--batch_size=8', '--eval_interval=10', '--log_interval=5', '--eval_tasks=0',
            '--kl_prompts=8', '--warmup_iters=2', '--eval_pairs=0']


@pytest.fixture(scope='module')
def toy_setup(tmp_path_factory, tok_meta):
    d = tmp_path_factory.mktemp('dpo')
    write_sft(d / 'sft', tok_meta)
    bad = ['{"prompt": "p", "chosen": "same", "rejected": "same"}', '{"prompt": "p", "chosen": "a"}',
           '{"prompt": "", "chosen": "a", "rejected": "b"}', 'not json']
    write_jsonl(d / 'train.jsonl', toy_prefs(60, 0) + bad)
    write_jsonl(d / 'val.jsonl', toy_prefs(16, 1))
    return d


def margin(path_or_model, tokenizer, prefs, per_token=False):
    """Mean over pairs of log p(chosen) - log p(rejected), each summed (or, per_token, averaged) over its reply."""
    m = path_or_model if isinstance(path_or_model, GPT) else M.model_from_checkpoint(str(path_or_model))[0]
    examples = [T.preference_example(T.check_preference(p), tokenizer, 64) for p in prefs]
    idx, mask, _ = T.preference_batch(examples)
    with torch.no_grad():
        c, r = M.response_logprobs(m.eval(), idx, mask).view(2, -1)
    if per_token:
        nc, nr = mask[:, 1:].sum(1).view(2, -1)
        c, r = c / nc, r / nr
    return (c - r).mean().item()


@pytest.mark.parametrize('mode', [['--lora_rank=4', '--learning_rate=1e-2'],
                                  ['--lora_rank=0', '--learning_rate=3e-3', '--loss_type=ipo', '--beta=0.5']])
def test_dpo_moves_policy_towards_chosen(toy_setup, tokenizer, mode):
    d = toy_setup
    out = d / ('out-' + mode[0].split('=')[1])
    p = run(['dpo.py', f'--init_from={d / "sft"}', f'--out_dir={out}', f'--data={d / "train.jsonl"}',
             f'--val_data={d / "val.jsonl"}', '--max_iters=20', *DPO_TINY, *mode])
    assert '4 bad records skipped' in p.stdout and 'chosen and rejected are identical' in p.stdout
    records = read_metrics(out)
    first = next(r for r in records if r.get('eval') == 'sft')
    if '--loss_type=ipo' not in mode:
        assert first['val_loss'] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert first['val_reward_accuracy'] == 0.0 and abs(first['kl']) < 1e-4
    final = records[-1]['after']
    assert final['val_reward_accuracy'] == 1.0 and final['val_margin'] > 0 and final['kl'] > 0
    # independently: the saved plain GPT prefers "yes" over "no" by more than the supervised model did
    val = toy_prefs(16, 1)
    before, after = margin(d / 'sft' / 'model.pt', tokenizer, val), margin(out / 'model.pt', tokenizer, val)
    beta = 0.5 if '--beta=0.5' in mode else 0.1
    if '--loss_type=ipo' in mode:  # IPO regresses the per-token log-ratio gap onto 1 / (2 beta)
        gain = margin(out / 'model.pt', tokenizer, val, True) - margin(d / 'sft' / 'model.pt', tokenizer, val, True)
        assert abs(gain - 1 / (2 * beta)) < 0.25
    else:
        assert after - before > 1.0
    # the logged margin is beta times this gain in log-ratio
    assert final['val_margin'] == pytest.approx(beta * (after - before), rel=1e-3, abs=1e-4)


# each is a process start (several seconds on a busy machine): one per kind of check
@pytest.mark.parametrize('args,message', [
    (['--loss_type=hinge'], "loss_type must be one of sigmoid, ipo; got 'hinge'"),
    (['--label_smoothing=0.2', '--loss_type=ipo'], 'sigmoid loss only'),
    (['--init_from=/nonexistent'], 'no model.pt or ckpt.pt'),
    (['--data=BADFILE'], '0 usable train'),
])
def test_dpo_bad_input_fails_with_one_line_before_work(toy_setup, args, message):
    d = toy_setup
    write_jsonl(d / 'bad.jsonl', ['{"prompt": "p", "chosen": "x", "rejected": "x"}', '[1, 2]', '{}'])
    args = [a.replace('BADFILE', str(d / 'bad.jsonl')) for a in args]
    p = run(['dpo.py', f'--init_from={d / "sft"}', f'--out_dir={d / "never"}', f'--data={d / "train.jsonl"}',
             *DPO_TINY, *args], check=False)
    assert message in error_line(p)
    assert not (d / 'never').exists()




# -----------------------------------------------------------------------------
# a batch in runs of similar length (tasks.pairs_by_length), as dpo.py and reward.py train

def random_pairs(n, seed):
    """Pairs of token sequences of different lengths (a shared prompt, two replies), as preference_example makes."""
    g = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [g.randrange(250) for _ in range(g.randint(2, 14))]
        ex = {}
        for k in ('chosen', 'rejected'):
            reply = [g.randrange(250) for _ in range(g.randint(1, 9))]
            ex[k], ex[k + '_mask'] = prompt + reply, [False] * len(prompt) + [True] * len(reply)
        pairs.append(ex)
    return pairs


def test_pairs_by_length_keeps_every_pair_and_weighs_runs_by_their_share():
    pairs = random_pairs(11, 0)
    runs = T.pairs_by_length(pairs, runs=3)
    assert [len(r) for r, _ in runs] == [4, 4, 3] and sum(s for _, s in runs) == pytest.approx(1)
    assert [s for _, s in runs] == [4 / 11, 4 / 11, 3 / 11]
    flat = [p for r, _ in runs for p in r]
    assert sorted(map(id, flat)) == sorted(map(id, pairs))  # every pair once
    longest = [max(len(p['chosen']), len(p['rejected'])) for p in flat]
    assert longest == sorted(longest)


def test_dpo_loss_in_runs_by_length_has_the_whole_batchs_gradient():
    """The reference: DPO's mean loss over the whole padded batch at once, every row with its own copy of the
    prompt. dpo.py's step, the runs' mean losses weighted by their shares, each pair's two replies packed after
    one copy of their prompt (pair_logprobs), must give the same loss and gradient."""
    policy = tiny_gpt(seed=5)
    ref = tiny_gpt(seed=6).eval()
    pairs = random_pairs(9, 1)
    params = list(policy.parameters())

    def mean_loss(batch, packed):
        idx, mask, lengths = T.preference_batch(batch)
        if packed:
            ref_c, ref_r = reference_reply_logprobs(policy, ref, idx, mask, lengths).view(2, -1)
            pol_c, pol_r = pair_logprobs(policy, idx, mask, lengths).view(2, -1)
        else:
            with torch.no_grad():
                ref_c, ref_r = M.response_logprobs(ref, idx, mask).view(2, -1)
            pol_c, pol_r = M.response_logprobs(policy, idx, mask).view(2, -1)
        return dpo_loss(pol_c, pol_r, ref_c, ref_r, 0.1)[0].mean()
    whole = mean_loss(pairs, packed=False)
    whole_grad = torch.autograd.grad(whole, params)
    in_runs = sum(mean_loss(run, packed=True) * share for run, share in T.pairs_by_length(pairs))
    assert torch.allclose(in_runs, whole, atol=1e-6)
    for a, b in zip(torch.autograd.grad(in_runs, params), whole_grad):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
