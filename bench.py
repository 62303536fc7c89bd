"""
Benchmark: training throughput (tokens/s, MFU) and sampling throughput (KV cache vs recomputing the
context) for any model size, on synthetic or real data. Prints one summary table.

    python bench.py                                          # GPT-2 124M shape, synthetic data
    python bench.py config/shakespeare_cpu.py --device=cpu   # the CPU quickstart model
    python bench.py --real_data=True --dataset=shakespeare_char
    python bench.py config/chat_base.py --device=cpu --vocab_size=1028 --dtype=bfloat16   # or --compile=True
    python bench.py --chat_model=runs/cpu/sft --data_dir=runs/cpu/data   # sampling replies as prefs and RL do

Timings exclude warmup steps (compilation, allocator growth); each figure is the median of `repeats`
timed runs, with the device synchronized before reading the clock. MFU (model FLOPs utilisation: nanoGPT's
count of training FLOPs per token times tokens/s, over a peak) is against the GPU's datasheet peak on CUDA and,
on a CPU, against the machine's own dense-matmul peak, measured here at the same threads and dtype.
"""
import os
import statistics
import time

import numpy as np
import torch

from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
batch_size = 12
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True
pos_emb = 'learned'
vocab_size = 50304
real_data = False          # True: batches from data_dir/dataset/train.bin instead of random ids
dataset = 'shakespeare_char'
data_dir = 'data'
device = 'auto'
dtype = 'auto'
compile = None             # torch.compile: None on CUDA only; True / False to say (on CPU it needs a C++ compiler)
warmup = 5                 # untimed training steps
steps = 20                 # timed training steps per repeat
repeats = 3
sample_batch = 10          # sampling: sequences drawn as one batch
sample_tokens = 200        # new tokens per sequence
muon = False               # True: Muon for the hidden matrices (train.py's --muon), AdamW for the rest
muon_lr = 0.02
peak_size = 2048           # CPU: n of the n x n matmul that measures the machine's own peak, MFU's yardstick (0: skip)
chat_model = ''            # a chat model (folder or checkpoint): time sampling replies to data_dir's task prompts
chat_prompts = 512         # val task prompts sampled
chat_samples = 8           # replies per prompt for preference pairs (prepare.py prefs), at temperature 1
chat_batch = 256           # replies per batch for pairs (tasks.sample_replies); rollouts: 128 at 0.7 (ppo_tasks_gold)
seed = 1337
# -----------------------------------------------------------------------------
from common import check_settings, fail, seed_everything, setup_device
from configurator import apply_config
apply_config(globals(), foreign_files=True)  # train.py's config files: their model's shape; the rest is skipped
check_settings(globals(), positive=('batch_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'vocab_size', 'steps',
                                    'repeats', 'sample_batch', 'sample_tokens', 'chat_prompts', 'chat_samples',
                                    'chat_batch'),
               non_negative=('warmup', 'peak_size'), fractions=('dropout',),
               choices={'pos_emb': ('learned', 'rope'), 'dtype': ('auto', 'float32', 'bfloat16', 'float16')})
if n_embd % n_head:
    fail(f"n_head must divide n_embd; got n_embd={n_embd}, n_head={n_head}")

seed_everything(seed)
_, _, _, device, device_type, dtype, ctx = setup_device(device, dtype)  # one process, no torchrun
use_compile = device_type == 'cuda' if compile is None else compile


def sync():
    if device_type == 'cuda':
        torch.cuda.synchronize()


