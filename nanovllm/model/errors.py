"""Errors a user can cause by pointing nano-vllm at the wrong model file."""


class ModelLoadError(ValueError):
    """A model file or directory that cannot be loaded; the message names the file and the problem."""
