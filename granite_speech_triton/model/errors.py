"""The two kinds of error the model code raises, both with messages meant for people."""


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match the model it is loaded into."""


class RequestError(ValueError):
    """A request is invalid (audio or options); the message names the problem for the caller."""
