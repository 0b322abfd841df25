"""Triton Python-backend model that runs a task graph with h2t-edge's runtime (copied as `1/model.py`).

`h2t_edge.serving.serve` uses it on the Triton server bundled with the nvidia-pytriton wheel, which has the
Python backend but no onnxruntime backend. Triton's dynamic batcher hands `execute` several requests
at once; they run as one batch, so batching happens in the server exactly as with the onnxruntime
backend.

Tensors cross the backend boundary through DLPack, not `as_numpy()` / `Tensor(name, ndarray)`: those
two go through the stub's compiled-in NumPy 1.x C ABI, and under NumPy 2 they silently read wrong
input values and return empty outputs (the element size sits elsewhere in NumPy 2's dtype struct).
DLPack is a stable C ABI, so this file works with either NumPy.
"""

import ctypes
import json
import os
from pathlib import Path

import numpy as np

try:
    import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend
except ImportError:  # imported outside Triton (h2t_edge.serving.serve reads THREADS_ENV)
    pb_utils = None

GRAPH_PARAMETER = "h2t_edge.graph_file"  # config parameter: the graph file in the version folder
SIDECAR_FILE = "h2t_edge_task.json"  # in the model folder: the task's sealed sidecar
# The stub renames a DLPack capsule it took over to "used_dlpack"; NumPy's capsule destructor only
# recognises "used_dltensor" and would report the other name as an error on every response.
_STUB_USED, _NUMPY_USED = b"used_dlpack", b"used_dltensor"
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.argtypes, _capsule_is_valid.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_int
_capsule_set_name = ctypes.pythonapi.PyCapsule_SetName
_capsule_set_name.argtypes, _capsule_set_name.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_int
THREADS_ENV = "H2T_EDGE_SERVE_THREADS"


class TritonPythonModel:
    def initialize(self, args):
        from runtime.backends import create_runner
        from runtime.predictor import read_task_sidecar

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        graph = Path(args["model_repository"]) / args["model_version"] / params[GRAPH_PARAMETER]
        # Checked again here, where the server loads it: the copied sidecar's seal, the graph's
        # sha256 and, with keys in $H2T_EDGE_TRUSTED_KEYS, its signature. A failure fails the load.
        read_task_sidecar(graph, Path(args["model_repository"]) / SIDECAR_FILE)
        threads = int(os.environ[THREADS_ENV]) if os.environ.get(THREADS_ENV) else None
        self.runner = create_runner(graph, "onnxruntime", providers="auto", intra_op_threads=threads)
        self.runner.activate()
        self.inputs = [spec["name"] for spec in config["input"]]
        self.outputs = [spec["name"] for spec in config["output"]]

    def execute(self, requests):
        arrays = {
            name: [np.from_dlpack(pb_utils.get_input_tensor_by_name(r, name)) for r in requests]
            for name in self.inputs
        }
        sizes = [len(a) for a in arrays[self.inputs[0]]]
        feed = {name: np.concatenate(parts) if len(parts) > 1 else parts[0] for name, parts in arrays.items()}
        try:
            result = self.runner.infer(feed)
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [_to_triton(name, result[name][start:start + size]) for name in self.outputs]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self):
        self.runner.deactivate()


def _to_triton(name, array):
    """A Triton output tensor holding `array`, handed over by DLPack."""
    capsule = np.ascontiguousarray(array).__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    if _capsule_is_valid(capsule, _STUB_USED):
        _capsule_set_name(capsule, _NUMPY_USED)  # the stub owns it now; NumPy must not free it
    return tensor
