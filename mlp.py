"""
The course's first chapters, before the transformer, runnable: the perceptron, a multilayer network,
backpropagation written out by hand, optimizers from scratch, overfitting and regularization, all on the
characters the GPT learns later. No autograd and no torch.optim in training: every gradient and every update
is a few lines below (tests/test_mlp.py checks them against torch.autograd and torch.optim).

    python prepare.py shakespeare_char      # once: tinyshakespeare as characters, the GPT's quickstart split
    python mlp.py                           # under two minutes on 2 CPU cores (102 s on 2 Xeon cores)
    python mlp.py --optimizers=adamw --context=5 --max_iters=10000

1. The perceptron (Rosenblatt 1958) learns a line that separates two classes of points, and stops making
   mistakes; on XOR no line exists, and it never stops. Two layers (a hidden tanh layer) solve XOR.
2. A character-level MLP language model (Bengio et al. 2003): the previous `context` characters, each an
   embedding, concatenated, a tanh hidden layer (or two), a softmax over the next character. Forward and
   backward passes layer by layer: linear, tanh, dropout, cross-entropy with softmax, the embedding lookup.
3. SGD, SGD with momentum, Adam (Kingma & Ba 2015) and AdamW (Loshchilov & Hutter 2019), each a small function,
   train that model with linear warmup and cosine decay; their val curves are out_dir/optimizers.png, next to
   a bigram count model, the simplest language model there is.
4. The same model on a small slice of the text overfits: train loss falls while val loss rises. Dropout
   (Srivastava et al. 2014) and weight decay shrink the gap, and early stopping keeps the best val point
   (out_dir/overfitting.png).
Every number is printed and written to out_dir/results.json; samples of the best model's text end the run.
"""
import json
import math
import os
import time

import torch

# -----------------------------------------------------------------------------
data_dir = 'data'
dataset = 'shakespeare_char'  # prepare.py's character-level split: val losses comparable with train.py's
out_dir = 'out-mlp'
# the language model
context = 5                 # characters the model sees before the one it predicts (3 or 8: worse on val)
n_embd = 16                 # each character's embedding
n_hidden = 300              # units in each hidden layer
n_layer = 1                 # hidden layers (1 or 2 are the classic choices)
batch_size = 64
max_iters = 10000           # per optimizer (5,000: Adam's val 1.88 instead of 1.81)
eval_interval = 250
warmup_iters = 100          # linear warmup, then cosine decay to a tenth of the peak
optimizers = 'sgd,momentum,adam,adamw'  # which to train, in order
lr_sgd = 0.5                # each optimizer's peak, chosen on val between two values (docs/experiments.md)
lr_momentum = 0.05
lr_adam = 5e-3
lr_adamw = 5e-3
momentum = 0.9
beta1 = 0.9
beta2 = 0.99
weight_decay = 0.01         # AdamW's, on the matrices and embeddings (not the biases); 0.1 cost 0.1 nats here
# overfitting: a small slice of the training text, without and with regularization
overfit_chars = 5000        # characters of train text (0: skip this part)
overfit_iters = 4000
overfit_dropout = 0.5         # 0.3: val 2.767 at the end, 0.5: 2.750 (weight decay 1.0; 0.2 and 0.1: 3.42)
overfit_weight_decay = 1.0
sample_chars = 300          # characters of generated text at the end
seed = 1337
# -----------------------------------------------------------------------------
OPTIMIZERS = ('sgd', 'momentum', 'adam', 'adamw')


# -----------------------------------------------------------------------------
# 1. The perceptron

