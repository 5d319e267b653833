"""How a config section is declared and read: ``opt()`` fields, the ``Section`` base, TOML type checks, and the
command-line flags built from the same declarations. config.py declares the sections themselves (see its docstring
for shared run settings); this module knows nothing about any particular section.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from photon_p2p.errors import ConfigError


@dataclass(frozen=True)
class Shared:
    """Marks a config field as a run setting: part of the run manifest, identical on every peer of a run."""

    ge: int | None = None  # lower bound a manifest from another peer must respect (checked when it is read)
    resolved: str | None = None  # share this property's value (never None) instead of the raw field
    implied_by: tuple[str, ...] = ()  # fields of the section whose explicit setting also pins this one's value


def opt(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    metavar: str | None = None,
    default_factory: Any = dataclasses.MISSING,
    cli: bool = True,
    shared: bool | Shared = False,
    none_as: str | None = None,
) -> Any:
    """A config field with its documentation; ``flag`` overrides the derived ``--field-name``; ``shared`` makes it
    a run setting (see the module docstring); ``none_as`` is the word (e.g. 'auto') that stands for None in flags
    and TOML, for an optional number whose default is chosen at run time."""
    metadata = dict(
        help=help,
        flag=flag,
        metavar=metavar,
        cli=cli,
        none_as=none_as,
        shared=Shared() if shared is True else shared or None,
    )
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class Section:
    """Base for component configs: flag naming, validation helpers, dict round trips."""

    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by components
        pass

    @classmethod
    def flag_of(cls, name: str) -> str:
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        return f.metadata.get("flag") or "--" + name.replace("_", "-")

    def fail(self, name: str, message: str) -> typing.NoReturn:
        """Raise a ConfigError that names both the flag and the TOML key of field ``name``."""
        value = getattr(self, name)
        raise ConfigError(f"{self.flag_of(name)} (TOML {self.SECTION}.{name}) = {value!r}: {message}")

    def require(self, name: str, ok: bool, message: str) -> None:
        if not ok:
            self.fail(name, message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def shared_fields(cls) -> dict[str, Shared]:
        """This section's run settings, in declaration order (the manifest's field order)."""
        return {f.name: f.metadata["shared"] for f in dataclasses.fields(cls) if f.metadata.get("shared")}

    @classmethod
    def shared_types(cls) -> dict[str, Any]:
        """The type of each run setting in the manifest: the field's, but never None where the value is resolved."""
        hints = _field_types(cls)
        return {
            name: _unwrap_optional(hints[name])[0] if spec.resolved else hints[name]
            for name, spec in cls.shared_fields().items()
        }

    def shared_values(self) -> dict[str, Any]:
        """The run settings as the manifest carries them: resolved where the field says so."""
        return {name: getattr(self, spec.resolved or name) for name, spec in self.shared_fields().items()}


# --------------------------------------------------------------------------------------------------------------
# TOML and type checking


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


# TOML's integers are 64-bit (tomllib reads any size): a bigger one could not travel in a manifest (msgpack) anyway
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


def _int_flag(text: str) -> int:
    """argparse type for integer flags: the same 64-bit range as TOML."""
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise ValueError(text)
    return value


_int_flag.__name__ = "int"  # argparse's message: "invalid int value: '...'"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check one TOML value against the field's type; ints are accepted for floats."""
    inner, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None
    origin = typing.get_origin(inner)
    if origin is Literal:
        if value not in typing.get_args(inner):
            choices = ", ".join(map(str, typing.get_args(inner)))
            raise ConfigError(f"{where} = {value!r}: choose one of {choices}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(inner)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r}: expected a list")
        return [_coerce(v, item_tp, where) for v in value]
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected true or false")
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r}: expected a number")
        if isinstance(value, int) and not INT_MIN <= value <= INT_MAX:
            raise ConfigError(f"{where} = {value}: out of range")  # float() of a huge int raises OverflowError
        return float(value)
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r}: expected an integer")
        if not INT_MIN <= value <= INT_MAX:
            raise ConfigError(f"{where} = {value}: out of range (at most {INT_MAX})")
        return value
    if inner is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}: expected a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # a bug in this file, not user input


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(options))})"


