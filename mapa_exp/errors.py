"""The one exception type for bad user input: it names the config key and the bad value."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration or input value is invalid; the message is one line naming the key and value."""

    def __init__(self, key: str, value, reason: str):
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}={value!r}: {reason}")


def check(condition: bool, key: str, value, reason: str) -> None:
    """Raise ConfigError(key, value, reason) unless ``condition`` holds."""
    if not condition:
        raise ConfigError(key, value, reason)
