"""The exceptions edge-qwen raises for user mistakes and bad files.

Every error carries a message that names the offending file, key or value and says what
to do. The CLI turns them into a one-line error and a non-zero exit; the HTTP server turns
them into OpenAI-shaped error bodies with the `status` given here.
"""

from __future__ import annotations


class EdgeQwenError(Exception):
    """Base class: a problem the user can fix. `status` is the HTTP status it maps to."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class ModelFileError(EdgeQwenError):
    """A model file is missing, truncated, foreign or of the wrong architecture."""

    code = "invalid_model_file"


class CheckpointError(EdgeQwenError):
    """A Hugging Face checkpoint folder cannot be converted as it is."""

    code = "invalid_checkpoint"


class OutputExistsError(EdgeQwenError):
    """The output file already exists and overwriting was not asked for."""

    code = "output_exists"


class OutputWriteError(EdgeQwenError):
    """An output cannot be written: read-only or missing folder, permission, full disk, size limit.

    The message names the path and the problem; nothing is left under the final name.
    """

    status = 500
    type = "server_error"
    code = "output_write_failed"


class DiskSpaceError(OutputWriteError):
    """Not enough free space for an output (found before the work, or when the disk filled up)."""

    code = "insufficient_storage"


class SchemaError(EdgeQwenError):
    """A JSON schema is invalid or uses keywords the engine cannot enforce."""

    code = "invalid_schema"


class RequestError(EdgeQwenError):
    """A generation request has an invalid parameter (messages, max_tokens, temperature...)."""

    code = "invalid_request"


class ContextOverflowError(RequestError):
    """The prompt plus max_tokens does not fit the context window."""

    code = "context_length_exceeded"


class ModelNotFoundError(EdgeQwenError):
    """A model name or path that the store or server does not know."""

    status = 404
    code = "model_not_found"


class BusyError(EdgeQwenError):
    """The model is busy and the caller asked not to wait (or the queue is full)."""

    status = 503
    type = "server_error"
    code = "busy"


class ConstraintViolation(EdgeQwenError):
    """Constrained output failed validation: a bug in the constraint engine, never returned."""

    status = 500
    type = "server_error"
    code = "constraint_violation"
