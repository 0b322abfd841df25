"""Triton Inference Server model repositories for compiled task graphs.

`export_repository(graphs, out)` writes one Triton model per task graph (`TASK.onnx` + `TASK.json`):

    out/
      TASK/
        config.pbtxt        # onnxruntime backend, TensorRT accelerator, dynamic batching, I/O specs
        labels.txt          # one class per line (Triton's classification extension reads it)
        h2t_edge_task.json  # the task sidecar (copied as is): the preprocessing contract clients follow
        h2t_edge_manifest.json  # every other file's BLAKE3 and the config's contents; sealed, maybe signed
        1/model.onnx        # version folder

Inputs and outputs come from the ONNX graph itself (names, element types, shapes), so a graph with any
number of outputs (a multi-task graph, say) gets every one of them. Configs are built as Triton's own
`ModelConfig` protobuf (`tritonclient.grpc.model_config_pb2`), written with `text_format` and parsed
back and checked before anything is written.

The same builder also writes the Python-backend flavour that `h2t_edge.serving.serve` runs on the Triton server
shipped in the nvidia-pytriton wheel (which has no onnxruntime backend): `backend: "python"`, the same
inputs, outputs, batching and labels, and a `1/model.py` that runs `1/model.onnx` with h2t-edge's runtime.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from h2t_edge.core.errors import ServingError
from h2t_edge.serving.triton_python_model import (
    GRAPH_PARAMETER,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    SIDECAR_FILE,
    config_summary,
    model_files,
    verify_model_folder,
)
from runtime.errors import ArtifactError
from runtime.io import atomic_write_bytes, json_bytes, read_json
from runtime.predictor import TaskSidecar, load_task, sidecar_path
from runtime.preprocess import PreprocessConfig
from runtime.schema import is_name
from runtime.trust import SigningKey, TrustedKeys, file_digest, read_file, seal, verify_bytes, verify_seal

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
# Model-config parameters (a string map Triton hands to backends and to clients in get_model_config).
PREPROCESS_PARAMETER = "h2t_edge.preprocess"
TASK_PARAMETER = "h2t_edge.task"
PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_python_model.py")

# ONNX TensorProto element type -> Triton DataType name.
ONNX_TO_TRITON = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32", 13: "TYPE_UINT64",
    16: "TYPE_BF16",
}
TENSORRT_PRECISIONS = ("FP32", "FP16")


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise ServingError(
            f"Triton model configs need tritonclient ({exc}); pip install -e '.[serve]'"
        ) from None
    return model_config_pb2


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as Triton sees it: dims leave out the batch dimension when the
    model batches (-1 marks a dimension the graph leaves dynamic)."""

    name: str
    data_type: str  # Triton DataType name, e.g. 'TYPE_FP32'
    dims: tuple[int, ...]
    labels: tuple[str, ...] | None = None  # class names along the last dimension


@dataclass(frozen=True)
class TritonTask:
    """A task graph read for Triton: its model name, I/O specs and sidecar."""

    name: str
    graph: Path
    sidecar: TaskSidecar
    sidecar_file: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: bool  # every input and output has a dynamic first (batch) dimension
    data: bytes = b""  # the graph's bytes as they were checked (what the repository gets)

    @property
    def label_sets(self) -> dict[tuple[str, ...], str]:
        """Each distinct class list among the outputs -> its label file name."""
        files: dict[tuple[str, ...], str] = {}
        for spec in self.outputs:
            if spec.labels is not None and spec.labels not in files:
                files[spec.labels] = LABELS_FILE if not files else f"labels_{len(files)}.txt"
        return files


