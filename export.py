"""
Export a model trained here to the Hugging Face format, which the rest of the ecosystem reads (transformers,
the hub, vLLM, llama.cpp's converters): GPT-2's architecture is ours, so only names and layouts change.

    python export.py --out_dir=out-sft --hf_dir=hf-sft       # model.pt (or ckpt.pt) of any stage
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \\
               m = AutoModelForCausalLM.from_pretrained('hf-sft'); t = AutoTokenizer.from_pretrained('hf-sft')"

Writes to hf_dir: config.json and model.safetensors (a GPT2LMHeadModel; LoRA adapters merged), the tokenizer
as tokenizer.json (byte-level BPE for bpe.py and GPT-2 tokenizers, one token per character for char-level
data; the chat tokens as special tokens), tokenizer_config.json with a chat template that renders this
repository's chat format, and generation_config.json (a chat model stops at <|end|>). GPT.from_pretrained
reads the result back. A model GPT-2 cannot express (rotary positions, no biases, a prompt-tuning prefix) is
refused in one line.
"""
import json
import os
import shutil
import sys


from common import check_out_dir, fail
from model import CheckpointError, find_model, model_from_checkpoint
from tokenizer import CHAT_TOKENS, load_tokenizer

# -----------------------------------------------------------------------------
out_dir = 'out-sft'    # a training run's folder: its model.pt, else its ckpt.pt
hf_dir = ''            # where to write; default: out_dir + '-hf'
# -----------------------------------------------------------------------------

# GPT-2's Linear layers were "Conv1D" modules: their weights are stored transposed
CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def hf_state_dict(model):
    """Our parameter names are GPT2LMHeadModel's already ('transformer.h.0.attn.c_attn.weight', ...); the four
    Conv1D weights go back to (in, out). lm_head is tied to the token embedding and is not stored twice."""
    return {k: (v.t() if k.endswith(CONV1D) else v).contiguous().clone()
            for k, v in model.state_dict().items() if k != 'lm_head.weight'}


def hf_config(model, tokenizer):
    c = model.config
    special = getattr(tokenizer, 'special_tokens', {})
    eos = special.get('<|end|>', special.get('<|endoftext|>'))
    return {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': c.vocab_size,
            'n_positions': c.block_size, 'n_ctx': c.block_size, 'n_embd': c.n_embd, 'n_layer': c.n_layer,
            'n_head': c.n_head, 'n_inner': None, 'activation_function': 'gelu_new', 'layer_norm_epsilon': 1e-5,
            'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0, 'tie_word_embeddings': True,
            'bos_token_id': special.get('<|endoftext|>', eos), 'eos_token_id': eos, 'torch_dtype': 'float32'}


def bytes_to_unicode():
    """GPT-2's printable stand-in for each byte, which tokenizer.json's byte-level vocabularies are written in."""
    printable = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + \
        list(range(ord('®'), ord('ÿ') + 1))
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def merge_pairs(ranks):
    """The (left, right) byte strings of every merged token, in rank order: the split BPE itself would make,
    applying only the merges ranked below the token (how tiktoken's rank tables become HF merge lists)."""
    pairs = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            i = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], float('inf')))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        pairs.append((parts[0], parts[1]))
    return pairs


