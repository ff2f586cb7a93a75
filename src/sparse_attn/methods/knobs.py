"""Declared types and ranges of method knobs: one :class:`KnobSpec` per knob, checked when a method
is built (construction, :func:`~sparse_attn.methods.get_method`, ``dataclasses.replace``, assignment
and every ``per_layer`` override).

A spec is a kind (``"float"``, ``"int"``, ``"bool"``, ``"choice"`` or ``"path"``) with a range or a
set of choices (a path knob takes None or a file path, whose contents the method checks); ``per_head``
specs also take a non-empty list of values (one per query head or per KV group), each checked on its
own. Numbers never accept booleans, floats never accept NaN, ints never
accept floats. A failed check raises :class:`KnobError` (a ``ValueError``) naming the owner (the
method), the knob, the value and what is allowed, e.g. ``xattention: threshold=2 is outside (0, 1]``.

Count knobs (:meth:`KnobSpec.count`: key columns, diagonals, key blocks, tokens) follow one rule for
every method: an int is an absolute count, a float in (0, 1) a share of what the call has of that
unit (its key length, or its key blocks), turned into a count per call by :func:`resolve_count`
(rounded to the nearest count, at least 1). So ``vertical_size=0.008`` keeps the same share of the
key columns at every length, where ``vertical_size=1000`` keeps 1000 columns whatever the length.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["KnobError", "KnobSpec", "min_count", "resolve_count"]

KINDS = ("float", "int", "bool", "choice", "path")


class KnobError(ValueError):
    """A knob (or a setting) outside its declared type or range. ``owner`` is who owns the knob
    (a method's name, ``"SparseConfig"``), ``detail`` the rest of the message."""

    def __init__(self, message: str, *, owner: Optional[str] = None, detail: Optional[str] = None):
        super().__init__(message)
        self.owner = owner
        self.detail = message if detail is None else detail


def _number(x) -> str:
    return repr(int(x)) if isinstance(x, float) and x.is_integer() and abs(x) < 1e15 else repr(x)


@dataclass(frozen=True)
class KnobSpec:
    """The declared type and range of one knob.

    * ``kind``: ``"float"`` (an int or a float, not a bool, not NaN), ``"int"`` (an int, not a bool),
      ``"bool"`` (True or False), ``"choice"`` (one of ``choices``) or ``"path"`` (None or a file
      path: a non-empty str or ``os.PathLike``; the method checks the file).
    * ``low`` / ``high``: bounds of a number (None: unbounded), excluded where ``low_open`` /
      ``high_open``.
    * ``per_head``: a non-empty list or tuple of such values is accepted too (checked element-wise).
    * ``share_of`` (``"int"`` only; a count knob, see :meth:`count`): a float in (0, 1) is accepted
      too, as a share of ``share_of`` (e.g. ``"the key length"``), resolved per call by
      :func:`resolve_count`.
    * ``indices_of`` (an index knob, see :meth:`indices`): an int >= 0 or a list of distinct ones,
      possibly empty, each an index of ``indices_of`` (e.g. ``"KV head"``).
    """

    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    per_head: bool = False
    share_of: Optional[str] = None
    indices_of: Optional[str] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"KnobSpec kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "choice") != bool(self.choices):
            raise ValueError("KnobSpec: choices go with kind='choice' (and only with it)")
        if self.share_of is not None and self.kind != "int":
            raise ValueError("KnobSpec: share_of goes with kind='int' (a count knob)")
        if self.indices_of is not None and (self.kind != "int" or not self.per_head):
            raise ValueError("KnobSpec: indices_of goes with kind='int' and per_head (an index knob)")

    # -- constructors for the common cases -------------------------------------------------------
    @classmethod
    def fraction(cls, per_head: bool = True) -> "KnobSpec":
        """A share of probability mass in (0, 1]."""
        return cls("float", 0.0, 1.0, low_open=True, per_head=per_head)

    @classmethod
    def integer(cls, low: Optional[int] = None, high: Optional[int] = None, per_head: bool = False) -> "KnobSpec":
        return cls("int", low, high, per_head=per_head)

    @classmethod
    def count(cls, low: int = 0, share_of: str = "the key length", per_head: bool = False) -> "KnobSpec":
        """A count (an int ``>= low``) or a share of ``share_of`` (a float in (0, 1))."""
        return cls("int", low, per_head=per_head, share_of=share_of)

    @classmethod
    def indices(cls, of: str = "KV head") -> "KnobSpec":
        """Indices (ints >= 0) of ``of``: one int, or a list of distinct ones, possibly empty."""
        return cls("int", 0, per_head=True, indices_of=of)

    @classmethod
    def real(cls, low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
             high_open: bool = False, per_head: bool = False) -> "KnobSpec":
        return cls("float", low, high, low_open=low_open, high_open=high_open, per_head=per_head)

    @classmethod
    def boolean(cls) -> "KnobSpec":
        return cls("bool")

    @classmethod
    def choice(cls, *choices) -> "KnobSpec":
        return cls("choice", choices=tuple(choices))

    @classmethod
    def path(cls) -> "KnobSpec":
        """None or the path of a file (a non-empty str or ``os.PathLike``)."""
        return cls("path")

    # -- text ------------------------------------------------------------------------------------
    def range_text(self) -> str:
        """The allowed values alone: ``(0, 1]``, ``>= 1``, ``one of 'kv', 'head'``, ``True or False``."""
        if self.kind == "bool":
            return "True or False"
        if self.kind == "path":
            return "None or a file path (a non-empty str)"
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.share_of is not None:
            return f"{self._bounds_text()}, or a share in (0, 1)"
        return self._bounds_text()

    def _bounds_text(self) -> str:
        if self.low is not None and self.high is not None:
            return (f"{'(' if self.low_open else '['}{_number(self.low)}, "
                    f"{_number(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return "any value"

    def describe(self) -> str:
        """What is allowed, in words (for messages and documentation)."""
        what = {"float": "a number", "int": "an int"}.get(self.kind)
        if self.indices_of is not None:
            return f"a {self.indices_of} index (an int {self.range_text()}) or a list of distinct ones, possibly empty"
        if self.share_of is not None:
            text = f"an int {self.range_text()} (a float is a share of {self.share_of})"
        elif what is None:
            text = self.range_text()
        elif self.low is None and self.high is None:
            text = what
        elif self.low is not None and self.high is not None:
            text = f"{what} in {self.range_text()}"
        else:
            text = f"{what} {self.range_text()}"
        return text + (" (or a list of them, one per head)" if self.per_head else "")

    # -- checking --------------------------------------------------------------------------------
    def check(self, owner: str, name: str, value: Any) -> None:
        """Raise :class:`KnobError` unless ``value`` fits; ``owner`` and ``name`` go in the message."""
        if self.per_head and isinstance(value, (list, tuple)):
            if not value and self.indices_of is None:
                self._fail(owner, name, value, f"is empty; expected {self.describe()}")
            for i, item in enumerate(value):
                self._check_one(owner, f"{name}[{i}]", item)
            if self.indices_of is not None and len(set(value)) != len(value):
                self._fail(owner, name, value, f"names a {self.indices_of} twice; expected {self.describe()}")
            return
        self._check_one(owner, name, value)

    def _fail(self, owner: str, name: str, value: Any, problem: str):
        detail = f"{name}={value!r} {problem}"
        raise KnobError(f"{owner}: {detail}", owner=owner, detail=detail)

    def _check_one(self, owner: str, name: str, value: Any) -> None:
        if self.kind == "bool":
            if not isinstance(value, bool):
                self._fail(owner, name, value, "is not a bool (True or False)")
            return
        if self.kind == "path":
            if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value)):
                self._fail(owner, name, value, f"is not {self.range_text()}")
            return
        if self.kind == "choice":
            if isinstance(value, bool) or not _hashable(value) or value not in self.choices:
                self._fail(owner, name, value, f"is not {self.range_text()}")
            return
        expected = self.describe()
        if isinstance(value, bool):
            self._fail(owner, name, value, f"is a bool, not a number; expected {expected}")
        if self.share_of is not None and isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
            if math.isnan(value):
                self._fail(owner, name, value, f"is not a number; expected {expected}")
            if not 0.0 < value < 1.0:
                self._fail(owner, name, value, f"is not {self.range_text()}: a float is a share of "
                           f"{self.share_of}, in (0, 1); a count is an int")
            return
        if self.kind == "int" and not isinstance(value, numbers.Integral):
            self._fail(owner, name, value, f"is not an int; expected {expected}")
        if not isinstance(value, numbers.Real):
            self._fail(owner, name, value, f"is not a number; expected {expected}")
        if math.isnan(value):
            self._fail(owner, name, value, f"is not a number; expected {expected}")
        low_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        high_bad = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if low_bad or high_bad:
            if self.low is not None and self.high is not None:
                self._fail(owner, name, value, f"is outside {self.range_text()}")
            self._fail(owner, name, value, f"is not {self.range_text()}")


