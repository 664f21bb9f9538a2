"""The command-line flags of a :class:`~experiments.config.Config`, derived from its fields; no JAX.

Every field has one flag, its name with dashes (``batch_size`` -> ``--batch-size``; a
tuple field takes the singular, ``ema_decays`` -> ``--ema-decay``; a switch is turned on
by ``--<name>`` and off by ``--no-<name>``, argparse's ``BooleanOptionalAction``). Type,
range, default and help come from the field's metadata (:func:`experiments.config.option`),
so ``train_rul``, ``sweep``, ``claims`` and ``window_check`` share one definition of each
flag. A command that sets some fields itself (``sweep``: the decays, from ``--models`` and
``--seeds`` the model and seed) leaves them out of its :class:`ConfigFlags`; one with other
defaults (``sweep`` probes flatness by default) names them.

:meth:`ConfigFlags.argv` is the inverse of parsing: the flags that give a config, those
that differ from the command's defaults, so the command a report prints to reproduce a
run is derived from the stored config, not written a second time.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from types import MappingProxyType
from typing import Any

from experiments.config import Config, Kind

FIELDS: Mapping[str, Field[Any]] = MappingProxyType({f.name: f for f in fields(Config)})


def _kind(f: Field[Any]) -> Kind:
    kind: Kind = f.metadata["kind"]
    return kind


def _is_switch(f: Field[Any]) -> bool:
    return _kind(f).type is bool


def flag_name(f: Field[Any]) -> str:
    """``--batch-size``, ``--ema-decay`` (tuple fields: singular), ``--progress`` (a switch,
    whose ``--no-progress`` turns it off)."""
    name = f.name.removesuffix("s") if f.metadata["nargs"] else f.name
    return "--" + name.replace("_", "-")


def _negated(flag: str) -> str:
    return "--no-" + flag.removeprefix("--")


def _text(value: Any) -> str:
    """A value as a command-line word that parses back to it: ``0.001``, ``1e-05``, ``40``."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def _shown_default(value: Any) -> str:
    if value is None:  # the help text says what None means
        return ""
    if isinstance(value, bool):
        return f" (default: {'on' if value else 'off'})"
    if isinstance(value, tuple):
        return f" (default: {' '.join(map(_text, value)) or 'none'})"
    return f" (default: {_text(value)})"


@dataclass(frozen=True)
class ConfigFlags:
    """The :class:`Config` fields that one command sets from its command line (``names``,
    in field order), with that command's ``defaults`` where they differ from Config's."""

    names: tuple[str, ...] = tuple(FIELDS)
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted((set(self.names) | set(self.defaults)) - set(FIELDS))
        if unknown:
            raise ValueError(f"not fields of Config: {unknown}")

    def without(self, *names: str) -> ConfigFlags:
        """These flags less the fields ``names`` (a command that sets them itself)."""
        return ConfigFlags(tuple(n for n in self.names if n not in names), self.defaults)

    def default(self, name: str) -> Any:
        """The value field ``name`` takes when its flag is not given."""
        return self.defaults.get(name, FIELDS[name].default)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add one flag per field to ``parser``; each value lands in ``args.<field name>``."""
        for name in self.names:
            f = FIELDS[name]
            parser.add_argument(flag_name(f), dest=name, **self._argparse_options(f))

    def _argparse_options(self, f: Field[Any]) -> dict[str, Any]:
        kind, default = _kind(f), self.default(f.name)
        help = f.metadata["help"].replace("%", "%%")
        if _is_switch(f):  # one switch per field, also for each item of a tuple (`each`)
            on = all(default) if isinstance(default, tuple) else bool(default)
            return {
                "action": argparse.BooleanOptionalAction,
                "default": on,
                "help": help + _shown_default(on),
            }
        options: dict[str, Any] = {
            "type": kind.parse,
            "default": default,
            "metavar": flag_name(f)[2:].replace("-", "_").upper(),
            "help": help + _shown_default(default),
        }
        if kind.choices:
            options.update(choices=kind.choices, metavar=None)
        if f.metadata["nargs"]:
            options["nargs"] = f.metadata["nargs"]
        return options

    def config(self, args: argparse.Namespace, **fixed: Any) -> Config:
        """The :class:`Config` of parsed ``args`` (``fixed`` wins: fields the command sets
        itself); fields neither names take their defaults. Raises ``ValueError`` for
        combinations no single flag can reject (``--lr-drop-epoch`` with ``--cosine``)."""
        values = {name: getattr(args, name) for name in self.names}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        values.update(fixed)
        for name in self.names:
            each = FIELDS[name].metadata["each"]
            if each and name not in fixed:  # one switch for every item of `each`
                values[name] = (values[name],) * len(values.get(each, self.default(each)))
        return Config(**values)

    def parse(
        self, parser: argparse.ArgumentParser, argv: Sequence[str] | None, **fixed: Any
    ) -> tuple[argparse.Namespace, Config]:
        """``parser.parse_args(argv)`` and its :meth:`config`; an invalid combination, or a
        ``--data-dir`` whose files are missing or malformed (read once here to check them),
        is an argparse error (usage and one line naming the flag, exit status 2), like an
        invalid value."""
        args = parser.parse_args(argv)
        try:
            cfg = self.config(args, **fixed)
        except ValueError as error:
            parser.error(str(error))
        if cfg.data_dir is not None:  # a missing or malformed file: one line, not a traceback
            from experiments.cmapss_files import DataFileError, read_subset

            try:
                read_subset(cfg.data_dir, cfg.subset)
            except (FileNotFoundError, DataFileError) as error:
                parser.error(f"argument --data-dir: {error}")
        return args, cfg

    def argv(self, cfg: Config) -> list[str]:
        """The flags that make :meth:`parse` return ``cfg`` (with the same ``fixed``):
        those of the fields whose value differs from this command's default."""
        words: list[str] = []
        for name in self.names:
            value, default = getattr(cfg, name), self.default(name)
            if FIELDS[name].metadata["each"]:  # one switch for all items: compare the set
                value, default = tuple(sorted(set(value))), tuple(sorted(set(default)))
            if value != default:
                words += _words(FIELDS[name], getattr(cfg, name))
        return words


def _words(f: Field[Any], value: Any) -> list[str]:
    """The flag of field ``f`` and the words that give it ``value``."""
    flag = flag_name(f)
    if f.metadata["each"]:
        if value and all(value):
            return [flag]
        if not any(value):
            return [_negated(flag)]
        raise ValueError(
            f"{f.name}={value!r}: {flag} / {_negated(flag)} turn on all or none, not some"
        )
    if _is_switch(f):
        return [flag if value else _negated(flag)]
    if f.metadata["nargs"]:
        return [flag, *map(_text, value)]
    return [flag, _text(value)]