def perceptron(x, y, epochs, lr=1.0):
    """Rosenblatt's rule on points x (N, 2) with labels y in {-1, +1}: visit the points in order; a point on the
    wrong side of the line (y (w.x + b) <= 0) moves the line toward it: w += lr y x, b += lr y. Returns (w, b,
    mistakes per epoch); the epochs stop early once one makes no mistake (the data is then separated)."""
    w, b, mistakes = torch.zeros(x.size(1), dtype=x.dtype), torch.zeros((), dtype=x.dtype), []
    for _ in range(epochs):
        m = 0
        for xi, yi in zip(x, y):
            if yi * (xi @ w + b) <= 0:
                w, b, m = w + lr * yi * xi, b + lr * yi, m + 1
        mistakes.append(m)
        if m == 0:
            break
    return w, b, mistakes


def separable_points(n, gen):
    """n points in the unit square, labelled by which side of the line x1 + 2 x2 = 1.2 they are on, with a
    margin of 0.1 kept clear (the perceptron convergence theorem needs one)."""
    x = torch.rand(4 * n, 2, generator=gen, dtype=torch.float64)
    s = x[:, 0] + 2 * x[:, 1] - 1.2
    keep = s.abs() > 0.1
    return x[keep][:n], torch.where(s[keep][:n] > 0, 1.0, -1.0).double()


XOR_X = torch.tensor([[0., 0.], [0., 1.], [1., 0.], [1., 1.]], dtype=torch.float64)
XOR_Y = torch.tensor([0, 1, 1, 0])


def two_layer_xor(gen, n_hidden=4, steps=2000, lr=1.0):
    """A hidden tanh layer, then a softmax over the two classes, trained on the 4 XOR points by full-batch SGD
    with the hand-written backward passes below. Returns the predicted class of each point."""
    W1 = torch.randn(2, n_hidden, generator=gen, dtype=torch.float64)
    b1 = torch.zeros(n_hidden, dtype=torch.float64)
    W2 = torch.randn(n_hidden, 2, generator=gen, dtype=torch.float64)
    b2 = torch.zeros(2, dtype=torch.float64)
    for _ in range(steps):
        h = torch.tanh(linear(XOR_X, W1, b1))
        logits = linear(h, W2, b2)
        dh, dW2, db2 = linear_backward(cross_entropy_backward(logits, XOR_Y), h, W2)
        _, dW1, db1 = linear_backward(tanh_backward(dh, h), XOR_X, W1)
        for p, g in ((W1, dW1), (b1, db1), (W2, dW2), (b2, db2)):
            p -= lr * g
    return linear(torch.tanh(linear(XOR_X, W1, b1)), W2, b2).argmax(1)


# -----------------------------------------------------------------------------
# 2. Layers, forward and backward, by hand. Each backward takes d(loss)/d(output) and returns the gradients of
# the layer's input and parameters: the chain rule, one layer at a time.

def linear(x, W, b):
    return x @ W + b


def linear_backward(dout, x, W):
    """y = x W + b: dx = dy W^T, dW = x^T dy, db = the sum of dy over the batch."""
    return dout @ W.T, x.T @ dout, dout.sum(0)


def tanh_backward(dout, out):
    """y = tanh(x): dy/dx = 1 - tanh(x)^2, from the output itself."""
    return dout * (1 - out ** 2)


def dropout_mask(shape, p, gen, dtype=torch.float32):
    """Inverted dropout: each unit kept with probability 1 - p and scaled by 1 / (1 - p), so that the expected
    activation is unchanged and nothing needs rescaling at evaluation. Its backward multiplies by the same mask."""
    return (torch.rand(shape, generator=gen) >= p).to(dtype) / (1 - p)


def cross_entropy(logits, targets):
    """Mean negative log-likelihood of the targets under softmax(logits). Subtracting each row's max changes no
    probability and keeps exp() from overflowing."""
    z = logits - logits.max(1, keepdim=True).values
    logp = z - z.exp().sum(1, keepdim=True).log()
    return -logp[torch.arange(len(targets)), targets].mean()


def cross_entropy_backward(logits, targets):
    """d(loss)/d(logits) = (softmax(logits) - one_hot(targets)) / N: softmax and the log cancel to this."""
    p = torch.softmax(logits, dim=1)
    p[torch.arange(len(targets)), targets] -= 1
    return p / len(targets)


