"""model.py against references: attention and GELU written out slowly, the slow generation path, and
logits that Hugging Face's own GPT-2 computed from an HF-written weight file."""
import functools
import http.server
import json
import math
import shutil
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import common as C
import download as D
import model as M
from conftest import HF_TINY
from model import GPT, GPTConfig, apply_rope, sample_from, sample_next


def tiny(pos_emb='learned', **kw):
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, dropout=0.0, pos_emb=pos_emb)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def all_logits(model, idx):
    return model(idx, targets=torch.zeros_like(idx))[0]


# -----------------------------------------------------------------------------
# the transformer's pieces

@pytest.mark.parametrize('pos_emb', ['learned', 'rope'])
def test_attention_matches_handwritten_softmax(pos_emb):
    m = tiny(pos_emb)
    attn = m.transformer.h[0].attn
    B, T, C, nh = 3, 7, 32, 2
    x = torch.randn(B, T, C)
    rope = None
    if pos_emb == 'rope':
        rope = (m.rope_cos[:T], m.rope_sin[:T])
    y = attn(x, rope)
    # reference: explicit loops over heads, softmax of masked scores
    qkv = x @ attn.c_attn.weight.T + attn.c_attn.bias
    q, k, v = qkv.split(C, dim=2)
    hd = C // nh
    out = torch.zeros(B, T, C)
    for h in range(nh):
        qh, kh, vh = (t[:, :, h * hd:(h + 1) * hd] for t in (q, k, v))
        if rope is not None:
            qh = apply_rope(qh.unsqueeze(1), *rope).squeeze(1)
            kh = apply_rope(kh.unsqueeze(1), *rope).squeeze(1)
        scores = qh @ kh.transpose(1, 2) / math.sqrt(hd)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float('-inf'))
        out[:, :, h * hd:(h + 1) * hd] = torch.softmax(scores, dim=-1) @ vh
    ref = out @ attn.c_proj.weight.T + attn.c_proj.bias
    assert (y - ref).abs().max() < 1e-5


