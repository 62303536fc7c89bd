"""LoRA, the chat format and finetune_lora.py, against references: the base model's own outputs, the
merge written out as W + scale * B @ A, and losses computed by hand over assistant tokens."""
import json

import pytest
import torch

import model as M
import tasks as T
import tokenizer as TK
from conftest import SHAKESPEARE, run
from model import GPT, GPTConfig, apply_lora, lora_disabled, merge_lora


def tiny(vocab_size=40, **kw):
    torch.manual_seed(0)
    cfg = dict(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def lora_model(rank=4, targets=('attn', 'proj', 'mlp_in', 'mlp_out')):
    m = tiny()
    base = tiny()
    apply_lora(m, rank=rank, alpha=8, targets=targets)
    return base, m


def test_lora_at_init_equals_base_exactly():
    base, m = lora_model()
    idx = torch.randint(0, 40, (3, 20))
    out = m(idx, torch.zeros_like(idx))[0]
    ref = base(idx, torch.zeros_like(idx))[0]
    assert (out - ref).abs().max().item() == 0.0


def test_lora_wraps_the_chosen_layers_and_freezes_the_rest():
    _, m = lora_model(targets=('attn', 'mlp_out'))
    wrapped = [n for n, mod in m.named_modules() if isinstance(mod, M.LoRALinear)]
    assert wrapped == ['transformer.h.0.attn.c_attn', 'transformer.h.0.mlp.c_proj',
                       'transformer.h.1.attn.c_attn', 'transformer.h.1.mlp.c_proj']
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f'{w}.lora_{x}' for w in wrapped for x in 'AB'}


def randomize_b(m):
    with torch.no_grad():
        for layer in M.lora_layers(m):
            layer.lora_B.normal_(0, 0.1)


def test_lora_forward_is_base_plus_scaled_low_rank_update():
    _, m = lora_model()
    randomize_b(m)
    layer = m.transformer.h[0].attn.c_attn
    x = torch.randn(5, 32)
    ref = x @ (layer.base.weight + (8 / 4) * layer.lora_B @ layer.lora_A).T + layer.base.bias
    assert (layer(x) - ref).abs().max() < 1e-5


def test_merged_equals_unmerged_and_disable_gives_base():
    base, m = lora_model()
    randomize_b(m)
    idx = torch.randint(0, 40, (2, 16))
    unmerged = m(idx, torch.zeros_like(idx))[0]
    with lora_disabled(m):
        off = m(idx, torch.zeros_like(idx))[0]
    assert (off - base(idx, torch.zeros_like(idx))[0]).abs().max().item() == 0.0
    assert (unmerged - off).abs().max() > 1e-3  # the adapters do something
    for layer in M.lora_layers(m):
        layer.merge()
    merged = m(idx, torch.zeros_like(idx))[0]
    assert (merged - unmerged).abs().max() < 1e-5
    for layer in M.lora_layers(m):
        layer.unmerge()
    assert (m(idx, torch.zeros_like(idx))[0] - unmerged).abs().max() < 1e-5
    plain = merge_lora(m)
    assert not M.lora_layers(plain)
    assert (plain(idx, torch.zeros_like(idx))[0] - unmerged).abs().max() < 1e-5


def test_merged_gpt_from_an_adapter_state_dict_equals_the_lora_model():
    """model.merged_gpt, the plain GPT that the chat scripts save as model.pt: no LoRA layers, same logits."""
    _, m = lora_model()
    randomize_b(m)
    idx = torch.randint(0, 40, (2, 16))
    lora = dict(rank=4, alpha=8.0, targets=['attn', 'proj', 'mlp_in', 'mlp_out'])
    plain = M.merged_gpt({'_orig_mod.' + k: v for k, v in m.state_dict().items()}, m.config.__dict__, lora)
    assert not M.lora_layers(plain)
    assert (plain(idx, torch.zeros_like(idx))[0] - m(idx, torch.zeros_like(idx))[0]).abs().max() < 1e-5


def test_parse_lora_targets_and_find_model(tmp_path):
    assert M.parse_lora_targets(8, 'attn,mlp_out,') == ('attn', 'mlp_out')
    assert M.parse_lora_targets(0, '') == ()  # no adapters: the list does not matter
    for rank, targets in ((8, ''), (8, 'attn,qkv'), (-1, 'attn')):
        with pytest.raises(ValueError, match="lora_targets name some of attn, proj, mlp_in, mlp_out"):
            M.parse_lora_targets(rank, targets)
    assert M.find_model(str(tmp_path)) is None
    (tmp_path / 'ckpt.pt').write_bytes(b'')
    assert M.find_model(str(tmp_path)) == str(tmp_path / 'ckpt.pt')
    (tmp_path / 'model.pt').write_bytes(b'')  # the merged model wins over the training state
    assert M.find_model(str(tmp_path)) == str(tmp_path / 'model.pt')


