"""mlp.py, the course's first chapters: the perceptron, backpropagation by hand, optimizers from scratch. Every
hand-written gradient against torch.autograd, every optimizer against torch.optim, the bigram model against
counting in a loop, and the script end to end."""
import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from conftest import run
from mlp import (XOR_Y, adam, adamw, bigram_loss, cross_entropy, examples, get_lr, init_mlp, mlp_backward,
                 mlp_forward, perceptron, separable_points, sgd, sgd_momentum, two_layer_xor)


def test_the_perceptron_separates_what_a_line_can_and_not_xor():
    gen = torch.Generator().manual_seed(0)
    x, y = separable_points(100, gen)
    w, b, mistakes = perceptron(x, y, epochs=100)
    assert mistakes[-1] == 0 and mistakes[0] > 0 and (y * (x @ w + b) > 0).all()
    xor_x = torch.tensor([[0., 0.], [0., 1.], [1., 0.], [1., 1.]], dtype=torch.float64)
    _, _, xor_mistakes = perceptron(xor_x, torch.tensor([-1., 1., 1., -1.], dtype=torch.float64), epochs=100)
    assert len(xor_mistakes) == 100 and min(xor_mistakes) > 0
    assert two_layer_xor(torch.Generator().manual_seed(0)).tolist() == XOR_Y.tolist()


@pytest.mark.parametrize('n_layer,dropout', [(1, 0.0), (2, 0.3)])
def test_every_hand_written_gradient_equals_autograd(n_layer, dropout):
    """The chain rule by hand (mlp_backward) against torch.autograd on the same forward pass written with torch's
    own ops (embedding, tanh, the same dropout masks, F.cross_entropy), float64."""
    gen = torch.Generator().manual_seed(1)
    p = init_mlp(11, 3, 4, 7, n_layer, gen, torch.float64)
    for k in p:  # nothing at zero: every term of every gradient matters
        p[k] = p[k] + 0.3 * torch.randn(p[k].shape, generator=gen, dtype=torch.float64)
    idx = torch.tensor([[1, 1, 2], [3, 1, 0], [10, 10, 10], [4, 5, 6], [1, 2, 1]])  # repeats: the lookup's sum
    targets = torch.tensor([0, 1, 10, 5, 1])
    logits, loss, cache = mlp_forward(p, idx, targets, dropout, torch.Generator().manual_seed(2))
    grads = mlp_backward(p, cache, targets)

    ref = {k: v.clone().requires_grad_() for k, v in p.items()}
    x = F.embedding(idx, ref['C']).flatten(1)
    for i in range(1, n_layer + 1):
        x = torch.tanh(x @ ref[f'W{i}'] + ref[f'b{i}'])
        if dropout:
            x = x * cache['masks'][i - 1]
    ref_loss = F.cross_entropy(x @ ref['Wout'] + ref['bout'], targets)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert set(grads) == set(p)
    for k in p:
        assert (grads[k] - ref[k].grad).abs().max() < 1e-6, k
    if dropout:  # the masks drop about 30% of units and scale the rest by 1 / 0.7
        m = torch.cat([mk.flatten() for mk in cache['masks']])
        assert set(m.unique().tolist()) <= {0.0, 1 / 0.7}


def test_cross_entropy_is_stable_and_right():
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([1, 2])
    assert abs(cross_entropy(logits, t).item() - F.cross_entropy(logits, t).item()) < 1e-12


@pytest.mark.parametrize('name', ['sgd', 'momentum', 'adam', 'adamw'])
def test_each_optimizer_equals_torch_optim_step_for_step(name):
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    grads = [torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(10)]
    ours, state = start.clone(), {}
    theirs = start.clone().requires_grad_()
    lr = 0.05
    if name == 'sgd':
        opt, step = torch.optim.SGD([theirs], lr=lr), lambda p, g: sgd(p, g, state, lr)
    elif name == 'momentum':
        opt, step = torch.optim.SGD([theirs], lr=lr, momentum=0.9), lambda p, g: sgd_momentum(p, g, state, lr, 0.9)
    elif name == 'adam':
        opt = torch.optim.Adam([theirs], lr=lr, betas=(0.9, 0.99))
        step = lambda p, g: adam(p, g, state, lr, (0.9, 0.99))  # noqa: E731
    else:
        opt = torch.optim.AdamW([theirs], lr=lr, betas=(0.9, 0.99), weight_decay=0.5)
        step = lambda p, g: adamw(p, g, state, lr, (0.9, 0.99), weight_decay=0.5)  # noqa: E731
    for g in grads:
        step(ours, g + ours)  # a gradient that depends on where the parameters are
        theirs.grad = g + theirs.detach()
        opt.step()
    assert (ours - theirs.detach()).abs().max() < 1e-6
    assert (ours - start).abs().max() > 0.05  # they moved


def test_the_schedule_warms_up_then_decays_to_a_tenth():
    assert get_lr(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert get_lr(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert get_lr(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert get_lr(55, 1.0, 10, 100) == pytest.approx(0.55)  # half way down the cosine: 0.1 + 0.9 / 2
    assert get_lr(100, 1.0, 10, 100) == pytest.approx(0.1) and get_lr(500, 1.0, 10, 100) == pytest.approx(0.1)


def test_bigram_loss_equals_counting_pairs_in_a_loop():
    train = torch.tensor([0, 1, 2, 1, 2, 2, 0, 1])
    val = torch.tensor([1, 2, 0, 3, 1])
    V = 4
    pairs, firsts = Counter(zip(train[:-1].tolist(), train[1:].tolist())), Counter(train[:-1].tolist())
    slow = -sum(math.log((pairs[(a, b)] + 1) / (firsts[a] + V)) for a, b in zip(val[:-1].tolist(), val[1:].tolist()))
    assert bigram_loss(train, val, V) == pytest.approx(slow / (len(val) - 1), abs=1e-12)


def test_examples_are_every_context_and_its_next_character():
    x, y = examples(torch.arange(10, 16), 3)
    assert x.tolist() == [[10, 11, 12], [11, 12, 13], [12, 13, 14]] and y.tolist() == [13, 14, 15]


def test_the_script_runs_every_chapter(char_data, tmp_path):
    out = tmp_path / 'mlp'
    run(['mlp.py', f'--data_dir={char_data}', f'--out_dir={out}', '--max_iters=400', '--eval_interval=200',
         '--overfit_chars=1000', '--overfit_iters=1500', '--sample_chars=40'])
    r = json.loads((out / 'results.json').read_text())
    assert r['perceptron']['two_layer_xor_right'] == 4 and r['perceptron']['xor_last_mistakes'] > 0
    assert 2.3 < r['bigram_val_loss'] < 2.6  # tinyshakespeare's characters: about 2.45 nats
    for name in ('sgd', 'momentum', 'adam', 'adamw'):
        assert r[f'{name}_val_loss'] < math.log(65), name  # below the uniform guess after 400 steps
    plain = r['overfit_plain']
    assert plain['final_train'] < plain['final_val'] - 0.3 and plain['best_iter'] < 1500  # it overfits
    assert len(r['sample']) == 40
    assert (out / 'optimizers.png').stat().st_size > 0 and (out / 'overfitting.png').stat().st_size > 0
