"""
The chat format, the task suite and its gold checkers, and preference data: what SFT, the reward model,
DPO and PPO train and are scored on (model.py is the network itself).

  - chat format: render a conversation to token ids with a mask on the assistant's tokens, and back;
  - task suite: small skills with exact answers (copy, sort, reverse, count, add), seeded disjoint
    train / val / test splits, check_answer (the gold checker) and gold_accuracy (greedy replies, scored);
  - preference data: pairs {prompt, chosen, rejected} from prepare.py or HH-RLHF, split, tokenized, batched.
"""
import hashlib
import json
import math
import os

import torch

from download import download
from model import model_from_checkpoint, pad_batch
from tokenizer import CHAT_TOKENS, load_tokenizer

# -----------------------------------------------------------------------------
# The chat format, in one place. A conversation is a list of {'role': 'user'|'assistant', 'content': str}:
#   <|user|>content<|end|><|assistant|>content<|end|><|user|>...
# Content is encoded as plain text (a user typing '<|end|>' gets no special token). Only the assistant's
# content and its <|end|> are trained on; generation stops at <|end|>.

def chat_ids(tokenizer):
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
    if missing:
        raise ValueError(f"the tokenizer has no chat tokens {missing}: use GPT-2's tokenizer or a bpe.py "
                         f"tokenizer trained with --special_tokens including {','.join(CHAT_TOKENS)}")
    return [tokenizer.special_tokens[t] for t in CHAT_TOKENS]


def load_chat_model(path, device):
    """The supervised model every alignment stage starts from, and its tokenizer (which must have the chat
    tokens): (model, meta, tokenizer). A missing or bad checkpoint or tokenizer ends the script in one line."""
    from common import fail
    try:
        model, meta = model_from_checkpoint(path, device)
        tokenizer = load_tokenizer(meta['data_meta'])
        chat_ids(tokenizer)
    except (ValueError, RuntimeError) as e:  # model.CheckpointError is a ValueError
        fail(str(e))
    return model, meta, tokenizer


def render_chat(messages, tokenizer):
    """Token ids of a conversation and a mask, True on the tokens the assistant is trained to produce."""
    user, assistant, end = chat_ids(tokenizer)
    ids, mask = [], []
    for m in messages:
        if m['role'] not in ('user', 'assistant'):
            raise ValueError(f"unknown role {m['role']!r}: expected 'user' or 'assistant'")
        is_assistant = m['role'] == 'assistant'
        content = tokenizer.encode_ordinary(m['content'])
        ids += [assistant if is_assistant else user] + content + [end]
        mask += [False] + [is_assistant] * (len(content) + 1)
    return ids, mask


def render_prompt(messages, tokenizer):
    """The ids that ask the model for the next assistant turn."""
    ids, _ = render_chat(messages, tokenizer)
    return ids + [chat_ids(tokenizer)[1]]


def chat_example(messages, tokenizer, block_size):
    """(inputs, targets) for training on a conversation: targets are -1 except where the assistant speaks.
    A conversation longer than block_size + 1 tokens is cut at the end, keeping its start (the prompt).
    Returns None if no assistant token is left to learn from."""
    ids, mask = render_chat(messages, tokenizer)
    ids, mask = ids[:block_size + 1], mask[:block_size + 1]
    targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    if all(t == -1 for t in targets):
        return None
    return ids[:-1], targets


# -----------------------------------------------------------------------------
# The task suite: small skills with exact answers, so that fine-tuning, DPO and PPO can be scored by a
# gold checker instead of by eye. Skills from easiest to hardest; each prompt has several phrasings.

SKILLS = ('copy', 'sort', 'reverse', 'count', 'add')
TASK_WORDS = ('cat', 'dog', 'owl', 'fox', 'bee', 'cow', 'pig', 'hen', 'ant', 'elk', 'yak', 'ram',
              'red', 'blue', 'green', 'gold', 'sun', 'moon', 'star', 'tree')