def check_nested(data: dict[str, Any], origin: str, sections: tuple[type[Section], ...]) -> dict[str, dict[str, Any]]:
    """Type-check nested dicts (a TOML file's tables, a saved config) against ``sections``; values still go through
    each section's validation when it is built."""
    by_name = {s.SECTION: s for s in sections}
    out: dict[str, dict[str, Any]] = {}
    for sec_name, values in data.items():
        if sec_name not in by_name:
            raise ConfigError(f"{origin}: unknown table [{sec_name}]{_suggest(sec_name, list(by_name))}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: '{sec_name}' must be a table ([{sec_name}])")
        cls = by_name[sec_name]
        types_ = _field_types(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        known = list(fields)
        checked = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{origin}: unknown key '{sec_name}.{key}'{_suggest(name, known)}")
            if value is not None and value == fields[name].metadata.get("none_as"):
                value = None  # e.g. micro_batch_size = "auto"
            checked[name] = _coerce(value, types_[name], f"{origin}: {sec_name}.{key}")
        out[sec_name] = checked
    return out


def load_toml(path: str | Path, sections: tuple[type[Section], ...]) -> dict[str, dict[str, Any]]:
    """Read and type-check a TOML config file (values are validated again when the configs are built)."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {p}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {p}: cannot read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {p}: not valid TOML ({e})") from None
    return check_nested(raw, str(p), sections)


# --------------------------------------------------------------------------------------------------------------
# command-line flags


def add_section_arguments(parser: argparse.ArgumentParser, sections: tuple[type[Section], ...]) -> None:
    """One argument group per component; every flag defaults to SUPPRESS so we know what the user set."""
    for cls in sections:
        # dataclasses invent a signature docstring for undocumented classes: show only real ones
        doc = cls.__doc__ if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else None
        doc = " ".join(doc.replace("``", "").split()) if doc else None
        group = parser.add_argument_group(f"{cls.SECTION} options", doc)
        types_ = _field_types(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True):
                continue
            flag = cls.flag_of(f.name)
            tp, _ = _unwrap_optional(types_[f.name])
            default = f.default if f.default is not dataclasses.MISSING else None
            help_ = f.metadata["help"]
            kwargs: dict[str, Any] = dict(dest=f"{cls.SECTION}.{f.name}", default=argparse.SUPPRESS)
            if tp is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
                help_ += f" (default: {'on' if default else 'off'})"
            else:
                origin = typing.get_origin(tp)
                if origin is list:
                    kwargs["nargs"] = "+"
                    tp = typing.get_args(tp)[0]
                elif default is not None:
                    help_ += f" (default: {default})"
                if origin is Literal:
                    kwargs["choices"] = typing.get_args(tp)
                    tp = str
                if tp is int:
                    tp = _int_flag
                if f.metadata.get("none_as"):
                    help_ += f" (default: {f.metadata['none_as']})" if default is None else ""
                    tp = _or_word(tp, f.metadata["none_as"])
                kwargs["type"] = tp
                kwargs["metavar"] = f.metadata.get("metavar")
            group.add_argument(flag, help=help_, **kwargs)


def _or_word(tp: Any, word: str) -> Any:
    """argparse type for a field whose None is spelled ``word`` on the command line."""

    def parse(text: str) -> Any:
        return None if text == word else tp(text)

    parse.__name__ = f"{tp.__name__} or '{word}'"  # argparse's message: "invalid int or 'auto' value: 'x'"
    return parse


def build_config(
    args: argparse.Namespace,
    sections: tuple[type[Section], ...],
    config_file: str | None,
) -> tuple[dict[str, Section], set[str]]:
    """Merge defaults < TOML < flags and build (and so validate) each component config.

    Also returns the ``section.name`` keys the user set explicitly (in the file or as flags): a swarm peer takes
    every other shared setting from the run manifest, but refuses to silently override what the user asked for.
    """
    merged = load_toml(config_file, sections) if config_file else {}
    for dest, value in vars(args).items():
        if "." in dest:
            sec, name = dest.split(".", 1)
            merged.setdefault(sec, {})[name] = value
    explicit = {f"{sec}.{name}" for sec, values in merged.items() for name in values}
    return {cls.SECTION: cls(**merged.get(cls.SECTION, {})) for cls in sections}, explicit