# -----------------------------------------------------------------------------
# The MLP language model (Bengio et al. 2003, characters instead of words)

def init_mlp(vocab_size, context, n_embd, n_hidden, n_layer, gen, dtype=torch.float32):
    """Parameters by name: the embedding table C, then W1, b1, ... for the hidden layers and the output layer.
    Hidden weights ~ N(0, 1) * (5/3) / sqrt(fan_in) (Kaiming's gain for tanh): activations neither vanish nor
    saturate at the start. The output layer starts near zero, so the first loss is about ln(vocab_size)."""
    p = {'C': torch.randn(vocab_size, n_embd, generator=gen, dtype=dtype)}
    fan_in = context * n_embd
    for i in range(1, n_layer + 1):
        p[f'W{i}'] = torch.randn(fan_in, n_hidden, generator=gen, dtype=dtype) * (5 / 3) / math.sqrt(fan_in)
        p[f'b{i}'] = torch.zeros(n_hidden, dtype=dtype)
        fan_in = n_hidden
    p['Wout'] = torch.randn(fan_in, vocab_size, generator=gen, dtype=dtype) * 0.01
    p['bout'] = torch.zeros(vocab_size, dtype=dtype)
    return p


def mlp_forward(p, idx, targets=None, dropout=0.0, gen=None):
    """idx (B, context) -> logits (B, vocab), and the loss if targets are given; also what backward needs."""
    n_layer = sum(k.startswith('W') for k in p) - 1
    x = p['C'][idx].view(idx.size(0), -1)  # look up each character's embedding; concatenate them
    cache = {'idx': idx, 'inputs': [x], 'outs': [], 'masks': []}
    for i in range(1, n_layer + 1):
        h = torch.tanh(linear(x, p[f'W{i}'], p[f'b{i}']))
        cache['outs'].append(h)
        if dropout > 0:
            mask = dropout_mask(h.shape, dropout, gen, h.dtype)
            cache['masks'].append(mask)
            h = h * mask
        x = h
        cache['inputs'].append(x)
    logits = linear(x, p['Wout'], p['bout'])
    cache['logits'] = logits
    return logits, (cross_entropy(logits, targets) if targets is not None else None), cache


def mlp_backward(p, cache, targets):
    """Every parameter's gradient of the mean cross-entropy, by the chain rule from the loss back to the
    embeddings: the layers of mlp_forward in reverse order."""
    grads = {}
    n_layer = len(cache['outs'])
    dx = cross_entropy_backward(cache['logits'], targets)
    dx, grads['Wout'], grads['bout'] = linear_backward(dx, cache['inputs'][-1], p['Wout'])
    for i in range(n_layer, 0, -1):
        if cache['masks']:
            dx = dx * cache['masks'][i - 1]
        dx = tanh_backward(dx, cache['outs'][i - 1])
        dx, grads[f'W{i}'], grads[f'b{i}'] = linear_backward(dx, cache['inputs'][i - 1], p[f'W{i}'])
    # the lookup copied rows of C: each row's gradient is the sum over every place it was used
    idx = cache['idx']
    grads['C'] = torch.zeros_like(p['C']).index_add_(0, idx.reshape(-1), dx.view(idx.numel(), -1))
    return grads


# -----------------------------------------------------------------------------
# 3. Optimizers from scratch: one step for one parameter p with gradient g, in place; state is its own dict

def sgd(p, g, state, lr):
    """p <- p - lr g."""
    p -= lr * g


def sgd_momentum(p, g, state, lr, mu=0.9):
    """v <- mu v + g; p <- p - lr v: a velocity that averages recent gradients, so that steps along a
    consistent direction grow and oscillating ones cancel (the first v is g, as torch.optim.SGD has it)."""
    state['v'] = g.clone() if 'v' not in state else mu * state['v'] + g
    p -= lr * state['v']


