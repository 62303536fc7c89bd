"""export.py against references: the HF-written tiny GPT-2 (its weights come back out of our export tensor for
tensor), GPT.from_pretrained reading an export back (same logits), and, where transformers / tokenizers are
installed (not in CI), transformers' GPT2LMHeadModel and the tokenizers library on the exported folder."""
import json

import pytest
import torch
from safetensors.torch import load_file

import model as M
from conftest import HF_TINY, SHAKESPEARE, error_line, run
from test_dpo import tiny_gpt


def save_as_ours(model, path, data_meta):
    path.parent.mkdir(parents=True, exist_ok=True)
    M.save_checkpoint(str(path), {'model': model.state_dict()}, dict(model_args=model.config.__dict__,
                                                                        data_meta=data_meta))


def logits(model, idx):
    with torch.no_grad():
        return model.lm_head(model.hidden_states(idx))


@pytest.fixture(scope='module')
def gpt2_export(tmp_path_factory):
    """The HF-written tiny GPT-2, loaded here, saved as our checkpoint with GPT-2's tokenizer, exported."""
    d = tmp_path_factory.mktemp('export')
    model = M.GPT.from_pretrained(str(HF_TINY)).eval()
    save_as_ours(model, d / 'run' / 'model.pt', {'tokenizer': 'gpt2'})
    run(['export.py', f'--out_dir={d / "run"}', f'--hf_dir={d / "hf"}'])
    return d, model


def test_export_of_an_hf_gpt2_gives_back_its_weights(gpt2_export):
    d, _ = gpt2_export
    ours, theirs = load_file(str(d / 'hf' / 'model.safetensors')), load_file(str(HF_TINY / 'model.safetensors'))
    theirs = {k if k.startswith('transformer.') else 'transformer.' + k: v for k, v in theirs.items()
              if not k.endswith(('.attn.bias', '.attn.masked_bias')) and k != 'lm_head.weight'}
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    config = json.loads((d / 'hf' / 'config.json').read_text())
    hf = json.loads((HF_TINY / 'config.json').read_text())
    for key in ('n_embd', 'n_layer', 'n_head', 'n_positions', 'vocab_size', 'activation_function'):
        assert config[key] == hf[key], key


def test_export_then_from_pretrained_gives_the_same_logits(tmp_path, tok_meta):
    model = tiny_gpt(seed=3).eval()
    save_as_ours(model, tmp_path / 'run' / 'model.pt', tok_meta)
    run(['export.py', f'--out_dir={tmp_path / "run"}', f'--hf_dir={tmp_path / "hf"}'])
    back = M.GPT.from_pretrained(str(tmp_path / 'hf')).eval()
    idx = torch.randint(0, 300, (3, 40))
    assert torch.equal(logits(back, idx), logits(model, idx))
    tok_config = json.loads((tmp_path / 'hf' / 'tokenizer_config.json').read_text())
    assert tok_config['eos_token'] == '<|end|>' and '<|assistant|>' in tok_config['chat_template']


def test_models_gpt2_cannot_express_are_refused_in_one_line(tmp_path, tok_meta):
    save_as_ours(tiny_gpt(pos_emb='rope'), tmp_path / 'rope' / 'model.pt', tok_meta)
    p = run(['export.py', f'--out_dir={tmp_path / "rope"}', f'--hf_dir={tmp_path / "hf"}'], check=False)
    assert "pos_emb='rope'" in error_line(p) and not (tmp_path / 'hf').exists()
    p = run(['export.py', f'--out_dir={tmp_path / "nothing"}'], check=False)
    assert 'no model.pt or ckpt.pt' in error_line(p)


TEXTS = ["Sort these digits from smallest to largest: 3 1 2", "héllo wörld 123 ,.; it's   two  spaces\n\nand tabs\t!",
         SHAKESPEARE.read_text()[:3000]]


def test_exported_tokenizers_encode_as_ours(gpt2_export, tmp_path, tok_meta, char_data):
    """GPT-2's (tiktoken's ranks), a bpe.py one with the chat tokens, and a character-level one: the tokenizers
    library reads each tokenizer.json and gives our ids for the same text."""
    tokenizers = pytest.importorskip('tokenizers')  # not installed in CI
    from tokenizer import load_tokenizer
    d, _ = gpt2_export
    char_meta = json.loads((char_data / 'shakespeare_char' / 'meta.json').read_text())
    folders = {'gpt2': (d / 'hf', {'tokenizer': 'gpt2'})}
    for name, meta, vocab in (('bpe', tok_meta, 320), ('char', char_meta, 65)):
        save_as_ours(tiny_gpt(vocab_size=vocab), tmp_path / name / 'model.pt', meta)
        run(['export.py', f'--out_dir={tmp_path / name}', f'--hf_dir={tmp_path / (name + "-hf")}'])
        folders[name] = (tmp_path / (name + '-hf'), meta)
    for name, (folder, meta) in folders.items():
        ours = load_tokenizer(meta)
        theirs = tokenizers.Tokenizer.from_file(str(folder / 'tokenizer.json'))
        for text in TEXTS if name != 'char' else TEXTS[2:]:  # the char vocabulary: Shakespeare's characters
            ids = ours.encode_ordinary(text)
            assert theirs.encode(text).ids == ids, name
            assert theirs.decode(ids) == text, name


def test_transformers_loads_the_export_with_our_logits_and_chat_format(tmp_path, tok_meta):
    transformers = pytest.importorskip('transformers')  # not installed in CI
    from tasks import render_prompt
    from tokenizer import load_tokenizer
    model = tiny_gpt(seed=4).eval()
    save_as_ours(model, tmp_path / 'run' / 'model.pt', tok_meta)
    run(['export.py', f'--out_dir={tmp_path / "run"}', f'--hf_dir={tmp_path / "hf"}'])
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / 'hf')).eval()
    idx = torch.randint(0, 300, (2, 50))
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, logits(model, idx), atol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'hf'))
    messages = [{'role': 'user', 'content': 'Copy: cat dog'}, {'role': 'assistant', 'content': 'cat dog'},
                {'role': 'user', 'content': 'Reverse: a b'}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids['input_ids'] if isinstance(ids, dict) or hasattr(ids, 'keys') else ids
    assert list(ids) == render_prompt(messages, load_tokenizer(tok_meta))