def timed(f):
    """f's result and its median wall time over `repeats` runs."""
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = f()
        sync()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def chat_sampling(max_new_tokens=16):
    """Replies to the task suite's val prompts as the prefs stage samples them (chat_samples per prompt at
    temperature 1, chat_batch at a time) and as RL's rollouts do (one per prompt at 0.7, 128 at a time, then the
    log-probs pass), each against its own forward passes replayed alone: the same batch shapes, step by step
    (the distinct prompts, then the rows still going), through the KV cache, with nothing else: no sampling, no
    per-token Python, no stopping. Their ratio is what the sampler adds to the model's own compute.
    Rows of (what, replies/s, tokens/s, tokens/reply)."""
    from model import find_model
    from rl import logprobs_by_length, rollout
    from tasks import chat_ids, load_chat_model, read_tasks, render_prompt
    model, _, tokenizer = load_chat_model(find_model(chat_model) or chat_model if os.path.isdir(chat_model)
                                          else chat_model, device)
    model.eval()
    end, vocab = chat_ids(tokenizer)[2], tokenizer.n_vocab
    tasks = read_tasks(data_dir, 'val')[:chat_prompts]
    if not tasks:
        fail(f"no task prompts in {data_dir}/tasks/val.jsonl: pass --data_dir=the recipe's data folder")
    prompts = [render_prompt([{'role': 'user', 'content': t['prompt']}], tokenizer) for t in tasks]
    pairs = [p for p in prompts for _ in range(chat_samples)]
    gen = torch.Generator(device=device).manual_seed(seed)
    passes = []  # per batch: the rows of each generation step (an lm_head call each), then a rollout's idx

    def sample_pairs(new_batch=lambda: None):
        gen.manual_seed(seed)  # every timed run samples the same replies: the work the replay repeats
        replies = []
        for i in range(0, len(pairs), chat_batch):
            new_batch()
            replies += model.generate(pairs[i:i + chat_batch], max_new_tokens, temperature=1.0, stop_token=end,
                                      generator=gen, vocab_limit=vocab)
        return replies

    def rollouts(new_batch=lambda: None):
        gen.manual_seed(seed)
        return [new_batch() or rollout(model, prompts[i:i + 128], max_new_tokens, end, gen, vocab, temperature=0.7)
                for i in range(0, len(prompts), 128)]

    def record(f):
        """f() once, noting the rows of every generation step, batch by batch: the lm_head calls on one position
        per row (the prefill's last, or a new token's), not the log-probs pass over whole sequences."""
        passes.clear()

        def note(module, inputs, out):
            if out.dim() == 2 or out.size(1) == 1:
                passes[-1].append(out.size(0))
        hook = model.lm_head.register_forward_hook(note)
        out = f(new_batch=lambda: passes.append([]))
        hook.remove()
        return out

    def replay(seqs, batch, ros=()):
        """The recorded forward passes alone: each batch's prefill, then one step for each recorded row count
        (the cache cut to that many rows when rows finished), then the log-probs pass over a rollout's idx (in
        runs of rows of similar length, as the rollout runs it)."""
        for b, steps in zip(range(0, len(seqs), batch), passes):
            cache, _ = model._prefill(seqs[b:b + batch], max_new_tokens)
            idx = torch.full((cache.batch_size, 1), end, device=device)
            for n in steps[1:]:
                if n < cache.batch_size:
                    cache.select_rows(torch.arange(n, device=device))
                model._decode_step(cache, idx[:n])
        for ro in ros:
            logprobs_by_length(model, ro['idx'], ro['lengths'], vocab, 0.7)

    rows = []
    with torch.no_grad(), ctx:
        replies = record(sample_pairs)  # also the warm-up
        _, dt = timed(sample_pairs)
        n_tok = sum(len(r) + (len(r) < max_new_tokens) for r in replies)  # the stop token is a token sampled
        rows.append((f"pairs: {chat_samples} replies x {len(prompts)} prompts at T=1, batch {chat_batch}",
                     len(replies) / dt, n_tok / dt, n_tok / len(replies)))
        _, dt = timed(lambda: replay(pairs, chat_batch))
        rows.append(("  its forward passes alone", len(replies) / dt, n_tok / dt, n_tok / len(replies)))
        ros = record(rollouts)
        _, dt = timed(rollouts)
        n_tok = int(sum(ro['mask'].sum() for ro in ros))
        rows.append((f"RL rollouts: 1 reply x {len(prompts)} prompts at T=0.7, batch 128, with the log-probs pass",
                     len(prompts) / dt, n_tok / dt, n_tok / len(prompts)))
        _, dt = timed(lambda: replay(prompts, 128, ros))
        rows.append(("  its forward passes alone", len(prompts) / dt, n_tok / dt, n_tok / len(prompts)))
    return rows


if chat_model:
    chat_rows = chat_sampling()
    name = (torch.cuda.get_device_name() if device_type == 'cuda'
            else f'cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)')
    print(f"\n{name}, {dtype}, chat model {chat_model}")
    print("| sampling | replies/s | tokens/s | tokens/reply |\n|---|---|---|---|")
    for what, rps, tps, tpr in chat_rows:
        print(f"| {what} | {rps:,.0f} | {tps:,.0f} | {tpr:.1f} |")
    raise SystemExit(0)