def test_rope_rotates_pairs_by_position_angle():
    # reference in complex numbers: pair (x1, x2) -> (x1 + i x2) * e^{i pos theta_j}
    hd, T, base = 8, 5, 10000.0
    cos, sin = M.rope_tables(hd, T, base)
    x = torch.randn(1, 1, T, hd)
    y = apply_rope(x, cos, sin)
    for p in range(T):
        for j in range(hd // 2):
            theta = p * base ** (-2 * j / hd)
            z = complex(x[0, 0, p, j], x[0, 0, p, j + hd // 2]) * complex(math.cos(theta), math.sin(theta))
            assert abs(y[0, 0, p, j] - z.real) < 1e-5 and abs(y[0, 0, p, j + hd // 2] - z.imag) < 1e-5


def test_gelu_is_gpt2_tanh_approximation():
    m = tiny()
    mlp = m.transformer.h[0].mlp
    x = torch.randn(4, 32)
    h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    ref = gelu @ mlp.c_proj.weight.T + mlp.c_proj.bias
    assert (mlp(x) - ref).abs().max() < 1e-5


@pytest.mark.parametrize('pos_emb', ['learned', 'rope'])
def test_causality_future_tokens_never_change_past_logits(pos_emb):
    m = tiny(pos_emb)
    a = torch.randint(0, 37, (2, 12))
    b = a.clone()
    b[:, 7:] = torch.randint(0, 37, (2, 5))
    la, lb = all_logits(m, a), all_logits(m, b)
    assert torch.equal(la[:, :7], lb[:, :7]) or (la[:, :7] - lb[:, :7]).abs().max() < 1e-6
    assert (la[:, 7:] - lb[:, 7:]).abs().max() > 1e-3  # and the later ones do change


def test_forward_loss_ignores_minus_one_and_last_position_logits():
    m = tiny()
    idx = torch.randint(0, 37, (2, 10))
    targets = torch.randint(0, 37, (2, 10))
    targets[0, :4] = -1
    logits, loss = m(idx, targets)
    keep = targets != -1
    ref = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert abs(loss.item() - ref.item()) < 1e-6
    last, none = m(idx)
    assert none is None and last.shape == (2, 1, 37)
    assert (last[:, 0] - logits[:, -1]).abs().max() < 1e-5


def test_init_scaled_residual_projections_and_tied_embeddings():
    m = GPT(GPTConfig(block_size=32, vocab_size=100, n_layer=8, n_head=4, n_embd=128))
    assert m.lm_head.weight is m.transformer.wte.weight
    std = m.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 8)) < 0.0015
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002


def test_configure_optimizers_decays_only_matrices():
    m = tiny()
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and all(p.dim() == 2 for p in decay['params'])
    assert no_decay['weight_decay'] == 0.0 and all(p.dim() == 1 for p in no_decay['params'])
    assert len(decay['params']) + len(no_decay['params']) == len(list(m.parameters()))


def test_mfu_peak_and_flops():
    m = tiny()
    cfg = m.config
    assert m.flops_per_token() == 6 * m.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert m.estimate_mfu(1000.0, 'cpu') is None  # no known peak on a CPU


# -----------------------------------------------------------------------------
# generation: the KV-cache path must give exactly the tokens of the slow path

@pytest.mark.parametrize('pos_emb', ['learned', 'rope'])
@pytest.mark.parametrize('temperature,top_k,top_p', [(0, None, None), (1.0, None, None), (0.8, 10, 0.9)])
def test_kv_cache_generation_equals_slow_path(pos_emb, temperature, top_k, top_p):
    m = tiny(pos_emb)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13]]  # ragged; the middle one nearly fills block_size
    n = 30  # every row runs far past block_size 16
    fast = m.generate(prompts, n, temperature, top_k, top_p, generator=torch.Generator().manual_seed(3))
    slow = m.generate(prompts, n, temperature, top_k, top_p, generator=torch.Generator().manual_seed(3),
                      use_cache=False)
    assert fast == slow and all(len(r) == n for r in fast)


def test_generation_slow_path_is_plain_argmax_loop():
    # the slow path itself, against the simplest greedy loop over the last block_size tokens
    m = tiny()
    seq = [5, 6, 7]
    ref = list(seq)
    for _ in range(25):
        ref.append(int(m(torch.tensor([ref[-16:]]))[0][0, -1].argmax()))
    assert m.generate([seq], 25, temperature=0) == [ref[3:]]


def test_stop_token_ends_rows():
    m = tiny()
    greedy = m.generate([[1, 2], [3]], 20, temperature=0)
    stop = greedy[0][4]
    out = m.generate([[1, 2], [3]], 20, temperature=0, stop_token=stop)
    assert out[0] == greedy[0][:greedy[0].index(stop)]
    row1 = greedy[1][:greedy[1].index(stop)] if stop in greedy[1] else greedy[1]
    assert out[1] == row1


@pytest.mark.parametrize('pos_emb', ['learned', 'rope'])
def test_finished_rows_leave_the_batch_and_the_rest_is_unchanged(pos_emb):
    """Rows that stop at different steps: the cached path (which drops finished rows and their cache) gives the
    slow path's tokens, sampled or greedy; greedy in a batch gives each row's tokens alone; and after a row
    stops, no later forward pass computes it."""
    m = tiny(pos_emb)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13], [20, 21], [30, 31, 32, 33]]
    for temperature, stop in ((1.0, 3), (0, None)):
        if stop is None:  # greedy: the token that ends the first row soonest, so the rows stop at different steps
            greedy = m.generate(prompts, 30, temperature=0)
            stop = min((r[2:] for r in greedy), key=lambda r: len(r))[0]
        fast = m.generate(prompts, 30, temperature, stop_token=stop, generator=torch.Generator().manual_seed(5))
        slow = m.generate(prompts, 30, temperature, stop_token=stop, generator=torch.Generator().manual_seed(5),
                          use_cache=False)
        assert fast == slow
        lengths = sorted(len(r) for r in fast)
        assert lengths[0] < lengths[-1]  # the rows stop at different steps
        if temperature == 0:
            assert fast == [m.generate([p], 30, temperature=0, stop_token=stop)[0] for p in prompts]
    # the rows each forward pass computes: all five, then one fewer after each row's stop token
    rows = []
    hook = m.lm_head.register_forward_hook(lambda mod, inp, out: rows.append(out.size(0)))
    out = m.generate(prompts, 30, temperature=0, stop_token=stop)
    hook.remove()
    live = [sum(len(r) >= t for r in out) for t in range(30)]  # rows still going at step t
    assert rows == [n for n in live if n > 0][:len(rows)] and len(rows) == max(len(r) for r in out) + (
        max(len(r) for r in out) < 30)


