"""
The model: a GPT (GPT-2's architecture, optionally with rotary positions), generation with a KV cache,
loading GPT-2's weights, LoRA, log-probabilities of replies, and checkpoints.

References:
1) OpenAI's GPT-2 TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
2) "Language Models are Unsupervised Multitask Learners" (GPT-2) and "RoFormer" (rotary positions).
3) "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al. 2021).
"""
import copy
import inspect
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from download import download_gpt2
from muon import MuonWithAdamW


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257, padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True        # biases in Linears and LayerNorms, as GPT-2; False is a little faster
    pos_emb: str = 'learned'  # 'learned' absolute positions (GPT-2) or 'rope' (rotary, as Llama)
    rope_base: float = 10000.0
    n_prefix: int = 0        # prompt tuning: learned "virtual token" embeddings in front of every sequence


# -----------------------------------------------------------------------------
# The transformer

def rope_tables(head_dim, n_pos, base):
    """cos and sin of angle pos * base^(-2i/head_dim) for each position and each of head_dim/2 pairs."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hd). Rotate the pair (x1[i], x2[i]) by the angle of its position: the dot product of
    # a rotated query and a rotated key then depends only on the distance between their positions.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so each new token costs one position
    of compute instead of re-running the whole context. Buffers are allocated once, at the length needed."""

    def __init__(self, batch_size, max_len, config):
        self.batch_size, self.max_len, self.config = batch_size, max_len, config
        self.k = [None] * config.n_layer
        self.v = [None] * config.n_layer
        self.length = 0  # tokens already in the cache
        self.pos_offset = torch.zeros(batch_size, dtype=torch.long)  # per row: slot j holds position j + offset
        self.pad = None  # (B, slots) True at left-padding, if any

    def update(self, layer, k, v):
        """Write this forward pass's k, v (B, nh, T, hd) after the cached ones; return all of them."""
        if self.k[layer] is None:
            shape = (self.batch_size, k.size(1), self.max_len, k.size(3))
            self.k[layer] = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.empty(shape, dtype=v.dtype, device=v.device)
        start, end = self.length, self.length + k.size(2)
        assert end <= self.max_len, "KV cache overflow"
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select_rows(self, rows):
        """Make the batch these rows of the cache (a LongTensor of row indices, which may repeat): the tokens so
        far are copied into new buffers. Dropping the sequences that have finished, later steps compute nothing
        for them; repeating a row, one prompt's cache serves each of the replies sampled to it."""
        for kv in (self.k, self.v):
            for layer, buf in enumerate(kv):
                if buf is not None:
                    new = buf.new_empty((len(rows),) + buf.shape[1:])
                    new[:, :, :self.length] = buf[rows, :, :self.length]
                    kv[layer] = new
        self.batch_size = len(rows)
        self.pos_offset = self.pos_offset[rows]
        if self.pad is not None:
            self.pad = self.pad[rows]


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, kv_cache=None, attn_mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = [t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)]  # (B, nh, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        # Flash attention on CUDA when there is no explicit mask. An explicit mask (padding in a batch
        # of prompts of different lengths, or new tokens after a cache) replaces is_causal.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=attn_mask is None and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in HF); the exact erf GELU differs by ~1e-3
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate='tanh')))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, kv_cache=None, attn_mask=None):
        # pre-LayerNorm: the residual stream itself is never normalised, which keeps deep stacks trainable
        x = x + self.attn(self.ln_1(x), rope, kv_cache, attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        assert config.pos_emb in ('learned', 'rope'), f"pos_emb must be 'learned' or 'rope', got {config.pos_emb!r}"
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.pos_emb == 'learned':
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:
            cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_base)
            self.register_buffer('rope_cos', cos, persistent=False)
            self.register_buffer('rope_sin', sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.n_prefix:  # prompt tuning (Lester et al. 2021): see add_prefix
            self.prefix = nn.Parameter(torch.zeros(config.n_prefix, config.n_embd))
        # weight tying: the output layer reads the token embedding matrix (fewer parameters, better loss)
        self.transformer.wte.weight = self.lm_head.weight
        self.gradient_checkpointing = False  # recompute each block in backward: less memory, ~30% more compute
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # so that the stream's variance does not grow with depth
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; by default without the position embeddings (the token embeddings count, since
        they are tied to the output layer and so do real work there)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_emb == 'learned':
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, idx, pos=None, kv_cache=None, attn_mask=None):
        """The final (LayerNormed) hidden state of every position: (B, T, n_embd).
        pos: (T,) or (B, T) position of each token, default 0..T-1 (after the cache's length). With a prompt-
        tuning prefix (n_prefix > 0), a fresh forward pass (no cache, or an empty one) runs the prefix first, at
        positions 0..n_prefix-1, every token n_prefix places later, and returns the tokens' states only."""
        B, T = idx.size()
        P = self.config.n_prefix
        if pos is None:
            start = max(kv_cache.length - P, 0) if kv_cache is not None else 0
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        pos = pos + P
        assert int(pos.max()) < self.config.block_size, \
            f"position {int(pos.max())} is past block_size {self.config.block_size}"
        x = self.transformer.wte(idx)
        with_prefix = P > 0 and (kv_cache is None or kv_cache.length == 0)
        if with_prefix:
            x = torch.cat([self.prefix.to(x.dtype).expand(B, -1, -1), x], dim=1)
            prefix_pos = torch.arange(P, device=idx.device)
            pos = torch.cat([prefix_pos, pos]) if pos.dim() == 1 else torch.cat([prefix_pos.expand(B, -1), pos], 1)
            if attn_mask is not None:  # every token sees the whole prefix; the prefix sees itself, causally
                full = torch.ones(B, 1, P + T, P + T, dtype=torch.bool, device=idx.device).tril()
                full[:, :, P:, P:] = attn_mask
                attn_mask = full
        rope = None
        if self.config.pos_emb == 'learned':
            x = x + self.transformer.wpe(pos)
        else:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (T, hd/2) or (B, T, hd/2)
            rope = (cos.unsqueeze(-3), sin.unsqueeze(-3))     # broadcast over heads
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, kv_cache, attn_mask, use_reentrant=False)
            else:
                x = block(x, rope, kv_cache, attn_mask)
        if kv_cache is not None:
            kv_cache.length += x.size(1)
        x = self.transformer.ln_f(x)
        return x[:, P:] if with_prefix else x

    def forward(self, idx, targets=None):
        """Logits and the mean cross-entropy over targets that are not -1 (fine-tuning masks prompts so).
        Without targets only the last position's logits are computed: that is all generation needs."""
        x = self.hidden_states(idx)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # list index keeps the time dimension
            loss = None
        return logits, loss

    # -------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 stop_token=None, generator=None, use_cache=True, vocab_limit=None):
        """Continue each prompt; return a list with the new tokens of each (a stop token ends a row and is
        not included). prompts: a (B, T) LongTensor or a list of token lists of any lengths."""
        rows = [[] for _ in range(len(prompts))]
        for step in self.generate_stream(prompts, max_new_tokens, temperature, top_k, top_p,
                                         stop_token, generator, use_cache, vocab_limit):
            for row, tok in zip(rows, step):
                if tok is not None:
                    row.append(tok)
        return rows

    @torch.no_grad()
    def generate_stream(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        stop_token=None, generator=None, use_cache=True, vocab_limit=None):
        """Yield, per step, a list with each row's new token (None once a row has emitted stop_token).

        Each step runs only the rows still going: a row that has emitted stop_token leaves the batch (and the
        next token of the live rows is drawn in one sample over them alone).
        use_cache=False is the slow, obviously-correct path: every step re-runs each live row's whole context
        (its last block_size tokens) on its own. The cached path must give exactly the same tokens.
        """
        if torch.is_tensor(prompts):
            prompts = prompts.tolist()
        seqs = [list(p) for p in prompts]
        assert all(len(s) > 0 for s in seqs), "every prompt needs at least one token"
        B, device = len(seqs), self.lm_head.weight.device
        ctx = self.config.block_size - self.config.n_prefix  # tokens that fit after a prompt-tuning prefix
        live = list(range(B))  # the rows still generating; row j of the cache is row live[j]
        cache = None
        for step in range(max_new_tokens):
            if not use_cache:
                logits = torch.cat([self(torch.tensor([seqs[i][-ctx:]], device=device))[0][:, -1] for i in live])
            elif cache is None or cache.length == cache.max_len:
                # Prefill (or re-fill). With learned positions the cache cannot slide: once a sequence
                # outgrows block_size, each token's position changes every step, so we recompute the
                # last block_size tokens from scratch rather than produce silently wrong tokens.
                cache, logits = self._prefill([seqs[i][-ctx:] for i in live], max_new_tokens - step)
            else:
                logits = self._decode_step(cache, torch.tensor([[seqs[i][-1]] for i in live], device=device))
            next_tokens = sample_next(logits.float(), temperature, top_k, top_p, generator, vocab_limit).tolist()
            out = [None] * B
            keep = []  # cache rows of the rows that go on
            for j, (i, tok) in enumerate(zip(live, next_tokens)):
                if stop_token is None or tok != stop_token:
                    out[i] = tok
                    seqs[i].append(tok)
                    keep.append(j)
            yield out
            if not keep:
                return
            if len(keep) < len(live):
                live = [live[j] for j in keep]
                if cache is not None:
                    cache.select_rows(torch.tensor(keep, device=device))

    def _decode_step(self, cache, idx):
        """Logits (B, V) of one new token per row (idx: (B, 1)) after the cached ones; left-padding (see
        _prefill) stays masked out."""
        pos = (cache.pos_offset + cache.length).clamp(min=0).unsqueeze(1)
        mask = None
        if cache.pad is not None:
            mask = torch.ones(idx.size(0), 1, 1, cache.length + 1, dtype=torch.bool, device=idx.device)
            mask[:, 0, 0, :cache.pad.size(1)] = ~cache.pad
        return self.lm_head(self.hidden_states(idx, pos, cache, mask))[:, -1]

    def _prefill(self, seqs, max_new_tokens=None):
        """Run prompts of possibly different lengths as one batch. Shorter prompts are left-padded; each
        row's positions start at 0 at its first real token, and no query attends to a pad key, so every row
        computes exactly what it would alone. The cache holds block_size tokens, or only as many as the
        prompts and max_new_tokens more need. A prompt that appears several times (k replies sampled to each
        prompt) is run once and its cache row copied."""
        B, T, device = len(seqs), max(len(s) for s in seqs), self.lm_head.weight.device
        first = {}  # each distinct prompt -> its row in the batch actually run
        copies = [first.setdefault(tuple(s), len(first)) for s in seqs]
        if len(first) < B:
            cache, logits = self._prefill([list(s) for s in first], max_new_tokens)
            rows = torch.tensor(copies, device=device)
            cache.select_rows(rows)
            return cache, logits[rows]
        n_pad = torch.tensor([T - len(s) for s in seqs], device=device)
        idx = torch.tensor([[0] * (T - len(s)) + s for s in seqs], device=device)
        P = self.config.n_prefix  # a prompt-tuning prefix fills the cache's first P slots (see hidden_states)
        max_len = self.config.block_size
        if max_new_tokens is not None:
            max_len = min(max_len, P + T + max_new_tokens)
        cache = KVCache(B, max_len, self.config)
        cache.pos_offset = -n_pad - P  # the token in cache slot j of row b is at position j - n_pad[b] - P
        mask = None
        if int(n_pad.max()) > 0:
            ar = torch.arange(T, device=device)
            pad = ar[None, :] < n_pad[:, None]                     # (B, T) True at pad slots
            causal = ar[None, :] <= ar[:, None]                    # (T, T) query i sees keys j <= i
            mask = causal[None] & ~pad[:, None, :]
            mask |= torch.eye(T, dtype=torch.bool, device=device)  # pads see themselves: no all-masked row (NaN)
            mask = mask.unsqueeze(1)                               # (B, 1, T, T), broadcast over heads
            cache.pad = torch.cat([torch.zeros(B, P, dtype=torch.bool, device=device), pad], dim=1)  # by slot
        pos = (torch.arange(T, device=device)[None, :] - n_pad[:, None]).clamp(min=0)
        logits = self.lm_head(self.hidden_states(idx, pos, cache, mask)[:, -1])
        return cache, logits

    # -------------------------------------------------------------------------
    # Pretrained GPT-2 weights

    @classmethod
    def from_pretrained(cls, name_or_dir, dropout=0.0):
        """GPT-2 from the Hugging Face hub ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'), or from any
        local directory holding an HF GPT-2's config.json and model.safetensors."""
        from safetensors.torch import load_file
        folder = name_or_dir if os.path.isdir(name_or_dir) else download_gpt2(name_or_dir)
        with open(os.path.join(folder, 'config.json')) as f:
            hf = json.load(f)
        if hf.get('activation_function', 'gelu_new') not in ('gelu_new', 'gelu_pytorch_tanh'):
            raise ValueError(f"{folder}: activation {hf['activation_function']} is not GPT-2's tanh GELU")
        config = GPTConfig(block_size=hf['n_positions'], vocab_size=hf['vocab_size'], n_layer=hf['n_layer'],
                           n_head=hf['n_head'], n_embd=hf['n_embd'], dropout=dropout, bias=True)
        model = cls(config)
        sd = model.state_dict()
        hf_sd = load_file(os.path.join(folder, 'model.safetensors'))
        # HF's GPT2Model files have bare names ('h.0.attn...'), GPT2LMHeadModel files 'transformer.h.0...'.
        # attn.bias / attn.masked_bias are causal-mask buffers, not weights; lm_head is tied to wte.
        hf_sd = {(k if k.startswith('transformer.') or k.startswith('lm_head') else 'transformer.' + k): v
                 for k, v in hf_sd.items()
                 if not k.endswith(('.attn.bias', '.attn.masked_bias'))}
        hf_sd.pop('lm_head.weight', None)
        expected = {k for k in sd if k != 'lm_head.weight'}
        if set(hf_sd) != expected:
            raise ValueError(f"{folder}: unexpected weight names; missing {sorted(expected - set(hf_sd))[:5]}, "
                             f"extra {sorted(set(hf_sd) - expected)[:5]}")
        # GPT-2 was written with "Conv1D" modules, which store Linear weights transposed
        conv1d = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
        with torch.no_grad():
            for k, v in hf_sd.items():
                v = v.t() if k.endswith(conv1d) else v
                assert v.shape == sd[k].shape, f"{k}: {tuple(v.shape)} vs {tuple(sd[k].shape)}"
                sd[k].copy_(v)
        return model

    def crop_block_size(self, block_size):
        """Use a shorter context than the loaded weights were trained with (e.g. GPT-2's 1024 -> 256)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.config.pos_emb == 'learned':
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        else:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]

    @torch.no_grad()
    def add_prefix(self, n_prefix, generator=None):
        """Prompt tuning (Lester et al. 2021): n_prefix trainable embeddings in front of every sequence, as if a
        prompt of "virtual tokens" were always there. They start as the embeddings of random real tokens (a
        starting point the model can read), and are the only weights that need to train."""
        rows = torch.randint(0, self.config.vocab_size, (n_prefix,), generator=generator)
        self.prefix = nn.Parameter(self.transformer.wte.weight[rows].clone())
        self.config.n_prefix = n_prefix

    @torch.no_grad()
    def resize_vocab(self, vocab_size):
        """Grow the (tied) token embedding, e.g. to give GPT-2's 50257 tokens rows for the chat tokens.
        New rows start at the mean embedding, a neutral point for a token the model has never seen."""
        old = self.transformer.wte.weight
        if vocab_size <= old.size(0):
            return
        new = torch.empty(vocab_size, old.size(1), dtype=old.dtype, device=old.device)
        new[:old.size(0)] = old
        new[old.size(0):] = old.mean(dim=0)
        self.lm_head.weight = nn.Parameter(new)
        self.transformer.wte.weight = self.lm_head.weight
        self.config.vocab_size = vocab_size

    # -------------------------------------------------------------------------
    # Training helpers

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, muon_lr=None, muon_momentum=0.95):
        """AdamW with weight decay on matrices only (not on biases and LayerNorm gains). With muon_lr, Muon
        (muon.py) at that learning rate for the matrices inside the blocks, AdamW for the rest."""
        params = [p for p in self.parameters() if p.requires_grad]
        # rows_only (see train_token_rows): weight decay would shrink the frozen rows too
        decay = [p for p in params if p.dim() >= 2 and not hasattr(p, 'rows_only')]
        no_decay = [p for p in params if p.dim() < 2 or hasattr(p, 'rows_only')]
        if muon_lr is not None:  # each group keeps its peak in base_lr: train.py's schedule scales them alike
            hidden = {id(p) for block in self.transformer.h for p in block.parameters() if p.dim() == 2}
            return MuonWithAdamW([
                {'params': [p for p in decay if id(p) in hidden], 'weight_decay': weight_decay, 'use_muon': True,
                 'lr': muon_lr, 'base_lr': muon_lr},
                {'params': [p for p in decay if id(p) not in hidden], 'weight_decay': weight_decay,
                 'base_lr': learning_rate},
                {'params': no_decay, 'weight_decay': 0.0, 'base_lr': learning_rate}],
                lr=learning_rate, betas=betas, momentum=muon_momentum)
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        # the fused kernel updates all parameters in one launch instead of several per parameter
        fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if fused else {}))

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), PaLM paper appendix B: 6N for the matmuls
        with the weights, plus 12 * n_layer * n_embd * T for attention's scores and weighted sums."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_second, device, peak=None):
        """Model FLOPs utilisation: achieved training FLOP/s over a peak: the one given (bench.py measures a CPU's
        own), else the GPU's dense bf16 datasheet peak (None if unknown)."""
        peak = peak or peak_flops(device)
        return None if peak is None else self.flops_per_token() * tokens_per_second / peak


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None, vocab_limit=None):
    """Pick one token per row from (B, V) logits. temperature 0 means greedy."""
    if vocab_limit is not None:
        logits = logits[:, :vocab_limit]  # padded vocabulary rows that no tokenizer can decode
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float('-inf'))
    if top_p is not None and top_p < 1.0:
        # nucleus sampling: keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reaches p
        sorted_logits = sorted_logits.masked_fill(remove, float('-inf'))
        logits = torch.full_like(logits, float('-inf')).scatter(1, order, sorted_logits)
    return sample_from(F.softmax(logits, dim=-1), generator)


