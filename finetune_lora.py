"""
Supervised fine-tuning (SFT) on chats: a base model that continues text becomes an assistant that
answers. With lora_rank > 0 only small low-rank adapters train (LoRA); with prompt_tokens > 0 only a few
"virtual token" embeddings in front of every sequence do (prompt tuning); otherwise all weights train.
Under LoRA, --quantize=nf4 (or int8) stores the frozen base weights in 4 (8) bits: QLoRA (quant.py).

    python finetune_lora.py config/sft_tasks.py                        # the built-in task suite, every weight
    python finetune_lora.py config/sft_tasks.py --lora_rank=8 --learning_rate=1e-3   # the same, LoRA
    python finetune_lora.py config/sft_tasks.py --prompt_tokens=16 --learning_rate=1e-2   # prompt tuning
    python finetune_lora.py config/sft_tasks.py --lora_rank=8 --learning_rate=1e-3 --quantize=nf4   # QLoRA
    python finetune_lora.py --init_from=gpt2 --data=alpaca_data.json   # Alpaca-format data, GPT-2 weights
    torchrun --standalone --nproc_per_node=8 finetune_lora.py config/sft_tasks.py

Loss is computed on the assistant's tokens only. Before and after training it measures gold accuracy
per skill on held-out task prompts (greedy replies, KV cache, checked by tasks.check_answer) and, for
forgetting, the loss on the base model's pretraining data. Writes to out_dir: ckpt.pt (training state,
for --init_from=resume), adapter.pt (the LoRA weights alone), model.pt (merged: a plain GPT that
sample.py, reward.py, dpo.py and ppo.py load) and metrics.jsonl.
"""
import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (check_out_dir, check_settings, fail, get_lr, metrics_logger, optimizer_step, or_fail,
                    peak_memory_mb, progress, reset_peak_memory, saved_tensor_bytes, seed_everything, set_lr,
                    setup_device, steps_per_process)
from download import download
from model import (GPT, CheckpointError, GPTConfig, apply_lora, clean_state_dict, find_model, load_checkpoint,
                   lora_state_dict, merged_gpt, model_from_checkpoint, parse_lora_targets, save_checkpoint,
                   train_token_rows)
from quant import base_bytes, merged_quantized_gpt, quantize_linears
from tasks import chat_example, chat_ids, eval_tasks_from, gold_accuracy, read_tasks, render_chat
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
init_from = 'out-chat-base'  # a train.py out_dir, a GPT-2 name / local HF directory, or 'resume' (out_dir)
out_dir = 'out-sft'
data = 'tasks'               # 'tasks': the built-in suite (data_dir/tasks, made by prepare.py); or an
                             # Alpaca-format .json/.jsonl file or URL (instruction, input, output)
data_dir = 'data'
val_fraction = 0.05          # for Alpaca data: held-out share
# LoRA
lora_rank = 8                # 0: full fine-tuning
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = 'attn,proj,mlp_in,mlp_out'  # attention qkv, attention output, MLP in, MLP out
# QLoRA (Dettmers et al. 2023): with LoRA, every linear layer of the blocks frozen in 4-bit NormalFloat ('nf4')
# or int8, blockwise absmax scales (one per quant_block weights), those scales themselves in int8 (double_quant)
quantize = 'none'            # 'none', 'nf4' or 'int8'
quant_block = 64
double_quant = False
# prompt tuning (Lester et al. 2021), instead of LoRA: the model is frozen and only prompt_tokens learned
# embeddings in front of every sequence train (and the chat tokens' rows, as with LoRA)
prompt_tokens = 0
# training
batch_size = 32
gradient_accumulation_steps = 1
max_iters = 300
learning_rate = 1e-3         # LoRA takes a much larger step than full fine-tuning (try 1e-4 there)
decay_lr = True
warmup_iters = 20
min_lr = 1e-4
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
replay_fraction = 0.0        # share of each batch made of pretraining text (fights forgetting)
# evaluation
eval_interval = 100
eval_iters = 20              # batches of val chats for the loss
eval_tasks = 250             # held-out task prompts for gold accuracy (0 disables)
log_interval = 10
# system
device = 'auto'
dtype = 'auto'
compile = False
seed = 1337
# -----------------------------------------------------------------------------
from configurator import apply_config
config = apply_config(globals())