@pytest.mark.parametrize('pos_emb', ['learned', 'rope'])
def test_a_repeated_prompt_is_run_once_and_each_copy_samples_on_its_own(pos_emb):
    """k replies to each of a few ragged prompts: the prompts are run once each (the first forward pass has one
    row per distinct prompt), and the tokens are the slow path's, which runs every row on its own."""
    m = tiny(pos_emb)
    prompts = [p for p in ([1, 2, 3], [4, 5, 6, 7, 8, 9], [13]) for _ in range(4)]
    rows = []
    hook = m.lm_head.register_forward_hook(lambda mod, inp, out: rows.append(out.size(0)))
    fast = m.generate(prompts, 20, 1.0, stop_token=3, generator=torch.Generator().manual_seed(2))
    hook.remove()
    slow = m.generate(prompts, 20, 1.0, stop_token=3, generator=torch.Generator().manual_seed(2), use_cache=False)
    assert fast == slow and rows[0] == 3 and rows[1] == sum(len(r) > 0 for r in fast)
    assert len({tuple(r) for r in fast}) > 3  # the copies of a prompt sample different replies


def test_seeded_sampling_is_reproducible():
    m = tiny()
    a = m.generate([[1]] * 4, 10, 1.0, generator=torch.Generator().manual_seed(7))
    b = m.generate([[1]] * 4, 10, 1.0, generator=torch.Generator().manual_seed(7))
    c = m.generate([[1]] * 4, 10, 1.0, generator=torch.Generator().manual_seed(8))
    assert a == b and a != c


