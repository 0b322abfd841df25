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
MANIFEST_FILE = "h2t_edge_manifest.json"  # in the model folder: every other file's BLAKE3, sealed, maybe signed
MANIFEST_FORMAT = "h2t-edge/triton-model"
# The stub renames a DLPack capsule it took over to "used_dlpack"; NumPy's capsule destructor only
# recognises "used_dltensor" and would report the other name as an error on every response.
_STUB_USED, _NUMPY_USED = b"used_dlpack", b"used_dltensor"
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.argtypes, _capsule_is_valid.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_int
_capsule_set_name = ctypes.pythonapi.PyCapsule_SetName
_capsule_set_name.argtypes, _capsule_set_name.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_int
THREADS_ENV = "H2T_EDGE_SERVE_THREADS"


def config_summary(config) -> dict:
    """What a model config says that serving depends on (inputs, outputs and their label files, batching,
    parameters), from Triton's JSON form of it (the `model_config` a model gets) or protobuf's
    `json_format.MessageToDict(..., preserving_proto_field_name=True)`: the two compare equal."""
    def tensors(key, with_labels):
        return [[t.get("name", ""), t.get("data_type", "TYPE_INVALID"), [int(d) for d in t.get("dims", [])],
                 *([t.get("label_filename", "")] if with_labels else [])] for t in config.get(key, [])]

    return {"max_batch_size": int(config.get("max_batch_size", 0)), "input": tensors("input", False),
            "output": tensors("output", True),
            "parameters": {k: v.get("string_value", "") for k, v in sorted(config.get("parameters", {}).items())}}


def model_files(model_dir: Path) -> list[str]:
    """Every file of a model folder (relative POSIX paths) but the manifest and Python's bytecode caches."""
    found = []
    for root, dirs, names in os.walk(model_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        found += [(Path(root) / n).relative_to(model_dir).as_posix() for n in names]
    return sorted(f for f in found if f != MANIFEST_FILE)


def verify_model_folder(model_dir, trusted_keys=None) -> tuple[dict, dict]:
    """Check a Triton model folder against its manifest before anything in it is used: the manifest's
    seal (and signature, with trusted keys here or in $H2T_EDGE_TRUSTED_KEYS), that the folder holds
    exactly the files it lists, and each file's BLAKE3. Returns (the manifest, relative path -> the
    bytes that were checked). Raises runtime.trust's IntegrityError / SignatureError naming the file."""
    from runtime.io import read_json
    from runtime.trust import IntegrityError, TrustedKeys, read_verified, verify_seal

    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_FILE
    fix = "export the model again with `h2t-edge export-triton` (or serve the task graph with `h2t-edge serve`)"
    if not path.is_file():
        raise IntegrityError(f"Triton model {model_dir} has no {MANIFEST_FILE}, the signed list of its files; {fix}")
    manifest = read_json(path, "Triton model manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("config"), dict):
        raise IntegrityError(f"{path}: field 'format' must be {MANIFEST_FORMAT!r} with 'files' and 'config'; {fix}")
    verify_seal(manifest, f"Triton model manifest {path}", fix=fix, trusted=TrustedKeys.resolve(trusted_keys))
    present, listed = model_files(model_dir), sorted(manifest["files"])
    if present != listed:
        raise IntegrityError(f"Triton model {model_dir} does not hold the files {path} lists: missing "
                             f"{sorted(set(listed) - set(present))}, not listed {sorted(set(present) - set(listed))} "
                             f"(a file was added, deleted or renamed after the model was exported); {fix}")
    files = {rel: read_verified(model_dir / rel, digest, field=f"files.{rel}_blake3", descriptor=path, fix=fix,
                                what="Triton model file") for rel, digest in manifest["files"].items()}
    return manifest, files


class TritonPythonModel:
    def initialize(self, args):
        from runtime.backends import create_runner
        from runtime.predictor import load_task
        from runtime.trust import IntegrityError

        config = json.loads(args["model_config"])
        model_dir = Path(args["model_repository"])
        # Checked first, before anything of the folder is used: the signed manifest over every file
        # (graph, config, labels, this code, the sidecar), then the config Triton actually loaded
        # against the one the manifest vouches for, then the sidecar's seal, the graph's digest and,
        # with keys in $H2T_EDGE_TRUSTED_KEYS, its signature. A failure fails the load.
        manifest, files = verify_model_folder(model_dir)
        if config_summary(config) != manifest["config"]:
            raise IntegrityError(f"the config Triton loaded for {model_dir} differs from the one "
                                 f"{model_dir / MANIFEST_FILE} vouches for (config.pbtxt was changed); export the "
                                 "model again")
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        graph = model_dir / args["model_version"] / params[GRAPH_PARAMETER]
        checked = {model_dir / rel: data for rel, data in files.items()}
        task = load_task(graph, model_dir / SIDECAR_FILE, files=checked)  # the bytes checked above, not re-read
        threads = int(os.environ[THREADS_ENV]) if os.environ.get(THREADS_ENV) else None
        self.runner = create_runner(task.model, "onnxruntime", providers="auto", intra_op_threads=threads)
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