# every check that needs no model comes first (common.check_settings: the same rules in every script)
check_settings(globals(), positive=('batch_size', 'gradient_accumulation_steps', 'learning_rate', 'eval_interval',
                                    'eval_iters', 'log_interval', 'lora_alpha', 'quant_block'),
               non_negative=('max_iters', 'warmup_iters', 'min_lr', 'weight_decay', 'grad_clip', 'eval_tasks',
                             'prompt_tokens'),
               fractions=('replay_fraction', 'val_fraction', 'lora_dropout', 'beta1', 'beta2'),
               choices={'quantize': ('none', 'nf4', 'int8')})
targets = or_fail(parse_lora_targets, lora_rank, lora_targets)
if lora_rank and prompt_tokens:
    fail(f"lora_rank={lora_rank} and prompt_tokens={prompt_tokens}: choose LoRA or prompt tuning, not both")
quant = dict(kind=quantize, block=quant_block, double_quant=double_quant) if quantize != 'none' else None
if quant and not lora_rank:
    fail(f"quantize={quantize} freezes the base weights in {quantize}: it needs LoRA adapters to train "
         f"(--lora_rank > 0); full fine-tuning and prompt tuning run with quantize='none'")
if double_quant and not quant:
    fail("double_quant=True quantizes the scales of a quantized base: set --quantize=nf4 or int8")
check_out_dir(out_dir)
ckpt = None
if init_from == 'resume':  # read the checkpoint now (on the CPU): a bad one is refused before any work
    try:
        ckpt, ckpt_meta = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    except CheckpointError as e:
        fail(f"init_from='resume': {e}")
    if ckpt_meta.get('quant') != quant:  # its state holds the base as it was stored: codes, or float weights
        fail(f"init_from='resume': the checkpoint's base was stored with quant={ckpt_meta.get('quant')}; this run "
             f"asks for {quant}: resume with the same --quantize, --quant_block and --double_quant")

# -----------------------------------------------------------------------------
# processes, devices, precision (common.setup_device, as in train.py)
ddp, ddp_rank, ddp_world_size, device, device_type, dtype, ctx = setup_device(device, dtype)
master_process = ddp_rank == 0
accum_steps = steps_per_process(gradient_accumulation_steps, ddp_world_size)
seed_everything(seed)  # LoRA's A matrices start random: the same ones on every run and every process

# -----------------------------------------------------------------------------
# the base model and its tokenizer
if ckpt is not None:
    base_meta = ckpt_meta['base']
    model = GPT(GPTConfig(**ckpt_meta['model_args']))
elif find_model(init_from):
    try:
        model, m = model_from_checkpoint(find_model(init_from), device)
    except CheckpointError as e:
        fail(str(e))
    base_meta = dict(init_from=find_model(init_from), data_meta=m['data_meta'],
                     pretrain_dataset=m.get('config', {}).get('dataset'),
                     pretrain_data_dir=m.get('config', {}).get('data_dir', data_dir))
else:
    try:
        model = GPT.from_pretrained(init_from)
    except (RuntimeError, ValueError, OSError) as e:
        fail(f"cannot load init_from='{init_from}': {e}")
    base_meta = dict(init_from=init_from, data_meta={'tokenizer': 'gpt2'}, pretrain_dataset=None,
                     pretrain_data_dir=data_dir)
try:
    tokenizer = load_tokenizer(base_meta['data_meta'])
    chat_token_ids = chat_ids(tokenizer)
except (ValueError, RuntimeError) as e:
    fail(str(e))