def read_task(graph: str | Path, name: str | None = None, sidecar_file: str | Path | None = None, *,
              trusted_keys: TrustedKeys | Sequence[str | os.PathLike] | None = None) -> TritonTask:
    """Read a compiled task graph and its sidecar into a TritonTask.

    name: the Triton model name (default: the sidecar's task name).
    sidecar_file: where the sidecar is (default: next to the graph, same stem).
    Raises ServingError when the graph, its sidecar or the model name is unusable.
    """
    import onnx

    graph = Path(graph)
    if not graph.is_file():
        raise ServingError(f"task graph {graph} does not exist; pass the .onnx written by `h2t-edge compile`")
    side = Path(sidecar_file) if sidecar_file is not None else sidecar_path(graph)
    if not side.is_file():
        raise ServingError(f"task sidecar {side} is missing; it must sit next to {graph.name} (same stem)")
    try:  # the runtime's one checker: seal (and signature, with trusted keys), schema, the graph's digest
        checked = load_task(graph, side, trusted_keys=trusted_keys)
    except ArtifactError as exc:
        raise ServingError(str(exc)) from exc
    sidecar = checked.sidecar
    if name is None:
        # A multi-task graph is named after its tasks ('a+b' in the sidecar; '+' would need quoting in URLs).
        name = "_".join(t.task for t in sidecar.tasks) if sidecar.multitask else sidecar.task
    if not is_name(name):
        raise ServingError(
            f"task name {name!r} (field 'task' of {side}) is not a usable Triton model name: use letters, "
            "digits, '_', '.', '-', at most 128, not starting with '.' (re-compile with --task NAME)"
        )
    try:
        model = onnx.load_from_string(checked.model.data)  # the bytes checked, not the path again
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's
        raise ServingError(f"cannot read task graph {graph} as ONNX ({exc}); re-compile the task") from None
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [v for v in model.graph.input if v.name not in initializers]
    labels = _output_labels(sidecar)
    shapes = {v.name: _shape(v, graph) for v in [*graph_inputs, *model.graph.output]}
    batching = all(shape and shape[0] == -1 for shape in shapes.values())

    def spec(value, with_labels: bool) -> TensorSpec:
        elem = value.type.tensor_type.elem_type
        if elem not in ONNX_TO_TRITON:
            raise ServingError(f"task graph {graph}: tensor {value.name!r} has ONNX element type {elem}, "
                               "which Triton has no type for")
        shape = shapes[value.name]
        dims = shape[1:] if batching else shape
        names = labels.get(value.name) if with_labels else None
        if names is not None and (not dims or dims[-1] not in (-1, len(names))):
            raise ServingError(f"task graph {graph}: output {value.name!r} has shape {shape} but {side} lists "
                               f"{len(names)} classes for it; re-compile the task")
        return TensorSpec(value.name, ONNX_TO_TRITON[elem], tuple(dims), names)

    return TritonTask(
        name=name, graph=graph, sidecar=sidecar, sidecar_file=side,
        inputs=tuple(spec(v, False) for v in graph_inputs),
        outputs=tuple(spec(v, True) for v in model.graph.output),
        batching=batching, data=checked.model.data,
    )


def _shape(value, graph: Path) -> tuple[int, ...]:
    """ONNX value shape with dynamic (named or unknown) dimensions as -1."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        raise ServingError(f"task graph {graph}: tensor {value.name!r} has no shape; re-compile the task")
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim)


def _output_labels(sidecar: TaskSidecar) -> dict[str, tuple[str, ...]]:
    """Output name -> the class names along its last axis: each task's logits (and probabilities,
    where the graph has them) carry that task's classes, in single- and multi-task sidecars alike."""
    labels = {}
    for task in sidecar.tasks:
        for name in (task.logits, task.probabilities):
            if name is not None:
                labels[name] = tuple(task.classes)
    return labels


def preprocess_contract(config: Any) -> PreprocessConfig:
    """The preprocessing a served model expects, from its model config: a ModelConfig protobuf (from
    `config.pbtxt` or tritonclient.grpc's `get_model_config(...).config`) or the dict that
    tritonclient.http's `get_model_config` returns. Feed `runtime.preprocess.preprocess_batch(images,
    contract)` as the model's input."""
    if isinstance(config, Mapping):
        name = config.get("name", "?")
        value = config.get("parameters", {}).get(PREPROCESS_PARAMETER, {}).get("string_value")
    else:
        name = config.name
        value = config.parameters[PREPROCESS_PARAMETER].string_value if PREPROCESS_PARAMETER in config.parameters else None
    if not value:
        raise ServingError(f"model {name!r} has no '{PREPROCESS_PARAMETER}' parameter in its config; "
                           "export it with `h2t-edge export-triton` or serve it with `h2t-edge serve`")
    try:
        return PreprocessConfig.from_dict(json.loads(value), source=f"model {name!r} parameter {PREPROCESS_PARAMETER}")
    except json.JSONDecodeError as exc:
        raise ServingError(f"model {name!r}: parameter {PREPROCESS_PARAMETER} is not JSON ({exc})") from None


