"""The one interface every inference backend implements (Polygraphy's loader/runner shape).

A *loader* is a small lazy callable that produces one thing the runner needs (an ONNX Runtime
session, a TensorRT engine...); nothing heavy happens until it is called. A *runner* wraps
that thing as a context manager with `activate` / `infer` / `deactivate`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, Union

import numpy as np

# Any zero-argument callable that returns what a runner needs, e.g. `SessionLoader`.
Loader = Callable[[], Any]

# A dimension of an input shape: an int, or a name (str) where the model leaves it dynamic.
Dim = Union[int, str]


class Runner(abc.ABC):
    """Runs one model. Use as `with runner: outputs = runner.infer(feed)`."""

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
