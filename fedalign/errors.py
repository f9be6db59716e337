"""The project's error base: an error a user can fix, described in one line."""


class FedalignError(Exception):
    """Something the user or operator can fix; ``str(error)`` is one line saying what to do."""


class FederationError(FedalignError):
    """The federation cannot proceed (silos missing, inconsistent roles, failed replies)."""


class ConfigError(FedalignError, ValueError):
    """A configuration problem, described in one line that says what to do."""
