"""Garbage in for flags and TOML configs (issue 16, point 7): hypothesis-generated argv and TOML files go through the
real parsing and config loading of every console script, in-process, and a few through real subprocesses.

Proves: whatever the input (known flags with values of the wrong type, huge numbers, NaN and infinities, odd unicode,
newlines and NUL bytes inside values, unknown flags and keys, shipped configs from peers/ and bootstrap/ mutated at
random, bytes that are not UTF-8), the result is either a parsed config or exit code 2 with exactly one
``error: ...`` line on stderr, never a traceback. Derandomized (the same examples every run) so CI is reproducible.
"""

from __future__ import annotations

import contextlib
import io
import math
import signal
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from photon_p2p.cli import bootstrap as bootstrap_cli
from photon_p2p.cli import common
from photon_p2p.cli import generate as generate_cli
from photon_p2p.cli import peer as peer_cli
from photon_p2p.cli import plot as plot_cli
from photon_p2p.cli import status as status_cli
from photon_p2p.cli import swarm as swarm_cli
from photon_p2p.config import SECTIONS, RunConfig

REPO = Path(__file__).resolve().parents[1]
PEER_TOMLS = sorted((REPO / "peers").glob("*.toml"))
BOOTSTRAP_TOMLS = sorted((REPO / "bootstrap").glob("*.toml"))
FUZZ = settings(
    max_examples=200,
    derandomize=True,
    deadline=5000,  # ms; parsing takes milliseconds, but two cores are shared with other test runs
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

# ------------------------------------------------------------------------------------------------------------
# what a run of a console script's parsing may end in


def outcome(fn: Callable[[], Any]) -> tuple[int, str, str]:
    """Run ``fn`` as the console scripts run their parsing (``run_main``: PhotonError -> one line, exit 2); returns
    (exit code, stdout, stderr). Anything else escaping (a traceback for the user) fails the test."""
    out, err = io.StringIO(), io.StringIO()
    previous = signal.getsignal(signal.SIGTERM)  # run_main installs its SIGTERM handler: give pytest its own back
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = common.run_main(lambda: (fn(), 0)[1])
            except SystemExit as e:  # argparse: --help/--version (0) and bad flags (2)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code, out.getvalue(), err.getvalue()


def assert_clean(code: int, stdout: str, stderr: str) -> None:
    """Accepted (0), or refused with exit 2 and exactly one ``error:`` line (that is all of stderr)."""
    assert "Traceback" not in stderr
    if code == 0:
        return
    assert code == common.EXIT_USER_ERROR, (code, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), repr(stderr)


# ------------------------------------------------------------------------------------------------------------
# strategies

# odd unicode: control characters, NUL, lone surrogates (what os.fsdecode makes of bytes that are not UTF-8),
# right-to-left marks, combining characters, emoji, full-width digits
odd_text = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(codec=None, categories=None), max_size=12),
    st.sampled_from(["", " ", "\n", "\x00", "\udcff", "\u202e", "e\u0301", "🚀", "１２", "-1", "--", "=", "0x10"]),
)
numbers_as_text = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "9" * 5000, "1_000", "0", "-0", "1e-320", "auto"]),
)
value_text = st.one_of(odd_text, numbers_as_text)


def flags_of(parser) -> list[str]:
    return sorted(s for s in parser._option_string_actions if s.startswith("--") and s not in ("--help", "--config"))


def argv_for(parser, must: list[str] = ()) -> st.SearchStrategy[list[str]]:
    """Known flags with random values (sometimes none, sometimes several, sometimes as --flag=value), and now and
    then an unknown flag or a bare word."""
    flag = st.sampled_from(flags_of(parser))
    item = st.one_of(
        st.tuples(flag, st.lists(value_text, max_size=3)).map(lambda t: [t[0], *t[1]]),
        st.tuples(flag, value_text).map(lambda t: [f"{t[0]}={t[1]}"]),
        odd_text.map(lambda s: ["--" + s]),
        odd_text.map(lambda s: [s]),
    )
    return st.lists(item, max_size=6).map(lambda items: list(must) + [a for it in items for a in it])


