"""The one interface every inference backend implements (Polygraphy's loader/runner shape).

A *loader* is a small lazy callable that produces one thing the runner needs (an ONNX Runtime
session, a TensorRT engine...); nothing heavy happens until it is called. A *runner* wraps
that thing as a context manager with `activate` / `infer` / `deactivate`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from ..errors import ArtifactError

# Any zero-argument callable that returns what a runner needs, e.g. `SessionLoader`.
Loader = Callable[[], Any]

# Every ONNX tensor stored outside the graph names its file under this key (StringStringEntryProto
# key = "location"), so a graph whose bytes lack it has no external data.
_EXTERNAL_DATA_KEY = b"\x0a\x08location"


@dataclass(frozen=True)
class ModelBytes:
    """A model as its verified bytes: `data` (ONNX, OpenVINO IR XML or a serialized engine, as `kind`
    says) and, for an IR, its `weights` (.bin). Loaders hand exactly these bytes to the engine and
    never open `source` (where they were read, for messages) again. `record`: the verified descriptor
    (an engine's key, for its TensorRT version and GPU check)."""

    data: bytes
    source: str
    kind: str = "onnx"  # "onnx", "ir" or "engine"
    weights: Optional[bytes] = None
    record: Optional[Mapping[str, Any]] = None
    # Digests still being computed while the engine parses `data` (`runtime.trust.DigestCheck`); the
    # loader that hands these bytes to an engine calls `confirm` before the engine runs anything.
    checks: tuple[Any, ...] = ()

    def confirm(self) -> None:
        """Wait for the digests of these bytes; IntegrityError unless they are the ones recorded."""
        for check in self.checks:
            check.verify()

    def refuse_external_data(self) -> None:
        """Refuse an ONNX graph that keeps tensors in external files: an engine given bytes resolves them
        against the working directory, and no digest covers them. (ONNX Runtime is told instead to look
        for them in an empty folder, which costs no scan of the bytes: `external_data_error`.)"""
        if self.kind == "onnx" and _EXTERNAL_DATA_KEY in self.data:
            raise external_data_error(self.source)


@dataclass(frozen=True)
class LeasedModel:
    """An ONNX graph as a leased file (`runtime.trust.FileLease`): the engine opens `lease.path`, the
    leased inode itself, whose bytes cannot change while the lease holds, so nothing is copied. `checks`
    run in order on `confirm` (the digest, the lease still held, the version record), which the loader
    calls once the engine has read the file and before it runs anything; the lease ends there."""

    lease: Any
    source: str
    record: Optional[Mapping[str, Any]] = None
    checks: tuple[Any, ...] = ()
    kind: str = "onnx"

    @property
    def path(self) -> str:
        return self.lease.path

    def confirm(self) -> None:
        try:
            for check in self.checks:
                check.verify()
        finally:
            self.lease.close()


def external_data_error(source: str) -> ArtifactError:
    return ArtifactError(f"ONNX graph {source} keeps tensors in external data files, which no digest covers; "
                         "save the graph with its weights inside it (onnx.save_model(..., "
                         "save_as_external_data=False)) and compile it again")

# A dimension of an input shape: an int, or a name (str) where the model leaves it dynamic.
Dim = Union[int, str]


class Runner(abc.ABC):
    """Runs one model. Use as `with runner: outputs = runner.infer(feed)`.

    Subclasses build their model in `activate` with `_load` and check every feed with
    `_check_feed`, whose input specs are read from the model once per activation.
    """

    _specs: Optional[dict[str, "InputSpec"]] = None

    @staticmethod
    def _load(source: Any, is_built: Callable[[Any], bool]) -> Any:
        """`source` itself when it is already the built object, else the result of calling it
        (a Loader)."""
        return source if is_built(source) else source()

    def _input_specs(self) -> dict[str, "InputSpec"]:
        """Input name -> InputSpec, read from the active model (called once per activation)."""
        raise NotImplementedError

    def _check_feed(self, feed: Mapping[str, np.ndarray]) -> None:
        """`check_feed` against the model's inputs, cached until `_forget_specs`."""
        if self._specs is None:
            self._specs = self._input_specs()
        check_feed(feed, self._specs)

    def _forget_specs(self) -> None:
        self._specs = None

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.deactivate()

    @abc.abstractmethod
    def activate(self) -> None:
        """Load the model and acquire resources; `infer` is valid only while active."""

    @abc.abstractmethod
    def deactivate(self) -> None:
        """Release what `activate` acquired. Safe to call twice."""

    @abc.abstractmethod
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on `feed` (input name -> array); returns output name -> array."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Human-readable backend name, e.g. 'onnxruntime[CPUExecutionProvider]'."""

    @property
    @abc.abstractmethod
    def input_names(self) -> list[str]:
        """Names of the model inputs, in model order."""

    @property
    @abc.abstractmethod
    def output_names(self) -> list[str]:
        """Names of the model outputs, in model order."""

    @abc.abstractmethod
    def input_shapes(self) -> dict[str, list[Dim]]:
        """Input name -> shape; dynamic dimensions are strings (their symbolic names)."""


@dataclass(frozen=True)
class InputSpec:
    """What a model input takes: its numpy dtype (None: not known) and shape (str: dynamic)."""

    dtype: Optional[np.dtype]
    shape: Sequence[Dim]


def check_feed(feed: Mapping[str, np.ndarray], inputs: Mapping[str, InputSpec]) -> None:
    """Raise ArtifactError unless `feed` has exactly the model's inputs, each a numpy array of
    the model's dtype, rank and static dimensions. Nothing is cast silently: a float64 image
    would hide a preprocessing bug. Every runner calls this before running."""
    missing = sorted(set(inputs) - set(feed))
    unexpected = sorted(set(feed) - set(inputs))
    if missing or unexpected:
        raise ArtifactError(
            f"feed does not match the model inputs {sorted(inputs)}: missing {missing}, "
            f"unexpected {unexpected}"
        )
    for name, array in feed.items():
        spec = inputs[name]
        if not isinstance(array, np.ndarray):
            raise ArtifactError(f"input '{name}' must be a numpy array, got {type(array).__name__}")
        if spec.dtype is not None and array.dtype != spec.dtype:
            expected = np.dtype(spec.dtype)
            raise ArtifactError(
                f"input '{name}' has dtype {array.dtype} but the model expects {expected}; "
                f"convert it with .astype(np.{expected})"
            )
        static = [d if isinstance(d, int) else None for d in spec.shape]
        if len(static) != array.ndim or any(d is not None and d != n for d, n in zip(static, array.shape)):
            raise ArtifactError(
                f"input '{name}' has shape {list(array.shape)} but the model expects {list(spec.shape)}"
            )


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine is optimized for: min <= opt <= max (TensorRT's optimization
    profile over the batch axis; every other axis is static)."""

    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    @classmethod
    def up_to(cls, max_batch: int) -> "BatchProfile":
        """min 1, opt the largest power of two <= max_batch / 2 (at least 1), max max_batch."""
        opt = 1
        while opt * 2 <= max(1, max_batch // 2):
            opt *= 2
        return cls(1, min(opt, max_batch), max_batch)

    def shapes(self, sample_shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) full shapes for one input whose per-sample shape is `sample_shape`."""
        return tuple((b, *map(int, sample_shape)) for b in (self.min, self.opt, self.max))

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}
