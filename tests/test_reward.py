"""reward.py and the preference data it reads, against references: the reward read at each row's last
real token against a row-by-row forward pass, Bradley-Terry and the ranking metrics against hand
computation, a toy preference it must learn, HH-RLHF transcripts (plain, gzipped, over HTTP) parsed into
known prompts and replies, and prepare.py prefs keeping exactly the (correct, incorrect) pairs."""
import json
import math
import random

import pytest
import torch

import model as M
import tasks as T
import tokenizer as TK
from conftest import error_line, read_metrics, run
from reward import (RewardModel, load_reward_model, ranking_metrics, reply_ids, reward_loss, score, score_ids,
                    shuffled_labels)
from test_dpo import random_pairs, tiny_gpt, write_jsonl, write_sft



# -----------------------------------------------------------------------------
# the model and its loss

def test_reward_is_read_at_each_rows_last_real_token():
    torch.manual_seed(1)
    rm = RewardModel(tiny_gpt()).eval()
    torch.nn.init.normal_(rm.head.weight)
    torch.nn.init.normal_(rm.head.bias)
    seqs = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [16, 17, 18, 19]]
    with torch.no_grad():
        batched = score_ids(rm, seqs)
        for s, r in zip(seqs, batched):  # reference: the row alone, no padding, its last position
            h = rm.gpt.hidden_states(torch.tensor([s]))[0, -1]
            assert r.item() == pytest.approx((h @ rm.head.weight[0] + rm.head.bias[0]).item(), abs=1e-5)
        # whatever sits in the padding changes nothing
        idx = M.pad_batch(seqs, 0)
        lengths = torch.tensor([len(s) for s in seqs])
        noisy = idx.clone()
        for i, s in enumerate(seqs):
            noisy[i, len(s):] = torch.randint(0, 260, (idx.size(1) - len(s),))
        assert torch.allclose(rm(noisy, lengths), batched, atol=1e-6)
        # replies that share a prompt, packed after one copy of it (rl.pack_by_prompt): each its own reward
        prompts = [[5, 6], [8, 9, 10, 11]]
        grouped = [p + r for r in ([7], [20, 21], [22, 23, 24]) for p in prompts] + [[30]]
        packed = score_ids(rm, grouped, batch_size=3, prompt_lengths=[2, 4] * 3 + [1])
        alone = torch.stack([rm(torch.tensor([s]), torch.tensor([len(s)]))[0] for s in grouped])
        assert torch.allclose(packed, alone, atol=1e-5)


def test_reward_head_starts_at_zero_so_first_loss_is_log2():
    rm = RewardModel(tiny_gpt())
    r = score_ids(rm, [[1, 2, 3], [4, 5]])
    assert torch.equal(r, torch.zeros(2))
    assert reward_loss(r[:1], r[1:]).item() == pytest.approx(math.log(2))


