"""Configuration: every flag and TOML key reaches its config field, and every mistake is a one-line error naming it.

Proves: each flag of photon-peer parses (and the same key in a TOML file gives the same value); precedence is
built-in default < TOML < flag; unknown tables and keys are ConfigErrors with a "did you mean" suggestion; values of
the wrong type are refused with the key named; cross-field validation names the flag to fix (e.g. --micro-batch-size
must divide --batch-size); a bad flag value on the command line is one ``error:`` line, not a usage dump; build_config
reports exactly the keys the user set; RunConfig survives the dict round trip a checkpoint stores.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from photon_p2p.cli.peer import build_parser, parse_config
from photon_p2p.config import SECTIONS, RunConfig, Section, TrainConfig, _field_types, build_config, load_toml
from photon_p2p.errors import ConfigError

# values that satisfy each field's validation (the generic choice below would not)
SAMPLES: dict[str, typing.Any] = {
    "model.preset": "micro",
    "model.seq_len": 32,
    "data.tokenizer": "tok.json",
    "data.val_fraction": 0.1,
    "data.partition": "1/3",
    "train.lr": 0.003,
    "train.alpha_f": 0.5,
    "train.weight_decay": 0.05,
    "train.grad_clip": 0.5,
    "train.micro_batch_size": 4,
    "train.device": "cpu",
    "round.outer_lr": 0.5,
    "round.outer_momentum": 0.5,
    "round.target_group_size": 4,
    "swarm.run_id": "my-run",
    "log.log_level": "debug",
    "checkpoint.dir": "ckpt",
}
# flags that are only valid together with others
CONTEXT = {"checkpoint.resume": ["--checkpoint-dir", "ckpt"], "checkpoint.fresh": ["--checkpoint-dir", "ckpt"]}


def all_fields() -> list[tuple[type[Section], dataclasses.Field]]:
    return [(cls, f) for cls in SECTIONS for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def sample(cls: type[Section], f: dataclasses.Field) -> typing.Any:
    """A valid value different from the default."""
    key = f"{cls.SECTION}.{f.name}"
    if key in SAMPLES:
        return SAMPLES[key]
    tp = _field_types(cls)[f.name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if typing.get_origin(tp) in (typing.Union, type(int | None)) else tp
    default = f.default if f.default is not dataclasses.MISSING else None
    if base is bool:
        return not default
    if typing.get_origin(base) is typing.Literal:
        return next(c for c in reversed(typing.get_args(base)) if c != default)
    if typing.get_origin(base) is list:
        return ["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2"]
    if base is int:
        return default + 2 if default is not None else 64
    if base is float:
        return default / 2 if default else 2.5
    if base is str:
        return "something"
    raise AssertionError(f"no sample value for {key} of type {tp}")


def as_flags(cls: type[Section], f: dataclasses.Field, value: typing.Any) -> list[str]:
    flag = cls.flag_of(f.name)
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, list):
        return [flag, *value]
    return [flag, str(value)]


def as_toml(value: typing.Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(as_toml(v) for v in value) + "]"
    return repr(value)


@pytest.mark.parametrize(("cls", "f"), all_fields(), ids=lambda x: getattr(x, "name", getattr(x, "SECTION", "?")))
def test_every_flag_and_toml_key_sets_its_field(tmp_path, cls, f):
    value = sample(cls, f)
    extra = CONTEXT.get(f"{cls.SECTION}.{f.name}", [])
    cfg, explicit = parse_config(as_flags(cls, f, value) + extra)
    assert getattr(getattr(cfg, cls.SECTION), f.name) == value
    assert f"{cls.SECTION}.{f.name}" in explicit

    toml = tmp_path / "run.toml"
    lines = [f"[{cls.SECTION}]", f"{f.name} = {as_toml(value)}"]
    if extra:
        lines += ["[checkpoint]", 'dir = "ckpt"'] if cls.SECTION != "checkpoint" else ['dir = "ckpt"']
    toml.write_text("\n".join(lines) + "\n")
    cfg, _ = parse_config(["--config", str(toml)])
    assert getattr(getattr(cfg, cls.SECTION), f.name) == value


def test_every_flag_has_help():
    help_text = build_parser().format_help()
    for cls, f in all_fields():
        assert cls.flag_of(f.name) in help_text
        assert len(f.metadata["help"]) > 10, f"{cls.SECTION}.{f.name} needs a real help text"


def test_defaults_without_flags():
    cfg, explicit = parse_config([])
    assert cfg == RunConfig()
    assert explicit == set()
    assert cfg.train.micro_batch == cfg.train.batch_size
    assert cfg.train.warmup == cfg.train.max_steps // 10


def test_toml_overrides_defaults_and_flags_override_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[model]\npreset = "micro"\n[train]\nmax_steps = 50\nlr = 3e-3\nbatch-size = 8\n'
        '[data]\npaths = ["a.txt", "b.txt"]\n'
    )
    cfg, explicit = parse_config(["--config", str(toml), "--lr", "0.01", "--data", "c.txt"])
    assert cfg.model.preset == "micro"  # TOML over the default
    assert cfg.train.max_steps == 50
    assert cfg.train.batch_size == 8  # dashes are accepted in TOML keys
    assert cfg.train.lr == 0.01  # flag over TOML
    assert cfg.data.paths == ["c.txt"]
    assert cfg.train.weight_decay == TrainConfig().weight_decay  # untouched: the default
    assert explicit == {"model.preset", "train.max_steps", "train.lr", "train.batch_size", "data.paths"}


def test_toml_ints_are_accepted_for_floats(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nalpha_f = 1\n")
    cfg, _ = parse_config(["--config", str(toml)])
    assert cfg.train.alpha_f == 1.0 and isinstance(cfg.train.alpha_f, float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[trian]\nlr = 0.1\n", "unknown table [trian] (did you mean 'train'?)"),
        ("[train]\nmax_step = 3\n", "unknown key 'train.max_step' (did you mean 'max_steps'?)"),
        ("[model]\nzzz = 3\n", "unknown key 'model.zzz' (known: "),
        ("lr = 0.1\n", "unknown table [lr]"),
        ("train = 3\n", "'train' must be a table"),
    ],
)
def test_unknown_toml_tables_and_keys(tmp_path, text, expected):
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(toml)])
    assert expected in str(e.value)
    assert str(toml) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[train]\nmax_steps = "ten"\n', "train.max_steps = 'ten': expected an integer"),
        ("[train]\nmax_steps = 2.5\n", "train.max_steps = 2.5: expected an integer"),
        ("[train]\nmax_steps = true\n", "train.max_steps = True: expected an integer"),
        ("[train]\nlr = true\n", "train.lr = True: expected a number"),
        ('[train]\nlr = "fast"\n', "train.lr = 'fast': expected a number"),
        ("[log]\nprogress = 1\n", "log.progress = 1: expected true or false"),
        ('[train]\ninner_optimizer = "sgd"\n', "train.inner_optimizer = 'sgd': choose one of adamw, adamw8bit"),
        ("[data]\npaths = 3\n", "data.paths = 3: expected a list"),
        ("[data]\npaths = [1, 2]\n", "data.paths = 1: expected a string"),
        ("[model]\nseq_len = 4\n", "--seq-len (TOML model.seq_len) = 4: must be at least 8"),
    ],
)
def test_wrong_types_in_toml(tmp_path, text, expected):
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(toml)])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_unreadable_toml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as e:
        load_toml(bad)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--batch-size", "6", "--micro-batch-size", "4"],
            "--micro-batch-size (TOML train.micro_batch_size) = 4: must divide --batch-size (6)",
        ),
        (["--micro-batch-size", "32"], "--micro-batch-size (TOML train.micro_batch_size) = 32: must divide"),
        (["--lr", "2"], "--lr (TOML train.lr) = 2.0: must be in (0, 1)"),
        (["--max-steps", "0"], "--max-steps (TOML train.max_steps) = 0: must be at least 1"),
        (["--val-fraction", "0.7"], "--val-fraction (TOML data.val_fraction) = 0.7: must be in (0, 0.5)"),
        (["--data-partition", "3/3"], "--data-partition (TOML data.partition) = '3/3': use K/N"),
        (["--model", "huge"], "--model (TOML model.preset) = 'huge': unknown preset"),
        (["--device", "tpu"], "--device (TOML train.device) = 'tpu': choose auto, cpu, cuda or cuda:N"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints (TOML checkpoint.keep) = 0: must be at least 1"),
        (["--resume"], "--resume needs --checkpoint-dir"),
        (["--fresh"], "--fresh needs --checkpoint-dir"),
        (["--resume", "--fresh", "--checkpoint-dir", "x"], "--resume and --fresh contradict each other"),
        (["--local-only", "--initial-peers", "/ip4/1.2.3.4/tcp/1"], "--local-only and --initial-peers contradict"),
        (["--target-group-size", "2", "--min-group-size", "3"], "must not exceed --target-group-size (2)"),
        (["--run-id", "a b"], "--run-id (TOML swarm.run_id) = 'a b'"),
    ],
)
def test_validation_names_the_flag(argv, expected):
    with pytest.raises(ConfigError) as e:
        parse_config(argv)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_validation_applies_to_toml_values_too(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nbatch_size = 6\nmicro_batch_size = 4\n")
    with pytest.raises(ConfigError, match=r"--micro-batch-size \(TOML train.micro_batch_size\) = 4: must divide"):
        parse_config(["--config", str(toml)])
    # ... and a flag can repair what the file got wrong
    cfg, _ = parse_config(["--config", str(toml), "--micro-batch-size", "3"])
    assert cfg.train.micro_batch == 3


@pytest.mark.parametrize(
    "argv", [["--batch-size", "x"], ["--lr", "fast"], ["--inner-optimizer", "sgd"], ["--no-such-flag"], ["--max-steps"]]
)
def test_bad_flag_is_one_error_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert argv[0] in err


def test_build_config_reports_only_what_was_set(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[round]\nlocal_steps = 7\n[swarm]\nrun_id = 'abc'\n")
    parser = argparse.ArgumentParser()
    from photon_p2p.config import add_section_arguments

    add_section_arguments(parser, SECTIONS)
    args = parser.parse_args(["--lr", "0.01", "--no-progress"])
    sections, explicit = build_config(args, SECTIONS, str(toml))
    assert explicit == {"round.local_steps", "swarm.run_id", "train.lr", "log.progress"}
    assert sections["round"].local_steps == 7 and sections["train"].lr == 0.01
    assert sections["log"].progress is False
    # a flag equal to the default is still explicit: the user asked for it
    _, explicit = build_config(parser.parse_args(["--max-steps", "300"]), SECTIONS, None)
    assert explicit == {"train.max_steps"}


def test_run_config_dict_round_trip():
    cfg, _ = parse_config(["--model", "micro", "--data", "a", "b", "--micro-batch-size", "4", "--outer-lr", "0.5"])
    again = RunConfig.from_dict(cfg.to_dict(), origin="checkpoint")
    assert again == cfg
    with pytest.raises(ConfigError, match="checkpoint: unknown key 'train.bogus'"):
        RunConfig.from_dict({"train": {"bogus": 1}}, origin="checkpoint")


@pytest.mark.parametrize(
    "module, argv",
    [
        ("peer", ["--bogus"]),
        ("bootstrap", ["--bogus"]),
        ("status", ["--run-id", "x"]),
        ("swarm", ["--bogus"]),
        ("export", ["--bogus"]),
        ("tokenizer", ["train", "--vocab-size", "many"]),
        ("plot", ["--bogus"]),
        ("generate", ["--bogus"]),
    ],
)
def test_every_cli_reports_a_bad_flag_in_one_line(capsys, module, argv):
    import importlib

    main = importlib.import_module(f"photon_p2p.cli.{module}").main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--help" in err, err
