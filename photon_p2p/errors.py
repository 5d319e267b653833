"""The one exception type users are meant to see."""


class PhotonError(Exception):
    """A problem the user can fix (bad flag, missing file, unreachable peer, ...).

    CLIs print it as a single ``error: ...`` line and exit with code 2; the message must say what is wrong and,
    where it is not obvious, what to do about it. Never raise it for bugs: those keep their traceback.
    """


class ConfigError(PhotonError):
    """A configuration value is invalid; the message names the flag (or TOML key) to fix."""


class DataError(PhotonError):
    """Training data or a tokenizer cannot be used; the message names the file."""


class CheckpointError(PhotonError):
    """A checkpoint cannot be written or loaded; the message names the file."""


class SwarmError(PhotonError):
    """The swarm cannot be joined or disagrees with us (manifest mismatch, unreachable peers, ...)."""