if model.config.vocab_size < tokenizer.n_vocab:
    model.resize_vocab(((tokenizer.n_vocab + 63) // 64) * 64)  # e.g. GPT-2's weights get chat-token rows

# LoRA or prompt tuning: freeze the base and add what trains; and let the chat tokens' embedding rows train
lora = dict(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=list(targets)) if lora_rank > 0 else None
mode = 'lora' if lora else 'prompt' if prompt_tokens else 'full'
n_params = sum(p.numel() for p in model.parameters())  # (a quantized weight is no longer a parameter)
if lora:
    apply_lora(model, **lora)
    train_token_rows(model, chat_token_ids)
    if quant:
        fp32_bytes = base_bytes(model)
        or_fail(lambda: quantize_linears(model, **quant))
        if master_process:
            print(f"base stored in {quantize}{' with double quantization' if double_quant else ''}: "
                  f"{base_bytes(model):,} bytes instead of {fp32_bytes:,}")
elif prompt_tokens:
    if not model.config.n_prefix:  # (a resumed run's prefix came with its checkpoint's model_args)
        model.add_prefix(prompt_tokens, torch.Generator().manual_seed(seed))
    for p in model.parameters():
        p.requires_grad = False
    model.prefix.requires_grad = True
    train_token_rows(model, chat_token_ids)
block_size = model.config.block_size - model.config.n_prefix  # what a sequence may use after the prefix
if ckpt is not None:
    model.load_state_dict(clean_state_dict(ckpt['model']))
model.to(device)
n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
if mode != 'full':  # of the embedding only the chat-token rows train
    w = model.transformer.wte.weight
    n_trainable += len(chat_token_ids) * w.size(1) - w.numel()
if master_process:
    what = {'lora': f'{"Q" if quant else ""}LoRA r={lora_rank}',
            'prompt': f'prompt tuning, {prompt_tokens} virtual tokens',
            'full': 'full fine-tuning'}[mode]
    print(f"{what}: {n_trainable:,} trainable parameters of {n_params:,} ({100 * n_trainable / n_params:.2f}%)")

# -----------------------------------------------------------------------------
# chat data


def load_records(source):
    """Alpaca records from a .json list or .jsonl file, or a URL of one."""
    if source.startswith(('http://', 'https://')):
        path = os.path.join(data_dir, 'alpaca', os.path.basename(source.split('?')[0]) or 'data.json')
        if not os.path.exists(path):
            try:
                download(source, path)
            except RuntimeError as e:
                fail(f"{e}. Offline? Download the file elsewhere and pass --data=PATH")
        source = path
    if not os.path.isfile(source):
        fail(f"data file not found: {source}")
    with open(source, encoding='utf-8') as f:
        text = f.read()
    try:
        if text.lstrip().startswith('['):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        fail(f"{source} is not JSON or JSONL: {e}")


def alpaca_to_chat(r):
    """An Alpaca record as one user turn and one assistant turn; None if it is unusable."""
    if not isinstance(r, dict) or not isinstance(r.get('instruction'), str) or not isinstance(r.get('output'), str):
        return None
    if not r['instruction'].strip() or not r['output'].strip():
        return None
    user = r['instruction'] + ('\n\n' + r['input'] if isinstance(r.get('input'), str) and r['input'].strip() else '')
    return [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': r['output']}]


def task_chat(t):
    return [{'role': 'user', 'content': t['prompt']}, {'role': 'assistant', 'content': t['answer']}]


def encode_chats(chats, what):
    """(inputs, targets) per chat (see tasks.chat_example); truncations and drops are counted."""
    out, truncated, dropped = [], 0, 0
    for chat in chats:
        example = chat_example(chat, tokenizer, block_size)
        truncated += len(render_chat(chat, tokenizer)[0]) > block_size + 1
        if example is None:
            dropped += 1
        else:
            out.append(example)
    if master_process and (truncated or dropped):
        print(f"{what}: {truncated} chats longer than block_size {block_size} truncated at the end, "
              f"{dropped} dropped (no assistant token within the block)")
    return out


val_tasks = []
if data == 'tasks':
    if not os.path.exists(os.path.join(data_dir, 'tasks', 'train.jsonl')):
        if master_process:
            r = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prepare.py'),
                                'tasks', f'--data_dir={data_dir}'])
            if r.returncode != 0:
                sys.exit(r.returncode)
        if ddp:
            dist.barrier()
    train_chats = [task_chat(t) for t in read_tasks(data_dir, 'train')]
    val_tasks = read_tasks(data_dir, 'val')
    val_chats = [task_chat(t) for t in val_tasks]
    test_tasks = read_tasks(data_dir, 'test')
else:
    records = load_records(data)
    chats = [alpaca_to_chat(r) for r in records]
    bad = sum(c is None for c in chats)
    chats = [c for c in chats if c is not None]
    if master_process:
        print(f"{data}: {len(chats)} usable records, {bad} skipped (missing fields or empty instruction/output)")
    if len(chats) < 2:
        fail(f"{data}: fewer than 2 usable records")
    order = np.random.default_rng(seed).permutation(len(chats))
    n_val = max(1, int(len(chats) * val_fraction))
    val_chats = [chats[i] for i in order[:n_val]]
    train_chats = [chats[i] for i in order[n_val:]]
    test_tasks = []
train_data = encode_chats(train_chats, 'train')
val_data = encode_chats(val_chats, 'val')
if not train_data or not val_data:
    fail("no usable training or validation chats")

# pretraining text: for replay and for measuring forgetting
pretrain_bin = None
if base_meta.get('pretrain_dataset'):
    p = os.path.join(base_meta['pretrain_data_dir'], base_meta['pretrain_dataset'])
    if os.path.exists(os.path.join(p, 'val.bin')):
        with open(os.path.join(p, 'meta.json')) as f:
            pretrain_dtype = np.dtype(json.load(f)['dtype'])
        pretrain_bin = p
if replay_fraction > 0 and pretrain_bin is None:
    fail("replay_fraction > 0 needs the base model's pretraining data (a train.py out_dir as init_from, "
         "with its dataset still prepared)")


def pretrain_rows(split, rng, n):
    data = np.memmap(os.path.join(pretrain_bin, f'{split}.bin'), dtype=pretrain_dtype, mode='r')
    ix = rng.integers(0, len(data) - block_size, size=n)
    return [(data[i:i + block_size].astype(np.int64).tolist(), data[i + 1:i + 1 + block_size].astype(np.int64).tolist())
            for i in ix]


def collate(rows):
    T = max(len(x) for x, _ in rows)
    x = torch.tensor([x + [0] * (T - len(x)) for x, _ in rows], dtype=torch.long)
    y = torch.tensor([y + [-1] * (T - len(y)) for _, y in rows], dtype=torch.long)
    return x.to(device), y.to(device)


def get_batch(split, rng):
    """A micro-batch of chats; with replay, some rows are windows of pretraining text instead."""
    source = train_data if split == 'train' else val_data
    n_replay = int(round(replay_fraction * batch_size)) if split == 'train' else 0
    rows = [source[i] for i in rng.integers(0, len(source), size=batch_size - n_replay)]
    if n_replay:
        rows += pretrain_rows('train', rng, n_replay)
    return collate(rows)


# -----------------------------------------------------------------------------
# optimizer, resume, compile, DDP
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
iter_num, before = 0, {}
if ckpt is not None:
    optimizer.load_state_dict(ckpt['optimizer'])
    iter_num, before = ckpt_meta['iter_num'], ckpt_meta.get('before', {})
    ckpt = None
raw_model = model
if compile and device_type == 'cuda':
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[torch.device(device).index] if device_type == 'cuda' else None)


