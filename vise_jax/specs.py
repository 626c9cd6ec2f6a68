"""The one parser for the short spec strings configs carry, with one error format.

Command lines want flat strings (`--config.eval.exports='vise=DIR,random=DIR'`), so a few config
keys hold small lists and mappings. They are all read here, and every complaint reads the same:

  config.train.head_weights='a=x': 'x' is not a number (expected 'NAME=NUMBER,...')

`{workdir}` is not expanded here: configlib.with_workdir does that once for the whole config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from vise_jax.errors import InputError

T = TypeVar('T')


def spec_error(key: str, value: object, problem: str, expected: str) -> InputError:
    """The error every spec parser raises: the key, its value, what is wrong, the grammar."""
    return InputError(f'{key}={value!r}: {problem} (expected {expected!r})')


def split_items(value: str | Iterable[str]) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']; a tuple of such strings is flattened the same way.

    A tuple in a config file and 'a,b' from the command line (one string) mean the same list.
    """
    parts = [value] if isinstance(value, str) else list(value)
    return [item.strip() for part in parts for item in str(part).split(',') if item.strip()]


def parse_names(value: str | Iterable[str], key: str, known: Iterable[str]) -> list[str]:
    """A list of names, each one of `known`, in the order given."""
    known = tuple(known)
    names = split_items(value)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise spec_error(key, value, f'unknown {unknown}; known: {known}',
                         ','.join(known))
    return names


def parse_mapping(value: str, key: str, *, convert: Callable[[str], T] = str,
                  what: str = 'VALUE', bare_name: Callable[[str], str] | None = None
                  ) -> dict[str, T]:
    """'name=value,...' -> {name: convert(value)}; names must be distinct.

    With `bare_name`, an entry without '=' is allowed and named `bare_name(entry)`.
    """
    expected = f'NAME={what},...'
    mapping: dict[str, T] = {}
    for entry in split_items(value):
        name, has_name, raw = (part.strip() for part in entry.partition('='))
        if not has_name:
            if bare_name is None:
                raise spec_error(key, value, f'{entry!r} has no "="', expected)
            name, raw = bare_name(entry), entry
        if not name or not raw:
            raise spec_error(key, value, f'{entry!r} lacks a name or a value', expected)
        if name in mapping:
            raise spec_error(key, value, f'{name!r} is named twice', expected)
        try:
            mapping[name] = convert(raw)
        except ValueError:
            raise spec_error(key, value, f'{raw!r} is not a {what.lower()}', expected) from None
    return mapping


def parse_pair(value: str, key: str, *, expected: str, last: bool = False) -> tuple[str, str]:
    """'LEFT:RIGHT' -> (left, right), split at the first ':' (the last with `last`).

    Splitting at the last colon keeps paths with colons whole ('gs://b/l.csv:column').
    """
    left, sep, right = value.rpartition(':') if last else value.partition(':')
    if not sep or not left.strip() or not right.strip():
        raise spec_error(key, value, 'needs both parts around ":"', expected)
    return left.strip(), right.strip()