def test_reward_loss_is_bradley_terry():
    g = torch.Generator().manual_seed(0)
    rc, rr = (torch.randn(12, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    ref = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(rc.tolist(), rr.tolist())) / 12
    assert reward_loss(rc, rr).item() == pytest.approx(ref, rel=1e-9)


def test_reward_loss_in_runs_by_length_has_the_whole_batchs_gradient():
    """The reference: the Bradley-Terry loss (with reward centering) over the whole padded batch at once, each
    row with its own copy of the prompt. reward.py's step, the runs' losses weighted by their shares, each pair
    packed after one copy of its prompt, must give the same loss and gradient."""
    rm = RewardModel(tiny_gpt(seed=3))
    torch.nn.init.normal_(rm.head.weight)
    pairs = random_pairs(9, 2)
    params = list(rm.parameters())

    def loss(batch, packed):
        idx, mask, lengths = T.preference_batch(batch)
        rc, rr = rm(idx, lengths, T.prompt_lengths(mask) if packed else None).view(2, -1)
        return reward_loss(rc, rr, center_coef=0.01)
    whole = loss(pairs, packed=False)
    whole_grad = torch.autograd.grad(whole, params)
    # as reward.py trains: in runs, each pair's prompt run once (rl.pack_by_prompt)
    in_runs = sum(loss(run, packed=True) * share for run, share in T.pairs_by_length(pairs))
    assert torch.allclose(in_runs, whole, atol=1e-6)
    for a, b in zip(torch.autograd.grad(in_runs, params), whole_grad):  # gradients of size 1-20: float32 rounding
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_score_renders_prompt_and_reply_like_a_preference(tokenizer):
    rm = RewardModel(tiny_gpt()).eval()
    torch.nn.init.normal_(rm.head.weight)
    pref = T.check_preference({'prompt': 'Reverse: a b', 'chosen': 'b a', 'rejected': 'a b'})
    ex = T.preference_example(pref, tokenizer, 64)
    assert reply_ids('Reverse: a b', 'b a', tokenizer, 64) == ex['chosen']
    assert reply_ids(pref['prompt'], 'a b', tokenizer, 64) == ex['rejected']
    s = score(rm, tokenizer, ['Reverse: a b', pref['prompt']], ['b a', 'a b'])
    assert torch.allclose(s, score_ids(rm, [ex['chosen'], ex['rejected']]))
    long = reply_ids('x ' * 100, 'y' * 10, tokenizer, 64)  # too long: the prompt's start goes
    assert len(long) == 64 and long[-11:] == tokenizer.encode_ordinary('y' * 10) + [T.chat_ids(tokenizer)[2]]


def test_ranking_metrics_by_hand():
    tasks = [{'skill': 'add', 'answer': '5'}, {'skill': 'add', 'answer': '7'}, {'skill': 'copy', 'answer': 'a'}]
    replies = [['5', '4', '6', '5'], ['1', '7', '2', '3'], ['a', 'a', 'a', 'a']]
    rewards = [[0.9, 0.1, 1.0, 0.2], [0.5, 0.4, 0.0, 0.4], [1.0, 0.0, 0.0, 0.0]]
    m = ranking_metrics(tasks, replies, rewards)
    # prompt 1: correct {0.9, 0.2} vs incorrect {0.1, 1.0}: 0.9>0.1, 0.9<1.0, 0.2>0.1, 0.2<1.0 -> 2 of 4
    # prompt 2: correct {0.4} vs {0.5, 0.0, 0.4}: lose, win, tie -> 1.5 of 3; prompt 3: no pairs
    assert m['add']['pairs'] == 7 and m['add']['auc'] == pytest.approx(3.5 / 7)
    assert m['copy']['pairs'] == 0 and m['copy']['auc'] is None
    assert m['all']['auc'] == pytest.approx(3.5 / 7)
    # best of 4 by reward: '6' (wrong), '1' (wrong), 'a' (right); random: 1/2, 1/4, 1; oracle 1, 1, 1
    assert m['add']['best_of_k'] == 0 and m['copy']['best_of_k'] == 1 and m['all']['best_of_k'] == pytest.approx(1 / 3)
    assert m['add']['random'] == pytest.approx(0.375) and m['all']['random'] == pytest.approx(1.75 / 3)
    assert m['all']['oracle'] == 1


# -----------------------------------------------------------------------------
# the script learns a separable toy preference: replies made of animal words beat replies of colours

ANIMALS, COLOURS = ['cat', 'dog', 'owl', 'fox', 'bee', 'cow'], ['red', 'blue', 'green', 'gold', 'pink', 'grey']


def toy_prefs(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        good = ' '.join(rng.choice(ANIMALS) for _ in range(rng.randint(1, 3)))
        bad = ' '.join(rng.choice(COLOURS) for _ in range(rng.randint(1, 3)))
        out.append({'prompt': f"Name some things, number {rng.randint(0, 99)}", 'chosen': good, 'rejected': bad})
    return out


@pytest.mark.parametrize('mode', [['--lora_rank=4', '--learning_rate=1e-2'], ['--lora_rank=0', '--learning_rate=1e-2']])
def test_reward_model_learns_separable_preference(tmp_path, tok_meta, tokenizer, mode):
    write_sft(tmp_path / 'sft', tok_meta)
    write_jsonl(tmp_path / 'train.jsonl', toy_prefs(300, 0))
    val = toy_prefs(100, 1)
    write_jsonl(tmp_path / 'val.jsonl', val)
    out = tmp_path / 'out'
    run(['reward.py', f'--init_from={tmp_path / "sft"}', f'--out_dir={out}', f'--data={tmp_path / "train.jsonl"}',
         f'--val_data={tmp_path / "val.jsonl"}', '--device=cpu', '--batch_size=16', '--max_iters=80',
         '--warmup_iters=5', '--eval_interval=80', '--log_interval=10', '--rank_prompts=0', *mode])
    records = read_metrics(out)
    assert records[0]['eval'] == 'init' and records[0]['val_loss'] == pytest.approx(math.log(2))
    final = records[-1]['final']
    assert final['val_accuracy'] > 0.95 and final['val_margin'] > 0, final
    # independently: the saved model, loaded the way ppo.py loads it, ranks the held-out pairs
    rm, meta = load_reward_model(str(out / 'reward.pt'))
    tok = TK.load_tokenizer(meta['data_meta'])
    rc = score(rm, tok, [p['prompt'] for p in val], [p['chosen'] for p in val])
    rr = score(rm, tok, [p['prompt'] for p in val], [p['rejected'] for p in val])
    assert (rc > rr).float().mean().item() == pytest.approx(final['val_accuracy'], abs=1e-6)
    assert (rc - rr).mean().item() == pytest.approx(final['val_margin'], rel=1e-4, abs=1e-5)
    one_by_one = torch.cat([score(rm, tok, [p['prompt']], [p['chosen']]) for p in val[:5]])
    assert torch.allclose(one_by_one, rc[:5], atol=1e-5)


def test_shuffled_labels_swap_a_seeded_half_and_keep_every_pair():
    prefs = toy_prefs(2000, 0)
    a, b = shuffled_labels(prefs, 1337), shuffled_labels(prefs, 1337)
    assert a == b and a != shuffled_labels(prefs, 1)  # seeded
    swapped = [x['chosen'] == p['rejected'] and x['rejected'] == p['chosen'] for x, p in zip(a, prefs)]
    kept = [x == p for x, p in zip(a, prefs)]
    assert all(s != k for s, k in zip(swapped, kept))  # each pair swapped or left as it was, nothing else
    assert abs(sum(swapped) / len(prefs) - 0.5) < 0.05


def test_reward_model_on_shuffled_labels_learns_nothing(tmp_path, tok_meta):
    """The control: the same separable pairs as above with chosen and rejected swapped at random leave the reward
    model at chance on held-out pairs (which keep their labels); the same run with the labels learns them."""
    write_sft(tmp_path / 'sft', tok_meta)
    write_jsonl(tmp_path / 'train.jsonl', toy_prefs(300, 0))
    write_jsonl(tmp_path / 'val.jsonl', toy_prefs(200, 1))
    accuracy = {}
    for shuffle in (False, True):
        out = tmp_path / f'out-{shuffle}'
        run(['reward.py', f'--init_from={tmp_path / "sft"}', f'--out_dir={out}', f'--data={tmp_path / "train.jsonl"}',
             f'--val_data={tmp_path / "val.jsonl"}', '--device=cpu', '--batch_size=16', '--max_iters=80',
             '--warmup_iters=5', '--eval_interval=80', '--log_interval=10', '--rank_prompts=0', '--lora_rank=0',
             '--learning_rate=1e-2', f'--shuffle_labels={shuffle}'])
        accuracy[shuffle] = read_metrics(out)[-1]['final']['val_accuracy']
    assert accuracy[False] > 0.95 and 0.3 < accuracy[True] < 0.7, accuracy


@pytest.mark.parametrize('args,message', [
    (['--lora_rank=8', '--lora_targets=attn,ffn'], 'lora_targets name some of'),
    (['--data=BADFILE'], '0 usable train'),
])
def test_reward_bad_input_fails_with_one_line_before_work(tmp_path, tok_meta, args, message):
    write_sft(tmp_path / 'sft', tok_meta)
    write_jsonl(tmp_path / 'bad.jsonl', ['{"prompt": "p", "chosen": "", "rejected": "x"}', '{"chosen": "a"}'])
    args = [a.replace('BADFILE', str(tmp_path / 'bad.jsonl')) for a in args]
    p = run(['reward.py', f'--init_from={tmp_path / "sft"}', f'--out_dir={tmp_path / "never"}', '--device=cpu',
             *args], check=False)
    assert message in error_line(p)
    assert not (tmp_path / 'never').exists()


# -----------------------------------------------------------------------------



# -----------------------------------------------------------------------------
# prepare.py prefs: the supervised model's replies, gold-labelled


def test_prepare_prefs_keeps_correct_incorrect_pairs(tmp_path, tok_meta, monkeypatch):
    import prepare
    write_sft(tmp_path / 'sft', tok_meta)
    monkeypatch.setattr(prepare, 'n_per_skill', 20)

    def fake_sampler(model, tokenizer, prompts, k, temperature, generator=None, return_finished=False, **kw):
        """copy: always right; add: never; the others: 2 distinct right replies, 2 distinct wrong ones, an
        empty one and one cut off before <|end|> (neither may be a rejected reply)."""
        assert return_finished
        out = []
        for p in prompts:
            t = by_prompt[p]
            if t['skill'] == 'copy':
                out.append([(t['answer'], True)] * k)
            elif t['skill'] == 'add':
                out.append([('no idea', True)] * k)
            else:
                out.append([(t['answer'], True), (t['answer'] + ' ', True), ('wrong one', True), ('wrong one', True),
                            ('', True), ('wrong two', True), ('rambling on and on', False)][:k])
        return out

    suite = T.make_task_suite(20, prepare.seed)
    by_prompt = {t['prompt']: t for ts in suite.values() for t in ts}
    monkeypatch.setattr(T, 'sample_replies', fake_sampler)
    stats = prepare.prepare_prefs(str(tmp_path / 'data'), str(tmp_path / 'sft'), n_prompts=10, n_val_prompts=5,
                                  k=7, max_pairs=3, temperature=1.0, device='cpu', seed=prepare.seed)
    by_key = {t['key']: t for ts in suite.values() for t in ts}
    for split, n in (('train', 2), ('val', 1)):  # prompts per skill
        prefs, problems = T.load_preferences(str(tmp_path / 'data' / 'prefs' / f'{split}.jsonl'))
        assert not problems
        assert len(prefs) == 3 * n * 3  # sort, reverse, count: 2 right x 2 wrong = 4 pairs, 3 kept
        for p in prefs:
            t = by_key[p['key']]
            assert p['skill'] in ('sort', 'reverse', 'count') and t in suite[split]
            assert T.check_answer(t, p['chosen']) and not T.check_answer(t, p['rejected'])
            assert p['rejected'] in ('wrong one', 'wrong two')  # never the empty or the unfinished reply
            assert p['prompt'] == [{'role': 'user', 'content': t['prompt']}]
        assert len({(p['key'], p['chosen'], p['rejected']) for p in prefs}) == len(prefs)  # no pair twice
        s = stats[split]
        assert s['copy'] == dict(prompts=n, replies=7 * n, correct=7 * n, empty=0, unfinished=0,
                                 prompts_all_correct=n, prompts_none_correct=0, prompts_with_pairs=0, pairs=0)
        assert s['add']['prompts_none_correct'] == n and s['add']['pairs'] == 0
        assert s['sort'] == dict(prompts=n, replies=7 * n, correct=2 * n, empty=n, unfinished=n,
                                 prompts_all_correct=0, prompts_none_correct=0, prompts_with_pairs=n, pairs=3 * n)
        assert s['all']['pairs'] == 9 * n and s['all']['prompts'] == 5 * n
    meta = json.loads((tmp_path / 'data' / 'prefs' / 'meta.json').read_text())
    assert meta['stats'] == json.loads(json.dumps(stats)) and meta['samples_per_prompt'] == 7
    assert not list((tmp_path / 'data' / 'prefs').glob('*.tmp'))


def test_prepare_prefs_cli(tmp_path, tok_meta):
    p = run(['prepare.py', 'prefs', f'--sft_dir={tmp_path / "nope"}', f'--data_dir={tmp_path}'], check=False)
    assert 'no supervised model at' in error_line(p) and not (tmp_path / 'prefs').exists()
    write_sft(tmp_path / 'sft', tok_meta)
    run(['prepare.py', 'prefs', f'--sft_dir={tmp_path / "sft"}', f'--data_dir={tmp_path}', '--n_per_skill=10',
         '--prefs_prompts=5', '--prefs_val_prompts=5', '--prefs_samples=2', '--device=cpu'])
    meta = json.loads((tmp_path / 'prefs' / 'meta.json').read_text())
    for split in ('train', 'val'):
        assert meta['stats'][split]['all']['prompts'] == 5 and meta['stats'][split]['all']['replies'] == 10
        assert (tmp_path / 'prefs' / f'{split}.jsonl').exists()


def test_best_of_n_equals_the_average_over_every_subset():
    """The closed form (the best of a random n is the i-th lowest with probability C(i-1, n-1) / C(N, n))
    against the slow definition: average, over every n-subset of the N replies, the reply with the top score."""
    import itertools
    from reward import best_of_n
    rng = random.Random(0)
    tasks = [{'skill': 'copy', 'prompt': f'Copy: {w}', 'answer': w} for w in ('a b', 'c d e', 'f')]
    replies = [[t['answer'] if rng.random() < 0.4 else 'wrong' for _ in range(6)] for t in tasks]
    rewards = [[rng.gauss(0, 1) for _ in range(6)] for _ in tasks]
    for row in best_of_n(tasks, replies, rewards, [1, 2, 3, 6]):
        n, acc, score_sum = row['n'], 0.0, 0.0
        for task, rs, sc in zip(tasks, replies, rewards):
            subsets = list(itertools.combinations(range(6), n))
            for sub in subsets:
                j = max(sub, key=lambda k: sc[k])
                acc += T.check_answer(task, rs[j]) / len(subsets)
                score_sum += sc[j] / len(subsets)
        assert row['gold_accuracy'] == pytest.approx(acc / len(tasks))
        assert row['score'] == pytest.approx(score_sum / len(tasks))
        assert row['kl'] == pytest.approx(math.log(n) - (n - 1) / n)
