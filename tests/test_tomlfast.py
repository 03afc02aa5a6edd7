"""activator.tomlfast: equal to tomllib or declining, never a wrong dict; and the fast path serves our configs."""

import glob
import os
import random
import sys

import pytest

from activator import config, tomlfast

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - depends on the interpreter
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.toml"), recursive=True))
# Shipped configs that use something outside the subset (inline tables and [[x]] arrays of tables).
DECLINED_CONFIGS = {"multi.toml"}


def same(a, b):
    """Equal with the same types all the way down (True == 1 for ==, not here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def check(text):
    """The contract for one document; returns "fast", "declined" (tomllib accepts) or "error"."""
    fast = tomlfast.loads(text)
    try:
        reference = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        assert fast is None, f"accepted a document tomllib rejects: {text!r} -> {fast!r}"
        return "error"
    if fast is None:
        return "declined"
    assert same(fast, reference), f"{text!r}: {fast!r} != tomllib's {reference!r}"
    return "fast"


def bench_document(units=1000):
    return "".join(f'[u{i:04d}]\nsocket.listen-stream = "127.0.0.1:{20000 + i}"\nservice.exec-start = ["true"]\n'
                   for i in range(1, units + 1))


# -- the random documents: the supported grammar and its near misses ---------------------------------------

KEYS = ["a", "b", "c", "x-y", "_", "1", "true", "A9"]
BAD_KEYS = ['"a"', "'a'", '""', "a b", "a.", ".a", "a..b", "é", "a$", "[a]", "a=b"]
WS = ["", "", "", " ", "  ", "\t", " \t"]
GOOD_INTS = ["0", "-0", "+0", "7", "-12", "+3", "1_000", "1_2_3", "123456789012345678901234567890", "-9_9"]
BAD_NUMBERS = ["01", "-01", "1__0", "_1", "1_", "+_1", "0x1F", "0o7", "0b1", "1.5", "1e3", "-1.0", "inf", "nan",
               "+inf", "1979-05-27", "07:32:00", "1979-05-27T07:32:00Z", "00", "1_000_", "--1", "+-1", "0_0"]
GOOD_WORDS = ["true", "false"]
BAD_WORDS = ["True", "FALSE", "truex", "tru", "yes", "null", "x"]
STRING_CHARS = ["a", "z", " ", "\t", "#", ",", "]", "[", "=", ".", "é", "日", "'", '"', "\\", "\\n", "\x01", "\x7f",
                "\x1f", "\r", "\ufeff"]


def gen_chars(rng, quote):
    chars = []
    for _ in range(rng.randrange(6)):
        c = rng.choice(STRING_CHARS) if rng.random() < 0.15 else rng.choice("abc xyz-_.:/")
        if c == quote and rng.random() < 0.8:
            continue  # mostly well-formed strings, sometimes one ended early
        chars.append(c)
    return "".join(chars)


def gen_scalar(rng):
    r = rng.random()
    if r < 0.33:
        return '"' + gen_chars(rng, '"') + '"'
    if r < 0.48:
        return "'" + gen_chars(rng, "'") + "'"
    if r < 0.7:
        return rng.choice(GOOD_INTS)
    if r < 0.86:
        return rng.choice(GOOD_WORDS)
    if r < 0.94:
        return rng.choice(BAD_NUMBERS)
    if r < 0.96:
        return rng.choice(BAD_WORDS)
    return rng.choice(['"abc', "'abc", '"""x"""', "'''x'''", '"a"b"', "{ a = 1 }", "{}", "[[1]]", '"\\u00e9"',
                       '""', "''", "1 2", '"a" "b"'])


def gen_value(rng):
    if rng.random() < 0.75:
        return gen_scalar(rng)
    items = [gen_scalar(rng) if rng.random() < 0.9 else rng.choice(["[]", "[1]", "{}"]) for _ in range(rng.randrange(4))]
    seps = [rng.choice(WS) + rng.choice([","] * 12 + ["", ",,"]) + rng.choice(WS) for _ in items]
    body = "".join(item + sep for item, sep in zip(items, seps))
    if items and rng.random() < 0.6:
        body = body.rstrip(", \t") if rng.random() < 0.7 else body
    if rng.random() < 0.05:
        body = ","
    if rng.random() < 0.04:
        body += "\n"  # a multi-line array
    return "[" + rng.choice(WS) + body + rng.choice(WS) + ("]" if rng.random() < 0.97 else "")


def gen_key(rng, parts=None):
    n = parts or rng.choice([1, 1, 1, 2, 2, 3])
    keys = [rng.choice(KEYS) if rng.random() < 0.97 else rng.choice(BAD_KEYS) for _ in range(n)]
    return "".join((rng.choice(WS) + "." + rng.choice(WS) if i else "") + k for i, k in enumerate(keys))


def gen_tail(rng):
    r = rng.random()
    if r < 0.75:
        return rng.choice(WS)
    if r < 0.96:
        return rng.choice(WS) + "#" + gen_chars(rng, None)
    return rng.choice([" x", " 1", ",", "]", " =", " = 1", "\x00", "\x7f", " #\x7f", "#\x1b[0m"])


def gen_line(rng):
    r = rng.random()
    indent = rng.choice(WS)
    if r < 0.1:
        return indent + rng.choice(["", "#", "# a comment", "#\t'\"é", "#\x01"])
    if r < 0.35:
        key = gen_key(rng, rng.choice([1, 1, 2, 2, 3]))
        if rng.random() < 0.03:
            return indent + "[[" + key + "]]" + gen_tail(rng)
        if rng.random() < 0.02:
            return indent + rng.choice(["[]", "[ ]", "[a", "a]", "[a]]", "[[a]"]) + gen_tail(rng)
        return indent + "[" + rng.choice(WS) + key + rng.choice(WS) + "]" + gen_tail(rng)
    return indent + gen_key(rng) + rng.choice(WS) + ("=" if rng.random() < 0.98 else rng.choice(["", "==", ":"])) \
        + rng.choice(WS) + gen_value(rng) + gen_tail(rng)


def gen_document(rng):
    ends = ["\n"] * 30 + ["\r\n"] * 8 + ["\r", "\n\n", "\r\r\n"]
    lines = [gen_line(rng) for _ in range(rng.randrange(1, 8))]
    text = "".join(line + rng.choice(ends) for line in lines)
    if rng.random() < 0.3:
        text = text.rstrip("\r\n")  # no line end at the end of the document
    return text


def test_differential_random_documents():
    """tomlfast against tomllib on 40,000 random documents; the counts show that each outcome is exercised."""
    rng = random.Random(20261202)
    outcomes = {"fast": 0, "declined": 0, "error": 0}
    for _ in range(40000):
        outcomes[check(gen_document(rng))] += 1
    # The fast path takes a good share; near misses are both declined (tomllib accepts) and errors.
    assert outcomes["fast"] > 4000, outcomes
    assert outcomes["declined"] > 4000, outcomes
    assert outcomes["error"] > 15000, outcomes


def test_differential_unit_shaped_documents():
    """Documents made only of the supported grammar in unit-file shape: mostly served by the fast path."""
    rng = random.Random(7)
    served = 0
    for _ in range(1500):
        lines = []
        for u in range(rng.randrange(1, 4)):
            lines.append(f"[{rng.choice(['u', 'v', 'w'])}{u}{rng.choice(['', '.socket', '.service'])}]")
            for _ in range(rng.randrange(4)):
                key = rng.choice(["socket", "service", "x"]) + rng.choice(["", ".a", ".b", ".c-d"])
                value = rng.choice(['"s"', "'l'", "1", "-2", "true", "false", '["a", 1, true]', "[]", '["x",]'])
                lines.append(f"{key} = {value}{rng.choice(['', ' # c'])}")
        if check("\n".join(lines) + "\n") == "fast":
            served += 1
    assert served > 300


@pytest.mark.parametrize("text", [
    "", "\n", "# only a comment", "a = 1", "a = 1\r\n", "[a]\r\nb = 'x'\r\n", "a=1#c", "[a]#c\nb=true#c",
    "[ a . b ]\n c . d = 1", "a = [ ]", "a = [1,]", "a = [ 'x' , \"y\" , 0 , true , ]", "a = ['\"', \"'\"]",
    "a = '\\\\'", "a = \"é\"", "a = \"#\" # #", "a = \"\t\"", "a = +0", "a = -0", "a = 1_000",
    "[a]\nb.c = 1\nb.d = 2", "[a.b]\n[a.c]", "x = 1\n[a]\nx = 2", "[a]\n[b]\n", "a = 'x'\n\n\n",
    "a = \"\"", "a = ''", "a = [\"\"]", "a = 123456789012345678901234567890", "a = '# not a comment'",
    "[a]\n b = 1\n\t[c]\n\td = 2", "1 = 1", "true = false", "a-b_c = 1",
])
def test_served(text):
    assert tomlfast.loads(text) is not None
    assert check(text) == "fast"


@pytest.mark.parametrize("text", [
    # legal TOML outside the subset, or legal only in some orders: declined, tomllib parses them
    "a.b = 1", "[a]\n[a.b]", "[a.b]\n[a]", '"a" = 1', "'a' = 1", "[\"a\"]", "a = 1.5", "a = 1e3", "a = inf",
    "a = 0x1F", "a = 0o7", "a = 0b1", "a = 1979-05-27", "a = 07:32:00", "a = { b = 1 }", "[[a]]", "a = \"\"\"x\"\"\"",
    "a = '''x'''", "a = \"\\n\"", "a = [[1]]", "a = [\n1]", "a = [1, # c\n]", "a = \"\\\\\"",
    "a = " + "9" * 200,
    # errors: declined, and tomllib says why
    "a = 1\na = 2", "[a]\n[a]", "[a]\nb = 1\nb = 2", "[a]\nb = 1\nb.c = 2", "[a]\nb.c = 1\nb = 2", "a = 1\n[a]",
    "a = 1\n[a.b]", "[a]\nb.c = 1\n[a.b]", "a = 01", "a = 1__0", "a = _1", "a = 1_", "a = ", "a", "= 1", "a = 1 2",
    "a = [1 2]", "a = [,]", "a = [1,,]", "a = \"abc", "a = 'abc", "a = \"x\x01\"", "a = 'x\x7f'", "a = 1 # \x01",
    "# \x7f", "a = 1\r", "a = 1\rb = 2", "[a", "[a]]", "[]", "a. = 1", "a .. b = 1", "a = True", "a = truex",
    "a = 1 x", "\ufeffa = 1", "a\u00a0= 1", "a = [1]]", "a = \"a\"\"b\"",
])
def test_declined(text):
    assert tomlfast.loads(text) is None
    check(text)


def test_never_raises_on_odd_input():
    for text in ["\x00", "[" * 10000, "a = " + "[" * 10000, "a = \ud800", "#\ud800", None, b"a = 1", 12]:
        assert tomlfast.loads(text) is None or check(text) == "fast"  # type: ignore[arg-type]


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_shipped_configs(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    outcome = check(text)
    if os.path.basename(path) in DECLINED_CONFIGS:
        assert outcome == "declined"
    else:
        assert outcome == "fast", "a shipped config left to tomllib"


def test_benchmark_document_served():
    text = bench_document()
    assert len(text.splitlines()) == 3000
    assert check(text) == "fast"
    assert check(text.replace("\n", "\r\n")) == "fast"


def test_load_units_same_as_tomllib(tmp_path, monkeypatch):
    path = tmp_path / "units.toml"
    path.write_text(bench_document() + '[extra]\nsocket.listen-stream = ["127.0.0.1:7007", "127.0.0.1:7008"]\n'
                    'socket.accept = true\nsocket.max-connections = 32\nservice.exec-start = "cat"\n'
                    'service.standard-input = "socket"\n')
    calls = []
    real = tomlfast.loads
    monkeypatch.setattr(tomlfast, "loads", lambda text: calls.append(1) or real(text))
    fast = config.load_units([str(path)])
    assert calls and len(fast) == 1001
    monkeypatch.setattr(tomlfast, "loads", lambda text: None)  # every document to tomllib
    assert config.load_units([str(path)]) == fast


def test_errors_still_come_from_tomllib(tmp_path):
    path = tmp_path / "units.toml"
    path.write_text('[a]\nsocket.listen-stream = "127.0.0.1:1"\n[a]\n')
    with pytest.raises(config.ConfigError) as info:
        config.load_units([str(path)])
    assert "TOML syntax error: line 3" in str(info.value)
