"""Muon (muon.py) against the maths written out slowly: Newton-Schulz acts on each singular value alone, the
optimizer's two rules against a hand-written step and torch's AdamW, the parameter split, and train.py's resume."""
import runpy

import pytest
import torch

import model as M
from conftest import ROOT, per_iter, read_metrics, run, train_args
from muon import NS_COEFFS, MuonWithAdamW, newton_schulz
from test_model import tiny


def slow_newton_schulz(G, steps=5):
    """The same iteration on the singular values themselves: G = U S V^T, s <- s / ||G||_F, then the quintic
    s <- a s + b s^3 + c s^5, five times; the result is U diag(s) V^T."""
    a, b, c = NS_COEFFS
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    s = S / G.double().norm()
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return U @ torch.diag(s) @ Vh


@pytest.mark.parametrize('shape', [(32, 32), (48, 16), (16, 48)])
def test_newton_schulz_is_the_quintic_on_each_singular_value(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    X = newton_schulz(G)
    assert X.shape == G.shape
    assert torch.allclose(X.double(), slow_newton_schulz(G), atol=2e-4)
    # and that is close to U V^T: every singular value pushed into about [0.7, 1.2]
    s = torch.linalg.svdvals(X.double())
    assert s.min() > 0.6 and s.max() < 1.25, s


def test_one_optimizer_two_rules_against_a_step_by_hand():
    """Three steps on a Muon matrix (Nesterov momentum, orthogonalised, sqrt(rows / cols) scale, decoupled decay)
    and on an AdamW vector, against the formulas by hand and torch.optim.AdamW."""
    g = torch.Generator().manual_seed(1)
    W0, b0 = torch.randn(24, 8, generator=g), torch.randn(8, generator=g)
    grads = [(torch.randn(24, 8, generator=g), torch.randn(8, generator=g)) for _ in range(3)]
    lr, muon_lr, wd, beta = 1e-2, 0.05, 0.1, 0.95
    W, b = W0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = MuonWithAdamW([{'params': [W], 'use_muon': True, 'lr': muon_lr, 'weight_decay': wd},
                         {'params': [b], 'weight_decay': wd}], lr=lr, betas=(0.9, 0.95), momentum=beta)
    b_ref = b0.clone().requires_grad_()
    adamw = torch.optim.AdamW([b_ref], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    W_ref, m = W0.double().clone(), torch.zeros(24, 8, dtype=torch.double)
    for gW, gb in grads:
        W.grad, b.grad, b_ref.grad = gW.clone(), gb.clone(), gb.clone()
        opt.step()
        adamw.step()
        m = beta * m + (1 - beta) * gW.double()
        nesterov = (1 - beta) * gW.double() + beta * m
        W_ref = W_ref * (1 - muon_lr * wd) - muon_lr * slow_newton_schulz(nesterov) * (24 / 8) ** 0.5
    assert torch.allclose(W.detach().double(), W_ref, atol=1e-5)
    assert torch.allclose(b.detach(), b_ref.detach(), atol=1e-6)


def test_configure_optimizers_gives_muon_the_hidden_matrices_only():
    m = tiny()
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', muon_lr=0.02)
    muon, adam_decay, adam_no_decay = opt.param_groups
    hidden = [blk.attn.c_attn.weight for blk in m.transformer.h] + [blk.attn.c_proj.weight for blk in m.transformer.h] \
        + [blk.mlp.c_fc.weight for blk in m.transformer.h] + [blk.mlp.c_proj.weight for blk in m.transformer.h]
    assert muon['use_muon'] and muon['lr'] == 0.02 and {id(p) for p in muon['params']} == {id(p) for p in hidden}
    # the embeddings (the head is tied to wte) stay with AdamW, decayed; vectors undecayed
    assert {id(p) for p in adam_decay['params']} == {id(m.transformer.wte.weight), id(m.transformer.wpe.weight)}
    assert not adam_decay['use_muon'] and adam_decay['weight_decay'] == 0.1 and adam_no_decay['weight_decay'] == 0.0
    assert all(p.dim() == 1 for p in adam_no_decay['params'])
    assert sum(len(grp['params']) for grp in opt.param_groups) == len(list(m.parameters()))


def test_train_with_muon_resumes_exactly(char_data, tmp_path):
    """train.py --muon=True stopped at iteration 20 and resumed gives exactly the losses and weights of a run left
    alone (the momentum buffers travel in the checkpoint), and each group follows the schedule at its own peak."""
    common = ['--muon=True', '--muon_lr=0.03', '--lr_decay_iters=40', '--warmup_iters=5', '--eval_interval=10',
              '--always_save_checkpoint=True']
    run(train_args(char_data, tmp_path / 'a', *common, '--max_iters=40'))
    run(train_args(char_data, tmp_path / 'b', *common, '--max_iters=20'))
    run(train_args(char_data, tmp_path / 'b', *common, '--max_iters=40', '--init_from=resume'))
    wa = M.load_checkpoint(str(tmp_path / 'a' / 'ckpt.pt'))[0]
    wb = M.load_checkpoint(str(tmp_path / 'b' / 'ckpt.pt'))[0]
    for k in wa['model']:
        assert torch.equal(wa['model'][k], wb['model'][k]), k
    assert per_iter(read_metrics(tmp_path / 'a'), 'loss') == per_iter(read_metrics(tmp_path / 'b'), 'loss')
    groups = wa['optimizer']['param_groups']
    assert groups[0]['use_muon'] and groups[0]['lr'] / groups[1]['lr'] == pytest.approx(0.03 / groups[1]['base_lr'])


def test_the_muon_chat_base_changes_only_the_optimizer_and_length():
    """config/chat_base_muon.py, applied on top of config/chat_base.py, sets only what its comment says it changes,
    and every key it sets is one train.py has."""
    overlay = {k for k in runpy.run_path(str(ROOT / 'config' / 'chat_base_muon.py')) if not k.startswith('__')}
    assert overlay == {'out_dir', 'muon', 'muon_lr', 'learning_rate', 'min_lr', 'max_iters', 'lr_decay_iters'}
    train_globals = (ROOT / 'train.py').read_text()
    assert all(f"\n{k} = " in train_globals for k in overlay), overlay
    base = runpy.run_path(str(ROOT / 'config' / 'chat_base.py'))
    assert runpy.run_path(str(ROOT / 'config' / 'chat_base_muon.py'))['max_iters'] <= 0.6 * base['max_iters']
