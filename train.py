"""
Pretraining. Runs on one GPU, on the CPU, or on many GPUs with DDP:

    python train.py config/shakespeare.py                      # one GPU (or CPU/MPS, auto-detected)
    python train.py config/shakespeare_cpu.py                  # a laptop, a few minutes
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2.py
    # two nodes: on each, torchrun --nnodes=2 --node_rank=R --nproc_per_node=8
    #            --master_addr=IP_OF_NODE_0 --master_port=29500 train.py config/gpt2.py

Every batch is a pure function of (seed, iteration, micro-step), so a resumed run sees exactly the
batches the uninterrupted run would have, and any split of the global batch over processes and
accumulation steps sees the same data.
"""
import gc
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import check_out_dir, check_settings, fail, get_lr, metrics_logger, progress, seed_everything, setup_device
from download import GPT2_NAMES
from model import GPT, CheckpointError, GPTConfig, clean_state_dict, load_checkpoint, save_checkpoint

# -----------------------------------------------------------------------------
# default config: GPT-2 124M on OpenWebText, as nanoGPT. Config files in config/ override these.
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200            # batches per split in each periodic loss estimate
eval_full_at_end = True     # finish with the loss over the whole val split, not an estimate
eval_only = False
always_save_checkpoint = True  # else only when val loss improves
init_from = 'scratch'       # 'scratch', 'resume' (from out_dir), or a GPT-2 name / local HF directory
# data
dataset = 'openwebtext'
data_dir = 'data'
gradient_accumulation_steps = 5 * 8  # micro-steps per iteration in total, split over the processes
batch_size = 12             # sequences per micro-step
block_size = 1024
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True
pos_emb = 'learned'         # 'learned' (GPT-2) or 'rope'
# AdamW
learning_rate = 6e-4
max_iters = 600000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0             # 0 disables clipping
muon = False                # True: Muon (muon.py) for the matrices inside the blocks, AdamW for the rest
muon_lr = 0.02              # Muon's peak learning rate (the schedule scales it as it scales learning_rate)
muon_momentum = 0.95
# learning rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000     # about max_iters, per Chinchilla
min_lr = 6e-5               # about learning_rate / 10, per Chinchilla
# system
device = 'auto'             # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'              # 'auto' (bf16 if supported, else fp16 on CUDA; fp32 on CPU/MPS), 'float32', 'bfloat16', 'float16'
compile = True              # torch.compile; applies on CUDA only
gradient_checkpointing = False
backend = 'auto'            # DDP: 'nccl' on CUDA, 'gloo' on CPU
seed = 1337
# logging
plot = True                 # draw out_dir/loss.png (train and val loss) at every evaluation
wandb_log = False
wandb_project = 'gpt'
wandb_run_name = 'run'
# -----------------------------------------------------------------------------
from configurator import apply_config
config = apply_config(globals())

# sanity checks before any work (common.check_settings: the same rules and messages in every script)
if init_from not in ('scratch', 'resume', *GPT2_NAMES) and not os.path.isdir(init_from):
    fail(f"init_from must be 'scratch', 'resume', one of {', '.join(GPT2_NAMES)} or a local HF directory, "
         f"got '{init_from}'")
ckpt = None
if init_from == 'resume':  # read the checkpoint now (on the CPU): a bad one is refused before any work
    if not os.path.exists(os.path.join(out_dir, 'ckpt.pt')):
        fail(f"init_from='resume': no checkpoint at {os.path.join(out_dir, 'ckpt.pt')} (start with init_from='scratch')")
    try:
        ckpt, ckpt_meta = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    except CheckpointError as e:
        fail(f"init_from='resume': {e}")
    if 'optimizer' not in ckpt or not {'model_args', 'iter_num', 'best_val_loss', 'data_meta'} <= set(ckpt_meta):
        fail(f"init_from='resume': {os.path.join(out_dir, 'ckpt.pt')} is not a train.py checkpoint")
check_settings(globals(), positive=('batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_interval',
                                    'eval_iters', 'log_interval', 'n_layer', 'n_head', 'n_embd', 'learning_rate'),
               non_negative=('max_iters', 'warmup_iters', 'lr_decay_iters', 'min_lr', 'weight_decay', 'grad_clip',
                             'muon_lr'),
               fractions=('dropout', 'beta1', 'beta2', 'muon_momentum'), choices={'pos_emb': ('learned', 'rope')})
