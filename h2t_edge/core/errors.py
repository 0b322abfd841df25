"""Typed errors of the h2t-edge toolchain. The CLI prints them as one line and exits non-zero."""


class H2TEdgeError(Exception):
    """Base class of every error that a user of `h2t_edge` can hit."""


class DatasetError(H2TEdgeError):
    """A dataset folder or manifest that cannot be read as (path, label) pairs."""


class CacheError(H2TEdgeError):
    """A feature cache that is missing, corrupt, or built from another backbone or dataset."""


class FitError(H2TEdgeError):
    """Features or labels that cannot be fitted (NaNs, too few examples per class, ...)."""


class TaskArtifactError(H2TEdgeError):
    """A task artifact that is missing, malformed, or from another backbone."""


class ServingError(H2TEdgeError):
    """A task graph that cannot be served, a Triton model repository that is invalid, or a serving
    engine (Triton server, Ray) that cannot start."""
