"""Exceptions shared across the package."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key and how to fix it."""

    def __init__(self, key: str, problem: str, fix: str):
        self.key = key
        super().__init__(f"config error at `{key}`: {problem}. Fix: {fix}")