TEMPLATES = {
    'copy': ["Repeat after me: {x}", "Say this back: {x}", "Echo these words: {x}", "Copy: {x}"],
    'sort': ["Sort these digits from smallest to largest: {x}", "Put in increasing order: {x}",
             "Sort: {x}", "Arrange from low to high: {x}"],
    'reverse': ["Reverse the order of these words: {x}", "Say these words backwards: {x}",
                "Reverse: {x}", "Write this list in reverse order: {x}"],
    'count': ["How many times does {w} appear in: {x}", "Count the word {w} in: {x}",
              "Number of {w} in: {x}", "How often is {w} in: {x}"],
    'add': ["What is {a} plus {b}?", "Add {a} and {b}.", "{a} + {b} =", "Compute the sum of {a} and {b}."],
}


def make_task(skill, rng):
    """One random instance: {'skill', 'prompt', 'answer', 'key'}; key names the instance without its
    phrasing, so that splits can be kept disjoint."""
    if skill == 'copy':
        words = [rng.choice(TASK_WORDS) for _ in range(rng.randint(2, 4))]
        args, answer = dict(x=' '.join(words)), ' '.join(words)
    elif skill == 'sort':
        digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5))]
        args, answer = dict(x=' '.join(digits)), ' '.join(sorted(digits))
    elif skill == 'reverse':
        words = [rng.choice(TASK_WORDS) for _ in range(rng.randint(2, 4))]
        args, answer = dict(x=' '.join(words)), ' '.join(reversed(words))
    elif skill == 'count':
        pool = rng.sample(TASK_WORDS, 3)
        words = [rng.choice(pool) for _ in range(rng.randint(3, 6))]
        w = rng.choice(pool)
        args, answer = dict(w=w, x=' '.join(words)), str(words.count(w))
    elif skill == 'add':
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        args, answer = dict(a=a, b=b), str(a + b)
    else:
        raise ValueError(f"unknown skill {skill!r}")
    key = skill + ':' + json.dumps(args, sort_keys=True)
    return dict(skill=skill, prompt=rng.choice(TEMPLATES[skill]).format(**args), answer=answer, key=key)


def make_task_suite(n_per_skill, seed=0, fractions=(0.8, 0.1, 0.1)):
    """Seeded train / val / test splits, n_per_skill instances per skill in all, no instance in two splits."""
    import random
    rng = random.Random(seed)
    splits = {'train': [], 'val': [], 'test': []}
    for skill in SKILLS:
        seen, tasks = set(), []
        for _ in range(100 * n_per_skill):
            if len(tasks) == n_per_skill:
                break
            t = make_task(skill, rng)
            if t['key'] not in seen:
                seen.add(t['key'])
                tasks.append(t)
        n_train, n_val = int(fractions[0] * len(tasks)), int(fractions[1] * len(tasks))
        splits['train'] += tasks[:n_train]
        splits['val'] += tasks[n_train:n_train + n_val]
        splits['test'] += tasks[n_train + n_val:]
    for split in ('val', 'test'):
        rng.shuffle(splits[split])  # skills interleaved: any prefix covers them all
    return splits


def read_tasks(data_dir, split):
    """The suite's split as records (prepare.py tasks writes data_dir/tasks/{split}.jsonl); [] where there is none."""
    path = os.path.join(data_dir, 'tasks', f'{split}.jsonl')
    if not os.path.exists(path):
        return []
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f]


def eval_tasks_from(data_dir, n):
    """The held-out prompts every stage reports its "val gold accuracy" on: the first n of the val split. Its skills
    are interleaved (make_task_suite shuffles each split), so any prefix is a random sample that covers them all,
    and every stage, whatever its seed, takes the same one."""
    return read_tasks(data_dir, 'val')[:n] if n else []


def check_answer(task, response):
    """The gold checker: the response must be the answer, up to surrounding and repeated whitespace."""
    return ' '.join(response.split()) == task['answer']


