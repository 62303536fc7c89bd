"""tasks.py against references: the chat format rendered and parsed back, losses on assistant tokens computed
by hand, the task suite's answers recomputed from the prompts, gold accuracy of a model that answers by rule,
and preference data (our format, HH-RLHF transcripts plain, gzipped and over HTTP) checked field by field."""
import functools
import gzip
import http.server
import math
import shutil
import threading
from pathlib import Path

import pytest
import torch

import bpe
import tasks as T
import tokenizer as TK
from model import GPT, GPTConfig
from test_dpo import PAIRS, tiny_gpt, toy_prefs, write_jsonl

FIXTURE = Path(__file__).parent / 'fixtures' / 'hh_rlhf_small.jsonl'


def parse_chat(ids, tokenizer):
    """The inverse of render_chat, written here as the tests' reference: token ids back to a list of messages."""
    user, assistant, end = T.chat_ids(tokenizer)
    messages, i = [], 0
    while i < len(ids):
        if ids[i] not in (user, assistant):
            raise ValueError(f"expected a role token at position {i}")
        j = ids.index(end, i + 1) if end in ids[i + 1:] else len(ids)
        messages.append({'role': 'user' if ids[i] == user else 'assistant',
                         'content': tokenizer.decode(ids[i + 1:j])})
        i = j + 1
    return messages