def sample_from(probs, generator=None):
    """One index per row of (B, V) probabilities by inverting the cumulative distribution: one uniform u per
    row, the first index whose cumulative probability passes u. Exact, and on a CPU several times faster than
    torch.multinomial, which spent a sixth of the sampler's time. The sums are in float64 so that rounding
    cannot move mass between tokens, and a token of probability 0 is never picked."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(probs.size(0), 1, generator=generator, dtype=torch.float64, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total, even after rounding
    return torch.searchsorted(cdf, u, right=True).squeeze(1)  # cdf[i-1] <= u < cdf[i], so probs[i] > 0


def peak_flops(device):
    """Dense bf16 peak FLOP/s of the GPU, from its name; None on CPU/MPS or an unknown GPU."""
    if torch.device(device).type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (('H200', 989e12), ('H100', 989e12), ('A100', 312e12), ('L4', 121e12),
                       ('A10', 125e12), ('4090', 165e12), ('3090', 71e12)):
        if key in name:
            return flops
    return None


# -----------------------------------------------------------------------------
# Checkpoints. Tensors go through torch.save and load with weights_only=True (no pickle of arbitrary
# objects); everything else (model args, config, data meta, RNG states) is one JSON string.

def save_checkpoint(path, tensors, meta):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path + '.tmp'
    torch.save({**tensors, 'meta_json': json.dumps(meta)}, tmp)
    os.replace(tmp, path)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and the reason, in one line."""