@torch.no_grad()
def eval_loss(batches):
    """Mean loss over fixed batches (split, i), shared over ranks."""
    model.eval()
    total = torch.zeros(2, device=device)
    for i in range(ddp_rank, len(batches), ddp_world_size):
        x, y = batches[i]()
        with ctx:
            _, loss = model(x, y)
        total += torch.stack([loss.float(), torch.ones((), device=device)])
    if ddp:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


val_batches = [lambda i=i: get_batch('val', np.random.default_rng([seed, 2**32, i])) for i in range(eval_iters)]
pretrain_batches = [lambda i=i: collate(pretrain_rows('val', np.random.default_rng([seed, 2**33, i]), batch_size))
                    for i in range(eval_iters)] if pretrain_bin else []


def evaluate(tag, tasks, test=False):
    """Val loss on assistant tokens, pretraining-text loss (forgetting), gold accuracy per skill on val
    prompts and, with test=True, on the test prompts (the numbers the results table reports)."""
    result = {'val_loss': eval_loss(val_batches)}
    if pretrain_batches:
        result['pretrain_val_loss'] = eval_loss(pretrain_batches)
    if tasks and master_process:
        acc, replies = gold_accuracy(raw_model, tokenizer, tasks)
        result['accuracy'] = acc
        result['example'] = {'prompt': tasks[0]['prompt'], 'reply': replies[0]}
    if test and test_tasks and master_process:
        result['test_accuracy'], _ = gold_accuracy(raw_model, tokenizer, test_tasks)
    if master_process:
        acc_text = ', '.join(f"{k} {v:.0%}" for k, v in result.get('accuracy', {}).items())
        if 'test_accuracy' in result:
            acc_text += '; test: ' + ', '.join(f"{k} {v:.0%}" for k, v in result['test_accuracy'].items())
        pre = f", pretrain-text loss {result['pretrain_val_loss']:.4f}" if 'pretrain_val_loss' in result else ''
        print(f"[{tag}] val loss {result['val_loss']:.4f}{pre}" + (f"; gold accuracy: {acc_text}" if acc_text else ''))
        log({'iter': iter_num, 'eval': tag, **result})
    return result


