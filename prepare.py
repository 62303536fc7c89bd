"""
Turn text into the token files train.py reads: data/<dataset>/train.bin, val.bin (flat arrays of token
ids, uint16 while the vocabulary fits, uint32 beyond) and meta.json (the tokenizer, vocab size, dtype).

    python prepare.py shakespeare_char          # tinyshakespeare, one token per character
    python prepare.py shakespeare               # the same text, GPT-2's BPE tokenizer (tiktoken)
    python prepare.py --input=FILE_OR_DIR --dataset=NAME --tokenizer=char|gpt2|PATH.model

The text is streamed in blocks, so a multi-GB input needs memory for one block, not the whole corpus.
A directory's files are read in sorted order (with the tokenizer's end-of-text token between them, if it
has one). The last val_fraction of the text (by bytes) is the validation split.
"""
import json
import os
import sys

import numpy as np

from common import check_settings, fail, write_text_atomic

# -----------------------------------------------------------------------------
dataset = ''          # output folder under data_dir; also picks defaults for the known datasets below
input = ''            # a text file or a directory of them; empty: the known dataset's download
tokenizer = 'char'    # 'char', 'gpt2' (tiktoken) or the path of a tokenizer trained with bpe.py (PREFIX.model)
val_fraction = 0.1
data_dir = 'data'
url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
block_bytes = 1 << 20  # how much text is encoded at a time
# the chat datasets: python prepare.py tasks; python prepare.py shakespeare_tasks
n_per_skill = 2000     # task instances per skill, 80/10/10 train/val/test
vocab_size = 1024      # shakespeare_tasks: size of the BPE trained for it
task_phrasings = 1     # shakespeare_tasks: each train task appears this many times, each in another phrasing
seed = 1337
# preference pairs: python prepare.py prefs --sft_dir=out-sft (the supervised model's replies, gold-labelled)
sft_dir = 'out-sft'      # the supervised model (its model.pt) whose replies are compared
prefs_prompts = 8000     # train task prompts sampled, the same number per skill (8000: all of them)
prefs_val_prompts = 500  # val task prompts: held-out pairs for reward.py and dpo.py
prefs_samples = 8        # replies sampled per prompt
prefs_pairs = 4          # at most this many (correct, incorrect) pairs kept per prompt
prefs_temperature = 1.0
prefs_reference = False  # True: a prompt none of whose sampled replies is correct pairs the task's reference answer
                         # (chosen) with its wrong replies, cut off or not: off-policy pairs, for a model that
                         # rarely succeeds (pipeline.py --smoke uses it: a model trained 4 steps never does)
device = 'auto'          # where the replies are sampled
# -----------------------------------------------------------------------------
TINYSHAKESPEARE = dict(size=1115394, sha256='86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed')
KNOWN = {'shakespeare_char': 'char', 'shakespeare': 'gpt2', 'tasks': None, 'shakespeare_tasks': None}


def input_files(path):
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if not f.startswith('.'))
        if not files:
            fail(f"no files in directory {path}")
        return files
    if not os.path.isfile(path):
        fail(f"input not found: {path}")
    return [path]


def text_blocks(files, block_bytes):
    """Yield (text, bytes_before_it, is_last_of_file) in pieces of about block_bytes, each cut just after a
    newline that sits between two non-space characters. GPT-2's (and GPT-4's) split pattern never puts
    such a newline inside a chunk, so encoding block by block gives exactly the ids of encoding it all."""
    offset = 0
    for path in files:
        carry = ''
        with open(path, encoding='utf-8', newline='') as f:  # newline='': the text exactly as in the file
            while new := f.read(block_bytes):
                text = carry + new
                cut = last_safe_cut(text)
                if cut < 0 and len(text) < 64 * block_bytes:
                    carry = text  # no safe place yet: read more
                    continue
                cut = len(text) if cut < 0 else cut
                yield text[:cut], offset, False
                offset += len(text[:cut].encode('utf-8'))
                carry = text[cut:]
        yield carry, offset, True
        offset += len(carry.encode('utf-8'))


def is_safe_cut(text, i):
    """A newline at i with non-space characters on both sides."""
    return 0 < i < len(text) - 1 and not text[i - 1].isspace() and not text[i + 1].isspace()


def last_safe_cut(text):
    """Index just after the last safe newline, or -1."""
    i = len(text) - 1
    while (i := text.rfind('\n', 0, i)) > 0:
        if is_safe_cut(text, i):
            return i + 1
    return -1