def adam(p, g, state, lr, betas=(0.9, 0.999), eps=1e-8):
    """m, v <- moving averages of g and g^2; each divided by 1 - beta^t (they start at 0, biased low);
    p <- p - lr m_hat / (sqrt(v_hat) + eps): a step of about lr in each coordinate, whatever the gradient's scale."""
    b1, b2 = betas
    t = state['t'] = state.get('t', 0) + 1
    state['m'] = (1 - b1) * g if 'm' not in state else b1 * state['m'] + (1 - b1) * g
    state['v'] = (1 - b2) * g * g if 'v' not in state else b2 * state['v'] + (1 - b2) * g * g
    m_hat, v_hat = state['m'] / (1 - b1 ** t), state['v'] / (1 - b2 ** t)
    p -= lr * m_hat / (v_hat.sqrt() + eps)


def adamw(p, g, state, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    """Decoupled weight decay: shrink the weights toward 0 by lr * weight_decay, then Adam's step. (Adding
    weight_decay * p to g instead, L2 regularization, would be divided by sqrt(v) like the rest of g.)"""
    p -= lr * weight_decay * p
    adam(p, g, state, lr, betas, eps)


def get_lr(it, peak, warmup, total):
    """Linear warmup to the peak over `warmup` steps, then cosine decay to a tenth of it at `total`."""
    if it < warmup:
        return peak * (it + 1) / warmup
    ratio = min(1.0, (it - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * ratio)))


def make_step(name, lr_peak, total_iters, weight_decay=0.0):
    """update(params, grads, it): one step of the named optimizer on every parameter, at the schedule's lr."""
    states = {}

    def update(params, grads, it):
        lr = get_lr(it, lr_peak, warmup_iters, total_iters)
        for k, p in params.items():
            s = states.setdefault(k, {})
            if name == 'sgd':
                sgd(p, grads[k], s, lr)
            elif name == 'momentum':
                sgd_momentum(p, grads[k], s, lr, momentum)
            elif name == 'adam':
                adam(p, grads[k], s, lr, (beta1, beta2))
            else:  # decay the matrices and the embeddings, not the biases
                adamw(p, grads[k], s, lr, (beta1, beta2), weight_decay=0.0 if k.startswith('b') else weight_decay)
    return update


# -----------------------------------------------------------------------------
# Data, the bigram baseline, training, sampling

def examples(data, context):
    """Every (previous `context` characters, next character) pair of a 1-D tensor of ids."""
    ix = torch.arange(context, len(data))
    return data[ix[:, None] - context + torch.arange(context)], data[ix]


def bigram_loss(train, val, vocab_size):
    """A bigram model by counting: P(b | a) = (count(a b) + 1) / (count(a) + vocab_size), add-one smoothed so
    that no pair seen only in val has probability 0. Returns its mean negative log-likelihood on val."""
    counts = torch.ones(vocab_size, vocab_size, dtype=torch.float64)
    counts.index_put_((train[:-1], train[1:]), torch.ones(len(train) - 1, dtype=torch.float64), accumulate=True)
    logp = (counts / counts.sum(1, keepdim=True)).log()
    return -logp[val[:-1], val[1:]].mean().item()


@torch.no_grad()
def mean_loss(params, x, y, chunk=65536):
    return sum(mlp_forward(params, x[i:i + chunk], y[i:i + chunk])[1].item() * len(x[i:i + chunk])
               for i in range(0, len(x), chunk)) / len(x)


def train_mlp(name, lr_peak, train_xy, eval_sets, iters, vocab_size, gen, dropout=0.0, wd=0.0):
    """Train a fresh MLP (the config's shape) with the named optimizer for iters steps of batch_size examples;
    returns (params, curve): the loss on each of eval_sets at every eval_interval and at the end."""
    params = init_mlp(vocab_size, context, n_embd, n_hidden, n_layer, gen)
    update = make_step(name, lr_peak, iters, wd)
    x, y = train_xy
    curve = []
    for it in range(iters + 1):
        if it % eval_interval == 0 or it == iters:
            curve.append({'iter': it, **{k: mean_loss(params, *xy) for k, xy in eval_sets.items()}})
        if it == iters:
            break
        ix = torch.randint(0, len(x), (batch_size,), generator=gen)
        _, loss, cache = mlp_forward(params, x[ix], y[ix], dropout, gen)
        update(params, mlp_backward(params, cache, y[ix]), it)
    return params, curve


