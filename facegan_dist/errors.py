"""Domain exceptions. The core raises these; only the CLI boundary turns them into exit codes.

Messages are one line and name the offending file or flag, because they are printed as-is.
"""


class FaceganError(Exception):
    """Base class: any error the user can fix from the message alone (exit code 1)."""


class ConfigError(FaceganError):
    """A flag, preset or config-file value is invalid; the message names the flag."""


class DataError(FaceganError):
    """A source dataset, image or shard is missing, unreadable or inconsistent; names the file."""


class CheckpointError(FaceganError):
    """A checkpoint or export is missing, incomplete or untrusted; names the path."""


class TrainingError(FaceganError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""