PEER_ARGV = argv_for(peer_cli.build_parser())
BOOT_ARGV = argv_for(bootstrap_cli.build_parser())
STATUS_ARGV = argv_for(status_cli.build_parser(), must=["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/Qm"])
SWARM_ARGV = argv_for(swarm_cli.build_parser()) | argv_for(peer_cli.build_parser(), must=["--peers", "2"])
GENERATE_ARGV = argv_for(generate_cli.build_parser())
PLOT_ARGV = argv_for(plot_cli.build_parser())


# TOML values of every type TOML has, the wrong ones included
scalar = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    # TOML's integers are 64-bit, but tomllib reads any size (and float() of a huge one raises OverflowError)
    st.sampled_from([0, -1, 1, 2**63 - 1, -(2**63), 2**63, 10**30, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    odd_text,
)
EDGE_NUMBERS = st.sampled_from(
    [0, -1, 2**63 - 1, 2**63, 10**30, -(10**400), 0.0, -0.0, 5e-324, 1e308, math.nan, math.inf, -math.inf]
)
toml_value = st.recursive(
    scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=2),
    max_leaves=5,
)


def toml_key(key: str) -> str:
    return '"' + _escape(key) + '"'


def _escape(s: str) -> str:
    out = []
    for ch in s:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF:
            # a lone surrogate is written as an escape TOML refuses: the file is then invalid TOML, also a case
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def toml_literal(v: Any) -> str:
    """Write one value as TOML (our own small writer: the project does not depend on a TOML writer)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return '"' + _escape(v) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_literal(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_literal(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def dump_toml(data: dict[str, Any]) -> str:
    lines = []
    for table, values in data.items():
        if isinstance(values, dict):
            lines.append(f"[{toml_key(table)}]")
            lines += [f"{toml_key(k)} = {toml_literal(v)}" for k, v in values.items()]
        else:  # a plain value where a table belongs
            lines.insert(0, f"{toml_key(table)} = {toml_literal(values)}")
    return "\n".join(lines) + "\n"


@st.composite
def mutated_config(draw, paths: list[Path]) -> bytes:
    """A shipped config, changed by a few random mutations (or, now and then, raw bytes)."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=200))
    data = tomllib.loads(draw(st.sampled_from(paths)).read_text())
    for _ in range(draw(st.integers(1, 4))):
        tables = list(data)
        kinds = ["retype", "retype", "edge", "edge", "unknown_key", "drop", "unknown_table", "flatten"]
        kind = draw(st.sampled_from(kinds))
        table = draw(st.sampled_from(tables)) if tables else None
        if table is None or not isinstance(data[table], dict):
            data[draw(odd_text) or "x"] = draw(toml_value)
            continue
        keys = list(data[table])
        if kind == "retype" and keys:
            data[table][draw(st.sampled_from(keys))] = draw(toml_value)
        elif kind == "edge" and keys:  # a number at the edges, in place of whatever the key held
            data[table][draw(st.sampled_from(keys))] = draw(EDGE_NUMBERS)
        elif kind == "unknown_key":
            data[table][draw(odd_text)] = draw(toml_value)
        elif kind == "drop" and keys:
            del data[table][draw(st.sampled_from(keys))]
        elif kind == "unknown_table":
            data[draw(odd_text)] = {draw(odd_text): draw(toml_value)}
        elif kind == "flatten":
            data[table] = draw(scalar)
    text = dump_toml(data)
    if draw(st.booleans()):  # also the flags' and TOML's spelling of a key: dashes for underscores
        text = text.replace("_", "-")
    return text.encode("utf-8", "surrogatepass")


# ------------------------------------------------------------------------------------------------------------
# the properties


@FUZZ
@given(argv=PEER_ARGV)
def test_photon_peer_flags(argv):
    assert_clean(*outcome(lambda: peer_cli.parse_config(argv)))


@FUZZ
@given(argv=BOOT_ARGV)
def test_photon_bootstrap_flags(argv):
    assert_clean(*outcome(lambda: bootstrap_cli.parse_config(argv)))