def build_config(
    task: TritonTask,
    *,
    backend: str = "onnxruntime",
    max_batch_size: int = 32,
    max_queue_delay_us: int = 100,
    preferred_batch_sizes: Sequence[int] = (),
    tensorrt: str | None = "FP16",
    instances: int | None = None,
) -> Any:
    """The Triton `ModelConfig` protobuf of one task.

    backend: 'onnxruntime' (for any Triton server; `tensorrt` adds ONNX Runtime's TensorRT accelerator
    with that precision, None leaves it out) or 'python' (h2t_edge.serving.serve's flavour, which runs the
    graph with h2t-edge's runtime on CPU instances).
    instances: model instances (None: Triton's default, one per GPU or one on CPU).
    """
    pb = _model_config_pb2()
    if backend not in ("onnxruntime", "python"):
        raise ServingError(f"backend must be 'onnxruntime' or 'python', got {backend!r}")
    if max_batch_size < 1:
        raise ServingError(f"max_batch_size must be at least 1, got {max_batch_size}")
    config = pb.ModelConfig(name=task.name, backend=backend, max_batch_size=max_batch_size if task.batching else 0)
    for spec in task.inputs:
        config.input.add(name=spec.name, data_type=pb.DataType.Value(spec.data_type), dims=spec.dims)
    for spec in task.outputs:
        out = config.output.add(name=spec.name, data_type=pb.DataType.Value(spec.data_type), dims=spec.dims)
        if spec.labels is not None:
            out.label_filename = task.label_sets[spec.labels]
    if task.batching:
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(b for b in preferred_batch_sizes if b <= max_batch_size)
    if backend == "onnxruntime":
        config.default_model_filename = MODEL_FILE
        if tensorrt is not None:
            if tensorrt not in TENSORRT_PRECISIONS:
                raise ServingError(f"tensorrt precision must be one of {TENSORRT_PRECISIONS} or None, got {tensorrt!r}")
            accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            accelerator.parameters["precision_mode"] = tensorrt
            accelerator.parameters["max_workspace_size_bytes"] = str(1 << 30)
        if instances is not None:
            config.instance_group.add(count=instances)
    else:
        config.instance_group.add(count=instances or 1, kind=pb.ModelInstanceGroup.KIND_CPU)
        config.parameters[GRAPH_PARAMETER].string_value = MODEL_FILE
    config.parameters[TASK_PARAMETER].string_value = task.sidecar.task
    config.parameters[PREPROCESS_PARAMETER].string_value = json.dumps(
        task.sidecar.preprocess.to_dict(), sort_keys=True
    )
    return config


def config_text(config: Any) -> str:
    """config.pbtxt text of a ModelConfig."""
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_config(text: str, source: str = "config.pbtxt") -> Any:
    """Parse config.pbtxt text with Triton's ModelConfig protobuf; ServingError naming `source` on failure."""
    from google.protobuf import text_format

    pb = _model_config_pb2()
    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as exc:
        raise ServingError(f"{source} is not a valid Triton model config: {exc}") from None


