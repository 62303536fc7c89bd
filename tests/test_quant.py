"""quant.py: NF4 against the paper's table, blockwise round trips within half a step of the code, NF4 against a
uniform 4-bit code on normal weights (the paper's argument, measured), packing, double quantization."""
import pytest
import torch

from model import LoRALinear
from quant import (NF4_PUBLISHED, QuantizedLinear, bits_per_weight, dequantize_blockwise, double_dequantize,
                   double_quantize, nf4_code, pack4, quantize_blockwise, uniform4_code, unpack4)


def normal_weights(shape=(256, 128), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_nf4_is_the_papers_table():
    code = nf4_code()
    assert code.shape == (16,) and (code[1:] > code[:-1]).all()
    assert (code - torch.tensor(NF4_PUBLISHED)).abs().max() < 1e-6
    assert code[7] == 0 and code[0] == -1 and code[-1] == 1


@pytest.mark.parametrize('which', ['nf4', 'int8'])
def test_round_trip_error_is_within_half_a_step_of_the_code(which):
    w = normal_weights()
    w[3, 5] = 40.0  # an outlier spoils its own block only
    code = nf4_code() if which == 'nf4' else None
    codes, absmax = quantize_blockwise(w, 64, code)
    back = dequantize_blockwise(codes, absmax, w.shape, code)
    # the largest gap between neighbouring code values, as a fraction of a block's absmax
    half_step = ((code[1:] - code[:-1]).max() if code is not None else torch.tensor(1 / 127)) / 2
    err = (back - w).abs().reshape(-1, 64)
    assert (err <= half_step * absmax.unsqueeze(1) + 1e-6).all()
    assert absmax.shape == (w.numel() // 64,) and codes.dtype == (torch.uint8 if code is not None else torch.int8)
    others = torch.ones(len(absmax), dtype=torch.bool)
    others[(3 * 128 + 5) // 64] = False
    assert err[~others].mean() > 5 * err[others].mean()  # the outlier's block is the worst by far


def test_nf4_beats_a_uniform_4bit_code_on_normal_weights():
    w = normal_weights((1024, 256), seed=1)
    mse = {}
    for name, code in (('nf4', nf4_code()), ('uniform', uniform4_code())):
        codes, absmax = quantize_blockwise(w, 64, code)
        mse[name] = ((dequantize_blockwise(codes, absmax, w.shape, code) - w) ** 2).mean().item()
        if name == 'nf4':  # normal weights use every NF4 value (the extremes least: a block's absmax is ~2.5 sd)
            counts = torch.bincount(codes.reshape(-1).long(), minlength=16).float()
            assert counts.min() > 0.2 * counts.mean()
    assert mse['nf4'] < 0.85 * mse['uniform'], mse


def test_nearest_code_value_is_chosen():
    code = nf4_code()
    x = torch.linspace(-1, 1, 1001).reshape(-1, 7 * 11 * 13)[:, :64]  # values across [-1, 1], in one block each
    x[:, 0] = 1.0  # absmax 1: no rescaling
    codes, _ = quantize_blockwise(x, 64, code)
    nearest = (x.reshape(-1, 1) - code).abs().argmin(1)
    assert torch.equal(codes.reshape(-1).long(), nearest)


def test_pack_two_codes_per_byte():
    codes = torch.randint(0, 16, (32, 64), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    packed = pack4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == codes.numel() // 2
    assert packed[0] == codes[0, 0] * 16 + codes[0, 1]
    assert torch.equal(unpack4(packed, codes.shape), codes)


def test_double_quantization_keeps_the_scales_and_saves_the_bits():
    w = normal_weights((512, 512), seed=3)
    _, absmax = quantize_blockwise(w, 64, nf4_code())
    codes, scales, mean = double_quantize(absmax, 256)
    back = double_dequantize(codes, scales, mean, absmax.numel())
    assert codes.dtype == torch.int8 and scales.numel() == -(-absmax.numel() // 256)
    assert (back - absmax).abs().max() <= (scales.max() / 127 / 2) + 1e-6  # half an int8 step
    assert (back - absmax).abs().max() / absmax.mean() < 0.01
    assert bits_per_weight(64) == 4.5 and bits_per_weight(64, double=True) == pytest.approx(4.127, abs=1e-3)


def test_a_block_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match='block size 64 does not divide the 100 values'):
        quantize_blockwise(torch.randn(10, 10), 64, nf4_code())


@pytest.mark.parametrize('kind,double', [('nf4', False), ('nf4', True), ('int8', False)])
def test_qlora_layer_is_the_dequantized_linear_plus_the_lora_term(kind, double):
    """QuantizedLinear under model.LoRALinear: the output equals a plain linear layer with the dequantized weight
    plus B A x (alpha / r); gradients reach the adapters only; the stored weight takes the bytes the format says."""
    torch.manual_seed(4)
    linear = torch.nn.Linear(256, 128)
    q = QuantizedLinear(linear, kind, 64, double)
    layer = LoRALinear(q, rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero; make the LoRA term count
    x = torch.randn(5, 256)
    w = dequantize_blockwise(quantize_blockwise(linear.weight.detach(), 64, nf4_code() if kind == 'nf4' else None)[0],
                             quantize_blockwise(linear.weight.detach(), 64)[1], (128, 256),
                             nf4_code() if kind == 'nf4' else None)
    ref = x @ w.t() + linear.bias.detach() + (x @ layer.lora_A.t() @ layer.lora_B.t()) * 2.0
    y = layer(x)
    assert (y - ref).abs().max() < (2e-3 if double else 1e-5)  # double quantization moves the scales a little
    assert (q.dequantized_weight() - linear.weight).abs().max() < 0.2 * linear.weight.abs().max()
    y.sum().backward()
    assert [n for n, p in layer.named_parameters()] == ['lora_A', 'lora_B']
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    n = 128 * 256
    if kind == 'int8':
        assert q.weight_bytes() == n + 4 * n // 64  # 8.5 bits per weight
    elif double:
        assert q.weight_bytes() == n // 2 + n // 64 + 4 * 2 + 4  # int8 scales, 2 fp32 second-level scales, a mean
        assert q.weight_bytes() * 8 / n == pytest.approx(bits_per_weight(64, double=True), abs=0.01)
    else:
        assert q.weight_bytes() * 8 / n == bits_per_weight(64) == 4.5


def test_the_dequantized_weight_is_not_kept_for_the_backward_pass():
    """MatmulDequantized: the same output and input gradient as a plain linear layer with the dequantized weight,
    and autograd saves nothing the size of the weight between the passes (a plain F.linear saves the weight)."""
    torch.manual_seed(5)
    q = QuantizedLinear(torch.nn.Linear(256, 128, bias=False), 'nf4')
    w = q.dequantized_weight()
    x = torch.randn(3, 7, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = q(x)
    assert (128, 256) not in saved and (256, 128) not in saved, saved
    y.pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, w)
    y_ref.pow(2).sum().backward()
    assert (y - y_ref).abs().max() < 1e-5 and (x.grad - x_ref.grad).abs().max() < 1e-5


def tiny_lora_gpt():
    from model import GPT, GPTConfig, apply_lora
    torch.manual_seed(6)
    m = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=64))
    lora = dict(rank=4, alpha=8.0, targets=['attn', 'mlp_in'])
    apply_lora(m, **lora)
    return m, lora


def test_quantize_linears_then_merge_gives_the_dequantized_weight_plus_the_adapter():
    """Every Linear of the blocks quantized (adapted or not), the embedding not; merged_quantized_gpt computes what
    the quantized LoRA model computes, with W = dequant + B A alpha / r written out slowly."""
    from model import LoRALinear
    from quant import base_bytes, merged_quantized_gpt, quantize_linears
    m, lora = tiny_lora_gpt()
    plain = {k: v.clone() for k, v in m.state_dict().items()}
    fp32 = base_bytes(m)
    quantize_linears(m, 'nf4', 64)
    blocks = list(m.transformer.h.modules())
    assert not any(isinstance(x, torch.nn.Linear) for x in blocks)
    assert sum(isinstance(x, QuantizedLinear) for x in blocks) == 2 * 4
    assert isinstance(m.transformer.h[0].attn.c_attn.base, QuantizedLinear)
    assert isinstance(m.transformer.h[0].attn.c_proj, QuantizedLinear)  # not adapted: quantized all the same
    linear_values = 2 * 64 * (3 * 64 + 64 + 4 * 64 + 4 * 64)
    assert fp32 - base_bytes(m) == 4 * linear_values - linear_values * 4.5 / 8 - 8 * 16 * 4  # + each table
    with torch.no_grad():
        for layer in m.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(0, 0.1)
    merged = merged_quantized_gpt(m.state_dict(), m.config.__dict__, lora, dict(kind='nf4', block=64))
    idx = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(7))
    assert (merged.eval()(idx, idx)[0] - m.eval()(idx, idx)[0]).abs().max() < 1e-4
    a = m.transformer.h[1].mlp.c_fc
    code = nf4_code()
    codes, absmax = quantize_blockwise(plain['transformer.h.1.mlp.c_fc.base.weight'], 64, code)
    slow = dequantize_blockwise(codes, absmax, (256, 64), code) + a.lora_B @ a.lora_A * 2.0
    assert (merged.transformer.h[1].mlp.c_fc.weight - slow).abs().max() < 1e-6
    assert not any('lora' in k or 'codes' in k for k in merged.state_dict())


def test_a_block_that_does_not_divide_a_weight_is_refused_before_any_layer_changes():
    from quant import quantize_linears
    m, _ = tiny_lora_gpt()
    msg = r"quant_block 100 does not divide the 4096 values of transformer.h.0.attn.c_proj's \(64, 64\) weight"
    with pytest.raises(ValueError, match=msg):
        quantize_linears(m, 'int8', 100)
    with pytest.raises(ValueError, match='must be even'):
        quantize_linears(m, 'nf4', 3)
    assert not any(isinstance(x, QuantizedLinear) for x in m.modules())