log = metrics_logger(out_dir, master_process)


def save():
    """The merged model (model.pt), the adapter alone (adapter.pt), then the training state (ckpt.pt), each
    atomically and ckpt.pt last: a run killed in between resumes from the older ckpt.pt and writes the same
    model.pt again."""
    sd = clean_state_dict(raw_model.state_dict())
    meta = dict(model_args=raw_model.config.__dict__, lora=lora, quant=quant, iter_num=iter_num, config=config,
                base=base_meta, data_meta=base_meta['data_meta'], before=before)
    if lora:
        adapter = lora_state_dict(raw_model)
        adapter['chat_token_rows'] = raw_model.transformer.wte.weight[chat_token_ids].detach().cpu()
        save_checkpoint(os.path.join(out_dir, 'adapter.pt'), adapter,
                        dict(lora=lora, quant=quant, base=base_meta['init_from'], chat_token_ids=chat_token_ids))
    if quant:  # the adapters folded into the dequantized weights: what the model computed in training
        merged = merged_quantized_gpt(sd, raw_model.config.__dict__, lora, quant)
    else:
        merged = merged_gpt(sd, raw_model.config.__dict__, lora)
    save_checkpoint(os.path.join(out_dir, 'model.pt'), {'model': merged.state_dict()},
                    dict(model_args=merged.config.__dict__, data_meta=base_meta['data_meta'], sft=meta['config'],
                         base=base_meta))
    save_checkpoint(os.path.join(out_dir, 'ckpt.pt'), {'model': sd, 'optimizer': optimizer.state_dict()}, meta)


# -----------------------------------------------------------------------------
if master_process:
    os.makedirs(out_dir, exist_ok=True)
eval_task_set = eval_tasks_from(data_dir, eval_tasks) if data == 'tasks' else []  # every stage's
if iter_num == 0:
    before = evaluate('base', eval_task_set, test=True)
