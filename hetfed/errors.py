"""Errors that hetfed raises for bad input, each naming what is wrong and what is allowed."""

from __future__ import annotations

from typing import Any


class HetfedError(Exception):
    """Base class of every error hetfed raises on purpose."""


class ConfigError(HetfedError, ValueError):
    """A configuration value is wrong.

    The message names the source (a file or the run config), the key, the value and what is
    allowed, so the user can fix it without reading code.
    """

    def __init__(self, key: str, value: Any, allowed: str, source: str = "run config") -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        self.source = source
        super().__init__(f"{source}: key '{key}' has value {value!r}; allowed: {allowed}")


class PluginError(HetfedError):
    """A registered strategy cannot be used; the message names its entry point and package."""
