"""Declared, typed hyperparameters for learners, mergers and benchmarks.

A component is a dataclass: its fields are its hyperparameters (name, type, default), so the CLI can
list them, check ``key=value`` overrides against them and record them in the results.

Ranges are declared in the field's type with ``annotated_types`` constraints (pydantic's vocabulary),
e.g. ``lr: Optional[PositiveFloat]``; every float must be finite. ``build`` checks type, range and
finiteness of each given value before any object is created, and reports the first violation as one
line (exit code 2 on the CLI).
"""

from __future__ import annotations

import dataclasses
import typing
import math
from typing import Annotated, Any, ClassVar, Dict, Literal, Optional, Union, get_args, get_origin

import annotated_types as at

from .errors import UserError

# declared ranges, used as field types (``steps: Optional[PositiveInt] = None``)
PositiveInt = Annotated[int, at.Ge(1)]
NonNegativeInt = Annotated[int, at.Ge(0)]
PositiveFloat = Annotated[float, at.Gt(0)]
NonNegativeFloat = Annotated[float, at.Ge(0)]
UnitInterval = Annotated[float, at.Interval(ge=0, le=1)]  # [0, 1]
OpenUnitInterval = Annotated[float, at.Interval(gt=0, le=1)]  # (0, 1]


@dataclasses.dataclass
class Component:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    @classmethod
    def hyperparameters(cls) -> Dict[str, Any]:
        """Field name -> resolved type annotation."""
        hints = typing.get_type_hints(cls, include_extras=True)  # keeps the declared ranges
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
        return out

    @classmethod
    def build(cls, values: Dict[str, Any], where: str = ""):
        """Instantiate from already-typed or textual values, checking every key and type."""
        hints = cls.hyperparameters()
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                known = ", ".join(sorted(hints)) or "none"
                raise UserError(f"unknown hyperparameter '{key}' for {where or cls.name}; known: {known}")
            kwargs[key] = coerce(value, hints[key], f"{where or cls.name}.{key}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise UserError(f"invalid hyperparameters for {where or cls.name}: {exc}") from exc

    def config(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert ``value`` (often a CLI string) to ``annotation`` or raise a one-line UserError."""
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *constraints = get_args(annotation)
        out = coerce(value, inner, key)
        check_constraints(out, constraints, key)
        return out
    if origin is Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null"}):
            if type(None) in get_args(annotation):
                return None
        errors = []
        for arg in args:
            try:
                return coerce(value, arg, key)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if len(errors) == 1 else f"{key}: cannot read {value!r} as {annotation}")
    if origin is Literal:
        choices = get_args(annotation)
        if value in choices:
            return value
        text = str(value)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise UserError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise UserError(f"{key} must be true or false; got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise UserError(f"{key} must be an integer; got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise UserError(f"{key} must be an integer; got {value!r}") from None
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(float(value), key)
        try:
            number = float(str(value))
        except ValueError:
            raise UserError(f"{key} must be a number; got {value!r}") from None
        return _finite(number, key)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{key} must be a string; got {value!r}")
    if origin in (tuple, list):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
        (item_type, *_rest) = get_args(annotation) or (str,)
        return origin(coerce(v, item_type, key) for v in items)
    return value


def _finite(number: float, key: str) -> float:
    if not math.isfinite(number):
        raise UserError(f"{key} must be a finite number; got {number}")
    return number


_BOUNDS = ((at.Gt, "gt", ">", lambda v, b: v > b), (at.Ge, "ge", ">=", lambda v, b: v >= b),
           (at.Lt, "lt", "<", lambda v, b: v < b), (at.Le, "le", "<=", lambda v, b: v <= b))


def check_constraints(value: Any, constraints, key: str) -> None:
    """Check ``value`` against annotated_types bounds (Gt/Ge/Lt/Le, and Interval, which groups them)."""
    for c in constraints:
        parts = list(c) if isinstance(c, at.GroupedMetadata) else [c]
        for part in parts:
            for kind, attr, symbol, ok in _BOUNDS:
                if isinstance(part, kind) and not ok(value, getattr(part, attr)):
                    want = _interval(c) if isinstance(c, at.Interval) else f"{symbol} {getattr(part, attr)}"
                    raise UserError(f"{key} must be {want}; got {value!r}")


def _interval(c: "at.Interval") -> str:
    lo = f"({c.gt}" if c.gt is not None else (f"[{c.ge}" if c.ge is not None else "(-inf")
    hi = f"{c.lt})" if c.lt is not None else (f"{c.le}]" if c.le is not None else "inf)")
    return f"in {lo}, {hi}"


OptionalFloat = Optional[float]