def test_top_k_top_p_keep_the_right_tokens():
    # probabilities 0.5, 0.25, 0.125, 0.0625, ...: top_p=0.7 keeps exactly the first two
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]]))
    seen = {int(sample_next(logits, 1.0, None, 0.7, torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}
    seen = {int(sample_next(logits, 1.0, 3, None, torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1, 2}
    assert int(sample_next(logits, 0)) == 0
    assert int(sample_next(torch.tensor([[0.0, 1.0, 9.0]]), 0, vocab_limit=2)) == 1


def test_sample_from_draws_each_token_with_its_probability():
    """Inverse-CDF sampling against the exact distribution: over 200,000 draws each token's frequency is within
    5 standard errors of its probability, and a token of probability 0 is never drawn (first, middle or last)."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.125, 0.0, 0.0615, 0.001, 0.0625, 0.0])
    probs = probs / probs.sum()
    n = 200_000
    idx = sample_from(probs.expand(n, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=len(probs)).double() / n
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * se).all()
    assert freq[probs == 0].sum() == 0
    one_hot = torch.eye(4)  # all the mass on one token, at either end too
    assert sample_from(one_hot.repeat(1000, 1), torch.Generator().manual_seed(1)).tolist() == [0, 1, 2, 3] * 1000


# -----------------------------------------------------------------------------
# GPT-2 weights written by Hugging Face

def test_hf_tiny_gpt2_reproduces_reference_logits():
    ref = np.load(HF_TINY / 'reference.npz')
    m = GPT.from_pretrained(str(HF_TINY)).eval()
    logits = all_logits(m, torch.tensor(ref['input_ids']))
    assert np.abs(logits.detach().numpy() - ref['logits']).max() < 1e-4


def test_hf_key_variants_prefix_and_mask_buffers(tmp_path):
    # the same weights saved as a bare GPT2Model would be (no 'transformer.' prefix), with the
    # attention-mask buffers some files carry, must load to the same logits
    sd = load_file(HF_TINY / 'model.safetensors')
    bare = {k.removeprefix('transformer.'): v for k, v in sd.items() if not k.startswith('lm_head')}
    n_pos = json.loads((HF_TINY / 'config.json').read_text())['n_positions']
    for i in range(2):
        bare[f'h.{i}.attn.bias'] = torch.tril(torch.ones(1, 1, n_pos, n_pos))
        bare[f'h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
    save_file(bare, tmp_path / 'model.safetensors')
    shutil.copy(HF_TINY / 'config.json', tmp_path / 'config.json')
    ref = np.load(HF_TINY / 'reference.npz')
    m = GPT.from_pretrained(str(tmp_path)).eval()
    assert np.abs(all_logits(m, torch.tensor(ref['input_ids'])).detach().numpy() - ref['logits']).max() < 1e-4


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over a temporary folder: (folder, base url)."""
    root = tmp_path / 'www'
    root.mkdir()
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()


def test_from_pretrained_downloads_over_http_and_caches(http_server, tmp_path, monkeypatch):
    root, url = http_server
    hub = root / 'openai-community' / 'gpt2' / 'resolve' / 'main'
    hub.mkdir(parents=True)
    for f in ('config.json', 'model.safetensors'):
        shutil.copy(HF_TINY / f, hub / f)
    monkeypatch.setattr(D, 'HF_ENDPOINT', url)
    monkeypatch.setattr(D, 'CACHE_DIR', str(tmp_path / 'cache'))
    m = GPT.from_pretrained('gpt2').eval()
    ref = np.load(HF_TINY / 'reference.npz')
    assert np.abs(all_logits(m, torch.tensor(ref['input_ids'])).detach().numpy() - ref['logits']).max() < 1e-4
    cached = tmp_path / 'cache' / 'gpt2' / 'model.safetensors'
    assert cached.read_bytes() == (HF_TINY / 'model.safetensors').read_bytes()
    shutil.rmtree(hub)  # the second load must come from the cache, not the server
    GPT.from_pretrained('gpt2')
    monkeypatch.setattr(D, 'CACHE_DIR', str(tmp_path / 'cache2'))
    with pytest.raises(RuntimeError, match='Offline'):
        GPT.from_pretrained('gpt2')
    assert not list((tmp_path / 'cache2').rglob('*.part'))  # nothing half-written is left behind


def test_from_pretrained_rejects_unknown_name():
    with pytest.raises(ValueError, match='gpt2-medium'):
        GPT.from_pretrained('gpt3')


def test_checkpoint_round_trip_weights_only(tmp_path):
    m = tiny('rope')
    path = str(tmp_path / 'ckpt.pt')
    M.save_checkpoint(path, {'model': m.state_dict()},
                      {'model_args': m.config.__dict__, 'data_meta': {'tokenizer': 'char', 'vocab': list('ab')}})
    m2, meta = M.model_from_checkpoint(path)
    idx = torch.randint(0, 37, (2, 9))
    assert torch.equal(all_logits(m, idx), all_logits(m2.eval(), idx))
    assert meta['data_meta']['vocab'] == ['a', 'b']
    torch.load(path, weights_only=True)  # no pickled objects in it


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        m = tiny('rope', dropout=0.0).train()
        m.gradient_checkpointing = ckpt
        idx = torch.randint(0, 37, (2, 12))
        _, loss = m(idx, torch.roll(idx, -1, 1))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert (grads[0] - grads[1]).abs().max() < 1e-6


def test_setup_device_on_one_cpu_process_and_a_bad_dtype():
    import contextlib
    ddp, rank, world, device, device_type, dtype, ctx = C.setup_device('cpu', 'auto')
    assert (ddp, rank, world, device, device_type, dtype) == (False, 0, 1, 'cpu', 'cpu', 'float32')
    assert isinstance(ctx, contextlib.nullcontext)  # fp32: no autocast
    ctx = C.setup_device('cpu', 'bfloat16')[-1]
    with ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(SystemExit, match="dtype must be auto"):
        C.setup_device('cpu', 'fp8')


# -----------------------------------------------------------------------------
# prompt tuning: a prefix of learned "virtual token" embeddings in front of every sequence

@pytest.mark.parametrize('pos_emb', ['learned', 'rope'])
def test_a_prefix_is_tokens_whose_embeddings_are_learned(pos_emb):
    """The reference: the same network without a prefix, given P extra vocabulary rows that hold the prefix's
    embeddings and a sequence that starts with those P tokens. Same logits at every real token."""
    m = tiny(pos_emb, block_size=24)
    m.add_prefix(4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        m.prefix.add_(0.1 * torch.randn_like(m.prefix))  # not just copies of real tokens
    ref = tiny(pos_emb, block_size=24, vocab_size=37 + 4)
    sd = {k: v for k, v in m.state_dict().items() if k != 'prefix'}
    sd['transformer.wte.weight'] = sd['lm_head.weight'] = torch.cat([m.transformer.wte.weight, m.prefix]).detach()
    ref.load_state_dict(sd)
    idx = torch.randint(0, 37, (3, 12))
    with_prefix = torch.cat([torch.arange(37, 41).expand(3, -1), idx], dim=1)
    assert torch.allclose(all_logits(m, idx), all_logits(ref, with_prefix)[:, 4:, :37], atol=1e-5)


@pytest.mark.parametrize('pos_emb', ['learned', 'rope'])
def test_prefix_generation_with_the_cache_equals_the_slow_path(pos_emb):
    m = tiny(pos_emb, block_size=20)
    m.add_prefix(3, generator=torch.Generator().manual_seed(2))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13]]  # ragged: left padding behind the prefix
    for temperature in (0, 1.0):
        fast = m.generate(prompts, 30, temperature, generator=torch.Generator().manual_seed(3))
        slow = m.generate(prompts, 30, temperature, generator=torch.Generator().manual_seed(3), use_cache=False)
        assert fast == slow
