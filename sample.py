"""
Generate text from a trained model (out_dir/ckpt.pt) or from GPT-2's weights:

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2 --start="What is the answer to life?" --num_samples=3
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --num_samples=1   # streams
    python sample.py --out_dir=out-sft --chat=True      # talk to a fine-tuned model, multi-turn

All samples are drawn as one batch with the KV cache; text is decoded with the tokenizer the
training data was prepared with (recorded in the checkpoint).
"""
import os
import sys
import time

import torch

from common import check_settings, fail, setup_device
from model import GPT, model_from_checkpoint
from tasks import chat_ids, render_prompt
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
init_from = 'resume'   # 'resume' (the checkpoint in out_dir) or a GPT-2 name / local HF directory
out_dir = 'out'
start = "\n"           # the prompt; "FILE:path" reads it from a file
num_samples = 10
max_new_tokens = 500
temperature = 0.8      # 1.0 samples the model's distribution, lower is more conservative, 0 is greedy
top_k = 200            # keep only the top_k most likely tokens (0: all)
top_p = 1.0            # nucleus sampling: keep the most likely tokens up to this probability mass
seed = 1337
device = 'auto'
dtype = 'auto'
compile = False        # torch.compile the model (CUDA only)
chat = False           # chat mode: read user messages from stdin, reply as the assistant (fine-tuned models)
# -----------------------------------------------------------------------------
from configurator import apply_config
apply_config(globals())

check_settings(globals(), positive=('num_samples',), non_negative=('max_new_tokens', 'temperature', 'top_k'),
               choices={'dtype': ('auto', 'float32', 'bfloat16', 'float16')})
if not 0 < top_p <= 1:
    fail(f"top_p must be in (0, 1], got {top_p}")
_, _, _, device, device_type, dtype, ctx = setup_device(device, dtype)  # one process, no torchrun

if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except OSError as e:
        fail(f"cannot read the prompt file: {e}")

# the model and its tokenizer
try:
    if init_from == 'resume':
        # ckpt.pt: a training checkpoint (train.py, finetune_lora.py, ppo.py); model.pt: a merged export
        names = [n for n in ('ckpt.pt', 'model.pt') if os.path.exists(os.path.join(out_dir, n))]
        if not names:
            fail(f"no checkpoint (ckpt.pt or model.pt) in {out_dir}: train one with train.py, or pass --init_from=gpt2")
        ckpt_path = os.path.join(out_dir, names[0])
        model, meta = model_from_checkpoint(ckpt_path, device)
        tokenizer = load_tokenizer(meta['data_meta'])
    else:
        model = GPT.from_pretrained(init_from).to(device)
        tokenizer = load_tokenizer({'tokenizer': 'gpt2'})
except (RuntimeError, ValueError, OSError) as e:
    fail(str(e))
model.eval()
if compile and device_type == 'cuda':
    model = torch.compile(model)

# never sample a token the model was not trained on: the padding rows of its vocabulary, or special
# tokens its tokenizer knows but its training data did not have (a chat model does produce <|end|>)
vocab_limit = min(tokenizer.n_vocab, model.config.vocab_size)
if init_from == 'resume' and not chat:
    vocab_limit = min(vocab_limit, meta['data_meta'].get('vocab_size', vocab_limit))
generator = torch.Generator(device=device).manual_seed(seed)
settings = dict(temperature=temperature, top_k=top_k or None, top_p=top_p, generator=generator,
                vocab_limit=vocab_limit)


def stream(prompt, stop_token=None):
    """Generate one continuation, printing each piece of text as soon as it decodes (a UTF-8 character
    may span several tokens); return the new tokens."""
    new, printed = [], ''
    for step in model.generate_stream([prompt], max_new_tokens, stop_token=stop_token, **settings):
        if step[0] is None:
            break
        new.append(step[0])
        text = tokenizer.decode(new)
        if not text.endswith('\ufffd'):
            print(text[len(printed):], end='', flush=True)
            printed = text
    print(tokenizer.decode(new)[len(printed):], flush=True)
    return new


if chat:
    try:
        end = chat_ids(tokenizer)[2]
    except ValueError as e:
        fail(str(e))
    messages = []
    print("chat: type a message and press enter; an empty line or Ctrl-D ends", file=sys.stderr)
    with torch.no_grad(), ctx:
        while True:
            print('> ', end='', file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line.strip():
                break
            messages.append({'role': 'user', 'content': line.rstrip('\n')})
            prompt = render_prompt(messages, tokenizer)
            # keep the newest turns that leave room for a reply within the context
            while len(prompt) + max_new_tokens > model.config.block_size and len(messages) > 1:
                messages = messages[2:] if len(messages) > 2 else messages[1:]
                prompt = render_prompt(messages, tokenizer)
            reply = stream(prompt[-(model.config.block_size - 1):], stop_token=end)
            messages.append({'role': 'assistant', 'content': tokenizer.decode(reply)})
    sys.exit(0)

try:
    prompt = tokenizer.encode(start)
except ValueError as e:
    fail(f"the prompt cannot be encoded: {e}")
if not prompt:
    fail("the prompt encodes to no tokens: give a non-empty --start")
if max(prompt) >= vocab_limit:
    fail(f"the prompt has token id {max(prompt)}, past the {vocab_limit} tokens the model was trained on")

t0 = time.time()
with torch.no_grad(), ctx:
    if num_samples == 1:
        print(start, end='', flush=True)
        n_tokens = len(stream(prompt))
    else:
        rows = model.generate([prompt] * num_samples, max_new_tokens, **settings)
        for row in rows:
            print(start + tokenizer.decode(row))
            print('---------------')
        n_tokens = sum(len(r) for r in rows)
dt = time.time() - t0
print(f"[{n_tokens} tokens in {dt:.2f} s, {n_tokens / dt:,.0f} tokens/s]", file=sys.stderr)
