"""
Quantization written out, the half of QLoRA (Dettmers et al. 2023) that is not LoRA: a frozen weight stored in
4 bits per value with the NormalFloat-4 code, or in 8 bits; blockwise absmax scaling; double quantization of the
scales; two 4-bit codes packed per byte.

Blockwise absmax: the weight, flattened, is cut into blocks of `block` values (64 in the paper); each block is
divided by its largest magnitude, so that it lies in [-1, 1], and each value is replaced by the index of the
nearest of the code's values. One outlier then spoils only its own block. Dequantizing is a table lookup times
the block's scale.

QLoRA is then quantize_linears under model.apply_lora's adapters (finetune_lora.py --quantize=nf4): the base
stays frozen in 4 bits, the adapters train in float32, and merged_quantized_gpt folds them into the dequantized
weights for the later stages.
"""
import torch

from model import GPT, GPTConfig, apply_lora, clean_state_dict, merge_lora

# NF4 as the paper publishes it (appendix E; bitsandbytes' table): the reference for nf4_code's test
NF4_PUBLISHED = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0)


def nf4_code():
    """The 16 values of NormalFloat-4: quantiles of the standard normal, scaled to [-1, 1], with an exact zero.
    Each half of the code gets equal probability mass of N(0, 1): 8 positive values from 9 evenly spaced
    probabilities between 1/2 and 1 - delta (the one at 1/2 is the shared 0) and 7 negative ones from 8.
    delta = (1/32 + 1/30) / 2 sits between the tails of a 16- and a 15-value code: the quantile at probability 1
    would be infinite. Values are densest near 0, where normal weights (trained weights nearly are) are."""
    top = 1 - 0.5 * (1 / 32 + 1 / 30)
    positive = torch.special.ndtri(torch.linspace(top, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(top, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.max()).float()


def uniform4_code():
    """A plain 4-bit code for comparison: 16 evenly spaced values over [-1, 1]."""
    return torch.linspace(-1, 1, 16)


def blocks(w, block):
    if w.numel() % block:
        raise ValueError(f"block size {block} does not divide the {w.numel()} values of a {tuple(w.shape)} tensor")
    return w.reshape(-1, block).float()


def quantize_blockwise(w, block=64, code=None):
    """(codes, absmax): each block scaled into [-1, 1] by its absmax, then each value the index (uint8) of the
    nearest value of `code` (NF4 or another 4-bit table), or, with code None, rounded to int8 (-127..127)."""
    x = blocks(w, block)
    absmax = x.abs().max(dim=1, keepdim=True).values
    x = x / absmax.clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero block stays zero
    if code is None:
        return torch.round(x * 127).to(torch.int8), absmax.squeeze(1)
    midpoints = (code[1:] + code[:-1]) / 2  # x between two midpoints is nearest to the value between them
    return torch.bucketize(x, midpoints).to(torch.uint8), absmax.squeeze(1)


def dequantize_blockwise(codes, absmax, shape, code=None):
    """The weight back: each code's value (or int8 / 127) times its block's absmax."""
    x = code[codes.long()] if code is not None else codes.float() / 127
    return (x * absmax.unsqueeze(1)).reshape(shape)


def pack4(codes):
    """Two 4-bit codes per byte, the first in the high half: n codes take n / 2 bytes."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        raise ValueError("pack4 needs an even number of codes")
    return (flat[0::2] << 4) | flat[1::2]


def unpack4(packed, shape):
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(shape)


def double_quantize(absmax, block=256):
    """Double quantization: the fp32 block scales (one per 64 weights: 0.5 bits per weight) quantized in turn,
    to int8 in blocks of 256 after subtracting their mean (they are all positive; centred, the int8 range is used
    on both sides). Then 8 / 64 + 32 / (64 * 256) bits per weight: 0.127 instead of 0.5. (The paper uses 8-bit
    floats for this second level; int8 with absmax takes the same bits.) Returns (codes, scales, mean)."""
    mean = absmax.mean()
    pad = (-absmax.numel()) % block  # the last block padded with the mean (zero after centring)
    centred = torch.cat([absmax - mean, absmax.new_zeros(pad)])
    codes, scales = quantize_blockwise(centred, block)
    return codes, scales, mean


def double_dequantize(codes, scales, mean, n):
    return dequantize_blockwise(codes, scales, (-1,))[:n] + mean


def bits_per_weight(block=64, double=False, block2=256, code_bits=4):
    """Storage per weight: the code, plus the scales (fp32 per block, or int8 per block and fp32 per 256 blocks)."""
    return code_bits + (8 / block + 32 / (block * block2) if double else 32 / block)


class MatmulDequantized(torch.autograd.Function):
    """y = x W^T, with W dequantized in the forward pass and again in the backward pass (dx = dy W), never kept
    in between. A plain F.linear would make autograd save every layer's full-precision W until the backward
    pass, and the memory the 4-bit storage saves would be spent again (bitsandbytes' MatMul4Bit does the same).
    W is frozen, so it needs no gradient of its own."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dequantized_weight().to(x.dtype).t()

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantized_weight().to(grad.dtype), None


class QuantizedLinear(torch.nn.Module):
    """A frozen linear layer stored quantized, QLoRA's base layer: the weight as NF4 codes packed two per byte
    (or int8), one absmax per block of 64 (or those scales double-quantized), dequantized to float at every
    forward pass; the bias, if any, kept as it was. Nothing in it is a parameter: wrapped in model.LoRALinear,
    only the adapters train, in full precision, and gradients flow through the dequantized weight to them."""

    def __init__(self, linear, kind='nf4', block=64, double_quant=False):
        super().__init__()
        if kind not in ('nf4', 'int8'):
            raise ValueError(f"kind must be nf4 or int8, got {kind!r}")
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kind, self.block = kind, block
        self.shape, self.double_quant, self.dtype = tuple(w.shape), double_quant, w.dtype
        code = nf4_code().to(w.device) if kind == 'nf4' else None
        codes, absmax = quantize_blockwise(w, block, code)
        self.register_buffer('codes', pack4(codes) if kind == 'nf4' else codes)
        self.register_buffer('code', code)
        if double_quant:
            self.n_blocks = absmax.numel()
            scale_codes, scale_scales, mean = double_quantize(absmax)
            self.register_buffer('scale_codes', scale_codes)
            self.register_buffer('scale_scales', scale_scales)
            self.register_buffer('scale_mean', mean.reshape(1))
        else:
            self.register_buffer('absmax', absmax)
        self.register_buffer('bias', None if linear.bias is None else linear.bias.detach().clone())

    def scales(self):
        if self.double_quant:
            return double_dequantize(self.scale_codes, self.scale_scales, self.scale_mean[0], self.n_blocks)
        return self.absmax

    def dequantized_weight(self):
        codes = unpack4(self.codes, (-1, self.block)) if self.kind == 'nf4' else self.codes
        return dequantize_blockwise(codes, self.scales(), self.shape, self.code).to(self.dtype)

    def forward(self, x):
        y = MatmulDequantized.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def weight_bytes(self):
        """Bytes that store the weight: its codes and its scales (the bias and the 16-value table aside)."""
        names = ('codes', 'scale_codes', 'scale_scales', 'scale_mean') if self.double_quant else ('codes', 'absmax')
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)


def quantize_linears(model, kind, block=64, double_quant=False):
    """Replace every Linear inside the transformer blocks (under LoRA adapters too: model.LoRALinear's base)
    by a QuantizedLinear, in place. The embedding (tied to the head, and its chat-token rows train) and the
    LayerNorms stay in float32, as in the paper. A ValueError (one line) before anything is replaced if the
    block size does not divide a weight. Returns the model."""
    layers = [(module, f"{path}.{name}", name, child) for path, module in model.transformer.h.named_modules()
              for name, child in module.named_children() if isinstance(child, torch.nn.Linear)]
    if kind == 'nf4' and block % 2:
        raise ValueError(f"quant_block must be even for nf4 (two codes per byte), got {block}")
    for _, path, _, child in layers:
        if block <= 0 or child.weight.numel() % block:
            raise ValueError(f"quant_block {block} does not divide the {child.weight.numel()} values of "
                             f"transformer.h.{path}'s {tuple(child.weight.shape)} weight")
    for module, _, name, child in layers:
        setattr(module, name, QuantizedLinear(child, kind, block, double_quant))
    return model


def base_bytes(model):
    """Bytes of the frozen model: every tensor of its state but the LoRA adapters, a tied weight once (quantized
    weights at the bytes their codes, scales and 16-value table take; the embedding and LayerNorms in float32)."""
    tensors = {v.data_ptr(): v for k, v in model.state_dict().items() if '.lora_' not in k}
    return sum(v.numel() * v.element_size() for v in tensors.values())


def merged_quantized_gpt(state_dict, model_args, lora, quant):
    """A plain GPT from a state dict trained with LoRA over a quantized base (quant: quantize_linears' keyword
    arguments): each adapter folded into its dequantized weight, W = dequant(codes, scales) + B A alpha / r.
    The result is float32 and knows nothing of quantization or LoRA, as model.merged_gpt's."""
    model = GPT(GPTConfig(**model_args))
    apply_lora(model, **lora)
    quantize_linears(model, **quant)
    model.load_state_dict(clean_state_dict(state_dict))
    for module in list(model.transformer.h.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, QuantizedLinear):
                plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    plain.weight.copy_(child.dequantized_weight())
                    if child.bias is not None:
                        plain.bias.copy_(child.bias)
                setattr(module, name, plain)
    return merge_lora(model)