after = before
tokens_seen, t0, iter_start, eval_seconds, activation_bytes = 0, time.time(), iter_num, 0.0, None
loss_sum = torch.zeros((), device=device)
reset_peak_memory(device_type)  # the peak of training itself, not of loading the float32 base
while iter_num < max_iters:
    lr = get_lr(iter_num, learning_rate, warmup_iters, max_iters, min_lr) if decay_lr else learning_rate
    set_lr(optimizer, lr)
    for micro_step in range(accum_steps):
        rng = np.random.default_rng([seed, iter_num, ddp_rank * accum_steps + micro_step])
        x, y = get_batch('train', rng)
        torch.manual_seed(int(rng.integers(2**62)))  # dropout masks: a function of (seed, iteration, micro-step)
        tokens_seen += int((y != -1).sum()) * ddp_world_size
        if ddp:
            model.require_backward_grad_sync = (micro_step == accum_steps - 1)
        # what autograd keeps for the backward pass, measured on this run's first micro-batch
        saved = saved_tensor_bytes(raw_model) if activation_bytes is None else nullcontext()
        with ctx, saved:
            _, loss = model(x, y)
            loss = loss / accum_steps
        activation_bytes = saved.bytes if activation_bytes is None else activation_bytes
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    optimizer_step(optimizer, scaler, [p for p in raw_model.parameters() if p.requires_grad], grad_clip)
    iter_num += 1
    if iter_num % log_interval == 0 or iter_num == max_iters:
        if ddp:
            dist.all_reduce(loss_sum)
            loss_sum /= ddp_world_size
        lossf = loss_sum.item() / (log_interval if iter_num % log_interval == 0 else iter_num % log_interval)
        if not math.isfinite(lossf):
            fail(f"loss is NaN or inf at iteration {iter_num}; the last good checkpoint in {out_dir} is kept")
        if master_process:
            print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {tokens_seen / (time.time() - t0):,.0f} "
                  f"trained tokens/s; {progress(iter_num, max_iters, t0, iter_start)}")
            log({'iter': iter_num, 'loss': lossf, 'lr': lr})
        loss_sum.zero_()
    if iter_num % eval_interval == 0 or iter_num == max_iters:
        t_eval, last = time.time(), iter_num == max_iters
        after = evaluate(f'iter {iter_num}', eval_task_set if last else [], test=last)
        if master_process:
            save()
        eval_seconds += time.time() - t_eval

elapsed = time.time() - t0
if master_process:
    peak = peak_memory_mb(device_type)
    # memory, counted: the frozen base; what trains with its gradients and AdamW's two moments; the activations
    trained = [p for p in raw_model.parameters() if p.requires_grad]
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    summary = dict(mode=mode, quantize=quantize, trainable_params=n_trainable, total_params=n_params,
                   trainable_pct=100 * n_trainable / n_params, base_bytes=base_bytes(raw_model),
                   training_state_bytes=sum(t.numel() * t.element_size() for t in trained * 2 + state),
                   activation_bytes=activation_bytes, train_seconds=elapsed, eval_seconds=eval_seconds,
                   ms_per_iter=1000 * (elapsed - eval_seconds) / max(iter_num - iter_start, 1),
                   tokens_per_s=tokens_seen / max(elapsed, 1e-9), peak_memory_mb=peak,
                   peak_memory_of='cuda allocations' if device_type == 'cuda' else 'process peak RSS')
    print(f"trained {iter_num} iterations in {elapsed:.1f} s, {summary['tokens_per_s']:,.0f} trained tokens/s"
          + (f", peak memory {peak:.0f} MiB ({summary['peak_memory_of']})" if peak is not None else ''))
    log({'summary': summary, 'before': before, 'after': after})
if ddp:
    dist.barrier()  # every process done before the group goes (see train.py)
    dist.destroy_process_group()