def resolve_count(value, total: int):
    """A count knob's value for a call with ``total`` of its unit (keys, diagonals, key blocks): an
    int as it is, a float share in (0, 1) as ``round(share * total)``, at least 1; a per-head list
    entry by entry."""
    if isinstance(value, (list, tuple)):
        return [resolve_count(v, total) for v in value]
    if isinstance(value, numbers.Integral):
        return int(value)
    return max(1, int(round(float(value) * total)))


def min_count(value) -> int:
    """The smallest entry of a resolved count knob (an int or a per-head list)."""
    return int(min(value)) if isinstance(value, (list, tuple)) else int(value)


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


class CheckedOnAssignment:
    """Mixin for a validated dataclass: once ``__post_init__`` has run ``validate()`` and called
    ``_start_checking()``, assigning one of ``checked_fields()`` runs ``validate()`` again; a refused
    value is rolled back, so the object never holds a value it would not accept at construction."""

    def validate(self):  # pragma: no cover - implemented by the subclass
        raise NotImplementedError

    def checked_fields(self):  # pragma: no cover - implemented by the subclass
        raise NotImplementedError

    def _start_checking(self) -> None:
        object.__setattr__(self, "_checked", True)

    def __setattr__(self, name, value):
        if not self.__dict__.get("_checked") or name not in self.checked_fields():
            object.__setattr__(self, name, value)
            return
        old = getattr(self, name)
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except Exception:
            object.__setattr__(self, name, old)
            raise
