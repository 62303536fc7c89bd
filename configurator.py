"""
The configurator every script uses. A script sets its config as plain globals, then calls

    from configurator import apply_config
    apply_config(globals())

and the command line may then name config files (plain Python, run in the script's globals) and
`--key=value` overrides, left to right:

    python train.py config/shakespeare.py --batch_size=32 --compile=False

Values are parsed with ast.literal_eval, falling back to a plain string (and a string key always takes
the text as written: --out_dir=2024 is the folder '2024'). An override must name a key the script
already has and keep its type (an int is fine where a float is expected). Every mistake exits with a
one-line error before the script does any work.
"""
import ast
import difflib
import os
import sys

SIMPLE_TYPES = (int, float, bool, str, type(None), tuple, list, dict)


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def is_config(k, v):
    """A public global of a plain type."""
    return not k.startswith('_') and isinstance(v, SIMPLE_TYPES)


def config_keys(g):
    """The config of a script: its public globals of plain types, set before apply_config."""
    return {k for k, v in g.items() if is_config(k, v)}


def check_and_convert(key, value, g, known, source):
    if key not in known:
        close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        fail(f"unknown config key '{key}' in {source}{hint}")
    default = g[key]
    if default is None:
        return value  # a None default means "no fixed type"
    expected = type(default)
    if expected is float and type(value) is int:
        return float(value)
    if expected is bool and isinstance(value, str) and value.lower() in ('true', 'false'):
        return value.lower() == 'true'
    if expected is tuple and type(value) is list:
        return tuple(value)
    if type(value) is not expected:
        fail(f"config key '{key}' in {source} expects {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def apply_config(g, argv=None, foreign_files=False):
    """Config files and --key=value, in order, onto the globals g; returns the config. foreign_files=True: a
    config file may set keys this script does not have, and those are skipped (bench.py reads train.py's
    configs for their model's shape); an unknown --key still fails."""
    argv = sys.argv[1:] if argv is None else argv
    known = config_keys(g)
    for arg in argv:
        if not arg.startswith('--'):
            # a config file: plain Python run against a copy of the globals, then checked key by key
            if not os.path.isfile(arg):
                fail(f"config file not found: {arg}")
            ns = dict(g)
            try:
                exec(compile(open(arg).read(), arg, 'exec'), ns)
            except Exception as e:
                fail(f"config file {arg} raised {type(e).__name__}: {e}")
            for k, v in ns.items():
                if not is_config(k, v):
                    continue  # modules, functions and helpers a config file uses are not config
                if k in g and g[k] is v or foreign_files and k not in known:
                    continue
                g[k] = check_and_convert(k, v, g, known, arg)
            print(f"config: {arg}", file=sys.stderr)
        else:
            if '=' not in arg and type(g.get(arg[2:])) is bool:
                arg += '=True'  # a bare --flag turns a boolean on
            if '=' not in arg:
                fail(f"expected --key=value, got '{arg}'")
            key, raw = arg[2:].split('=', 1)
            try:
                value = ast.literal_eval(raw)
            except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
                value = raw
            if isinstance(g.get(key), str) and not isinstance(value, str):
                value = raw  # --out_dir=2024, --start=42: text, not a number
            g[key] = check_and_convert(key, value, g, known, arg)
            print(f"config: {key} = {g[key]!r}", file=sys.stderr)
    return {k: g[k] for k in sorted(known)}