def tokenizer_json(meta, tokenizer):
    """The tokenizer in the `tokenizers` library's format."""
    special = dict(getattr(tokenizer, 'special_tokens', {}))
    added = [{'id': i, 'content': s, 'single_word': False, 'lstrip': False, 'rstrip': False, 'normalized': False,
              'special': True} for s, i in sorted(special.items(), key=lambda kv: kv[1])]
    base = {'version': '1.0', 'truncation': None, 'padding': None, 'added_tokens': added, 'normalizer': None,
            'post_processor': None}
    if meta['tokenizer'] == 'char':
        return {**base, 'pre_tokenizer': {'type': 'Split', 'pattern': {'Regex': r'[\s\S]'}, 'behavior': 'Isolated',
                                          'invert': False},
                # WordLevel insists on an unknown token; ours refuses unknown characters, HF maps them to the first
                'decoder': {'type': 'Fuse'}, 'model': {'type': 'WordLevel', 'vocab': dict(tokenizer.stoi),
                                                       'unk_token': tokenizer.vocab[0]}}
    if meta['tokenizer'] == 'gpt2':  # tiktoken's ranks and split pattern, plus our chat tokens
        ranks, pattern = tokenizer.enc._mergeable_ranks, tokenizer.enc._pat_str
        pairs = merge_pairs(ranks)
    else:  # a bpe.py tokenizer knows its own merges
        ranks, pattern = tokenizer.ranks, tokenizer.pattern_regex
        pairs = [(tokenizer.vocab[a], tokenizer.vocab[b]) for a, b in tokenizer.merges]
    u = bytes_to_unicode()
    text = lambda b: ''.join(u[x] for x in b)
    return {**base,
            'pre_tokenizer': {'type': 'Sequence', 'pretokenizers': [
                {'type': 'Split', 'pattern': {'Regex': pattern}, 'behavior': 'Isolated', 'invert': False},
                {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': False, 'use_regex': False}]},
            'decoder': {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': False, 'use_regex': False},
            'model': {'type': 'BPE', 'dropout': None, 'unk_token': None, 'continuing_subword_prefix': None,
                      'end_of_word_suffix': None, 'fuse_unk': False, 'byte_fallback': False, 'ignore_merges': False,
                      'vocab': {text(b): i for b, i in ranks.items()},
                      'merges': [[text(a), text(b)] for a, b in pairs]}}


# renders <|user|>content<|end|><|assistant|>content<|end|>..., as tasks.render_chat does
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|user|>' if m['role'] == 'user' else '<|assistant|>' }}"
                 "{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def export(model, meta, hf_dir):
    """Write the HF folder next to hf_dir, then rename it into place: a failed export leaves nothing half done."""
    from safetensors.torch import save_file
    c = model.config
    if c.pos_emb != 'learned' or not c.bias or c.n_prefix:
        raise ValueError(f"GPT-2's architecture has learned positions, biases and no prompt-tuning prefix; this model "
                         f"has pos_emb='{c.pos_emb}', bias={c.bias}, n_prefix={c.n_prefix}, which transformers' "
                         f"GPT2LMHeadModel cannot load")
    data_meta = meta['data_meta']
    tokenizer = load_tokenizer(data_meta)
    tmp = hf_dir.rstrip('/') + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(hf_state_dict(model), os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    config = hf_config(model, tokenizer)
    special = getattr(tokenizer, 'special_tokens', {})
    chat = all(t in special for t in CHAT_TOKENS)
    files = {'config.json': config,
             'generation_config.json': {'bos_token_id': config['bos_token_id'], 'eos_token_id': config['eos_token_id']},
             'tokenizer.json': tokenizer_json(data_meta, tokenizer),
             'tokenizer_config.json': {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': c.block_size,
                                       'clean_up_tokenization_spaces': False,
                                       **({'eos_token': '<|end|>', 'chat_template': CHAT_TEMPLATE} if chat else {}),
                                       **({'bos_token': '<|endoftext|>'} if '<|endoftext|>' in special else {})}}
    for name, obj in files.items():
        with open(os.path.join(tmp, name), 'w', encoding='utf-8') as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
    shutil.rmtree(hf_dir, ignore_errors=True)
    os.replace(tmp, hf_dir)


if __name__ == '__main__':
    from configurator import apply_config
    apply_config(globals())
    hf_dir = hf_dir or out_dir.rstrip('/') + '-hf'
    path = find_model(out_dir)
    if path is None:
        fail(f"no model.pt or ckpt.pt in out_dir='{out_dir}'")
    check_out_dir(hf_dir)
    try:
        model, meta = model_from_checkpoint(path)
        export(model.eval(), meta, hf_dir)
    except (CheckpointError, ValueError, RuntimeError) as e:
        fail(str(e))
    n = sum(p.numel() for p in model.parameters())
    print(f"{path} -> {hf_dir}: GPT2LMHeadModel, {n:,} parameters, {model.config.n_layer} layers; tokenizer "
          f"({meta['data_meta']['tokenizer']}, {load_tokenizer(meta['data_meta']).n_vocab} tokens)")
    sys.exit(0)
