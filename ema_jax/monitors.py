"""What early stopping watches in ``train_with_ema``'s history: three small frozen types.

* :class:`Raw` — a value of the raw params: ``Raw()`` is their validation loss (history key
  ``val_loss``), ``Raw("val_mae")`` another metric, ``Raw("train_loss")`` the epoch's mean
  training loss.
* :class:`Average` — one average's value: ``Average()`` the first (the only one for a single
  decay; ``index=None`` means the first too), ``Average(1)`` average 1 of K, ``Average(
  metric="val_mae")`` another metric (history key ``<metric>_ema``).
* :class:`BestAverage` — each epoch, the best of the K averages (by the stopper's ``mode``),
  and that average's weights; the loop records its value and index in the history
  (:attr:`BestAverage.key`, ``<key>_index``).

``metric`` is always the raw params' history key (``val_<name>`` for each metric of
``metric_fn``, or ``train_loss``); an average's key adds ``_ema``. The monitors are hashable
and equal by value, so they key ``TrainResult.stopping``.

The strings of earlier versions stay accepted by ``train_with_ema`` with their meaning
unchanged (a history key, ``"<key>[i]"`` for average ``i``, ``"best_ema"``); :func:`parse`
turns one into its type. A string names a history key exactly, so ``"val_loss_ema"`` (the
default monitor) is refused when the state keeps K > 1 averages, whose values form a list:
name one (``Average(i)``, ``"val_loss_ema[i]"``) or ``BestAverage()``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ema_jax import _checks

Layout = Mapping[str, int | None]
"""One epoch's history record by key: the length K of a list over averages, or ``None`` for
a number (what ``ema_jax.steps.evaluate_dataset_layout`` returns, plus ``train_loss``)."""

EMA_SUFFIX = "_ema"


def _metric(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"metric must be a history key such as 'val_loss', got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Raw:
    """The raw params' ``metric`` (a history key: ``val_loss``, ``val_<name>``,
    ``train_loss``); early stopping keeps the raw weights."""

    metric: str = "val_loss"

    def __post_init__(self) -> None:
        _metric(self.metric)


@dataclasses.dataclass(frozen=True)
class Average:
    """Average ``index``'s ``metric`` (history key ``<metric>_ema``, item ``index`` for K
    decays); early stopping keeps that average's weights. ``index=None`` is ``0``."""

    index: int = 0
    metric: str = "val_loss"

    def __post_init__(self) -> None:
        index = 0 if self.index is None else _checks.integer("index", self.index, 0)
        object.__setattr__(self, "index", index)
        _metric(self.metric)


@dataclasses.dataclass(frozen=True)
class BestAverage:
    """Each epoch, the best (by the stopper's ``mode``; NaNs last) of the averages'
    ``metric``, and that average's weights."""

    metric: str = "val_loss"

    def __post_init__(self) -> None:
        _metric(self.metric)

    @property
    def key(self) -> str:
        """The history key of the chosen value (``best_ema`` for ``val_loss``, else
        ``best_<metric>_ema``); ``<key>_index`` holds the chosen average's index."""
        return "best_ema" if self.metric == "val_loss" else f"best_{self.metric}{EMA_SUFFIX}"


Monitor = Raw | Average | BestAverage
"""A typed monitor: :class:`Raw`, :class:`Average` or :class:`BestAverage`."""

_INDEXED = re.compile(r"(?P<key>.+)\[(?P<index>\d+)\]")


def parse(text: str) -> Monitor:
    """The typed monitor of one of the strings ``train_with_ema`` has always accepted:
    ``"best_ema"`` -> ``BestAverage()``; ``"<key>_ema[i]"`` and ``"<key>_ema"`` ->
    ``Average(i or 0, "<key>")``; any other history key -> ``Raw(key)``.

    Syntax only: whether the key exists, and whether an unindexed ``_ema`` key names one
    value, depends on the run (``train_with_ema`` checks both before training).
    """
    if not isinstance(text, str):
        raise TypeError(f"a monitor string must be a str, got {text!r}")
    if text == "best_ema":
        return BestAverage()
    match = _INDEXED.fullmatch(text)
    key, index = (match["key"], int(match["index"])) if match else (text, None)
    if key.endswith(EMA_SUFFIX) and len(key) > len(EMA_SUFFIX):
        return Average(index or 0, key[: -len(EMA_SUFFIX)])
    if index is not None:
        raise ValueError(
            f"monitor={text!r}: only an average's key ('<key>_ema[i]') takes an index; "
            f"{key!r} is a number"
        )
    return Raw(key)