def load_checkpoint(path, map_location='cpu'):
    """Return (tensors dict, meta dict). A file that is missing, truncated, not one of our checkpoints, or that
    holds Python objects other than tensors raises CheckpointError. weights_only=True is what refuses the
    last kind: unpickling an arbitrary object can run any code, so such a file is never loaded."""
    import pickle
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except pickle.UnpicklingError as e:
        if 'GLOBAL' not in str(e):  # no Python object named in it: not a pickle of ours at all
            raise CheckpointError(f"{path} is not a readable checkpoint (truncated, or not written by torch.save)") \
                from None
        raise CheckpointError(f"refused to load {path}: it holds Python objects, not only tensors, and loading "
                              f"those can run code. Only load checkpoints written by these scripts") from None
    except (RuntimeError, EOFError, KeyError, ValueError):
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, or not written by torch.save)") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('meta_json'), str):
        raise CheckpointError(f"{path} is not a checkpoint of these scripts (no metadata in it)")
    try:
        meta = json.loads(ckpt.pop('meta_json'))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its metadata is not valid JSON") from None
    return ckpt, meta


def clean_state_dict(sd):
    """Drop the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names."""
    out = {}
    for k, v in sd.items():
        for prefix in ('_orig_mod.', 'module.'):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def merged_gpt(state_dict, model_args, lora=None):
    """A plain GPT from a state dict trained with LoRA adapters (lora: apply_lora's arguments, or None):
    each adapter folded into its weight, so that whoever loads it needs to know nothing about LoRA."""
    model = GPT(GPTConfig(**model_args))
    if lora:
        apply_lora(model, **lora)
    model.load_state_dict(clean_state_dict(state_dict))
    if lora:
        merge_lora(model)
    return model