def tiny(vocab_size=40, **kw):
    torch.manual_seed(0)
    cfg = dict(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


# -----------------------------------------------------------------------------
# the chat format and the task suite


@pytest.fixture(scope='module')
def chat_tokenizer():
    tok = bpe.Tokenizer('gpt2')
    tok.train("Repeat after me: cat dog owl. What is 12 plus 30? 42 " * 20, 300)
    tok.register_special_tokens(['<|endoftext|>', *TK.CHAT_TOKENS])
    return tok


def test_chat_renderer_round_trips_and_masks_assistant(chat_tokenizer):
    tok = chat_tokenizer
    chat = [{'role': 'user', 'content': 'Repeat after me: cat <|end|> dog'},
            {'role': 'assistant', 'content': 'cat <|end|> dog'},
            {'role': 'user', 'content': 'What is 12 plus 30?'},
            {'role': 'assistant', 'content': '42'}]
    ids, mask = T.render_chat(chat, tok)
    assert parse_chat(ids, tok) == chat  # special-looking text in content stays text
    user, assistant, end = T.chat_ids(tok)
    assert ids.count(end) == 4  # typed '<|end|>' did not become the special token
    # the mask covers exactly each assistant content plus its <|end|>
    expected = []
    for m in chat:
        n = len(tok.encode_ordinary(m['content']))
        expected += [False] + [m['role'] == 'assistant'] * (n + 1)
    assert mask == expected
    prompt = T.render_prompt(chat[:1], tok)
    assert prompt[-1] == assistant and prompt[:-1] == T.render_chat(chat[:1], tok)[0]


def test_only_assistant_tokens_carry_loss(chat_tokenizer):
    tok = chat_tokenizer
    m = tiny(vocab_size=tok.n_vocab, block_size=64)
    chat = [{'role': 'user', 'content': 'What is 12 plus 30?'}, {'role': 'assistant', 'content': '42'}]
    x, y = T.chat_example(chat, tok, 64)
    x, y = torch.tensor([x]), torch.tensor([y])
    _, loss = m(x, y)
    # by hand: mean negative log-probability of the assistant tokens only
    logits = m(x, torch.zeros_like(x))[0][0]
    ids, mask = T.render_chat(chat, tok)
    nll = [-torch.log_softmax(logits[t], -1)[ids[t + 1]] for t in range(len(ids) - 1) if mask[t + 1]]
    assert abs(loss.item() - (sum(nll) / len(nll)).item()) < 1e-5
    # changing a prompt token's target leaves the loss unchanged, changing an assistant one does not
    raw = torch.tensor([ids[1:]])  # the unmasked next tokens
    keep = torch.tensor([mask[1:]])
    prompt_t = next(t for t in range(len(ids) - 1) if not mask[t + 1])
    answer_t = next(t for t in range(len(ids) - 1) if mask[t + 1])
    for t, same in ((prompt_t, True), (answer_t, False)):
        changed = raw.clone()
        changed[0, t] = (changed[0, t] + 1) % tok.n_vocab
        _, loss2 = m(x, torch.where(keep, changed, -1))
        assert (abs(loss2.item() - loss.item()) < 1e-7) == same


def test_long_conversation_is_truncated_at_the_end(chat_tokenizer):
    tok = chat_tokenizer
    chat = [{'role': 'user', 'content': 'cat ' * 10}, {'role': 'assistant', 'content': 'dog ' * 50}]
    x, y = T.chat_example(chat, tok, 24)
    full, _ = T.render_chat(chat, tok)
    assert len(x) == 24 and x == full[:24] and y[-1] == full[24]
    # a prompt that fills the whole block leaves nothing to learn: dropped
    assert T.chat_example([{'role': 'user', 'content': 'cat ' * 40}, chat[1]], tok, 24) is None


def test_task_suite_is_seeded_disjoint_and_checkable():
    a, b = T.make_task_suite(50, seed=3), T.make_task_suite(50, seed=3)
    assert a == b
    keys = {s: {t['key'] for t in v} for s, v in a.items()}
    assert not keys['train'] & keys['val'] and not keys['train'] & keys['test'] and not keys['val'] & keys['test']
    assert {t['skill'] for t in a['test']} == set(T.SKILLS)
    for t in a['train']:
        assert T.check_answer(t, ' ' + t['answer'] + '\n')
        assert not T.check_answer(t, t['answer'] + ' x')
    # the answers against a slow recomputation from the prompt's words
    for t in a['train']:
        words = t['prompt'].split(': ')[-1].split()
        if t['skill'] == 'sort':
            assert t['answer'] == ' '.join(sorted(words))
        elif t['skill'] == 'reverse':
            assert t['answer'] == ' '.join(words[::-1])
        elif t['skill'] == 'add':
            nums = [int(w.strip('?.')) for w in t['prompt'].split() if w.strip('?.').isdigit()]
            assert int(t['answer']) == sum(nums)


def test_gold_accuracy_with_a_model_that_answers_by_rule(chat_tokenizer):
    # a stand-in model whose greedy reply is the right answer for 'copy' tasks: accuracy must be 100% there
    tok = chat_tokenizer
    tasks = [t for t in T.make_task_suite(20, seed=1)['test'] if t['skill'] in ('copy', 'add')]

    class Oracle(torch.nn.Module):
        training = False

        def eval(self):
            return self

        def train(self, mode=True):
            return self

        def generate(self, prompts, n, temperature, stop_token, vocab_limit):
            out = []
            for p in prompts:
                text = tok.decode(p)
                task = next(t for t in tasks if t['prompt'] in text)
                out.append(tok.encode_ordinary(task['answer'] if task['skill'] == 'copy' else 'no'))
            return out

    acc, replies = T.gold_accuracy(Oracle(), tok, tasks)
    assert acc['copy'] == 1.0 and acc['add'] == 0.0
    assert math.isclose(acc['all'], sum(t['skill'] == 'copy' for t in tasks) / len(tasks))


# -----------------------------------------------------------------------------
# preference data

# HH-RLHF: whole transcripts that differ in the last assistant turn

HH_EXPECTED = [
    {'prompt': [{'role': 'user', 'content': 'What is the capital of France?'}],
     'chosen': 'The capital of France is Paris.', 'rejected': "I don't know."},
    {'prompt': [{'role': 'user', 'content': 'Can you help me bake bread?'},
                {'role': 'assistant', 'content': 'Sure. Do you have yeast?'},
                {'role': 'user', 'content': 'Yes, a packet.'}],
     'chosen': 'Great: mix flour, water, salt and the yeast, knead, let it rise, then bake.',
     'rejected': 'Buy some bread instead.'},
    {'prompt': [{'role': 'user', 'content': "Translate 'caf\u00e9' to English."}],
     'chosen': 'Coffee shop.\nIt can also mean coffee.', 'rejected': 'Tea.'},
]
HH_PROBLEMS = [(4, 'missing field rejected'), (5, 'chosen and rejected are identical'), (6, 'empty rejected'),
               (7, 'chosen and rejected transcripts differ before the last Assistant turn'), (8, 'not JSON'),
               (9, 'not an HH-RLHF transcript'), (10, 'a transcript does not end with an Assistant turn')]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_preference_example_masks_exactly_the_reply(tokenizer):
    user, assistant, end = T.chat_ids(tokenizer)
    for p in PAIRS:
        pref = T.check_preference(p)
        ex = T.preference_example(pref, tokenizer, block_size=64)
        prompt = T.render_prompt(pref['prompt'], tokenizer)
        for k in ('chosen', 'rejected'):
            reply = tokenizer.encode_ordinary(p[k]) + [end]
            assert ex[k] == prompt + reply
            assert ex[k + '_mask'] == [False] * len(prompt) + [True] * len(reply)
        assert not ex['truncated']


def test_preference_example_truncates_prompt_start_then_reply_end(tokenizer):
    long_prompt = 'word ' * 40
    p = T.check_preference({'prompt': long_prompt, 'chosen': 'short', 'rejected': 'x' * 50})
    ex = T.preference_example(p, tokenizer, block_size=48)
    full_prompt = T.render_prompt(p['prompt'], tokenizer)
    assert ex['truncated'] and len(ex['chosen']) <= 48 and len(ex['rejected']) <= 48
    n_prompt = ex['chosen_mask'].count(False)
    assert n_prompt == ex['rejected_mask'].count(False) == 24  # half the block kept for the replies
    assert ex['chosen'][:n_prompt] == full_prompt[-n_prompt:] == ex['rejected'][:n_prompt]  # its end kept
    assert ex['rejected'][n_prompt:] == tokenizer.encode_ordinary('x' * 50)[:24]            # reply's start kept
    # replies that only differ beyond the block are the same sequence: no pair left
    same = T.check_preference({'prompt': 'hi', 'chosen': 'y' * 80 + 'a', 'rejected': 'y' * 80 + 'b'})
    assert T.preference_example(same, tokenizer, block_size=48) is None


def test_preference_splits_say_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match='python prepare.py prefs'):
        T.preference_splits('prefs', str(tmp_path))
    with pytest.raises(FileNotFoundError, match='not found'):
        T.preference_splits(str(tmp_path / 'none.jsonl'), str(tmp_path))
    # without val_data a seeded share is held out, disjoint from train
    write_jsonl(tmp_path / 'p.jsonl', toy_prefs(40, 0))
    train, val, report = T.preference_splits(str(tmp_path / 'p.jsonl'), str(tmp_path), val_fraction=0.25, seed=3)
    assert len(train) == 30 and len(val) == 10 and not report
    assert sorted(p['prompt'][0]['content'] for p in train + val) == sorted(p['prompt'] for p in toy_prefs(40, 0))
    again = T.preference_splits(str(tmp_path / 'p.jsonl'), str(tmp_path), val_fraction=0.25, seed=3)
    assert again[1] == val


