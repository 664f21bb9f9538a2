"""What one training run is: :class:`Config`, its checks, and the models it can name; no JAX.

Each field of :class:`Config` carries, as metadata, the :class:`Kind` of value it holds
and a help text. The kind checks values given in Python (``Config(epochs=0)`` raises a
``ValueError``) and reads them from a command line (:mod:`experiments.cli` derives every
flag from the fields), so an option's name, default, range and help are written once.

This module imports neither JAX nor Flax: reports (``sweep --report-only``) read and
describe stored configurations without them.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import numpy as np

# The models a run can name: name -> (class in experiments.models, its keyword arguments).
# Kept here, as data, so that a configuration is checked without importing Flax.
MODEL_SPECS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType(
    {
        "dcnn": ("DCNN", {}),
        "dcnn_li": ("DCNN", {"layer_norm": False}),  # Li et al. (2018) as published
        "dcnn_wide": ("DCNN", {"layer_norm": False, "filters": 20}),  # 2x the filters
        "cnn_attn": ("CNNAttention", {}),
        "gru": ("RNN", {}),
        "lstm": ("RNN", {"cell": "lstm"}),
        "cnn_gru": ("CNNGRU", {}),
        "cnn_gru_bn": ("CNNGRU", {"batch_norm": True}),  # the BatchNorm study's
    }
)


SUBSETS: tuple[str, ...] = ("FD001", "FD002", "FD003", "FD004")
"""The four C-MAPSS subsets."""


@dataclass(frozen=True)
class Kind:
    """A kind of option value: its type, the condition it meets, and the phrase that
    completes "must be" in error messages (``"an integer >= 1"``).

    :meth:`check` tests a Python value (a ``ValueError`` naming the option);
    :meth:`parse` reads a command-line word (an argparse error, which argparse prefixes
    with the flag), so both say the same thing about the same values.
    """

    type: type
    holds: Callable[[Any], bool]
    expected: str
    choices: tuple[str, ...] | None = None

    def accepts(self, value: object) -> bool:
        """Whether ``value`` has this kind's type (a bool is no number) and meets its
        condition."""
        if self.type is bool:
            typed = isinstance(value, bool)
        elif isinstance(value, bool):
            typed = False
        elif self.type is int:
            typed = isinstance(value, int | np.integer)
        elif self.type is float:
            typed = isinstance(value, int | float | np.integer | np.floating)
        else:
            typed = isinstance(value, self.type)
        return typed and bool(self.holds(value))

    def check(self, name: str, value: object) -> None:
        """Raise a ``ValueError`` naming ``name`` unless :meth:`accepts` ``value``."""
        if not self.accepts(value):
            raise ValueError(f"{name} must be {self.expected}, got {value!r}")

    def parse(self, text: str) -> Any:
        """The value of a command-line word (an argparse ``type=``)."""
        try:
            value = self.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.expected}, got {text!r}") from None
        if not self.holds(value):
            raise argparse.ArgumentTypeError(f"must be {self.expected}, got {text!r}")
        return value


def one_of(names: Mapping[str, Any] | tuple[str, ...]) -> Kind:
    """The kind of a name among ``names``."""
    choices = tuple(sorted(names))
    return Kind(str, lambda v: v in choices, f"one of {list(choices)}", choices=choices)


COUNT = Kind(int, lambda v: v >= 1, "an integer >= 1")
INDEX = Kind(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE = Kind(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = Kind(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
FRACTION = Kind(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
FACTOR = Kind(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
TEXT = Kind(str, lambda v: True, "a string")
SWITCH = Kind(bool, lambda v: True, "True or False")
MODEL = one_of(MODEL_SPECS)
VALIDATION_METRICS: tuple[str, ...] = ("loss", "mse")
"""What a run validates each epoch (``experiments.training.Scoring.metrics``): the history
records ``val_<metric>`` and ``val_<metric>_ema``."""
_METRIC = "|".join(VALIDATION_METRICS)
MONITOR = Kind(
    str,
    lambda v: (
        v in ("best_ema", "train_loss")
        or re.fullmatch(rf"val_({_METRIC})(_ema\[\d+\])?", v) is not None
    ),
    "best_ema, train_loss, val_<metric> or val_<metric>_ema[i] (average i of --ema-decay), "
    f"<metric> one of {', '.join(VALIDATION_METRICS)}",
)


def option(
    default: Any,
    help: str,
    kind: Kind,
    *,
    nargs: str | None = None,
    each: str | None = None,
    label: str | None = None,
) -> Any:
    """A :class:`Config` field and what its flag needs to know.

    ``nargs``: the flag takes several values (the field is a tuple). ``each``: a tuple of
    switches set by one flag for every item of the field named ``each``. ``label``: the
    field is a data option that report headings name when it is not the default.
    """
    metadata = {"help": help, "kind": kind, "nargs": nargs, "each": each, "label": label}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Config:
    """One training run. ``ema_decays[i]`` is debiased iff ``ema_debias[i]``."""

    data_dir: str | None = option(
        None, "directory with NASA's C-MAPSS files (default: synthetic)", TEXT
    )
    subset: str = option("FD001", "the C-MAPSS subset", one_of(SUBSETS))
    model: str = option("cnn_attn", "the model (experiments/models.py)", MODEL)
    epochs: int = option(30, "training epochs", COUNT)
    batch_size: int = option(256, "training mini-batch size", COUNT)
    lr: float = option(1e-3, "Adam(W) learning rate", POSITIVE)
    weight_decay: float = option(0.0, "AdamW weight decay", NON_NEGATIVE)
    cosine: bool = option(False, "cosine learning-rate decay to 0", SWITCH)
    lr_drop_epoch: int = option(
        0,
        "multiply the learning rate by --lr-drop-factor from this epoch on (0: never; "
        "Li et al. 2018 used 200 of 250)",
        INDEX,
    )
    lr_drop_factor: float = option(0.1, "the factor of --lr-drop-epoch", FACTOR)
    ema_decays: tuple[float, ...] = option(
        (0.999,), "one or more decays β in [0, 1), all kept in the same run", FRACTION, nargs="+"
    )
    ema_debias: tuple[bool, ...] = option(
        (True,),
        "bias-correct every average (ema_jax.ema's debias=True: exact from the first step, "
        "so a run shorter than the 1/(1-β)-step window gets the mean of its steps); "
        "--no-ema-debias: plain averages, which start at the initial weights",
        SWITCH,
        each="ema_decays",
    )
    bema: bool = option(
        False,
        "average with BEMA (ema_jax.bema, TRL's defaults: the EMA with its lag corrected) "
        "instead of the --ema-decay averages",
        SWITCH,
    )
    bema_start_step: int = option(
        0,
        "with --bema: the burn-in, the optimizer step whose params are BEMA's θ0 (0: the "
        "initial params, TRL's default)",
        INDEX,
    )
    switch_ema: bool = option(
        False,
        "Switch EMA (Li et al. 2024): at the end of every --switch-every-th epoch, after its "
        "validation, the params become the first average's (ema_jax.train_with_ema's "
        "switch_every)",
        SWITCH,
    )
    switch_every: int = option(1, "with --switch-ema: switch every this many epochs", COUNT)
    seed: int = option(
        0, "seed of the initialisation, dropout, data order and validation split", INDEX
    )
    refit_all: bool = option(
        False,
        "train on ALL training engines (no validation split) for --epochs, a choice made "
        "beforehand on validation; per-epoch columns then monitor training windows and the "
        "'best' rule is the last epoch",
        SWITCH,
    )
    window: int = option(30, "cycles per input window", COUNT, label="window")
    max_rul: float = option(
        125.0,
        "cap of the piecewise-linear RUL target, also applied to the test labels",
        POSITIVE,
        label="cap",
    )
    smooth: float = option(
        0.0,
        "causal exponential smoothing of each engine's scaled sensors, "
        "s_t = a*s_(t-1) + (1-a)*x_t with a = SMOOTH in [0, 1) (0: none)",
        FRACTION,
        label="smoothing",
    )
    members: int = option(
        1,
        "train a deep ensemble of this many independently initialised copies of the model "
        "in one run and predict their mean (1: a single model)",
        COUNT,
        label="members",
    )
    min_prefix: int = option(
        0,
        "also train on the front-padded windows that end at cycles MIN_PREFIX .. WINDOW-1 "
        "of each training engine, as short test engines are padded (0: none)",
        INDEX,
        label="prefixes from cycle",
    )
    cycle_feature: bool = option(
        False,
        "add each row's cycle count (min-max scaled on the training engines) as a feature",
        SWITCH,
        label="cycle feature",
    )
    early_stopping: int | None = option(
        None,
        "stop when the monitored value has not improved for this many epochs (Keras's "
        "rule, ema_jax.EarlyStopping); each --monitor gets its own stopper on the same run, "
        "which ends when all have stopped, and the test split is read once for each one's "
        "best weights (rule 'early') (default: off)",
        INDEX,
    )
    monitors: tuple[str, ...] = option(
        ("best_ema",),
        "what --early-stopping watches: val_loss (raw weights), val_loss_ema[i] (average i), "
        "best_ema (each epoch the best average's val_loss), or any other per-epoch value",
        MONITOR,
        nargs="+",
    )
    perturb: tuple[float, ...] = option(
        (),
        "relative weight-noise sizes for the flatness probe (e.g. 0.01 0.02 0.05)",
        POSITIVE,
        nargs="*",
    )
    perturb_draws: int = option(4, "noise draws per size in the flatness probe", COUNT)
    progress: bool = option(True, "show a progress bar and a line per epoch", SWITCH)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind: Kind = f.metadata["kind"]
            if isinstance(f.default, tuple):
                for item in value:
                    kind.check(f.name, item)
            elif not (value is None and f.default is None):
                kind.check(f.name, value)
        if not self.ema_decays:
            raise ValueError("ema_decays must hold at least one decay in [0, 1)")
        for decay in self.ema_decays:  # the params are float32 (ema_jax would refuse it)
            if np.float32(decay) == 1.0:
                raise ValueError(
                    f"ema_decays (--ema-decay): {decay!r} rounds to 1.0 in float32, the "
                    "params' dtype, and an average with decay 1 never moves: use at most "
                    "0.99999994"
                )
        if len(self.ema_debias) != len(self.ema_decays):
            raise ValueError(
                f"ema_debias needs one bool per decay ({len(self.ema_decays)}), "
                f"got {len(self.ema_debias)}"
            )
        if self.early_stopping is not None and self.refit_all:
            raise ValueError("early_stopping needs validation engines: not with refit_all")
        for monitor in self.monitors:
            index = re.search(r"\[(\d+)\]$", monitor)
            if index and int(index[1]) >= len(self.ema_decays):
                raise ValueError(
                    f"monitors: {monitor!r} names average {index[1]}, but there are "
                    f"{len(self.ema_decays)} (--ema-decay)"
                )
        if self.lr_drop_epoch and self.cosine:
            raise ValueError("lr_drop_epoch and cosine are exclusive schedules: pick one")
        if self.switch_every != 1 and not self.switch_ema:
            raise ValueError("switch_every (--switch-every) is Switch EMA's: add --switch-ema")
        if self.bema_start_step and not self.bema:
            raise ValueError("bema_start_step (--bema-start-step) is BEMA's burn-in: add --bema")

    @classmethod
    def from_json(cls, stored: Mapping[str, Any]) -> Config:
        """The config that ``asdict`` stored as JSON (tuples read back as lists); a setting
        added after the run was stored takes its default, which is what the run used."""
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()
        }
        return cls(**values)

    @property
    def variants(self) -> list[str]:
        """``["raw", "ema0.999", "ema0.999-debiased", ...]`` in the order of the decays;
        ``["raw", "bema"]`` with ``bema``."""
        if self.bema:
            return ["raw", "bema"]
        return ["raw"] + [
            variant_name(d, b) for d, b in zip(self.ema_decays, self.ema_debias, strict=True)
        ]

    def preprocessing(self) -> dict[str, Any]:
        """The keyword arguments of :func:`experiments.cmapss.prepare` that this run sets."""
        names = ("window", "max_rul", "smooth", "min_prefix", "cycle_feature")
        return {name: getattr(self, name) for name in names}

    def data_description(self) -> str:
        """``", window 40, cap 130, members 5"``: the labelled data options that differ
        from the defaults (empty for the defaults)."""
        parts = []
        for f in fields(self):
            label, value = f.metadata["label"], getattr(self, f.name)
            if label is not None and value != f.default:
                parts.append(label if isinstance(value, bool) else f"{label} {value:g}")
        return "".join(f", {part}" for part in parts)


def variant_name(decay: float, debias: bool) -> str:
    """``"ema0.999"``, or ``"ema0.999-debiased"``: the name of one average in reports."""
    return f"ema{decay:g}" + ("-debiased" if debias else "")