def cpu_has_bf16():
    """Whether the CPU multiplies bf16 in hardware (AVX512_BF16 or AMX): elsewhere bf16 is emulated, and slow."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = set(next(line for line in f if line.startswith('flags')).split())
    except (OSError, StopIteration):
        return False
    return bool(flags & {'avx512_bf16', 'amx_bf16'})


def matmul_peak(n, dtype, repeats=5):
    """The machine's own dense-matmul limit at the threads in use: FLOP/s of the best of `repeats` timed
    (n x n) @ (n x n) products, 2 n^3 FLOPs each. On a CPU, which has no datasheet number to hand, this is MFU's
    yardstick (a GPU's is its datasheet peak, model.peak_flops)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up: threads, caches, the kernel's first-call setup
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


if real_data:
    import json
    with open(os.path.join(data_dir, dataset, 'meta.json')) as f:
        meta = json.load(f)
    data = np.memmap(os.path.join(data_dir, dataset, 'train.bin'), dtype=np.dtype(meta['dtype']), mode='r')
    vocab_size = meta['vocab_size']


def get_batch(rng):
    if real_data:
        ix = rng.integers(0, len(data) - block_size, size=batch_size)
        x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in ix]))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in ix]))
    else:
        x = torch.from_numpy(rng.integers(0, vocab_size, size=(batch_size, block_size)))
        y = torch.roll(x, -1, 1)
    return x.to(device), y.to(device)


model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                      n_embd=n_embd, dropout=dropout, bias=bias, pos_emb=pos_emb)).to(device)
optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type, muon_lr=muon_lr if muon else None)
train_model = torch.compile(model) if use_compile else model
rng = np.random.default_rng(seed)

# training: forward, backward, clip, AdamW (or Muon) step
times = []
for r in range(repeats):
    for i in range(warmup + steps if r == 0 else steps):
        if r == 0 and i == warmup or r > 0 and i == 0:
            sync()
            t0 = time.time()
        x, y = get_batch(rng)
        with ctx:
            _, loss = train_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    times.append((time.time() - t0) / steps)
dt = statistics.median(times)
tok_s = batch_size * block_size / dt
peaks = {}  # CPU: the machine's own matmul peak per dtype, measured here; MFU against the one training used
if device_type == 'cpu' and peak_size:
    peaks = {'float32': matmul_peak(peak_size, torch.float32)}
    if cpu_has_bf16():
        peaks['bfloat16'] = matmul_peak(peak_size, torch.bfloat16)
mfu = model.estimate_mfu(tok_s, device, peak=peaks.get(dtype))

# sampling: one batch of sample_batch sequences, sample_tokens new tokens each (capped by block_size)
model.eval()
n_new = min(sample_tokens, block_size - 1)
prompts = [[0]] * sample_batch
sample_rates = {}
for use_cache in (True, False):
    runs = []
    for _ in range(repeats if use_cache else 1):  # the slow path once: it is only the reference
        sync()
        t0 = time.time()
        with torch.no_grad(), ctx:
            model.generate(prompts, n_new, temperature=1.0, generator=torch.Generator(device=device).manual_seed(0),
                           use_cache=use_cache)
        sync()
        runs.append(time.time() - t0)
    sample_rates[use_cache] = sample_batch * n_new / statistics.median(runs)

name = torch.cuda.get_device_name() if device_type == 'cuda' else f'cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)'
print(f"\n{name}, {dtype}, compile={use_compile}, {model.get_num_params() / 1e6:.2f}M parameters")
print("| what | result |\n|---|---|")
for name, flops in peaks.items():
    print(f"| matmul peak, {name}, {peak_size} x {peak_size}, {torch.get_num_threads()} threads | "
          f"{flops / 1e9:.1f} GFLOP/s |")
print(f"| training ({'Muon + AdamW' if muon else 'AdamW'}), batch {batch_size} x {block_size} | "
      f"{dt * 1000:.1f} ms/iter, {tok_s:,.0f} tokens/s, "
      f"{model.flops_per_token() * tok_s / 1e9:.1f} GFLOP/s" + (f", MFU {mfu * 100:.1f}%" if mfu is not None else "")
      + (f" of the {dtype} matmul peak" if dtype in peaks else "") + " |")
print(f"| sampling {sample_batch} x {n_new} tokens, KV cache | {sample_rates[True]:,.0f} tokens/s |")
print(f"| sampling {sample_batch} x {n_new} tokens, no cache (reference) | {sample_rates[False]:,.0f} tokens/s |")