if n_embd % n_head or (pos_emb == 'rope' and (n_embd // n_head) % 2):
    fail(f"n_head must divide n_embd into heads of equal (and, with rope, even) width; got n_embd={n_embd}, "
         f"n_head={n_head}")
check_out_dir(out_dir)
if decay_lr and lr_decay_iters <= warmup_iters:
    fail(f"lr_decay_iters ({lr_decay_iters}) must be greater than warmup_iters ({warmup_iters})")

# -----------------------------------------------------------------------------
# processes and devices
# Launched by torchrun (RANK is set), each process joins the group and takes its own GPU; dtype 'auto' is
# bf16 on GPUs that have it, fp16 on older ones, fp32 elsewhere, and ctx runs forward passes in it
# (autocast; a no-op in fp32). common.setup_device spells the steps out.
ddp, ddp_rank, ddp_world_size, device, device_type, dtype, ctx = setup_device(device, dtype, backend)
if gradient_accumulation_steps % ddp_world_size:
    fail(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must divide by the {ddp_world_size} processes")
master_process = ddp_rank == 0  # only this one logs and writes checkpoints
accum_steps = gradient_accumulation_steps // ddp_world_size  # this process's micro-steps per iteration
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if master_process:
    print(f"tokens per iteration: {tokens_per_iter:,} ({gradient_accumulation_steps} micro-steps x "
          f"{batch_size} x {block_size}, {ddp_world_size} process(es))")

# -----------------------------------------------------------------------------
# data: train.bin / val.bin are flat arrays of token ids, read through a memmap
data_path = os.path.join(data_dir, dataset)
if not os.path.exists(os.path.join(data_path, 'meta.json')):
    if dataset in ('shakespeare_char', 'shakespeare', 'shakespeare_tasks'):
        # the first command a user types must just work: prepare the dataset (download it) first
        if master_process:
            print(f"{data_path} is missing: running prepare.py {dataset}")
            r = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prepare.py'),
                                dataset, f'--data_dir={data_dir}'])
            if r.returncode != 0:
                sys.exit(r.returncode)
        if ddp:
            dist.barrier()
    else:
        fail(f"dataset '{dataset}' not found in {data_path}: run "
             f"python prepare.py --input=YOUR_TEXT --dataset={dataset} --tokenizer=gpt2 --data_dir={data_dir}")
with open(os.path.join(data_path, 'meta.json'), encoding='utf-8') as f:
    data_meta = json.load(f)
data_dtype = np.dtype(data_meta['dtype'])
for split in ('train', 'val'):
    if not os.path.exists(os.path.join(data_path, f'{split}.bin')):
        fail(f"{data_path} has a meta.json but no {split}.bin: run prepare.py for {dataset} again")
    n = os.path.getsize(os.path.join(data_path, f'{split}.bin')) // data_dtype.itemsize
    if n <= block_size:
        fail(f"{split}.bin of {dataset} has {n} tokens, not more than block_size {block_size}")


def get_batch(split, rng):
    """A micro-batch of random windows, drawn with the given numpy generator."""
    # a fresh memmap per batch: a long-lived one keeps pages referenced and memory grows (nanoGPT #433)
    data = np.memmap(os.path.join(data_path, f'{split}.bin'), dtype=data_dtype, mode='r')
    ix = rng.integers(0, len(data) - block_size, size=batch_size)
    x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in ix]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in ix]))
    if device_type == 'cuda':
        # pinned host memory lets the copy run asynchronously, overlapping the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def train_batch(t, k):
    """Micro-batch k (counted over all processes) of iteration t, and a seed for its dropout masks."""
    rng = np.random.default_rng([seed, t, k])
    x, y = get_batch('train', rng)
    return x, y, int(rng.integers(2**62))


# -----------------------------------------------------------------------------
# model
iter_num, best_val_loss = 0, float('inf')
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                  vocab_size=None, dropout=dropout, pos_emb=pos_emb)
seed_everything(seed)  # the same initial weights on every run and every process
if init_from == 'scratch':
    # GPT-2's 50257 rounded up to 50304 (a multiple of 64) for speed; small vocabularies as they are
    model_args['vocab_size'] = 50304 if data_meta['tokenizer'] == 'gpt2' else data_meta['vocab_size']
    model = GPT(GPTConfig(**model_args))
elif init_from == 'resume':
    print(f"resuming from {out_dir}")
    old = ckpt_meta['data_meta']
    if old['tokenizer'] != data_meta['tokenizer'] or old['vocab_size'] != data_meta['vocab_size'] \
            or old.get('vocab') != data_meta.get('vocab'):
        fail(f"the checkpoint in {out_dir} was trained on a {old['tokenizer']} vocabulary of {old['vocab_size']} "
             f"but {dataset} uses a {data_meta['tokenizer']} vocabulary of {data_meta['vocab_size']}")
    model_args = ckpt_meta['model_args']  # the architecture comes from the checkpoint
    model = GPT(GPTConfig(**model_args))
    model.load_state_dict(clean_state_dict(ckpt['model']))
    iter_num, best_val_loss = ckpt_meta['iter_num'], ckpt_meta['best_val_loss']