def validate_model_dir(model_dir: str | Path) -> Any:
    """Check a written model folder as Triton will load it: config.pbtxt parses as ModelConfig; its
    name is the folder's; every label file and version folder it needs exists; its inputs and
    outputs match the ONNX graph of each version. Returns the parsed ModelConfig."""
    model_dir = Path(model_dir)
    path = model_dir / "config.pbtxt"
    if not path.is_file():
        raise ServingError(f"{model_dir} has no config.pbtxt; export the repository again")
    config = parse_config(path.read_text(), str(path))

    def bad(field: str, why: str) -> ServingError:
        return ServingError(f"{path}: field '{field}' {why}; export the repository again")

    if config.name != model_dir.name:
        raise bad("name", f"is {config.name!r}, Triton needs the folder name {model_dir.name!r}")
    if config.backend not in ("onnxruntime", "python"):
        raise bad("backend", f"is {config.backend!r}, expected 'onnxruntime' or 'python'")
    for out in config.output:
        if out.label_filename and not (model_dir / out.label_filename).is_file():
            raise bad("output.label_filename", f"names {out.label_filename}, which is missing")
    versions = sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise ServingError(f"{model_dir} has no version folder (1/, 2/, ...); export the repository again")
    for version in versions:
        if not (version / MODEL_FILE).is_file():
            raise ServingError(f"{version} has no {MODEL_FILE}; export the repository again")
        task = read_task(version / MODEL_FILE, config.name, model_dir / SIDECAR_FILE)
        wanted_in = {s.name: list(s.dims) for s in task.inputs}
        wanted_out = {s.name: list(s.dims) for s in task.outputs}
        if {i.name: list(i.dims) for i in config.input} != wanted_in:
            raise bad("input", f"does not match the inputs of {version / MODEL_FILE} ({wanted_in})")
        if {o.name: list(o.dims) for o in config.output} != wanted_out:
            raise bad("output", f"does not match the outputs of {version / MODEL_FILE} ({wanted_out})")
        if (config.max_batch_size > 0) != task.batching:
            raise bad("max_batch_size", f"is {config.max_batch_size} but the graph "
                      f"{'has' if task.batching else 'has no'} dynamic batch dimension")
    return config


def write_model(
    task: TritonTask, repository: str | Path, *, version: int = 1, backend: str = "onnxruntime",
    signing_key: SigningKey | None = None, **options: Any
) -> Path:
    """Write one task's model folder into `repository`; options go to `build_config`. Returns the folder.
    The task's sealed sidecar goes along as `h2t_edge_task.json` (signed again with `signing_key`), and
    `h2t_edge_manifest.json` lists every file of the folder (graph, config, labels, model code, sidecar)
    with its BLAKE3, and the config's contents, sealed and signed with `signing_key`: the model checks it
    at `initialize` and `serve` before it starts the server."""
    from google.protobuf import json_format

    if version < 1:
        raise ServingError(f"model version must be at least 1, got {version}")
    model_dir = Path(repository) / task.name
    config = build_config(task, backend=backend, **options)
    text = config_text(config)
    parse_config(text, str(model_dir / "config.pbtxt"))  # round trip through Triton's schema
    files: dict[str, bytes] = {f"{version}/{MODEL_FILE}": task.data or task.graph.read_bytes()}
    if backend == "python":
        files[f"{version}/model.py"] = PYTHON_MODEL_SOURCE.read_bytes()
    for labels, file_name in task.label_sets.items():
        files[file_name] = "".join(f"{label}\n" for label in labels).encode()
    contract = read_file(task.sidecar_file, what="task sidecar", fix="re-compile the task")  # as compiled
    if signing_key is not None:  # or signed again by the repository's publisher
        contract = json_bytes(seal(json.loads(contract), signing_key))
    files[SIDECAR_FILE] = contract
    files["config.pbtxt"] = text.encode()
    digests = {**_kept_files(model_dir, set(files)), **{rel: file_digest(data) for rel, data in files.items()}}
    manifest = seal({"format": MANIFEST_FORMAT, "version": 1, "model": task.name,
                     "config": config_summary(json_format.MessageToDict(config, preserving_proto_field_name=True)),
                     "files": dict(sorted(digests.items()))}, signing_key)
    for rel, data in files.items():
        atomic_write_bytes(model_dir / rel, data)
    atomic_write_bytes(model_dir / MANIFEST_FILE, json_bytes(manifest))  # last: a folder with it is complete
    validate_model_dir(model_dir)
    return model_dir