def test_frozen_weights_unchanged_after_steps_except_chat_rows():
    _, m = lora_model()
    M.train_token_rows(m, [37, 38])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = m.configure_optimizers(0.1, 1e-2, (0.9, 0.99), 'cpu')
    m.train()
    for _ in range(5):
        idx = torch.randint(0, 40, (4, 16))
        idx[:, 3] = 37
        _, loss = m(idx, torch.roll(idx, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in m.named_parameters():
        if '.lora_' in n:
            continue
        if n == 'transformer.wte.weight':
            rows = torch.ones(40, dtype=torch.bool)
            rows[[37, 38]] = False
            assert torch.equal(p[rows], before[n][rows]), "only the chat-token rows may train"
            assert not torch.equal(p[37], before[n][37])
        else:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in m.named_parameters() if '.lora_B' in n)


def test_adapter_save_load_round_trip(tmp_path):
    _, m = lora_model()
    randomize_b(m)
    M.save_checkpoint(str(tmp_path / 'adapter.pt'), M.lora_state_dict(m), {'lora': 'r4'})
    tensors, meta = M.load_checkpoint(str(tmp_path / 'adapter.pt'))
    assert all('.lora_' in k for k in tensors) and len(tensors) == 2 * 2 * 4
    _, fresh = lora_model()
    missing, unexpected = fresh.load_state_dict(tensors, strict=False)
    assert not unexpected and all('.lora_' not in k for k in missing)
    idx = torch.randint(0, 40, (2, 16))
    assert torch.equal(fresh(idx, torch.zeros_like(idx))[0], m(idx, torch.zeros_like(idx))[0])


# -----------------------------------------------------------------------------
# finetune_lora.py end to end: a tiny base pretrained on Shakespeare plus task text, then SFT

@pytest.fixture(scope='module')
def chat_base(tmp_path_factory):
    """data_dir with the task suite and a tiny base model pretrained on it (about half a minute on 2 cores)."""
    d = tmp_path_factory.mktemp('chat')
    (d / 'small.txt').write_text(SHAKESPEARE.read_text()[:100_000])
    run(['prepare.py', 'tasks', f'--data_dir={d}', '--n_per_skill=400'])
    run(['prepare.py', 'shakespeare_tasks', f'--data_dir={d}', f'--input={d / "small.txt"}', '--vocab_size=384'])
    run(['train.py', '--dataset=shakespeare_tasks', f'--data_dir={d}', f'--out_dir={d / "base"}', '--n_layer=2',
         '--n_head=4', '--n_embd=64', '--block_size=64', '--batch_size=32', '--gradient_accumulation_steps=1',
         '--max_iters=1000', '--lr_decay_iters=1000', '--warmup_iters=20', '--learning_rate=3e-3', '--min_lr=3e-4',
         '--eval_interval=1000', '--eval_iters=5', '--log_interval=500', '--device=cpu', '--compile=False'],
        env={'OMP_NUM_THREADS': '2'})  # the one test model big enough for a second thread to pay (1.4x)
    return d


def sft(d, out, *extra):
    return run(['finetune_lora.py', f'--init_from={d / "base"}', f'--data_dir={d}', f'--out_dir={d / out}',
                '--max_iters=300', '--eval_interval=300', '--log_interval=100', '--eval_tasks=100', '--eval_iters=5',
                '--learning_rate=3e-3', '--device=cpu', *extra])


def summary(path):
    records = [json.loads(line) for line in open(path)]
    return next(r for r in records if 'summary' in r)


def test_full_sft_raises_gold_accuracy_on_easiest_skill(chat_base):
    p = sft(chat_base, 'sft_full', '--lora_rank=0', '--max_iters=400', '--eval_interval=400')
    s = summary(chat_base / 'sft_full' / 'metrics.jsonl')
    before, after = s['before']['test_accuracy'], s['after']['test_accuracy']
    assert after['copy'] > before['copy'], p.stdout
    assert s['after']['val_loss'] < s['before']['val_loss']
    assert s['summary']['trainable_pct'] == 100.0
    # forgetting is measured on the base's pretraining text
    assert 'pretrain_val_loss' in s['before'] and 'pretrain_val_loss' in s['after']
    # the exported model.pt is a plain GPT whose greedy replies give the logged accuracy
    m, meta = M.model_from_checkpoint(str(chat_base / 'sft_full' / 'model.pt'))
    tok = TK.load_tokenizer(meta['data_meta'])
    tasks = [json.loads(line) for line in open(chat_base / 'tasks' / 'test.jsonl')]
    acc, replies = T.gold_accuracy(m, tok, tasks)
    assert acc == after
    # sample.py's chat mode gives the same greedy reply to the same prompt, over two turns
    t = tasks[0]
    chat = run(['sample.py', f'--out_dir={chat_base / "sft_full"}', '--chat=True', '--temperature=0',
                '--max_new_tokens=16', '--device=cpu'], input=t['prompt'] + '\n' + t['prompt'] + '\n\n')
    lines = chat.stdout.splitlines()
    assert lines[0] == replies[0]
    assert len(lines) == 2


def test_lora_sft_trains_a_small_adapter_and_resumes(chat_base):
    sft(chat_base, 'sft_lora', '--max_iters=100', '--eval_interval=50', '--lora_rank=4')
    s = summary(chat_base / 'sft_lora' / 'metrics.jsonl')
    assert s['after']['val_loss'] < s['before']['val_loss']
    assert 0 < s['summary']['trainable_pct'] < 10
    adapter, meta = M.load_checkpoint(str(chat_base / 'sft_lora' / 'adapter.pt'))
    assert meta['lora']['rank'] == 4
    n = sum(v.numel() for k, v in adapter.items() if '.lora_' in k)
    assert n == 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))  # 2 layers, r * (in + out) each
    # the base weights + adapter reproduce the merged export
    base, _ = M.model_from_checkpoint(str(chat_base / 'base' / 'ckpt.pt'))
    M.apply_lora(base, **meta['lora'])
    base.load_state_dict({k: v for k, v in adapter.items() if '.lora_' in k}, strict=False)
    with torch.no_grad():
        base.transformer.wte.weight[meta['chat_token_ids']] = adapter['chat_token_rows']
    merged, _ = M.model_from_checkpoint(str(chat_base / 'sft_lora' / 'model.pt'))
    idx = torch.randint(0, 300, (2, 30))
    assert (base.eval()(idx, idx)[0] - merged.eval()(idx, idx)[0]).abs().max() < 1e-4  # logits ~10: float32 rounding
    # resume continues to max_iters from the iteration it stopped at
    sft(chat_base, 'sft_lora', '--max_iters=120', '--eval_interval=50', '--lora_rank=4', '--init_from=resume')
    records = [json.loads(line) for line in open(chat_base / 'sft_lora' / 'metrics.jsonl')]
    assert [r['eval'] for r in records if 'eval' in r] == ['base', 'iter 50', 'iter 100', 'iter 120']
    assert records[-1]['before'] == s['before']  # the base model's numbers, kept in the checkpoint


