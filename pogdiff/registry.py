"""The one mechanism behind every extension point that a flag chooses from (`--objective`, `--sampling`).

A `Registry` is a dict from name to entry, in registration order (the flag's choices and their `--help` order);
an entry is any object with a `name`. Registering from outside the package (a test, a plugin module imported
before the parser is built) makes a new choice with no other file changed.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """Entries by name for the command-line flag `flag` (named in errors)."""

    def __init__(self, flag: str) -> None:
        super().__init__()
        self.flag = flag

    def register(self, entry: T, *, replace: bool = False) -> T:
        """Makes `entry` a choice of the flag (of the parsers built from now on) and returns it."""
        name = entry.name
        if name in self and not replace:
            raise ValueError(
                f"{self.flag} already has a choice named {name!r} (already registered; pass replace=True)."
            )
        self[name] = entry
        return entry

    def choice(self, name: str) -> T:
        """The entry `name`; a UserError listing the choices otherwise."""
        if name not in self:
            raise UserError(f"{self.flag} must be one of {', '.join(self)}, got {name!r}.")
        return self[name]
