"""The pieces the fine-tuning scripts share (common.py, tasks.py, model.py), against references written out here:
the optimizer step against its arithmetic done by hand, the reference model against the policy it was made
from, the evaluation prompts against the val file, the metrics log against json."""
import json
import os

import pytest
import torch

import common as C
import tasks as T
from model import LoRALinear, policy_and_reference
from test_dpo import tiny_gpt


def test_optimizer_step_clips_the_global_norm_then_steps_as_written_out():
    """SGD (lr 0.1) after optimizer_step with grad_clip 0.5: every gradient scaled by 0.5 / (their global norm)
    when that norm is above 0.5, then p -= lr * g (no clipping with a large grad_clip or 0); gradients end zeroed."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    grads = [torch.randn(3, 4) * 3, torch.randn(5) * 3]
    for grad_clip in (0.5, 1e6, 0.0):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = torch.optim.SGD(params, lr=0.1)
        scaler = torch.amp.GradScaler('cpu', enabled=False)
        C.optimizer_step(opt, scaler, params, grad_clip)
        norm = sum((g ** 2).sum() for g in grads).sqrt().item()
        scale = min(1.0, grad_clip / (norm + 1e-6)) if grad_clip > 0 else 1.0
        for p, b, g in zip(params, before, grads):
            assert torch.allclose(p.detach(), b - 0.1 * scale * g, atol=1e-6)
            assert p.grad is None


def test_set_lr_and_steps_per_process():
    opt = torch.optim.AdamW([{'params': [torch.nn.Parameter(torch.zeros(2))]},
                             {'params': [torch.nn.Parameter(torch.zeros(2))], 'weight_decay': 0.0}], lr=1.0)
    C.set_lr(opt, 3e-4)
    assert [g['lr'] for g in opt.param_groups] == [3e-4, 3e-4]
    assert C.steps_per_process(8, 4) == 2 and C.steps_per_process(5, 1) == 5
    with pytest.raises(SystemExit):
        C.steps_per_process(6, 4)


def test_or_fail_turns_the_named_errors_into_one_line(capsys):
    assert C.or_fail(int, '7') == 7
    with pytest.raises(SystemExit) as e:
        C.or_fail(int, 'seven')
    assert e.value.code == 1 and capsys.readouterr().err.startswith('error: invalid literal')
    with pytest.raises(ZeroDivisionError):  # an error not named is a bug: its traceback stays
        C.or_fail(lambda: 1 / 0)


@pytest.mark.parametrize('lora', [None, dict(rank=4, alpha=8.0, targets=['attn', 'mlp_in'])])
def test_policy_and_reference(lora):
    """Both start as the same function; training the policy leaves the reference where it was. With LoRA the
    reference is the policy with its adapters off (no copy: None), without it a frozen copy."""
    policy = tiny_gpt(seed=1)
    x = torch.randint(0, 320, (2, 10))
    _, start = policy(x, x)
    ref = policy_and_reference(policy, lora)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    if lora:
        assert ref is None and any(isinstance(m, LoRALinear) for m in policy.modules())
        assert all('lora' in n for n, p in policy.named_parameters() if p.requires_grad)
    else:
        assert not any(p.requires_grad for p in ref.parameters()) and len(trainable) == len(list(ref.parameters()))
    _, loss = policy(x, x)
    assert torch.allclose(loss, start)  # LoRA's B starts at zero: the policy is still the supervised model
    opt = torch.optim.SGD(trainable, lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        policy(x, x)[1].backward()
        opt.step()
    assert policy(x, x)[1] < start
    if lora:
        from model import lora_disabled
        with lora_disabled(policy):
            assert torch.allclose(policy(x, x)[1], start)
    else:
        assert torch.allclose(ref(x, x)[1], start)


def test_eval_tasks_are_the_first_of_the_val_file(tmp_path):
    """Every stage that reports val gold accuracy takes the same prompts: the first n of data_dir/tasks/val.jsonl,
    which the suite's shuffled splits make a sample of every skill."""
    splits = T.make_task_suite(40, seed=3)
    (tmp_path / 'tasks').mkdir()
    with open(tmp_path / 'tasks' / 'val.jsonl', 'w') as f:
        for t in splits['val']:
            f.write(json.dumps(t) + '\n')
    lines = (tmp_path / 'tasks' / 'val.jsonl').read_text().splitlines()
    got = T.eval_tasks_from(str(tmp_path), 10)
    assert got == [json.loads(line) for line in lines[:10]]
    assert {t['skill'] for t in got} == set(T.SKILLS)
    assert T.eval_tasks_from(str(tmp_path), 0) == [] and T.read_tasks(str(tmp_path), 'test') == []


