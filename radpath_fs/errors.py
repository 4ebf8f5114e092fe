"""Errors users see. Each names the file (or key) and the problem; the CLI maps them to exit code 2."""

from __future__ import annotations


class RadpathError(Exception):
    """Base for errors that are the user's input, not a bug: printed as one line, exit code 2."""


class InputError(RadpathError):
    """A bad input file. `path` is the file, `problem` says what is wrong with it."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(RadpathError):
    """A bad pipeline config. The message names the file and the dotted key."""


class StoreError(RadpathError):
    """The store is missing, of another layout version, or used in a way it cannot be."""


class StoreLockedError(StoreError):
    """Another writer holds the store."""


class BatchErrors(RadpathError):
    """Several cases failed in a batch step run without --skip-errors."""

    def __init__(self, errors: list[InputError]):
        self.errors = errors
        lines = "\n".join(f"  {e}" for e in errors)
        super().__init__(f"{len(errors)} invalid case(s); nothing was written:\n{lines}")
