"""User-facing errors: each carries a one-line message naming the bad value and what is allowed."""


class ConfigError(ValueError):
    """Invalid configuration value; raised before any model loads."""


class DataError(ValueError):
    """Malformed or missing input data (file, line, field)."""


class StorageError(RuntimeError):
    """The run store is locked, corrupted or not writable."""


class BackendUnavailableError(ConnectionError):
    """A model server stayed unreachable after the retry budget (everything stored so far is kept)."""


class BackendRequestError(RuntimeError):
    """A model server answered a request with an error that retrying cannot fix."""
