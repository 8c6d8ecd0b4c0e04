"""Exceptions shared across the package."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key and how to fix it."""

    def __init__(self, key: str, problem: str, fix: str):
        self.key = key
        super().__init__(f"config error at `{key}`: {problem}. Fix: {fix}")


def require_at_least(section: object, prefix: str, name: str, minimum: float) -> None:
    """Raise a ConfigError naming ``<prefix>.<name>`` unless that field of ``section`` is >= ``minimum``."""
    value = getattr(section, name)
    if value < minimum:
        raise ConfigError(f"{prefix}.{name}", f"got {value}", f"use at least {minimum}")


def require_positive(section: object, prefix: str, name: str) -> None:
    """Raise a ConfigError naming ``<prefix>.<name>`` unless that field of ``section`` is > 0."""
    value = getattr(section, name)
    if value <= 0:
        raise ConfigError(f"{prefix}.{name}", f"got {value}", "use a positive number")
