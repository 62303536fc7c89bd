"""configurator.py: --key=value overrides and config files, checked key by key against the script's own
globals; every mistake is a one-line error and a non-zero exit before the script does any work."""
import time

import pytest

from configurator import apply_config
from conftest import ROOT, error_line, run


def script_globals():
    """What a script's globals look like when it calls apply_config: config, plus modules and functions."""
    return dict(batch_size=12, learning_rate=6e-4, eval_interval=2000, eval_iters=200, max_iters=5000,
                compile=True, out_dir='out', betas=(0.9, 0.95), layers=[1, 2], anything=None,
                time=time, helper=lambda: 0, _private=1)


def apply_fails(capsys, argv):
    """apply_config(argv) must exit non-zero with one line on stderr; return that line."""
    g = script_globals()
    with pytest.raises(SystemExit) as e:
        apply_config(g, argv)
    assert e.value.code not in (0, None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1].startswith('error: ') and '\n' not in lines[-1]
    return lines[-1]


def test_overrides_parse_and_keep_types():
    g = script_globals()
    config = apply_config(g, ['--batch_size=32', '--learning_rate=1', '--compile=False', '--out_dir=runs/a b',
                              '--betas=[0.8, 0.99]', '--layers=[3]', '--anything={"k": 1}', '--eval_iters=-3'])
    assert g['batch_size'] == 32 and type(g['batch_size']) is int
    assert g['learning_rate'] == 1.0 and type(g['learning_rate']) is float  # an int is fine for a float
    assert g['compile'] is False
    assert g['out_dir'] == 'runs/a b'  # not a Python literal: the plain string
    assert g['betas'] == (0.8, 0.99) and type(g['betas']) is tuple
    assert g['layers'] == [3]
    assert g['anything'] == {'k': 1}  # a None default takes any type
    assert g['eval_iters'] == -3
    # the returned config is exactly the plain-typed public globals, with their new values
    assert config == {k: g[k] for k in ('anything', 'batch_size', 'betas', 'compile', 'eval_interval',
                                        'eval_iters', 'layers', 'learning_rate', 'max_iters', 'out_dir')}


@pytest.mark.parametrize('raw,expected', [('False', False), ('True', True), ('false', False), ('true', True),
                                          ('FALSE', False), ('yes', None), ('1', None)])
def test_bool_parsing(raw, expected, capsys):
    if expected is None:  # neither a bool literal nor true/false: a type error, not a silent True
        assert "expects bool" in apply_fails(capsys, [f'--compile={raw}'])
        return
    g = script_globals()
    apply_config(g, [f'--compile={raw}'])
    assert g['compile'] is expected


@pytest.mark.parametrize('raw,expected', [('2024', '2024'), ('1e3', '1e3'), ('None', 'None'), ('[1]', '[1]'),
                                          ("'quoted'", 'quoted'), ('a=b', 'a=b'), ('', '')])
def test_string_keys_take_the_text_as_written(raw, expected):
    g = script_globals()
    apply_config(g, [f'--out_dir={raw}'])
    assert g['out_dir'] == expected


def test_unknown_key_names_the_closest_known_keys(capsys):
    msg = apply_fails(capsys, ['--batch_sise=3'])
    assert "'batch_sise'" in msg and 'batch_size' in msg
    msg = apply_fails(capsys, ['--eval_iter=3'])
    assert 'eval_iters' in msg and 'eval_interval' in msg
    assert msg.index('eval_iters') < msg.index('eval_interval')  # the closest first
    # modules, functions and private names are not config, even though they are globals
    for key in ('time', 'helper', '_private'):
        assert f"unknown config key '{key}'" in apply_fails(capsys, [f'--{key}=1'])


@pytest.mark.parametrize('arg,expected', [('--batch_size=3.5', 'expects int'), ('--batch_size=True', 'expects int'),
                                          ('--batch_size=None', 'expects int'), ('--compile=1', 'expects bool'),
                                          ('--learning_rate=fast', 'expects float'),
                                          ('--betas=0.9', 'expects tuple'), ('--layers=(1,)', 'expects list')])
def test_type_mismatch_names_the_expected_type(arg, expected, capsys):
    msg = apply_fails(capsys, [arg])
    assert expected in msg and arg.split('=')[0][2:] in msg


def test_malformed_argument(capsys):
    assert "expected --key=value" in apply_fails(capsys, ['--batch_size'])


