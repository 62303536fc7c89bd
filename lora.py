"""
LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): adapters on a frozen GPT's Linear
layers, switching them off (the reference policy for DPO and PPO), and merging them back into plain weights.
finetune_lora.py trains them; model.merged_gpt folds them in when a checkpoint loads.
"""
import copy
import math

import torch
import torch.nn as nn


# LoRA (Hu et al. 2021): instead of updating a frozen weight W (out x in), learn a low-rank change
# B @ A with A (r x in) and B (out x r), scaled by alpha / r. B starts at zero, so at step 0 the model
# is exactly the base model. Only A and B train: under 1-2% of the weights for small r.

LORA_TARGETS = {'attn': 'attn.c_attn', 'proj': 'attn.c_proj', 'mlp_in': 'mlp.c_fc', 'mlp_out': 'mlp.c_proj'}


class LoRALinear(nn.Module):

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's default init (and HF PEFT)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True   # False: the layer is the frozen base layer (the reference model for DPO/PPO)
        self.merged = False   # True: B @ A has been added into base.weight

    def forward(self, x):
        y = self.base(x)
        if self.enabled and not self.merged:
            y = y + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale
        return y

    def delta(self):
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def parse_lora_targets(lora_rank, lora_targets):
    """The comma-separated --lora_targets as a tuple; ValueError (a one-line message) if lora_rank is
    negative or, with adapters, the list is empty or names something else."""
    targets = tuple(t for t in lora_targets.split(',') if t)
    if lora_rank < 0 or (lora_rank > 0 and (not targets or set(targets) - set(LORA_TARGETS))):
        raise ValueError(f"lora_rank must be >= 0 and lora_targets name some of {', '.join(LORA_TARGETS)}; "
                         f"got {lora_rank}, '{lora_targets}'")
    return targets


def apply_lora(model, rank, alpha, dropout=0.0, targets=tuple(LORA_TARGETS)):
    """Freeze every weight of the model and wrap the chosen Linear layers of each block with LoRA."""
    for p in model.parameters():
        p.requires_grad = False
    suffixes = tuple(LORA_TARGETS[t] for t in targets)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full.endswith(suffixes):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
    return model


def policy_and_reference(model, lora):
    """Make model the trainable policy and return the frozen reference it starts equal to (DPO's and PPO's
    ref). With lora (apply_lora's arguments) the reference is the policy with its adapters switched off
    (lora_disabled): None is returned and no second copy is kept. Without it every weight trains and the
    reference is a frozen copy."""
    if lora:
        apply_lora(model, **lora)
        return None
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad = False
    return ref


def train_token_rows(model, ids):
    """Let only these rows of the (tied) token embedding train, e.g. the chat tokens, which a base model
    never saw: LoRA alone cannot move their embeddings. (As PEFT's trainable_token_indices.)"""
    w = model.transformer.wte.weight
    mask = torch.zeros(w.size(0), 1, device=w.device, dtype=w.dtype)
    mask[list(ids)] = 1
    w.requires_grad = True
    w.rows_only = list(ids)  # configure_optimizers keeps weight decay off this tensor
    w.register_hook(lambda grad: grad * mask)  # the other rows get zero gradient, so AdamW leaves them as they are
    return len(ids) * w.size(1)


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def set_lora_enabled(model, enabled):
    for m in lora_layers(model):
        assert not m.merged, "unmerge LoRA before switching adapters off"
        m.enabled = enabled


class lora_disabled:
    """`with lora_disabled(model):` runs the frozen base model: the reference policy for DPO and PPO,
    with no second copy of the weights in memory."""
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        set_lora_enabled(self.model, False)

    def __exit__(self, *exc):
        set_lora_enabled(self.model, True)


def merge_lora(model):
    """Fold every adapter into its base weight and put plain Linears back: the result is an ordinary GPT
    that sample.py loads with no LoRA code."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(module, child_name, child.base)
    for p in model.parameters():
        p.requires_grad = True
    return model