def test_prompt_tuning_trains_only_the_prefix_and_the_chat_rows(chat_base):
    sft(chat_base, 'sft_prompt', '--lora_rank=0', '--prompt_tokens=8', '--learning_rate=1e-2', '--max_iters=100',
        '--eval_interval=100')
    s = summary(chat_base / 'sft_prompt' / 'metrics.jsonl')
    assert s['summary']['mode'] == 'prompt' and s['summary']['trainable_params'] == (8 + 3) * 64
    assert s['after']['val_loss'] < s['before']['val_loss']
    tuned, meta = M.model_from_checkpoint(str(chat_base / 'sft_prompt' / 'model.pt'))
    base, _ = M.model_from_checkpoint(str(chat_base / 'base' / 'ckpt.pt'))
    assert tuned.config.n_prefix == 8
    chat_rows = T.chat_ids(TK.load_tokenizer(meta['data_meta']))
    for k, v in base.state_dict().items():  # everything else is the base model, bit for bit
        if k in ('transformer.wte.weight', 'lm_head.weight'):
            keep = torch.ones(v.size(0), dtype=torch.bool)
            keep[chat_rows] = False
            assert torch.equal(tuned.state_dict()[k][keep], v[keep]) and not torch.equal(tuned.state_dict()[k], v)
        else:
            assert torch.equal(tuned.state_dict()[k], v), k
    # the saved model generates with its prefix: its greedy replies give the logged test accuracy
    tasks = [json.loads(line) for line in open(chat_base / 'tasks' / 'test.jsonl')]
    assert T.gold_accuracy(tuned, TK.load_tokenizer(meta['data_meta']), tasks)[0] == s['after']['test_accuracy']


def test_alpaca_data_bad_records_are_skipped_and_counted(chat_base, tmp_path):
    rows = [{'instruction': 'Copy: cat', 'input': '', 'output': 'cat'}] * 30 + [
        {'instruction': 'no output'}, {'instruction': '', 'output': 'x'}, {'output': 'y'}, 'not a record',
        {'instruction': 'Copy: ' + 'dog ' * 100, 'input': '', 'output': 'dog'}]
    path = tmp_path / 'alpaca.jsonl'
    path.write_text('\n'.join(json.dumps(r) for r in rows))
    p = sft(chat_base, 'sft_alpaca', f'--data={path}', '--max_iters=5', '--eval_interval=5', '--eval_tasks=0')
    assert '31 usable records, 4 skipped' in p.stdout
    assert 'dropped' in p.stdout  # the over-long one: no assistant token within block_size