else:
    print(f"initializing from GPT-2 weights: {init_from}")
    if data_meta['tokenizer'] != 'gpt2':
        fail(f"GPT-2 weights need data prepared with --tokenizer=gpt2; {dataset} uses {data_meta['tokenizer']}")
    try:
        model = GPT.from_pretrained(init_from, dropout=dropout)
    except (RuntimeError, ValueError, OSError) as e:
        fail(str(e))
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
    model_args = {k: getattr(model.config, k) for k in model_args}
if model_args['vocab_size'] < data_meta['vocab_size']:
    fail(f"model vocabulary {model_args['vocab_size']} is smaller than the data's {data_meta['vocab_size']}")
if model_args['block_size'] < block_size:
    fail(f"block_size {block_size} is longer than the model's {model_args['block_size']}")
model.gradient_checkpointing = gradient_checkpointing
model.to(device)
if master_process:
    print(f"{model.get_num_params() / 1e6:.2f}M parameters, device {device}, dtype {dtype}")

# fp16 needs loss scaling to keep small gradients from underflowing; bf16 and fp32 do not
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type,
                                       muon_lr=muon_lr if muon else None, muon_momentum=muon_momentum)
if ckpt is not None:
    optimizer.load_state_dict(ckpt['optimizer'])
    if 'scaler' in ckpt:
        scaler.load_state_dict(ckpt['scaler'])
    torch.set_rng_state(ckpt['rng_torch'].cpu())
    if device_type == 'cuda' and 'rng_cuda' in ckpt:
        torch.cuda.set_rng_state(ckpt['rng_cuda'].cpu())
    ckpt = None  # free memory
iter_start = iter_num  # a resumed run does not save again the checkpoint it started from

