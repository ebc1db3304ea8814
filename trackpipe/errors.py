"""Every exception trackpipe raises on purpose, in one place."""


class TrackpipeError(Exception):
    """Base of trackpipe's own errors."""


class ConfigError(TrackpipeError):
    """The configuration file or environment holds an unknown key or a bad value."""


class RequestRejected(TrackpipeError):
    """An ingest request is refused as a whole; `code` selects the row of the error table."""

    def __init__(self, code: str, message: str, errors: list[dict] | None = None,
                 headers: tuple[tuple[bytes, bytes], ...] = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.errors = errors
        self.headers = headers  # e.g. Retry-After on a 429


class StoreUnavailable(TrackpipeError):
    """The event log could not commit (disk full, I/O error, shutting down): retry later."""


class StartFailed(TrackpipeError):
    """trackpipe cannot start on its data dir: a file there cannot be opened or read."""