def test_metrics_logger_appends_json_lines_from_one_process(tmp_path):
    log, silent = C.metrics_logger(str(tmp_path)), C.metrics_logger(str(tmp_path), enabled=False)
    log({'iter': 1, 'loss': 2.5})
    silent({'iter': 1, 'loss': 9.0})
    log({'eval': 'sft', 'accuracy': {'all': 0.5}})
    lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{'iter': 1, 'loss': 2.5}, {'eval': 'sft', 'accuracy': {'all': 0.5}}]


def test_sampled_kl_against_the_exact_kl_of_two_token_replies():
    """rl.sampled_kl (the card's one KL estimator) against KL(pi || ref) summed exactly over every reply of at most
    two tokens by the chain rule: KL(first token) + sum over first tokens y (not <|end|>) of pi(y) KL(second | y)."""
    from rl import sampled_kl
    torch.manual_seed(0)
    policy, ref = tiny_gpt(seed=1, vocab_size=24, n_embd=16).eval(), tiny_gpt(seed=2, vocab_size=24, n_embd=16).eval()
    with torch.no_grad():  # sharper distributions than a fresh init's, so that the KL is not tiny
        policy.lm_head.weight.mul_(8)
        ref.lm_head.weight.mul_(8)
    prompt, end = [3, 5, 7], 9
    with torch.no_grad():
        def dist(model, seqs):
            return torch.log_softmax(model(torch.tensor(seqs))[0][:, -1].float(), -1)
        p1, q1 = dist(policy, [prompt]), dist(ref, [prompt])
        exact = (p1.exp() * (p1 - q1)).sum().item()
        firsts = [y for y in range(24) if y != end]
        p2, q2 = dist(policy, [prompt + [y] for y in firsts]), dist(ref, [prompt + [y] for y in firsts])
        exact += (p1[0, firsts].exp() * (p2.exp() * (p2 - q2)).sum(-1)).sum().item()
    gen = torch.Generator().manual_seed(0)
    estimate = sampled_kl(policy, ref, [prompt] * 6000, 2, end, gen, batch_size=2000)
    assert exact > 0.3 and estimate == pytest.approx(exact, rel=0.08)
    assert sampled_kl(policy, policy, [prompt] * 50, 2, end, gen) == pytest.approx(0.0, abs=1e-6)


def test_peak_memory_counts_from_the_reset():
    """On Linux the peak resident set restarts at the reset: a large block freed before it does not count, one
    allocated after it does (about its size)."""
    import numpy as np
    from common import peak_memory_mb, reset_peak_memory
    if not os.access('/proc/self/clear_refs', os.W_OK):
        pytest.skip('no /proc/self/clear_refs to reset the peak with')
    block = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    del block
    reset_peak_memory('cpu')
    base = peak_memory_mb('cpu')
    block = np.ones(200 * 2**20 // 8)
    peak = peak_memory_mb('cpu')
    del block
    assert 190 < peak - base < 260, (base, peak)


def test_saved_tensor_bytes_counts_the_activations_not_the_weights():
    """A two-layer MLP, y = W2 relu(W1 x + b1): autograd keeps x (for W1's gradient) and relu's output (for relu's
    and W2's gradients, one tensor), written out here; W1 and W2 are the model's own and not counted. With the
    first layer frozen, nothing needs x any more."""
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    x = torch.randn(32, 64)
    with C.saved_tensor_bytes(net) as saved:
        net(x).sum().backward()
    assert saved.bytes == 4 * (32 * 64 + 32 * 256)
    net[0].requires_grad_(False)
    with C.saved_tensor_bytes(net) as saved:
        net(x).sum()
    assert saved.bytes == 4 * 32 * 256