@FUZZ
@given(argv=STATUS_ARGV)
def test_photon_status_flags(argv):
    assert_clean(*outcome(lambda: status_cli.parse_options(argv)))


@FUZZ
@given(argv=SWARM_ARGV)
def test_photon_swarm_flags(argv):
    assert_clean(*outcome(lambda: swarm_cli.parse(argv)))


@settings(FUZZ, max_examples=100)
@given(argv=GENERATE_ARGV | PLOT_ARGV)
def test_photon_generate_and_plot_flags(argv):
    # their parsers alone: what follows parsing opens checkpoints and metrics files (tested in their own files)
    for parser in (generate_cli.build_parser(), plot_cli.build_parser()):
        assert_clean(*outcome(lambda p=parser: p.parse_args(argv)))


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="fuzz-") as d:
        yield Path(d)


@FUZZ
@given(content=mutated_config(PEER_TOMLS), extra=PEER_ARGV)
def test_photon_peer_toml(scratch, content, extra):
    path = scratch / "peer.toml"
    path.write_bytes(content)
    assert_clean(*outcome(lambda: peer_cli.parse_config(["--config", str(path), *extra[:4]])))


@FUZZ
@given(content=mutated_config(BOOTSTRAP_TOMLS))
def test_photon_bootstrap_toml(scratch, content):
    path = scratch / "bootstrap.toml"
    path.write_bytes(content)
    assert_clean(*outcome(lambda: bootstrap_cli.parse_config(["--config", str(path)])))


@FUZZ
@given(content=mutated_config(PEER_TOMLS))
def test_saved_run_config(content):
    """A checkpoint's saved config is read back with RunConfig.from_dict (--resume): the same one-line errors."""
    try:
        data = tomllib.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return
    assert_clean(*outcome(lambda: RunConfig.from_dict(data, origin="checkpoint")))


def test_the_strategies_reach_both_outcomes():
    """The properties above mean something only if the generated inputs are both accepted and refused: check one of
    each by hand, through the same helpers."""
    good = tomllib.loads(PEER_TOMLS[0].read_text())
    assert outcome(lambda: RunConfig.from_dict(good))[0] == 0
    assert [s.SECTION for s in SECTIONS]  # every section can be named in a file
    code, _, err = outcome(lambda: peer_cli.parse_config(["--lr", "nan"]))
    assert code == 2 and err.startswith("error: ") and "--lr" in err


# ------------------------------------------------------------------------------------------------------------
# the worst of the above through real processes


def test_real_processes_print_one_line(tmp_path):
    from tests.helpers.procs import console
    from tests.helpers.swarm import assert_one_line_error, run_cli_batch

    bad_utf8 = tmp_path / "bad.toml"
    bad_utf8.write_bytes(b"[train]\nmax_steps = \xff\xfe\n")
    huge = tmp_path / "huge.toml"
    huge.write_text("[train]\nmax_steps = 9223372036854775807\nlr = inf\n")
    newline_key = tmp_path / "newline.toml"
    newline_key.write_text('[swarm]\n"run\\nid" = "x"\n')
    boot = tmp_path / "boot.toml"
    boot.write_text("bootstrap = 5\n")
    cases = {
        "unknown_flag_with_newline": console("photon-peer") + ["--data", "x", "--no\nsuch"],
        "huge_int": console("photon-peer") + ["--data", "x", "--max-steps", "9" * 5000],
        "bad_utf8": console("photon-peer") + ["--config", str(bad_utf8)],
        "huge_toml": console("photon-peer") + ["--config", str(huge)],
        "newline_key": console("photon-peer") + ["--config", str(newline_key)],
        "boot_flat": console("photon-bootstrap") + ["--config", str(boot)],
        "status_nan": console("photon-status") + ["--initial-peers", "x", "--watch", "nan"],
    }
    results = run_cli_batch(cases, tmp_path / "runs")
    for name, result in results.items():
        assert result.returncode == 2, (name, result.stderr)
        assert_one_line_error(result)