def test_finetune_bad_input_fails_fast(chat_base, tmp_path):
    bad = tmp_path / 'bad.json'
    bad.write_text('{not json')
    for args, msg in ((['--data=' + str(bad)], 'not JSON'), (['--data=/no/such/file.json'], 'not found'),
                      (['--lora_targets=attn,qkv'], 'lora_targets'), (['--init_from=/no/such/dir'], 'init_from'),
                      (['--quantize=nf3'], 'quantize must be one of none, nf4, int8'),
                      (['--lora_rank=0', '--quantize=nf4'], 'needs LoRA adapters'),
                      (['--double_quant=True'], 'set --quantize'),
                      (['--lora_rank=4', '--quantize=int8', '--quant_block=100'], 'quant_block 100 does not divide'),
                      (['--lora_rank=4', '--quantize=nf4', '--quant_block=0'], 'quant_block must be > 0')):
        p = run(['finetune_lora.py', f'--init_from={chat_base / "base"}', f'--data_dir={chat_base}',
             f'--out_dir={tmp_path / "never"}', '--device=cpu', *args], check=False)
        assert p.returncode != 0 and msg in p.stderr, (args, p.stderr)
        assert not (tmp_path / 'never').exists()


def test_qlora_sft_keeps_the_base_in_nf4_merges_and_resumes(chat_base, tmp_path):
    """--quantize=nf4: the base in the checkpoint is the base model's weights quantized (frozen: the same codes
    after training), it takes 4.5 bits per weight of the blocks' linear layers, model.pt computes what the
    quantized model with its adapters computes, and resume needs the same quantization."""
    from quant import QuantizedLinear, base_bytes, nf4_code, pack4, quantize_blockwise, quantize_linears
    sft(chat_base, 'sft_qlora', '--max_iters=60', '--eval_interval=30', '--lora_rank=4', '--quantize=nf4')
    s = summary(chat_base / 'sft_qlora' / 'metrics.jsonl')
    assert s['after']['val_loss'] < s['before']['val_loss']
    assert s['summary']['quantize'] == 'nf4'
    base, _ = M.model_from_checkpoint(str(chat_base / 'base' / 'ckpt.pt'))
    linears = {n: mod.weight for n, mod in base.transformer.h.named_modules() if isinstance(mod, torch.nn.Linear)}
    n = sum(w.numel() for w in linears.values())
    fp32 = base_bytes(base)
    assert fp32 - s['summary']['base_bytes'] == 4 * n - n * 4.5 / 8 - len(linears) * 16 * 4
    ckpt, meta = M.load_checkpoint(str(chat_base / 'sft_qlora' / 'ckpt.pt'))
    assert meta['quant'] == {'kind': 'nf4', 'block': 64, 'double_quant': False}
    codes, absmax = quantize_blockwise(linears['0.mlp.c_fc'], 64, nf4_code())
    assert torch.equal(ckpt['model']['transformer.h.0.mlp.c_fc.base.codes'], pack4(codes))
    assert torch.equal(ckpt['model']['transformer.h.0.mlp.c_fc.base.absmax'], absmax)
    # the quantized model with its adapters, rebuilt by hand, against the merged export
    q = GPT(GPTConfig(**meta['model_args']))
    apply_lora(q, **meta['lora'])
    quantize_linears(q, **meta['quant'])
    q.load_state_dict(ckpt['model'])
    assert isinstance(q.transformer.h[1].attn.c_proj.base, QuantizedLinear)
    merged, _ = M.model_from_checkpoint(str(chat_base / 'sft_qlora' / 'model.pt'))
    idx = torch.randint(0, 300, (2, 30))
    assert (q.eval()(idx, idx)[0] - merged.eval()(idx, idx)[0]).abs().max() < 1e-4
    # resume: the same quantization continues; another one is refused in one line
    p = run(['finetune_lora.py', f'--data_dir={chat_base}', f'--out_dir={chat_base / "sft_qlora"}',
             '--init_from=resume', '--lora_rank=4', '--quantize=int8', '--device=cpu'], check=False)
    assert p.returncode != 0 and 'resume with the same --quantize' in p.stderr, p.stderr
    sft(chat_base, 'sft_qlora', '--max_iters=70', '--eval_interval=30', '--lora_rank=4', '--quantize=nf4',
        '--init_from=resume')
    records = [json.loads(line) for line in open(chat_base / 'sft_qlora' / 'metrics.jsonl')]
    assert [r['eval'] for r in records if 'eval' in r] == ['base', 'iter 30', 'iter 60', 'iter 70']