def check_hh(prefs, problems):
    assert prefs == HH_EXPECTED
    assert [n for n, _ in problems] == [n for n, _ in HH_PROBLEMS]
    for (_, reason), (_, expected) in zip(problems, HH_PROBLEMS):
        assert reason.startswith(expected)


def test_hh_rlhf_plain_and_gzipped(tmp_path):
    check_hh(*T.load_preferences(str(FIXTURE), str(tmp_path / 'cache')))
    gz = tmp_path / 'train.jsonl.gz'
    gz.write_bytes(gzip.compress(FIXTURE.read_bytes()))
    check_hh(*T.load_preferences(str(gz), str(tmp_path / 'cache')))
    plain_named_gz = tmp_path / 'plain.jsonl.gz'  # gzip is recognised by its bytes, not its name
    shutil.copy(FIXTURE, plain_named_gz)
    check_hh(*T.load_preferences(str(plain_named_gz), str(tmp_path / 'cache')))


def test_hh_transcript_becomes_the_chat_format(tokenizer):
    pref = HH_EXPECTED[1]
    ids = T.preference_example(pref, tokenizer, 256)['chosen']
    assert parse_chat(ids, tokenizer) == pref['prompt'] + [{'role': 'assistant', 'content': pref['chosen']}]


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over a temporary folder: (folder, base url)."""
    root = tmp_path / 'www'
    root.mkdir()
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()


def test_hh_rlhf_from_url_is_downloaded_once(http_server, tmp_path):
    root, url = http_server
    (root / 'helpful-base').mkdir()
    (root / 'helpful-base' / 'train.jsonl.gz').write_bytes(gzip.compress(FIXTURE.read_bytes()))
    cache = tmp_path / 'cache'
    check_hh(*T.load_preferences(f'{url}/helpful-base/train.jsonl.gz', str(cache)))
    assert len(list(cache.glob('*-train.jsonl.gz'))) == 1 and not list(cache.glob('*.part'))
    shutil.rmtree(root / 'helpful-base')  # the second load comes from the cache
    check_hh(*T.load_preferences(f'{url}/helpful-base/train.jsonl.gz', str(cache)))
    with pytest.raises(RuntimeError, match='download of .* failed'):
        T.load_preferences(f'{url}/missing.jsonl.gz', str(cache))
    assert not list(cache.glob('missing*'))


def test_our_format_and_hh_mixed_and_bad_records():
    good = T.check_preference({'prompt': 'Hi', 'chosen': 'Hello', 'rejected': 'Go away', 'skill': 'x'})
    assert good['prompt'] == [{'role': 'user', 'content': 'Hi'}] and good['skill'] == 'x'
    for bad, reason in [({'prompt': 'Hi', 'chosen': 'a'}, 'missing field rejected'),
                        ({'prompt': 'Hi', 'chosen': ' a ', 'rejected': 'a'}, 'identical'),
                        ({'prompt': 'Hi', 'chosen': '', 'rejected': 'a'}, 'empty chosen'),
                        ({'prompt': '  ', 'chosen': 'b', 'rejected': 'a'}, 'empty prompt'),
                        ({'prompt': 'Hi', 'chosen': 3, 'rejected': 'a'}, 'chosen is not a string'),
                        ({'prompt': [{'role': 'assistant', 'content': 'x'}], 'chosen': 'b', 'rejected': 'a'},
                         'end with a user turn'),
                        ({'prompt': [{'role': 'system', 'content': 'x'}], 'chosen': 'b', 'rejected': 'a'},
                         'prompt is not'),
                        (['a'], 'not a JSON object')]:
        with pytest.raises(ValueError, match=reason):
            T.check_preference(bad)


def test_sample_replies_greedy_matches_generate(tokenizer):
    m = tiny_gpt().eval()
    prompts = ['Copy: cat dog', [{'role': 'user', 'content': 'Sort: 3 1 2'}]]
    out = T.sample_replies(m, tokenizer, prompts, k=3, temperature=0, max_new_tokens=8, batch_size=4)
    end = T.chat_ids(tokenizer)[2]
    for p, replies in zip(prompts, out):
        ids = T.render_prompt(p if isinstance(p, list) else [{'role': 'user', 'content': p}], tokenizer)
        alone = tokenizer.decode(m.generate([ids], 8, temperature=0, stop_token=end, vocab_limit=tokenizer.n_vocab)[0])
        assert replies == [alone] * 3
        row = m.generate([ids], 8, temperature=0, stop_token=end, vocab_limit=tokenizer.n_vocab)[0]
        flagged = T.sample_replies(m, tokenizer, [p], k=2, temperature=0, max_new_tokens=8, return_finished=True)
        assert flagged == [[(alone, len(row) < 8)] * 2]  # finished: it emitted <|end|> within 8 tokens


@pytest.mark.parametrize('fixed, broken', [(0, 0), (3, 0), (5, 5), (7, 2), (1, 12), (30, 18)])
def test_mcnemar_matches_the_binomial_tail_enumerated(fixed, broken):
    """McNemar's exact p against the definition: under no difference each discordant prompt is a fair coin;
    p is the probability, over every outcome of n coins, of a split at least as uneven as the one seen."""
    a = [True] * broken + [False] * fixed + [True, False, True]  # + some concordant prompts (ignored)
    b = [False] * broken + [True] * fixed + [True, False, True]
    n = fixed + broken
    p_slow = sum(math.comb(n, k) for k in range(n + 1) if abs(k - n / 2) >= abs(fixed - n / 2)) / 2 ** n
    got_fixed, got_broken, p = T.mcnemar(a, b)
    assert (got_fixed, got_broken) == (fixed, broken)
    assert p == pytest.approx(min(1.0, p_slow), rel=1e-12)
