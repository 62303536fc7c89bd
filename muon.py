"""
Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks", kellerjordan.github.io/posts/muon;
as the modded-nanogpt speedruns and nanochat use it) for the hidden matrices, AdamW for everything else.

Muon keeps SGD's momentum, but before a step it replaces each weight matrix's update by the nearest semi-orthogonal
matrix: the update U S V^T becomes U V^T, every direction the gradient found taking a step of the same size. The
few directions with large singular values no longer drown the many small ones, so a step teaches more. U V^T comes
from five Newton-Schulz iterations (matmuls only, no SVD) with coefficients that push every singular value into
roughly [0.7, 1.2] as fast as possible rather than exactly to 1, which trains just as well.

Only the 2-D weights inside the blocks (attention's and the MLP's) are Muon's: the embeddings and the head (tied
here) are lookups and a classifier, not linear maps between hidden states, and biases and LayerNorm gains are
vectors; AdamW takes those, as in the paper.
"""
import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # the quintic's a, b, c (Jordan et al.)


def newton_schulz(G, steps=5, eps=1e-7):
    """Approximately U V^T for G = U S V^T: X <- a X + (b X X^T + c (X X^T)^2) X, from X = G / ||G||_F (so that
    every singular value starts at most 1). Works on the wide orientation (fewer rows), where X X^T is smaller.
    bf16 on CUDA, as the speedruns do; fp32 elsewhere (bf16 matmuls are slow on CPUs without AMX or AVX-512 BF16)."""
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T
    X = X / (X.norm() + eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).to(G.dtype)


def muon_update(grad, momentum_buffer, beta, nesterov=True, ns_steps=5):
    """The direction of one Muon step for one matrix: momentum (Nesterov's by default), made semi-orthogonal, and
    scaled by sqrt(max(1, rows / cols)) so that a tall matrix's step is as large per entry as a wide one's."""
    momentum_buffer.lerp_(grad, 1 - beta)  # m <- beta m + (1 - beta) g
    update = grad.lerp(momentum_buffer, beta) if nesterov else momentum_buffer
    return newton_schulz(update, ns_steps) * max(1.0, grad.size(0) / grad.size(1)) ** 0.5


def adam_update(grad, exp_avg, exp_avg_sq, step, betas, eps):
    """Adam's direction, bias-corrected (Kingma & Ba 2015), as torch.optim.AdamW computes it."""
    exp_avg.lerp_(grad, 1 - betas[0])
    exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    m_hat = exp_avg / (1 - betas[0] ** step)
    v_hat = exp_avg_sq / (1 - betas[1] ** step)
    return m_hat / (v_hat.sqrt() + eps)


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer, two rules: param groups with use_muon=True take Muon's step, the others AdamW's. Weight decay
    is decoupled in both (p <- p (1 - lr wd) - lr update). One object, so that train.py's schedule, gradient
    clipping, checkpoints and resume treat it as they treat AdamW."""

    def __init__(self, groups, lr, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, nesterov=True, ns_steps=5):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, use_muon=False)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd = group['lr'], group['weight_decay']
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group['use_muon']:
                    if not state:
                        state['momentum_buffer'] = torch.zeros_like(p)
                    update = muon_update(p.grad, state['momentum_buffer'], group['momentum'], group['nesterov'],
                                         group['ns_steps'])
                else:
                    if not state:
                        state['step'] = 0
                        state['exp_avg'] = torch.zeros_like(p)
                        state['exp_avg_sq'] = torch.zeros_like(p)
                    state['step'] += 1
                    update = adam_update(p.grad, state['exp_avg'], state['exp_avg_sq'], state['step'],
                                         group['betas'], group['eps'])
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)