@torch.no_grad()
def gold_accuracy(model, tokenizer, tasks, batch_size=64, max_new_tokens=16):
    """Per-skill accuracy of greedy replies (KV cache, batched) to each task's prompt, and the replies."""
    end = chat_ids(tokenizer)[2]
    was_training = model.training
    model.eval()
    replies = []
    for i in range(0, len(tasks), batch_size):
        batch = tasks[i:i + batch_size]
        prompts = [render_prompt([{'role': 'user', 'content': t['prompt']}], tokenizer) for t in batch]
        for row in model.generate(prompts, max_new_tokens, temperature=0, stop_token=end,
                                  vocab_limit=tokenizer.n_vocab):
            replies.append(tokenizer.decode(row))
    model.train(was_training)
    acc = {}
    for skill in SKILLS:
        results = [check_answer(t, r) for t, r in zip(tasks, replies) if t['skill'] == skill]
        if results:
            acc[skill] = sum(results) / len(results)
    acc['all'] = sum(check_answer(t, r) for t, r in zip(tasks, replies)) / max(1, len(tasks))
    return acc, replies


def mcnemar(correct_a, correct_b):
    """Is model b better than model a on the same prompts, or is the difference noise? McNemar's exact test
    looks only at the prompts where they disagree: fixed (a wrong, b right) and broken (a right, b wrong). If
    neither model were better, each such prompt would be a fair coin; p (two-sided) is the probability of a
    split at least this uneven. Returns (fixed, broken, p)."""
    fixed = sum(1 for a, b in zip(correct_a, correct_b) if b and not a)
    broken = sum(1 for a, b in zip(correct_a, correct_b) if a and not b)
    n = fixed + broken
    tail = sum(math.comb(n, k) for k in range(min(fixed, broken) + 1)) / 2 ** n
    return fixed, broken, min(1.0, 2 * tail)


# -----------------------------------------------------------------------------
# Preference data, shared by reward.py, dpo.py and ppo.py. A preference is
#   {'prompt': [messages, ending with a user turn], 'chosen': str, 'rejected': str}
# (two candidate assistant replies to the prompt, the first one preferred; other fields ride along).
# prepare.py prefs writes these as JSONL; Anthropic's HH-RLHF transcripts are converted on loading.

HH_TURN = '\n\n(Human|Assistant):'  # HH-RLHF transcripts: "\n\nHuman: ...\n\nAssistant: ..."


def check_preference(r):
    """A preference record in the chat format, or ValueError saying what is wrong with it. A plain
    string prompt is one user turn."""
    if not isinstance(r, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in ('prompt', 'chosen', 'rejected') if k not in r]
    if missing:
        raise ValueError(f"missing field {', '.join(missing)}")
    prompt = r['prompt']
    if isinstance(prompt, str):
        prompt = [{'role': 'user', 'content': prompt}]
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and m.get('role') in ('user', 'assistant') and isinstance(m.get('content'), str)
            for m in prompt):
        raise ValueError("prompt is not a string or a list of {'role': 'user'|'assistant', 'content': str}")
    if prompt[-1]['role'] != 'user':
        raise ValueError("prompt does not end with a user turn")
    if not any(m['content'].strip() for m in prompt):
        raise ValueError("empty prompt")
    for k in ('chosen', 'rejected'):
        if not isinstance(r[k], str):
            raise ValueError(f"{k} is not a string")
        if not r[k].strip():
            raise ValueError(f"empty {k}")
    if r['chosen'].strip() == r['rejected'].strip():
        raise ValueError("chosen and rejected are identical")
    return {**r, 'prompt': prompt}