def first_safe_cut(text, start):
    """Index just after the first safe newline at or after start, or len(text)."""
    i = max(start, 1) - 1
    while (i := text.find('\n', i + 1)) != -1:
        if is_safe_cut(text, i):
            return i + 1
    return len(text)


def build_tokenizer(kind, files):
    """Return (encode, meta) for the tokenizer named by kind."""
    if kind == 'char':
        chars = set()
        for path in files:  # first pass: the character set, streamed
            with open(path, encoding='utf-8', newline='') as f:
                while block := f.read(1 << 22):
                    chars.update(block)
        vocab = sorted(chars)
        stoi = {ch: i for i, ch in enumerate(vocab)}
        return (lambda text: [stoi[c] for c in text]), dict(tokenizer='char', vocab=vocab, vocab_size=len(vocab),
                                                            eot_token=None)
    if kind == 'gpt2':
        from tokenizer import gpt2_encoding
        try:
            enc = gpt2_encoding()
        except RuntimeError as e:
            fail(str(e))
        # '<|endoftext|>' inside the text is plain text here; the eot id only separates files
        return enc.encode_ordinary, dict(tokenizer='gpt2', vocab_size=enc.n_vocab, eot_token=enc.eot_token)
    import bpe
    try:
        tok = bpe.load(kind)
    except (ValueError, OSError) as e:
        fail(f"cannot load tokenizer {kind}: {e}")
    fast = tok.to_tiktoken()  # tiktoken's speed with our merges
    with open(kind, encoding='utf-8') as f:
        model_text = f.read()
    return fast.encode_ordinary, dict(tokenizer='bpe', vocab_size=tok.n_vocab, bpe_model=model_text,
                                      bpe_model_path=os.path.abspath(kind),
                                      eot_token=tok.special_tokens.get('<|endoftext|>'))


def fetch_tinyshakespeare(path, url, dataset, data_dir):
    """Download tinyshakespeare (size and sha256 checked) or say how to pass it offline."""
    from download import download
    try:
        download(url, path, expected_sha256=TINYSHAKESPEARE['sha256'], expected_size=TINYSHAKESPEARE['size'])
    except RuntimeError as e:
        data_arg = '' if data_dir == 'data' else f' --data_dir={data_dir}'
        fail(f"{e}. Offline? Get tinyshakespeare's input.txt and run: "
             f"python prepare.py {dataset} --input=PATH/TO/input.txt{data_arg}")


