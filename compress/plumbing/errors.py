"""Errors a user can cause and fix: command-line entry points print them as one line and exit non-zero."""


class PipelineError(Exception):
    """Base of every error caused by the user's input (paths, options, checkpoints)."""


class CheckpointError(PipelineError):
    """A checkpoint that is missing, unreadable, or does not match the architecture."""


class InvalidKeepRatio(PipelineError, ValueError):
    """A keep ratio outside (0, 1] or one that keeps no token at some stage."""