def _kept_files(model_dir: Path, rewritten: set[str]) -> dict[str, str]:
    """The digests of the files of an existing model folder that this write keeps (other versions),
    each checked against the folder's sealed manifest first."""
    kept = [rel for rel in model_files(model_dir) if rel not in rewritten] if model_dir.is_dir() else []
    if not kept:
        return {}
    path = model_dir / MANIFEST_FILE
    fix = "export the model to a new repository"
    try:
        old = read_json(path, "Triton model manifest")
        verify_seal(old, f"Triton model manifest {path}", fix=fix)
        return {rel: file_digest(verify_bytes(read_file(model_dir / rel, what="Triton model file", fix=fix),
                                              old.get("files", {}).get(rel), field=f"files.{rel}_blake3",
                                              path=model_dir / rel, descriptor=path, fix=fix))
                for rel in kept}
    except (ArtifactError, AttributeError) as exc:
        raise ServingError(f"{model_dir} holds files this export keeps ({kept[:3]}), but they are not vouched for "
                           f"by a valid {MANIFEST_FILE} ({exc}); {fix}") from None


def verify_repository(repository: str | Path,
                      trusted_keys: TrustedKeys | Sequence[str | os.PathLike] | None = None) -> list[Path]:
    """Check every model folder of a repository against its manifest (as the model does at
    `initialize`); ServingError naming the file otherwise. Returns the model folders."""
    repository = Path(repository)
    folders = sorted(p for p in repository.iterdir() if p.is_dir()) if repository.is_dir() else []
    if not folders:
        raise ServingError(f"{repository} holds no model folders; export the repository again")
    for model_dir in folders:
        try:
            verify_model_folder(model_dir, trusted_keys)
        except ArtifactError as exc:
            raise ServingError(str(exc)) from exc
    return folders


def export_repository(
    graphs: Sequence[str | Path],
    out: str | Path,
    *,
    names: Sequence[str] | None = None,
    overwrite: bool = False,
    trusted_keys: TrustedKeys | Sequence[str | os.PathLike] | None = None,
    signing_key: SigningKey | None = None,
    **options: Any,
) -> list[Path]:
    """Write a Triton model repository with one model per task graph. Returns the model folders.

    Every graph is verified first as a device verifies it (`runtime.predictor.read_task_sidecar`:
    seal, graph sha256, and with trusted keys, here or in $H2T_EDGE_TRUSTED_KEYS, a trusted
    signature); nothing unverified enters the repository. signing_key: sign the copied sidecars.

    names: Triton model names, one per graph (default: each sidecar's task name).
    overwrite: replace the version folder of a model that already has it (other models and
    versions in `out` are kept).
    options: `write_model` / `build_config` options (backend, version, max_batch_size,
    max_queue_delay_us, preferred_batch_sizes, tensorrt, instances).
    """
    if not graphs:
        raise ServingError("no task graphs given; pass one or more TASK.onnx files")
    if names is not None and len(names) != len(graphs):
        raise ServingError(f"{len(names)} model names for {len(graphs)} task graphs; give one per graph")
    tasks = [read_task(g, n, trusted_keys=trusted_keys) for g, n in zip(graphs, names or [None] * len(graphs))]
    seen: dict[str, Path] = {}
    for task in tasks:
        if task.name in seen:
            raise ServingError(f"task graphs {seen[task.name]} and {task.graph} are both named {task.name!r}; "
                               "re-compile one with another --task name")
        seen[task.name] = task.graph
    out = Path(out)
    version = options.get("version", 1)
    for task in tasks:
        # Another version of a model is added beside the ones there; the same version is replaced.
        if (out / task.name / str(version)).exists():
            if not overwrite:
                raise ServingError(f"{out / task.name / str(version)} already exists; pass --overwrite to "
                                   "replace it, or --version N to add a version")
            shutil.rmtree(out / task.name / str(version))
    return [write_model(task, out, signing_key=signing_key, **options) for task in tasks]