def prepare(dataset, input, tokenizer, val_fraction, data_dir, url):
    # every check that needs no download comes first
    if tokenizer not in ('char', 'gpt2') and not os.path.isfile(tokenizer):
        fail(f"unknown tokenizer '{tokenizer}': expected char, gpt2 or the path of a bpe.py .model file")
    if not 0.0 <= val_fraction < 1.0:
        fail(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = os.path.join(data_dir, dataset)
    if not input:
        if dataset not in KNOWN:
            fail(f"no --input given and '{dataset}' is not a known dataset ({', '.join(KNOWN)})")
        input = os.path.join(out_dir, 'input.txt')
        if not os.path.exists(input):
            fetch_tinyshakespeare(input, url, dataset, data_dir)
    files = input_files(input)
    total = sum(os.path.getsize(p) for p in files)
    if total == 0:
        fail(f"input {input} is empty")
    try:
        encode, meta = build_tokenizer(tokenizer, files)
    except UnicodeDecodeError as e:
        fail(f"input is not UTF-8 text: {e}")
    dtype = np.uint16 if meta['vocab_size'] <= 2**16 else np.uint32
    split_at = int(total * (1 - val_fraction))  # byte offset where the val split begins

    os.makedirs(out_dir, exist_ok=True)
    paths = {s: os.path.join(out_dir, f'{s}.bin') for s in ('train', 'val')}
    paths['meta'] = os.path.join(out_dir, 'meta.json')
    counts = {'train': 0, 'val': 0}
    # everything is written to .tmp files first: a failed run leaves a previous dataset as it was
    written = False
    try:
        with open(paths['train'] + '.tmp', 'wb') as f_train, open(paths['val'] + '.tmp', 'wb') as f_val:
            outs = {'train': f_train, 'val': f_val}

            def write(split, ids):
                np.asarray(ids, dtype=dtype).tofile(outs[split])
                counts[split] += len(ids)

            files_done = 0
            for text, offset, last_of_file in text_blocks(files, block_bytes):
                end = offset + len(text.encode('utf-8'))
                if offset >= split_at:
                    write('val', encode(text))
                elif end <= split_at:
                    write('train', encode(text))
                else:  # this block straddles the split: cut it at a safe newline after the split point
                    n_chars = len(text.encode('utf-8')[:split_at - offset].decode('utf-8', errors='ignore'))
                    cut = first_safe_cut(text, n_chars)
                    write('train', encode(text[:cut]))
                    write('val', encode(text[cut:]))
                files_done += last_of_file
                if last_of_file and files_done < len(files) and meta['eot_token'] is not None:
                    write('val' if end > split_at else 'train', [meta['eot_token']])  # between files
        if counts['train'] == 0 or (val_fraction > 0 and counts['val'] == 0):
            fail(f"input too small to split: {counts['train']} train and {counts['val']} val tokens")
        meta.update(dtype=np.dtype(dtype).name, train_tokens=counts['train'], val_tokens=counts['val'],
                    source=os.path.abspath(input), val_fraction=val_fraction)
        with open(paths['meta'] + '.tmp', 'w', encoding='utf-8') as f:
            json.dump(meta, f, ensure_ascii=False, indent=1)
        written = True
    except UnicodeDecodeError as e:
        fail(f"input is not UTF-8 text: {e}")
    finally:
        if not written:  # failed (or interrupted): remove the partial files
            for p in paths.values():
                if os.path.exists(p + '.tmp'):
                    os.remove(p + '.tmp')
    # meta.json is what marks a dataset ready: it goes first and comes back last, so a crash between
    # these renames leaves a dataset that train.py sees as missing, never new bins with an old meta
    if os.path.exists(paths['meta']):
        os.remove(paths['meta'])
    for split in ('train', 'val', 'meta'):
        os.replace(paths[split] + '.tmp', paths[split])
    print(f"{out_dir}: {counts['train']:,} train and {counts['val']:,} val tokens, "
          f"vocab {meta['vocab_size']:,} ({meta['tokenizer']}), {meta['dtype']}")
    return meta


# -----------------------------------------------------------------------------
# Chat data: the task suite (data/tasks) and the corpus of a small base model that can learn to chat
# offline (data/shakespeare_tasks)

# GPT-2's split pattern, except that every digit is its own chunk: a small model adds far more easily
# when "57" is the tokens 5, 7 rather than one of a hundred unrelated tokens
CHAT_BASE_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++|\p{N}| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def prepare_tasks(data_dir, n_per_skill, seed):
    """data/tasks/{train,val,test}.jsonl: seeded, disjoint instances of every skill (see tasks.py)."""
    from tasks import make_task_suite
    out_dir = os.path.join(data_dir, 'tasks')
    os.makedirs(out_dir, exist_ok=True)
    suite = make_task_suite(n_per_skill, seed)
    for split, tasks in suite.items():
        write_text_atomic(os.path.join(out_dir, f'{split}.jsonl'), ''.join(json.dumps(t) + '\n' for t in tasks))
    print(f"{out_dir}: " + ', '.join(f"{len(v)} {k}" for k, v in suite.items()) + " tasks")
    return suite


def prepare_chat_base(data_dir, input, url, vocab_size, seed, phrasings=1):
    """tinyshakespeare with the task suite's training examples mixed in as plain text ("prompt\\nanswer"), each
    in `phrasings` of its skill's templates, tokenized by a BPE trained on it with the chat tokens registered:
    the corpus of a base model that knows some of the skills but has never seen a chat."""
    import random
    import bpe
    from tasks import TEMPLATES
    from tokenizer import CHAT_TOKENS
    out_dir = os.path.join(data_dir, 'shakespeare_tasks')
    os.makedirs(out_dir, exist_ok=True)
    shakespeare = input or os.path.join(out_dir, 'shakespeare.txt')
    if not input and not os.path.exists(shakespeare):
        fetch_tinyshakespeare(shakespeare, url, 'shakespeare_tasks', data_dir)
    try:
        with open(shakespeare, encoding='utf-8') as f:
            paragraphs = f.read().split('\n\n')
    except UnicodeDecodeError as e:
        fail(f"{shakespeare} is not UTF-8 text ({e.reason} at byte {e.start})")
    if not any(p.strip() for p in paragraphs):
        fail(f"{shakespeare} is empty")
    task_path = os.path.join(data_dir, 'tasks', 'train.jsonl')
    if not os.path.exists(task_path):
        prepare_tasks(data_dir, n_per_skill, seed)
    with open(task_path, encoding='utf-8') as f:
        tasks = [json.loads(line) for line in f]
    rng = random.Random(seed)
    pieces = paragraphs + [f"{t['prompt']}\n{t['answer']}" for t in tasks]
    for t in tasks[:] if phrasings > 1 else []:  # more of the same instances, in the skill's other templates
        args = json.loads(t['key'].split(':', 1)[1])  # the instance without its phrasing (tasks.make_task)
        others = [p for p in TEMPLATES[t['skill']] if p.format(**args) != t['prompt']]
        pieces += [f"{p.format(**args)}\n{t['answer']}" for p in rng.sample(others, min(phrasings - 1, len(others)))]
    rng.shuffle(pieces)  # spread tasks evenly, so the val split (the end) has both kinds of text
    text = '\n\n'.join(pieces)
    mixed = os.path.join(out_dir, 'input.txt')
    write_text_atomic(mixed, text)
    tok = bpe.Tokenizer(CHAT_BASE_PATTERN)
    tok.train(text[:int(len(text) * (1 - val_fraction))], vocab_size)  # the val text stays unseen
    tok.register_special_tokens(['<|endoftext|>', *CHAT_TOKENS])
    tok.save(os.path.join(out_dir, 'tokenizer'))
    return prepare('shakespeare_tasks', mixed, os.path.join(out_dir, 'tokenizer.model'), val_fraction, data_dir, url)


# -----------------------------------------------------------------------------
# Preference data (data/prefs): pairs of the supervised model's own replies, labelled by the task suite's
# gold checkers, rule-based feedback standing in for human labellers (as in RLAIF):
#   python prepare.py prefs --sft_dir=out-sft
# For each prompt, sample several replies at temperature ~1, check each, and keep (correct, incorrect)
# pairs: only prompts the model sometimes gets right and sometimes wrong give a pair.

KNOWN['prefs'] = None


def dedupe(texts):
    return list(dict.fromkeys(texts))


def preference_pairs(task, replies, max_pairs, rng, reference=False):
    """Up to max_pairs (chosen, rejected) records from (text, finished) replies: a distinct correct reply
    against a distinct incorrect one. Left out as rejected: empty replies (not valid preference data) and
    unfinished ones, cut off before <|end|>: the model never produced them followed by <|end|>, as the pair
    would show them, and pushing that down teaches the policy not to stop. With reference=True a prompt
    with no correct reply uses the task's own answer as the chosen one, against its wrong replies cut off or not."""
    from tasks import check_answer
    correct = dedupe(r for r, _ in replies if check_answer(task, r))
    wrong = dedupe(r for r, finished in replies if finished and r.strip() and not check_answer(task, r))
    if reference and not correct:
        correct = [task['answer']]
        wrong = dedupe(r for r, _ in replies if r.strip() and not check_answer(task, r))
    pairs = [(c, w) for c in correct for w in wrong]
    rng.shuffle(pairs)
    return [{'prompt': [{'role': 'user', 'content': task['prompt']}], 'chosen': c, 'rejected': w,
             'skill': task['skill'], 'key': task['key']} for c, w in pairs[:max_pairs]]


def prepare_prefs(data_dir, sft_dir, n_prompts, n_val_prompts, k, max_pairs, temperature, device, seed,
                  reference=False):
    """data/prefs/{train,val}.jsonl from train and val task prompts, and meta.json with what was kept."""
    import random
    import torch
    from model import model_from_checkpoint
    from tasks import SKILLS, chat_ids, check_answer, check_preference, sample_replies
    from tokenizer import load_tokenizer
    path = os.path.join(sft_dir, 'model.pt')
    if not os.path.exists(path):
        fail(f"no supervised model at {path}: run finetune_lora.py first, or pass --sft_dir=DIR")
    if k < 2 or max_pairs < 1 or n_prompts < len(SKILLS) or n_val_prompts < 0 or temperature <= 0:
        fail(f"need prefs_samples >= 2, prefs_pairs >= 1, prefs_prompts >= {len(SKILLS)}, prefs_val_prompts >= 0 "
             f"and prefs_temperature > 0")
    if not os.path.exists(os.path.join(data_dir, 'tasks', 'val.jsonl')):
        prepare_tasks(data_dir, n_per_skill, seed)
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model, meta = model_from_checkpoint(path, device)
    tokenizer = load_tokenizer(meta['data_meta'])
    try:
        chat_ids(tokenizer)
    except ValueError as e:
        fail(str(e))
    rng = random.Random(seed)
    generator = torch.Generator(device).manual_seed(seed)
    out_dir = os.path.join(data_dir, 'prefs')
    os.makedirs(out_dir, exist_ok=True)
    stats = {}
    for split, n in (('train', n_prompts), ('val', n_val_prompts)):
        with open(os.path.join(data_dir, 'tasks', f'{split}.jsonl'), encoding='utf-8') as f:
            pool = [json.loads(line) for line in f]
        per_skill = -(-n // len(SKILLS))  # the same number of prompts for every skill
        tasks = [t for s in SKILLS for t in [t for t in pool if t['skill'] == s][:per_skill]]
        print(f"{split}: sampling {k} replies to each of {len(tasks)} prompts")
        # 16 new tokens, as tasks.gold_accuracy and ppo.py allow: every answer of the suite fits
        replies = sample_replies(model, tokenizer, [t['prompt'] for t in tasks], k, temperature, max_new_tokens=16,
                                 generator=generator, return_finished=True, show_progress=True)
        records, stats[split] = [], {}
        for task, rs in zip(tasks, replies):
            pairs = preference_pairs(task, rs, max_pairs, rng, reference)
            records += [check_preference(p) for p in pairs]  # every pair we write is valid by construction
            s = stats[split].setdefault(task['skill'], dict(prompts=0, replies=0, correct=0, empty=0, unfinished=0,
                                                            prompts_all_correct=0, prompts_none_correct=0,
                                                            prompts_with_pairs=0, pairs=0))
            n_correct = sum(check_answer(task, r) for r, _ in rs)
            s['prompts'] += 1
            s['replies'] += len(rs)
            s['correct'] += n_correct
            s['empty'] += sum(not r.strip() for r, _ in rs)
            s['unfinished'] += sum(not finished for _, finished in rs)
            s['prompts_all_correct'] += n_correct == len(rs)
            s['prompts_none_correct'] += n_correct == 0
            s['prompts_with_pairs'] += bool(pairs)
            s['pairs'] += len(pairs)
        total = {key: sum(s[key] for s in stats[split].values()) for key in next(iter(stats[split].values()), {})}
        stats[split]['all'] = total
        write_text_atomic(os.path.join(out_dir, f'{split}.jsonl'), ''.join(json.dumps(r) + '\n' for r in records))
        print(f"{split}: {'skill':>8} {'prompts':>7} {'replies':>7} {'correct':>7} {'cut off':>7} {'all ok':>6} "
              f"{'none ok':>7} {'pairs':>6}")
        for skill, s in stats[split].items():
            print(f"{'':>{len(split) + 1}} {skill:>8} {s['prompts']:>7} {s['replies']:>7} "
                  f"{s['correct'] / max(1, s['replies']):>7.0%} {s['unfinished']:>7} {s['prompts_all_correct']:>6} "
                  f"{s['prompts_none_correct']:>7} {s['pairs']:>6}")
    meta = dict(sft_model=os.path.abspath(path), samples_per_prompt=k, max_pairs_per_prompt=max_pairs,
                temperature=temperature, reference_answers=reference, seed=seed, stats=stats)
    write_text_atomic(os.path.join(out_dir, 'meta.json'), json.dumps(meta, indent=1))
    print(f"{out_dir}: {stats['train']['all']['pairs']} train and "
          f"{stats['val'].get('all', {}).get('pairs', 0)} val preference pairs")
    return stats


def expand_dataset_name(argv):
    """`python prepare.py shakespeare_char ...`: a known dataset by name, as --dataset and --tokenizer."""
    if argv and not argv[0].startswith('--') and not os.path.isfile(argv[0]):
        name = argv[0]
        if name not in KNOWN:
            fail(f"unknown dataset '{name}': expected {', '.join(KNOWN)}, or --input=PATH --dataset=NAME")
        return [f'--dataset={name}'] + ([f'--tokenizer={KNOWN[name]}'] if KNOWN[name] else []) + argv[1:]
    return argv


if __name__ == '__main__':
    from configurator import apply_config
    apply_config(globals(), expand_dataset_name(sys.argv[1:]))
    check_settings(globals(), positive=('block_bytes', 'n_per_skill', 'vocab_size', 'task_phrasings', 'prefs_samples',
                                        'prefs_pairs', 'prefs_prompts', 'prefs_temperature'),
                   non_negative=('prefs_val_prompts',), fractions=('val_fraction',))
    if not dataset:
        fail("name the dataset: python prepare.py shakespeare_char, or --input=PATH --dataset=NAME")
    if dataset == 'tasks':
        prepare_tasks(data_dir, n_per_skill, seed)
    elif dataset == 'shakespeare_tasks':
        prepare_chat_base(data_dir, input, url, vocab_size, seed, task_phrasings)
    elif dataset == 'prefs':
        prepare_prefs(data_dir, sft_dir, prefs_prompts, prefs_val_prompts, prefs_samples, prefs_pairs,
                      prefs_temperature, device, seed, prefs_reference)
    else:
        prepare(dataset, input, tokenizer, val_fraction, data_dir, url)
