"""The export stage's user errors: one line each, exit code 2 (``ExportError``) or 1 (``ValidationFailed``)."""
from compress.plumbing.errors import PipelineError


class ExportError(PipelineError):
    """An export request that cannot be carried out as asked."""


class ValidationFailed(ExportError):
    """An exported graph disagreed with PyTorch beyond its criteria: nothing was written."""