@torch.no_grad()
def sample_text(params, n, start, gen):
    """n characters, each drawn from the model's distribution given the previous `context` ones."""
    ctx, out = [start] * context, []
    for _ in range(n):
        logits, _, _ = mlp_forward(params, torch.tensor([ctx]))
        nxt = int(torch.multinomial(torch.softmax(logits[0], 0), 1, generator=gen))
        out.append(nxt)
        ctx = ctx[1:] + [nxt]
    return out


def bits(nats):
    return nats / math.log(2)


if __name__ == '__main__':
    import numpy as np
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from common import check_out_dir, check_settings, fail
    from configurator import apply_config
    config = apply_config(globals())
    check_settings(globals(), positive=('context', 'n_embd', 'n_hidden', 'n_layer', 'batch_size', 'max_iters',
                                        'eval_interval', 'lr_sgd', 'lr_momentum', 'lr_adam', 'lr_adamw'),
                   non_negative=('warmup_iters', 'weight_decay', 'overfit_chars', 'overfit_iters',
                                 'overfit_weight_decay', 'sample_chars', 'momentum'),
                   fractions=('beta1', 'beta2', 'overfit_dropout'))
    chosen = [o.strip() for o in optimizers.split(',') if o.strip()]
    unknown = [o for o in chosen if o not in OPTIMIZERS]
    if unknown or not chosen:
        fail(f"optimizers must name some of {', '.join(OPTIMIZERS)}; got {optimizers!r}")
    path = os.path.join(data_dir, dataset)
    if not os.path.exists(os.path.join(path, 'meta.json')):
        fail(f"no prepared data at {path}: run python prepare.py shakespeare_char first (or pass --data_dir=DIR)")
    with open(os.path.join(path, 'meta.json'), encoding='utf-8') as f:
        meta = json.load(f)
    if meta.get('tokenizer') != 'char':
        fail(f"{path} is not a character-level dataset (tokenizer {meta.get('tokenizer')!r}): mlp.py needs one")
    check_out_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab_size, itos = meta['vocab_size'], meta['vocab']
    load = lambda split: torch.from_numpy(np.fromfile(os.path.join(path, f'{split}.bin'),  # noqa: E731
                                                      dtype=meta['dtype']).astype(np.int64))
    train, val = load('train'), load('val')
    results = {}

    print("1. the perceptron")
    x, y = separable_points(100, gen)
    _, _, mistakes = perceptron(x, y, epochs=100)
    print(f"   separable points: mistakes per epoch {mistakes}: separated after {len(mistakes)} epochs")
    _, _, xor_mistakes = perceptron(XOR_X, torch.where(XOR_Y == 1, 1.0, -1.0).double(), epochs=100)
    print(f"   XOR: mistakes per epoch {xor_mistakes[:8]} ... {xor_mistakes[-1]} after {len(xor_mistakes)} epochs: "
          f"no line separates XOR, so the rule never stops")
    xor_pred = two_layer_xor(gen)
    print(f"   two layers (4 tanh units, backprop by hand, 2,000 SGD steps): XOR predicted {xor_pred.tolist()}, "
          f"{int((xor_pred == XOR_Y).sum())}/4 right")
    results['perceptron'] = dict(separable_epochs=len(mistakes), separable_mistakes=mistakes,
                                 xor_last_mistakes=xor_mistakes[-1], two_layer_xor_right=int((xor_pred == XOR_Y).sum()))

    print("2-3. the MLP language model, each optimizer from scratch")
    train_xy, val_xy = examples(train, context), examples(val, context)
    results['bigram_val_loss'] = bigram_loss(train, val, vocab_size)
    print(f"   bigram counts: val loss {results['bigram_val_loss']:.4f} ({bits(results['bigram_val_loss']):.3f} "
          f"bits/char)")
    lrs = dict(sgd=lr_sgd, momentum=lr_momentum, adam=lr_adam, adamw=lr_adamw)
    curves, best = {}, None
    for name in chosen:
        params, curves[name] = train_mlp(name, lrs[name], train_xy, {'val': val_xy}, max_iters, vocab_size, gen,
                                         wd=weight_decay if name == 'adamw' else 0.0)
        v = curves[name][-1]['val']
        results[f'{name}_val_loss'] = v
        print(f"   {name:8s} lr {lrs[name]:g}: val loss {v:.4f} ({bits(v):.3f} bits/char) after {max_iters} "
              f"iterations, {time.time() - t0:.0f} s so far")
        if best is None or v < best[1]:
            best = (name, v, params)
    plt.figure(figsize=(7, 4.5))
    for name, c in curves.items():
        plt.plot([r['iter'] for r in c], [r['val'] for r in c], label=name)
    plt.axhline(results['bigram_val_loss'], color='gray', ls='--', label='bigram counts')
    plt.xlabel('iteration')
    plt.ylabel('val loss (nats/char)')
    plt.ylim(top=results['bigram_val_loss'] + 0.4)
    plt.title(f'MLP language model ({context} characters of context), optimizers from scratch')
    plt.legend()
    plt.savefig(os.path.join(out_dir, 'optimizers.png'), dpi=100, bbox_inches='tight')
    plt.close()

    if overfit_chars:
        print(f"4. overfitting: the first {overfit_chars:,} characters of train, {overfit_iters} iterations of AdamW")
        small = examples(train[:overfit_chars], context)
        plt.figure(figsize=(7, 4.5))
        for label, dp, wd in (('no regularization', 0.0, 0.0),
                              (f'dropout {overfit_dropout}, weight decay {overfit_weight_decay}', overfit_dropout,
                               overfit_weight_decay)):
            _, c = train_mlp('adamw', lr_adamw, small, {'train': small, 'val': val_xy}, overfit_iters, vocab_size,
                             gen, dp, wd)
            stop = min(c, key=lambda r: r['val'])
            key = 'overfit_plain' if dp == 0 else 'overfit_regularized'
            results[key] = dict(final_train=c[-1]['train'], final_val=c[-1]['val'], best_val=stop['val'],
                                best_iter=stop['iter'])
            print(f"   {label}: train {c[-1]['train']:.3f}, val {c[-1]['val']:.3f} at the end; early stopping "
                  f"keeps iteration {stop['iter']} (val {stop['val']:.3f})")
            line, = plt.plot([r['iter'] for r in c], [r['train'] for r in c], label=f'{label}: train')
            plt.plot([r['iter'] for r in c], [r['val'] for r in c], '--', color=line.get_color(), label=f'{label}: val')
            plt.plot(stop['iter'], stop['val'], 'o', color=line.get_color())
        plt.xlabel('iteration')
        plt.ylabel('loss (nats/char)')
        plt.title(f'{overfit_chars:,} characters of train: overfitting, and regularization (o: early stopping)')
        plt.legend(fontsize=8)
        plt.savefig(os.path.join(out_dir, 'overfitting.png'), dpi=100, bbox_inches='tight')
        plt.close()

    text = ''.join(itos[i] for i in sample_text(best[2], sample_chars, itos.index('\n'), gen))
    print(f"5. {sample_chars} characters from the best model ({best[0]}, val loss {best[1]:.4f}):\n{text}")
    results['sample'] = text
    results['seconds'] = time.time() - t0
    tmp = os.path.join(out_dir, 'results.json.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump({'config': config, **results}, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, 'results.json'))
    print(f"done in {results['seconds']:.0f} s: {out_dir}/results.json, optimizers.png, overfitting.png")