def parse_hh_transcript(text):
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', ...}]"""
    import re
    parts = re.split(HH_TURN, text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("not an HH-RLHF transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...')")
    return [{'role': 'user' if role == 'Human' else 'assistant', 'content': content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def hh_to_preference(r):
    """An HH-RLHF record {chosen, rejected} (two whole transcripts that differ only in the last assistant
    turn) as a preference: prompt = the turns before that reply; chosen / rejected = the two replies."""
    if not isinstance(r, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in ('chosen', 'rejected') if not isinstance(r.get(k), str)]
    if missing:
        raise ValueError(f"missing field {', '.join(missing)}")
    chosen, rejected = parse_hh_transcript(r['chosen']), parse_hh_transcript(r['rejected'])
    if chosen[-1]['role'] != 'assistant' or rejected[-1]['role'] != 'assistant':
        raise ValueError("a transcript does not end with an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("chosen and rejected transcripts differ before the last Assistant turn")
    return check_preference({'prompt': chosen[:-1], 'chosen': chosen[-1]['content'],
                             'rejected': rejected[-1]['content']})


def load_preferences(source, cache_dir='data/prefs_cache'):
    """Preferences from a JSONL file (optionally gzipped), local or a URL (downloaded once into cache_dir).
    Each line is either our format {prompt, chosen, rejected} or HH-RLHF's {chosen, rejected} transcripts.
    Returns (preferences, problems): a bad line (not JSON, missing fields, empty or identical replies)
    is skipped, and problems lists (line number, reason) for each."""
    import gzip
    if source.startswith(('http://', 'https://')):
        # HH-RLHF has a train.jsonl.gz in each of its folders: the URL's hash keeps them apart
        name = os.path.basename(source.split('?')[0]) or 'prefs.jsonl'
        path = os.path.join(cache_dir, hashlib.sha256(source.encode()).hexdigest()[:12] + '-' + name)
        if not os.path.exists(path):
            download(source, path)  # RuntimeError with a readable message if it fails
        source = path
    if not os.path.isfile(source):
        raise FileNotFoundError(f"preference file not found: {source}")
    with open(source, 'rb') as f:
        gz = f.read(2) == b'\x1f\x8b'  # gzip's magic number, whatever the file is called
    prefs, problems = [], []
    with (gzip.open(source, 'rt', encoding='utf-8') if gz else open(source, encoding='utf-8')) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                prefs.append(check_preference(r) if isinstance(r, dict) and 'prompt' in r else hh_to_preference(r))
            except (json.JSONDecodeError, ValueError) as e:
                problems.append((n, str(e) if not isinstance(e, json.JSONDecodeError) else f"not JSON ({e.msg})"))
    return prefs, problems


def preference_example(pref, tokenizer, block_size):
    """Token ids of prompt + chosen and prompt + rejected (each reply ends with <|end|>), with masks True on
    the reply tokens. A pair longer than block_size loses the start of its prompt first (the same for both,
    keeping at least half the block for the replies), then the end of its replies. None if truncation
    leaves the two sequences equal."""
    end = chat_ids(tokenizer)[2]
    prompt = render_prompt(pref['prompt'], tokenizer)
    replies = [tokenizer.encode_ordinary(pref[k]) + [end] for k in ('chosen', 'rejected')]
    n_prompt = min(len(prompt), max(block_size - max(len(r) for r in replies), block_size // 2))
    cut = [r[:block_size - n_prompt] for r in replies]
    if cut[0] == cut[1]:
        return None
    prompt_kept = prompt[len(prompt) - n_prompt:]
    ex = {'truncated': n_prompt < len(prompt) or cut != replies, 'skill': pref.get('skill')}
    for k, r in zip(('chosen', 'rejected'), cut):
        ex[k], ex[k + '_mask'] = prompt_kept + r, [False] * n_prompt + [True] * len(r)
    return ex


def pairs_by_length(examples, runs=2):
    """The pairs of a batch in `runs` runs of similar length (sorted by their longer sequence), each with its
    share of the pairs: [(pairs, share)]. preference_batch pads a run only to its own longest row (a batch of
    replies to prompts of 7-21 tokens padded to its longest row is ~45% padding); a mean over the batch's pairs
    is the runs' means weighted by their shares."""
    pairs = sorted(examples, key=lambda e: max(len(e['chosen']), len(e['rejected'])))
    size = -(-len(pairs) // runs)
    return [(pairs[s:s + size], len(pairs[s:s + size]) / len(pairs)) for s in range(0, len(pairs), size)]


def prompt_lengths(mask):
    """Each preference_batch row's prompt length (the index of its first reply token), as a list: what
    rl.pack_by_prompt needs to run a pair's prompt once."""
    return mask.float().argmax(1).tolist()


def preference_batch(examples, device='cpu'):
    """(idx, mask, lengths) for a list of preference_example()s: 2B right-padded rows, the B chosen
    sequences first and then the B rejected ones; mask is True on reply tokens; lengths count real tokens."""
    seqs = [e['chosen'] for e in examples] + [e['rejected'] for e in examples]
    masks = [e['chosen_mask'] for e in examples] + [e['rejected_mask'] for e in examples]
    idx = pad_batch(seqs, 0, device)
    mask = pad_batch(masks, 0, device).bool()
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long, device=device)
    return idx, mask, lengths


@torch.no_grad()
def sample_replies(model, tokenizer, prompts, k=1, temperature=1.0, max_new_tokens=24, batch_size=256,
                   generator=None, top_k=None, return_finished=False, show_progress=False):
    """k sampled assistant replies (text) to each prompt (a list of messages, or a string: one user turn),
    batched with the KV cache and stopped at <|end|>. Returns one list of k replies per prompt; with
    return_finished, each reply is (text, finished): False if it ran out of tokens before <|end|>.
    show_progress prints how many are done and the time left after each batch."""
    import time
    from common import progress
    t0 = time.time()
    end = chat_ids(tokenizer)[2]
    was_training = model.training
    model.eval()
    ids = [render_prompt(p if isinstance(p, list) else [{'role': 'user', 'content': p}], tokenizer)
           for p in prompts for _ in range(k)]
    out = []
    for i in range(0, len(ids), batch_size):
        for row in model.generate(ids[i:i + batch_size], max_new_tokens, temperature=temperature, top_k=top_k,
                                  stop_token=end, generator=generator, vocab_limit=tokenizer.n_vocab):
            text = tokenizer.decode(row)
            out.append((text, len(row) < max_new_tokens) if return_finished else text)  # the stop token is not in row
        if show_progress:
            print(f"sampled {progress(len(out), len(ids), t0)}", flush=True)
    model.train(was_training)
    return [out[j * k:(j + 1) * k] for j in range(len(prompts))]


def describe_problems(problems, limit=3):
    """'N skipped: 3 missing field prompt, 1 empty chosen (line 7: empty chosen; ...)' for load_preferences."""
    from collections import Counter
    counts = Counter(reason for _, reason in problems)
    first = '; '.join(f"line {n}: {reason}" for n, reason in problems[:limit])
    return f"{len(problems)} bad records skipped: " + ', '.join(f"{c} {r}" for r, c in counts.most_common()) + \
        f" (first: {first})"


def preference_splits(data, data_dir='data', val_data='', val_fraction=0.05, seed=0):
    """Train and val preferences, and lines reporting what was skipped. data='prefs' reads prepare.py's
    data_dir/prefs/{train,val}.jsonl; otherwise data (and val_data, if given) is a JSONL(.gz) path or URL
    in our format or HH-RLHF's, and without val_data a seeded val_fraction of it is held out.
    Raises FileNotFoundError, RuntimeError (a failed download) or ValueError (nothing usable)."""
    import random
    cache = os.path.join(data_dir, 'prefs_cache')
    if data == 'prefs':
        folder = os.path.join(data_dir, 'prefs')
        if not os.path.exists(os.path.join(folder, 'meta.json')):
            raise FileNotFoundError(f"no preference data in {folder}: run python prepare.py prefs --sft_dir=out-sft")
        data, val_data = os.path.join(folder, 'train.jsonl'), os.path.join(folder, 'val.jsonl')
    train, problems = load_preferences(data, cache)
    report = [f"{data}: {describe_problems(problems)}"] if problems else []
    if val_data:
        val, val_problems = load_preferences(val_data, cache)
        report += [f"{val_data}: {describe_problems(val_problems)}"] if val_problems else []
    else:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_val = max(1, int(len(train) * val_fraction)) if len(train) > 1 else 0
        val, train = [train[i] for i in order[:n_val]], [train[i] for i in order[n_val:]]
    if not train or not val:
        raise ValueError(f"{data}: {len(train)} usable train and {len(val)} usable val preference pairs; need some of each"
                         + (f" ({describe_problems(problems)})" if problems else ''))
    return train, val, report


def encode_preferences(prefs, tokenizer, block_size):
    """preference_example() of each pair; returns (examples, the number truncated, the number dropped)."""
    examples, truncated, dropped = [], 0, 0
    for p in prefs:
        ex = preference_example(p, tokenizer, block_size)
        if ex is None:
            dropped += 1
        else:
            truncated += ex['truncated']
            examples.append(ex)
    return examples, truncated, dropped
