"""Typed errors of the on-device runtime. Each message names the file, the field and the fix."""


class H2TRuntimeError(Exception):
    """Base class of every error that a user of `runtime/` can hit."""


class ImageError(H2TRuntimeError):
    """An image file is missing, unreadable, corrupt or of an unsupported kind."""


class ArtifactError(H2TRuntimeError):
    """A task graph, engine or its JSON sidecar is missing, malformed or does not match."""


class BackendUnavailable(H2TRuntimeError):
    """The requested inference backend or provider cannot be loaded on this machine."""


class ArtifactWriteError(ArtifactError, OSError):
    """An artifact could not be written (a full disk, no permission); the previous file is unchanged.
    Also an OSError, so callers that catch OSError keep working."""
