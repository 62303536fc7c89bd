"""
What every script does the same way: refusing bad settings in one line; processes, device and precision;
seeding; the learning-rate schedule; writing files atomically. (model.py is the model, tasks.py the data it
is trained on.) torch is imported inside the functions that need it, so that prepare.py and bpe.py, which
only write files, start fast.
"""
import math
import os
import sys
import time


def fail(msg):
    """A user's mistake (a setting, a missing file): one line on stderr and exit code 1, no traceback.
    A traceback stays right for a bug."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def check_settings(settings, positive=(), non_negative=(), fractions=(), choices=None):
    """The checks every script makes on its configuration before any work, so that the rules are the same
    everywhere: each name in positive must be > 0 (sizes, counts, rates that must move), in non_negative
    >= 0, in fractions within [0, 1); choices maps a name to its allowed values. The first setting outside
    what it allows ends the script with one line naming it, its value and what is allowed."""
    for name in positive:
        if not settings[name] > 0:
            fail(f"{name} must be > 0, got {settings[name]!r}")
    for name in non_negative:
        if not settings[name] >= 0:
            fail(f"{name} must be >= 0, got {settings[name]!r}")
    for name in fractions:
        if not 0 <= settings[name] < 1:
            fail(f"{name} must be in [0, 1), got {settings[name]!r}")
    for name, allowed in (choices or {}).items():
        if settings[name] not in allowed:
            fail(f"{name} must be one of {', '.join(map(str, allowed))}; got {settings[name]!r}")


def or_fail(fn, *args, errors=(ValueError,)):
    """fn(*args), where one of errors (a bad setting, a missing or unreadable file: model.CheckpointError is a
    ValueError) ends the script in one line, as fail does."""
    try:
        return fn(*args)
    except errors as e:
        fail(str(e))


def check_out_dir(out_dir):
    """out_dir must be a directory or not exist yet (it is created once every check has passed)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"out_dir '{out_dir}' exists and is not a directory")


def setup_device(device='auto', dtype='auto', backend='auto'):
    """Processes, device and precision, for train.py and the chat scripts. Launched by torchrun (RANK is
    set), this process joins the group (backend 'auto': NCCL on CUDA, gloo on CPU) and takes its own GPU.
    dtype 'auto': bf16 on GPUs that have it, else fp16 there, fp32 elsewhere; ctx runs forward passes in
    it (autocast) and is a no-op in fp32.
    Returns (ddp, rank, world_size, device, device_type, dtype, ctx)."""
    from contextlib import nullcontext
    import torch
    import torch.distributed as dist
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):  # a script-setup helper: fail like the scripts do
        sys.exit(f"error: dtype must be auto, float32, bfloat16 or float16, got '{dtype}'")
    ddp = int(os.environ.get('RANK', -1)) != -1
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    device_type = 'cuda' if 'cuda' in device else 'mps' if 'mps' in device else 'cpu'
    rank, world_size = 0, 1
    if ddp:
        dist.init_process_group(backend=backend if backend != 'auto' else 'nccl' if device_type == 'cuda' else 'gloo')
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if device_type == 'cuda':
            device = f'cuda:{int(os.environ["LOCAL_RANK"])}'
            torch.cuda.set_device(device)
    if dtype == 'auto':
        dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if device_type == 'cuda' else 'float32'
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    torch.backends.cuda.matmul.allow_tf32 = True  # tf32 matmuls for what stays in fp32
    torch.backends.cudnn.allow_tf32 = True
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
    return ddp, rank, world_size, device, device_type, dtype, ctx


def steps_per_process(gradient_accumulation_steps, world_size):
    """Each process's share of an iteration's micro-steps (torchrun splits them: the same batch whatever the
    number of processes); they must divide evenly."""
    if gradient_accumulation_steps % world_size:
        fail(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must divide by the {world_size} processes")
    return gradient_accumulation_steps // world_size


def set_lr(optimizer, lr):
    """This iteration's learning rate (get_lr's schedule, or a constant) in every parameter group."""
    for group in optimizer.param_groups:
        group['lr'] = lr


def optimizer_step(optimizer, scaler, params, grad_clip):
    """The update after an iteration's backward passes (train.py's loop spells it out): unscale the gradients
    (fp16's GradScaler), clip the global norm of params' gradients to grad_clip (0: no clipping), step, zero."""
    import torch
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def seed_everything(seed):
    """Seed every generator a script may draw from: Python's random, numpy's global one, torch's on the CPU and
    on every GPU. PyTorch seeds itself at random in every process, so without this two runs of the same
    command start from different LoRA matrices, reward heads or dropout masks."""
    import random
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """Linear warmup for warmup_iters, then cosine decay down to min_lr at lr_decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


def reset_peak_memory(device_type):
    """Measure peak memory from here on: CUDA's allocator statistics, or, on Linux, the process's peak resident
    set (VmHWM), which writing 5 to /proc/self/clear_refs resets. Elsewhere the peak counts from the start."""
    if device_type == 'cuda':
        import torch
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def peak_memory_mb(device_type):
    """The peak since reset_peak_memory, in MiB: CUDA's allocations, or the process's peak resident set on a CPU
    (the tensors plus the Python and torch runtime, a few hundred MiB); None where it cannot be read."""
    if device_type == 'cuda':
        import torch
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == 'darwin' else kib / 2**10  # macOS counts bytes, Linux KiB


class saved_tensor_bytes:
    """`with saved_tensor_bytes(model) as saved:` around a forward pass; then saved.bytes is what autograd keeps
    for the backward pass: the activations, each storage once, and not the model's own parameters and buffers,
    which are held anyway."""

    def __init__(self, model):
        import torch
        self.bytes = 0
        self.seen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return t

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def metrics_logger(out_dir, enabled=True):
    """log(record): one JSON line appended to out_dir/metrics.jsonl, which plots.py, pipeline.py and the tests
    read; enabled=False (every process of a torchrun but the first) writes nothing."""
    import json
    path = os.path.join(out_dir, 'metrics.jsonl')

    def log(record):
        if enabled:
            with open(path, 'a') as f:
                f.write(json.dumps(record) + '\n')
    return log


def write_text_atomic(path, text):
    """Write to a temp file, then rename: a crash never leaves a half-written file under the real name."""
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(path + '.tmp', path)


def progress(done, total, t0, done_at_t0=0):
    """'1049/1500 (70%), eta 1m45s': where a loop is, and the time left at the pace since t0 (when done_at_t0
    of the total were done: a resumed run counts from where it restarted)."""
    rate = (time.time() - t0) / max(done - done_at_t0, 1)
    return f"{done}/{total} ({100 * done / max(total, 1):.0f}%), eta {duration(rate * (total - done))}"


def duration(seconds):
    """90 -> '1m30s', 42 -> '42s'."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