raw_model = model
if compile and device_type == 'cuda':
    print("compiling the model... (takes a minute)")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[torch.device(device).index] if device_type == 'cuda' else None)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters fixed batches per split (the same batches every time), shared over ranks."""
    out = {}
    model.eval()
    for split_id, split in enumerate(['train', 'val']):
        total = torch.zeros(2, device=device)
        for i in range(ddp_rank, eval_iters, ddp_world_size):
            x, y = get_batch(split, np.random.default_rng([seed, 2**32, split_id, i]))
            with ctx:
                _, loss = model(x, y)
            total += torch.stack([loss.float(), torch.ones((), device=device)])
        if ddp:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


@torch.no_grad()
def full_val_loss():
    """Loss over the whole val split, in consecutive non-overlapping windows (the last partial one too)."""
    data = np.memmap(os.path.join(data_path, 'val.bin'), dtype=data_dtype, mode='r')
    starts = list(range(0, len(data) - 1, block_size))
    total = torch.zeros(2, device=device, dtype=torch.float64)
    model.eval()
    for b in range(ddp_rank * batch_size, len(starts), batch_size * ddp_world_size):
        chunk = starts[b:b + batch_size]
        x = torch.full((len(chunk), block_size), 0, dtype=torch.long)
        y = torch.full((len(chunk), block_size), -1, dtype=torch.long)  # -1: no target (past the end)
        for r, s in enumerate(chunk):
            n = min(block_size, len(data) - 1 - s)
            x[r, :n] = torch.from_numpy(data[s:s + n].astype(np.int64))
            y[r, :n] = torch.from_numpy(data[s + 1:s + 1 + n].astype(np.int64))
        x, y = x.to(device), y.to(device)
        with ctx:
            _, loss = model(x, y)
        n_targets = (y != -1).sum()
        total += torch.stack([loss.double() * n_targets, n_targets.double()])
    if ddp:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


write_metrics = metrics_logger(out_dir, master_process)


def log_metrics(record):
    write_metrics(record)
    if wandb_log and master_process:
        wandb.log(record)


def val_report(val):
    """Perplexity and, for character data, bits per character of a val loss (in nats per token)."""
    extra = {'val_ppl': math.exp(val)}
    text = f"val loss {val:.4f}, val ppl {extra['val_ppl']:.2f}"
    if data_meta['tokenizer'] == 'char':
        extra['val_bpc'] = val / math.log(2)
        text += f", {extra['val_bpc']:.3f} bits/char"
    return text, extra


def save(iter_num):
    meta = dict(model_args=model_args, iter_num=iter_num, best_val_loss=best_val_loss, config=config,
                data_meta=data_meta)
    tensors = dict(model=clean_state_dict(raw_model.state_dict()), optimizer=optimizer.state_dict(),
                   scaler=scaler.state_dict(), rng_torch=torch.get_rng_state())
    if device_type == 'cuda':
        tensors['rng_cuda'] = torch.cuda.get_rng_state()
    save_checkpoint(os.path.join(out_dir, 'ckpt.pt'), tensors, meta)
    print(f"saved checkpoint to {out_dir}/ckpt.pt")


def stop_on_nonfinite(what, it):
    print(f"error: {what} is NaN or inf at iteration {it}; stopping. The last good checkpoint "
          f"({out_dir}/ckpt.pt) is kept: try a lower learning_rate or more warmup_iters.", file=sys.stderr)
    if ddp:
        dist.destroy_process_group()
    sys.exit(1)


if master_process:
    os.makedirs(out_dir, exist_ok=True)  # only now, once every check has passed
if wandb_log and master_process:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# -----------------------------------------------------------------------------
# the training loop
loss_sum = torch.zeros((), device=device)  # summed on the device; read back only when logging
steps_since_log, t_log = 0, time.time()
t_start = time.time()  # for the time left (evaluations included)
while True:
    lr = get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr) if decay_lr else learning_rate
    for group in optimizer.param_groups:  # with Muon each group at its own peak (base_lr), on one schedule
        group['lr'] = lr * group['base_lr'] / learning_rate if 'base_lr' in group else lr

    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        t_eval = time.time()
        losses = estimate_loss()
        if master_process:
            text, extra = val_report(losses['val'])
            print(f"step {iter_num}: train loss {losses['train']:.4f}, {text}")
            log_metrics({'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val'], **extra})
            if plot:
                from plots import loss_png  # matplotlib: imported only when used
                loss_png(out_dir)
        if not math.isfinite(losses['val']) or not math.isfinite(losses['train']):
            stop_on_nonfinite('the eval loss', iter_num)
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses['val'])
            if master_process and iter_num > iter_start and not eval_only:
                save(iter_num)
        t_log += time.time() - t_eval  # eval and checkpoint time is not training time
    if eval_only or iter_num >= max_iters:
        break

    for micro_step in range(accum_steps):
        k = ddp_rank * accum_steps + micro_step  # micro-step index over all processes
        x, y, dropout_seed = train_batch(iter_num, k)
        if dropout > 0:
            torch.manual_seed(dropout_seed)  # dropout masks depend on (seed, t, k) too, not on history
        if ddp:
            # all-reduce the gradients only once, after the last micro-step
            model.require_backward_grad_sync = (micro_step == accum_steps - 1)
        with ctx:
            _, loss = model(x, y)
            loss = loss / accum_steps  # so the accumulated gradient is the mean over micro-steps
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    steps_since_log += 1

    if iter_num % log_interval == 0:
        if ddp:
            dist.all_reduce(loss_sum)
            loss_sum /= ddp_world_size
        lossf = loss_sum.item() / steps_since_log  # .item() waits for the GPU: only here, when logging
        dt = (time.time() - t_log) / steps_since_log
        if not math.isfinite(lossf):
            stop_on_nonfinite('the training loss', iter_num - 1)
        if master_process:
            tok_s = tokens_per_iter / dt
            mfu = raw_model.estimate_mfu(tok_s / ddp_world_size, device)
            mfu_text = f", mfu {mfu * 100:.1f}%" if mfu is not None else ""
            print(f"iter {iter_num - 1}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                  f"{tok_s:,.0f} tok/s{mfu_text}; {progress(iter_num, max_iters, t_start, iter_start)}")
            log_metrics({'iter': iter_num - 1, 'loss': lossf, 'lr': lr, 'ms_per_iter': dt * 1000,
                         'tokens_per_s': tok_s, 'mfu': mfu})
        loss_sum.zero_()
        steps_since_log, t_log = 0, time.time()

if eval_full_at_end and not eval_only:
    val = full_val_loss()
    if master_process:
        text, extra = val_report(val)
        print(f"final, over the whole val split: {text}")
        log_metrics({'iter': iter_num, 'full_val_loss': val, **extra})
if ddp:
    # Wait for every process, then free the DDP wrapper (its reducer holds the process group) before tearing the
    # group down, so gloo's threads are joined now and not at interpreter exit, where they can abort the process
    # ("terminate called without an active exception", CI 2026-12-07) after every result has been written.
    dist.barrier()
    del model
    gc.collect()
    dist.destroy_process_group()
    gc.collect()