def resolve(monitor: Any, layout: Layout) -> Monitor:
    """``monitor`` (a typed monitor or a string) as a typed monitor, checked against one
    epoch's record ``layout``: a ``ValueError`` naming the choices when it does not name
    one value of it, a ``TypeError`` when it is no monitor."""
    given = monitor
    if isinstance(monitor, str):
        _check_string(monitor, layout)
        monitor = parse(monitor)  # and checked as its type: "best_ema" needs val_loss_ema
    if not isinstance(monitor, (Raw, Average, BestAverage)):
        raise TypeError(
            "monitor must be an ema_jax.monitors.Raw / Average / BestAverage, a history key "
            f"string, or a sequence of them, got {monitor!r}"
        )
    if isinstance(monitor, Raw):
        key, is_average = monitor.metric, _is_average_key(monitor.metric, layout)
        if key in layout and (is_average or layout[key] is not None):
            raise ValueError(
                f"monitor={given!r}: {key} is the averages' value: use "
                f"Average(metric={key[: -len(EMA_SUFFIX)]!r}) or BestAverage(...)"
            )
    else:
        key = monitor.metric + EMA_SUFFIX
    if key not in layout:
        raise ValueError(
            f"monitor={given!r} reads history key {key!r}, which this run does not record; "
            f"it records {_describe(layout)}"
        )
    count = layout[key] or 1
    if isinstance(monitor, Average) and monitor.index >= count:
        raise ValueError(
            f"monitor={given!r} names average {monitor.index}, but the state keeps "
            f"{count} average{'s' if count > 1 else ''} (indices 0..{count - 1})"
        )
    return monitor


def resolve_all(monitor: Any, layout: Layout) -> tuple[Monitor, ...]:
    """:func:`resolve` of one monitor or of each of a sequence; a repeat is an error."""
    given = (monitor,) if isinstance(monitor, (str, Raw, Average, BestAverage)) else monitor
    if not isinstance(given, Sequence) or not given:
        raise TypeError(
            "monitor must be a monitor (ema_jax.monitors.Raw / Average / BestAverage, or a "
            f"history key string) or a non-empty sequence of them, got {monitor!r}"
        )
    resolved = tuple(resolve(m, layout) for m in given)
    for i, m in enumerate(resolved):
        if m in resolved[:i]:
            raise ValueError(
                f"monitor lists {m!r} twice (as {given[resolved.index(m)]!r} and "
                f"{given[i]!r}): each monitor runs one stopper"
            )
    return resolved


def measure(monitor: Monitor, record: Mapping[str, Any], mode: str) -> tuple[float, int | None]:
    """``(value, ema_index)`` of ``monitor`` in one epoch's ``record``: ``ema_index`` is the
    average whose weights the value measures, ``None`` for the raw params."""
    if isinstance(monitor, Raw):
        return float(record[monitor.metric]), None
    value = record[monitor.metric + EMA_SUFFIX]
    values = value if isinstance(value, list) else [value]
    if isinstance(monitor, Average):
        return float(values[monitor.index]), monitor.index
    finite = [i for i, v in enumerate(values) if not math.isnan(v)] or [0]
    best = (min if mode == "min" else max)(finite, key=lambda i: values[i])
    return float(values[best]), best


def _is_average_key(key: str, layout: Layout) -> bool:
    return key.endswith(EMA_SUFFIX) and key[: -len(EMA_SUFFIX)] in layout


def _check_string(text: str, layout: Layout) -> None:
    """A string names one value of the history exactly as before the types: a key holding
    a number, ``"<key>[i]"`` for item ``i`` of a list, or ``"best_ema"``."""
    if text == "best_ema":
        return
    match = _INDEXED.fullmatch(text)
    key, index = (match["key"], int(match["index"])) if match else (text, None)
    choices = ", ".join(_names(layout))
    if key not in layout:
        raise ValueError(f"monitor={text!r} is not a monitored value; choose from {choices}")
    count = layout[key]
    names_one = index is None if count is None else index is not None and index < count
    if not names_one:
        raise ValueError(
            f"monitor={text!r} does not name one value of this history ({key} is "
            f"{'a list of ' + str(count) if count is not None else 'a number'}); "
            f"choose from {choices}"
        )


def _names(layout: Layout) -> list[str]:
    names = ["best_ema"] if "val_loss" + EMA_SUFFIX in layout else []
    for key, count in layout.items():
        names += [f"{key}[{i}]" for i in range(count)] if count is not None else [key]
    return names


def _describe(layout: Layout) -> str:
    return ", ".join(
        key if count is None else f"{key} (a list of {count})" for key, count in layout.items()
    )


__all__ = ["Average", "BestAverage", "Monitor", "Raw", "parse"]
