"""Command-line flags shared by train.py, tiny_sd.py and sample.py: nanoGPT's --key=value typed by each default, and
the checks that turn a bad value into one line naming the flag and its limit, before any work starts.

    parse_flags(argv, defaults, extra=None)   --key=value -> {key: value of the default's type}
    check_ranges(values, RANGES)              every numeric flag against its valid range, e.g. ">= 1", "(0, 1]"
    writable_dir(path, flag)                  create the output folder if needed and prove it writable
"""
import ast
import math
import re
import tempfile
from pathlib import Path

_INTERVAL = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])")  # "[0, 1)", "(0, 1]", ...
_BOUND = re.compile(r"(>=|>|<=|<)\s*(\S+)")                                  # ">= 1", "> 0", ...


def parse_bool(s):
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"not a boolean: {s!r}")


def parse_flags(argv, defaults, extra=None):
    """--key=value -> {key: value}, each converted to its default's type (booleans: True/False/1/0/yes/no; a default
    of None takes a Python literal). Keys not in defaults go into `extra` as Python literals (or bare strings) when it
    is a dict, else they are an error that lists the keys there are."""
    values = {}
    for arg in argv:
        key, eq, val = arg[2:].partition("=")
        if not arg.startswith("--") or not eq:
            raise SystemExit(f"error: expected --key=value, got {arg!r}")
        if key not in defaults:
            if extra is None:
                raise SystemExit(f"error: unknown flag --{key}; the flags are --{', --'.join(defaults)}")
            try:
                extra[key] = ast.literal_eval(val)
            except (ValueError, SyntaxError):
                extra[key] = val  # a bare string
            continue
        default = defaults[key]
        try:
            if isinstance(default, bool):
                values[key] = parse_bool(val)
            elif default is None:
                values[key] = ast.literal_eval(val)
            else:
                values[key] = type(default)(val)
        except (ValueError, SyntaxError):
            kind = "a Python literal" if default is None else type(default).__name__
            raise SystemExit(f"error: --{key} expects {kind}, got {val!r}")
    return values


def in_range(x, rule):
    """Whether the number x satisfies rule: ">= a", "> a", "<= a", "< a", or an interval "[a, b]", "(a, b]", ...
    NaN and infinities are never in range."""
    if not math.isfinite(x):
        return False
    if m := _INTERVAL.fullmatch(rule.strip()):
        lo, hi = float(m[2]), float(m[3])
        return (x >= lo if m[1] == "[" else x > lo) and (x <= hi if m[4] == "]" else x < hi)
    if m := _BOUND.fullmatch(rule.strip()):
        b = float(m[2])
        return {">=": x >= b, ">": x > b, "<=": x <= b, "<": x < b}[m[1]]
    raise ValueError(f"not a range rule: {rule!r}")


def check_ranges(values, ranges):
    """Exit with one line at the first value out of its range. ranges: {flag: rule} (see in_range); a flag missing
    from values is not checked. Integers are ints already (parse_flags); this checks their limits."""
    for flag, rule in ranges.items():
        if flag in values and not in_range(values[flag], rule):
            limit = rule.strip() if rule.strip()[0] in "<>" else f"in {rule.strip()}"
            raise SystemExit(f"error: --{flag}={values[flag]}: must be {limit}")


def writable_dir(path, flag):
    """Create the folder `path` (and its parents) if needed and write a scratch file in it: a run that could not
    save its results stops here, with one line, rather than after the work."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
    except OSError as e:
        raise SystemExit(f"error: --{flag}={path}: cannot write there ({e.strerror or e})")
    return p