def test_config_file_applied_left_to_right(tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("import math\n"
                   "batch_size = 32\n"
                   "learning_rate = 1\n"                 # int for a float: converted
                   "out_dir = out_dir + '-' + str(int(math.sqrt(batch_size * 2)))\n"  # sees earlier values
                   "_scratch = 'not config'\n")
    g = script_globals()
    apply_config(g, ['--out_dir=base', str(cfg), '--batch_size=5'])
    assert g['batch_size'] == 5  # the later override wins
    assert g['learning_rate'] == 1.0 and type(g['learning_rate']) is float
    assert g['out_dir'] == 'base-8'
    assert '_scratch' not in g and 'math' not in g and g['time'] is time
    g = script_globals()
    apply_config(g, ['--batch_size=5', str(cfg)])
    assert g['batch_size'] == 32  # the later config file wins


def test_config_file_errors(tmp_path, capsys):
    assert 'config file not found: nope.py' in apply_fails(capsys, ['nope.py'])
    bad_key = tmp_path / 'bad_key.py'
    bad_key.write_text("batch_size = 4\nbatch_sise = 3\n")
    msg = apply_fails(capsys, [str(bad_key)])
    assert "'batch_sise'" in msg and str(bad_key) in msg and 'batch_size' in msg
    bad_type = tmp_path / 'bad_type.py'
    bad_type.write_text("compile = 'yes please'\n")
    assert 'expects bool' in apply_fails(capsys, [str(bad_type)])
    raises = tmp_path / 'raises.py'
    raises.write_text("batch_size = 1 / 0\n")
    assert 'ZeroDivisionError' in apply_fails(capsys, [str(raises)])


# -----------------------------------------------------------------------------
# each script stops on a bad config before it does anything

# the output folders come before the mistake, so that any work done before the check would show in tmp_path
@pytest.mark.parametrize('args,expected', [
    (['train.py', '--out_dir=OUT', '--data_dir=DATA', '--batch_sise=3'], 'batch_size'),
    (['train.py', '--out_dir=OUT', '--data_dir=DATA', 'BAD_CONFIG'], 'batch_size'),
    (['train.py', '--out_dir=OUT', '--data_dir=DATA', '--max_iters=1.5'], 'expects int'),
    (['sample.py', '--out_dir=OUT', '--temprature=0'], 'temperature'),
    (['prepare.py', '--data_dir=DATA', '--tokeniser=char'], 'tokenizer'),
    (['prepare.py', 'shakespeare_char', '--data_dir=DATA', '--val_fraction=big'], 'expects float'),
])
def test_scripts_fail_before_any_work(args, expected, tmp_path):
    out, data, cfg = tmp_path / 'out', tmp_path / 'data', tmp_path / 'bad.py'
    cfg.write_text("batch_sise = 3\n")
    args = [a.replace('OUT', str(out)).replace('DATA', str(data)).replace('BAD_CONFIG', str(cfg)) for a in args]
    p = run(args, check=False, timeout=120)
    assert expected in error_line(p)
    assert not out.exists() and not data.exists()  # refused before any work: nothing written
    assert not out.exists() and not data.exists()  # nothing was created
    assert p.stdout == ''  # no work was reported


def test_bare_flag_turns_a_boolean_on(capsys):
    g = script_globals()
    g['compile'] = False
    apply_config(g, ['--compile'])
    assert g['compile'] is True
    assert 'expected --key=value' in apply_fails(capsys, ['--batch_size'])  # only booleans may be bare


def test_foreign_config_files_set_what_the_script_has(tmp_path, capsys):
    """bench.py reads train.py's config files with foreign_files=True: the keys it has are applied (types
    checked), the others skipped; an unknown --key still fails, and without the flag a foreign key fails."""
    cfg = tmp_path / 'train_cfg.py'
    cfg.write_text("batch_size = 64\nwandb_log = False\ngradient_accumulation_steps = 4\n")
    g = script_globals()
    config = apply_config(g, [str(cfg)], foreign_files=True)
    assert g['batch_size'] == 64 and 'wandb_log' not in g and 'gradient_accumulation_steps' not in config
    assert "'wandb_log'" in apply_fails(capsys, [str(cfg)])
    g = script_globals()
    with pytest.raises(SystemExit):
        apply_config(g, [str(cfg), '--wandb_log=True'], foreign_files=True)
    bad_type = tmp_path / 'bad_type.py'
    bad_type.write_text("batch_size = 'many'\nlr_decay_iters = 10\n")
    with pytest.raises(SystemExit):
        apply_config(script_globals(), [str(bad_type)], foreign_files=True)
    assert 'expects int' in capsys.readouterr().err


def test_bench_loads_a_train_config_for_its_shape():
    """bench.py with train.py's CPU config times that config's model (its width and heads, read from the file),
    not its own GPT-2-sized default: the parameter count it prints is the model built here from the file."""
    import runpy
    from model import GPT, GPTConfig
    cfg = runpy.run_path(str(ROOT / 'config' / 'shakespeare_cpu.py'))
    expected = GPT(GPTConfig(n_layer=1, n_head=cfg['n_head'], n_embd=cfg['n_embd'], block_size=32,
                             vocab_size=50304, bias=cfg.get('bias', True))).get_num_params()
    p = run(['bench.py', 'config/shakespeare_cpu.py', '--device=cpu', '--n_layer=1', '--block_size=32',
             '--batch_size=2', '--warmup=0', '--steps=1', '--repeats=1', '--sample_batch=1', '--sample_tokens=2',
             '--compile=False'], timeout=300)
    assert f"{expected / 1e6:.2f}M parameters" in p.stdout


def test_bench_reports_mfu_against_the_measured_cpu_peak():
    """On CPU bench.py measures the machine's own fp32 matmul peak and gives MFU against it: the printed training
    GFLOP/s is nanoGPT's count (6N + 12 L d T per token, from the model built here) times the printed tokens/s,
    and the MFU is that over the printed peak."""
    import re
    from model import GPT, GPTConfig
    p = run(['bench.py', '--device=cpu', '--n_layer=2', '--n_head=2', '--n_embd=64', '--block_size=64',
             '--vocab_size=256', '--batch_size=4', '--warmup=1', '--steps=2', '--repeats=1', '--sample_batch=1',
             '--sample_tokens=2', '--peak_size=256', '--compile=False'], timeout=300)
    peak = float(re.search(r"matmul peak, float32, 256 x 256, \d+ threads \| ([\d.]+) GFLOP/s", p.stdout).group(1))
    tok_s, gflops, mfu = re.search(r"([\d,]+) tokens/s, ([\d.]+) GFLOP/s, MFU ([\d.]+)% of the float32 matmul peak",
                                   p.stdout).groups()
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256))
    assert float(gflops) == pytest.approx(model.flops_per_token() * float(tok_s.replace(',', '')) / 1e9, rel=0.01,
                                          abs=0.06)
    assert float(mfu) == pytest.approx(100 * float(gflops) / peak, rel=0.02, abs=0.06)