def model_from_checkpoint(path, device='cpu'):
    """Rebuild the GPT saved by train.py or a fine-tuning script; returns (model, meta). A checkpoint
    saved with LoRA adapters comes back with them merged: a plain GPT."""
    ckpt, meta = load_checkpoint(path, map_location=device)
    try:
        return merged_gpt(ckpt['model'], meta['model_args'], meta.get('lora')).to(device), meta
    except (KeyError, TypeError, RuntimeError) as e:  # a checkpoint, but not of a GPT (or of another shape)
        raise CheckpointError(f"{path} does not hold a GPT these scripts can rebuild ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]})") from None


def find_model(folder):
    """The model a later stage starts from: folder/model.pt (a fine-tuning script's merged model), else
    folder/ckpt.pt (its training state, which also loads as a plain GPT); None if neither exists."""
    return next((os.path.join(folder, n) for n in ('model.pt', 'ckpt.pt')
                 if os.path.exists(os.path.join(folder, n))), None)


def start_point(init_from, out_dir):
    """Where a stage after SFT starts: (ckpt, meta, sft_path). init_from='resume': out_dir/ckpt.pt and the
    supervised model its metadata names (the reference: it must still exist); else no checkpoint and
    init_from's model. A CheckpointError says what is missing in one line."""
    if init_from != 'resume':
        sft_path = find_model(init_from)
        if sft_path is None:
            raise CheckpointError(f"no model.pt or ckpt.pt in init_from='{init_from}': run finetune_lora.py first")
        return None, {}, sft_path
    try:
        ckpt, meta = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    except CheckpointError as e:
        raise CheckpointError(f"init_from='resume': {e}") from None
    sft_path = meta.get('sft_path')
    if not sft_path or not os.path.exists(sft_path):
        raise CheckpointError(f"the supervised model {sft_path} this run started from is gone: it is the reference")
    return ckpt, meta, sft_path


# -----------------------------------------------------------------------------
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


def lora_state_dict(model):
    """The adapter alone: a small file next to the base checkpoint."""
    return {k: v.detach().cpu() for k, v in clean_state_dict(model.state_dict()).items() if '.lora_' in k}


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


# -----------------------------------------------------------------------------
# Log-probabilities of responses: what fine-tuning, DPO and PPO compute on prompt + response sequences

def token_logprobs(model, idx):
    """log p(idx[:, t+1] | idx[:, :t+1]) for every t: (B, T-1). Right padding is harmless (causal)."""
    logits = model.lm_head(model.hidden_states(idx[:, :-1])).float()
    return torch.gather(F.log_softmax(logits, dim=-1), 2, idx[:, 1:].unsqueeze(-1)).squeeze(-1)


def response_logprobs(model, idx, mask):
    """Sum of log-probabilities of the tokens where mask (B, T) is True (the response), per sequence."""
    return (token_logprobs(model, idx) * mask[:, 1:]).sum(dim=1)


def pad_batch(seqs, pad=0, device='cpu'):
    """Right-pad lists to one (B, T) tensor."""
    T = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [pad] * (T - len(s)) for s in seqs], dtype=torch.long, device=device)
