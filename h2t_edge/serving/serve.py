"""Serve task graphs on NVIDIA Triton Inference Server: `h2t-edge serve TASK.onnx ...`.

The server is the `tritonserver` binary that ships inside the nvidia-pytriton wheel, run on a model
repository written by `h2t_edge.serving.triton_repo` (one model per task, named after the task, with Triton's
dynamic batcher). Clients use the standard Triton HTTP/REST and gRPC APIs (`tritonclient`).

Why not PyTriton's `Triton.bind()`: PyTriton 0.7.0 pins numpy<2 and, under the NumPy 2 this project
installs, its Python-backend proxy moves tensors with `as_numpy()` / `Tensor(name, ndarray)`, which the
stub's NumPy 1.x C ABI gets wrong: a request [[1, 2], [3, 4]] reaches the model as [[1, 1], [1, 1]] and
every response comes back with no data (the client fails with "cannot reshape array of size 0 into
shape (1,2)"). The wheel's server itself runs fine; the model file here passes tensors by DLPack.

The wheel's bundled Python-backend stub also links the system libpython (here Debian's 3.11.2) while
the venv's standard library may be another patch release (pyenv 3.11.7), which fails in the stub with
"AttributeError: '_thread.RLock' object has no attribute '_recursion_count'"; the server is therefore
started with the running interpreter's own libpython first on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from h2t_edge.core.errors import ServingError
from h2t_edge.serving.triton_python_model import THREADS_ENV
from h2t_edge.serving.triton_repo import export_repository, verify_repository
from runtime.io import atomic_write_bytes
from runtime.trust import TRUSTED_KEYS_ENV, SigningKey, TrustedKeys

INSTALL_HINT = "pip install --no-deps nvidia-pytriton (the wheel that ships tritonserver)"


@dataclass(frozen=True)
class TritonDist:
    """The Triton server files inside the nvidia-pytriton wheel."""

    server: Path  # bin/tritonserver
    backends: Path  # backends/ (python backend only)
    stub: Path  # the Python-backend stub built for this interpreter's version
    libs: Path  # nvidia_pytriton.libs (shared libraries the binaries link)


def find_triton() -> TritonDist:
    """Locate the Triton server of the installed nvidia-pytriton wheel (without importing pytriton,
    whose own Python dependencies the server does not need). Raises ServingError naming what is missing."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServingError(f"the Triton server is not installed; {INSTALL_HINT}")
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    dist = TritonDist(
        server=root / "bin" / "tritonserver",
        backends=root / "backends",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=package.parent / "nvidia_pytriton.libs",
    )
    for path in (dist.server, dist.backends / "python" / "libtriton_python.so", dist.stub):
        if not path.exists():
            raise ServingError(f"{path} is missing from the nvidia-pytriton wheel (Python {version}); "
                               f"reinstall it: {INSTALL_HINT}")
    return dist


def _stop_with_parent() -> None:
    """In the server process before exec: get SIGTERM (Triton's graceful stop) when the process that
    started it dies, so a killed `h2t-edge serve` leaves no server behind (Linux prctl)."""
    import ctypes
    import ctypes.util

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Endpoints:
    host: str
    http_port: int
    grpc_port: int

    @property
    def http(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.grpc_port}"


class TritonServer:
    """A running `tritonserver` process on a model repository. Use as a context manager, or
    `start()` / `stop()`. Its log goes to `log_path`.

    repository: a model repository whose models use the Python backend (`triton_repo`'s
    backend='python'); http_port/grpc_port 0 picks free ports. threads: ONNX Runtime intra-op
    threads per model instance (None: ONNX Runtime's default).
    """

    def __init__(self, repository: str | Path, *, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, threads: int | None = None, workdir: str | Path | None = None,
                 startup_timeout: float = 120.0, trusted_keys: Sequence[str] = ()):
        self.repository = Path(repository)
        self.trusted_keys = list(trusted_keys)  # passed to the model file, which checks each model at load
        self.endpoints = Endpoints(host, http_port or free_port(host), grpc_port or free_port(host))
        self.threads = threads
        self.startup_timeout = startup_timeout
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="h2t-triton-"))
        self.log_path = self.workdir / "tritonserver.log"
        self._process: subprocess.Popen | None = None

    def _prepare_backends(self, dist: TritonDist) -> Path:
        """A backend folder whose Python backend has the stub for this interpreter (Triton looks for
        the stub beside libtriton_python.so)."""
        backends = self.workdir / "backends"
        if not (backends / "python" / "triton_python_backend_stub").exists():
            shutil.copytree(dist.backends, backends, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(dist.stub, backends / "python" / "triton_python_backend_stub")
        return backends

    def _environment(self, dist: TritonDist) -> dict[str, str]:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        soname = sysconfig.get_config_var("INSTSONAME") or ""
        # The stub must embed this interpreter's libpython, matching the stdlib it will import.
        first = [libdir] if libdir and soname and (Path(libdir) / soname).exists() else []
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*first, str(dist.libs), *filter(None, [env.get("LD_LIBRARY_PATH")])])
        # The stub's embedded Python finds its prefix (this venv, with h2t-edge and onnxruntime) on PATH.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if self.threads is not None:
            env[THREADS_ENV] = str(self.threads)
        if self.trusted_keys:
            env[TRUSTED_KEYS_ENV] = os.pathsep.join([*self.trusted_keys, *filter(None, [env.get(TRUSTED_KEYS_ENV)])])
        return env

    def start(self) -> "TritonServer":
        dist = find_triton()
        backends = self._prepare_backends(dist)
        command = [
            str(dist.server), f"--model-repository={self.repository}", f"--backend-directory={backends}",
            f"--http-address={self.endpoints.host}", f"--http-port={self.endpoints.http_port}",
            f"--grpc-address={self.endpoints.host}", f"--grpc-port={self.endpoints.grpc_port}",
            "--allow-metrics=false", "--exit-timeout-secs=10", "--strict-readiness=true",
        ]
        log = open(self.log_path, "wb")
        try:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             env=self._environment(dist), start_new_session=True,
                                             preexec_fn=_stop_with_parent)
        except OSError as exc:
            raise ServingError(f"cannot start {dist.server}: {exc}; {INSTALL_HINT}") from None
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:  # a failed start or Ctrl-C while starting leaves no server behind
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        url = f"http://{self.endpoints.http}/v2/health/ready"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServingError(f"tritonserver exited with code {self._process.returncode} while starting: "
                                   f"{self.log_tail()} (full log: {self.log_path})")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise ServingError(f"tritonserver was not ready after {self.startup_timeout:.0f} s: {self.log_tail()} "
                           f"(full log: {self.log_path})")

    def log_tail(self, lines: int = 3) -> str:
        """The last error lines of the server log (or its last lines), joined on one line."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [line for line in text if line[:1] == "E" or "error" in line.lower()]
        return " | ".join((errors or text)[-lines:]).strip()

    def stop(self) -> None:
        """Stop the server (SIGINT, Triton's graceful shutdown; SIGKILL after its exit timeout)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                # The server and its Python-backend stubs share the session started for it.
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> "TritonServer":
        # `serve()` hands back a started server; entering it must not start a second one.
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    graphs: Sequence[str | Path],
    *,
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int | None = None,
    workdir: str | Path | None = None,
    max_batch_size: int = 32,
    max_queue_delay_us: int = 500,
    instances: int = 1,
    threads: int | None = None,
    startup_timeout: float = 120.0,
    trusted_keys: Sequence[str | Path] | None = None,
) -> TritonServer:
    """Start a Triton server that serves each task graph as a model named after its task.

    grpc_port: default http_port + 1 (Triton's 8000/8001 convention); 0 picks a free port, and so does
    http_port=0. instances: Python-backend model instances per task (each runs its own ONNX Runtime
    session with `threads` intra-op threads). Returns the started server; call `stop()` (or use it as
    a context manager) to shut it down. Every graph is verified before it enters the repository;
    trusted_keys (public key files, added to $H2T_EDGE_TRUSTED_KEYS) also make a trusted signature
    mandatory, and the server's model file checks each model again when Triton loads it. The served
    repository carries a manifest over every file of each model (signed, with trusted keys, by a key
    of this run), checked before the server starts and by each model at `initialize`.
    """
    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="h2t-serve-")) if owned else Path(workdir)
    repository = workdir / "model_repository"
    if repository.exists():
        shutil.rmtree(repository)
    keys = [str(Path(k).resolve()) for k in trusted_keys or ()]
    session_key = None
    if TrustedKeys.resolve(keys):
        # Trusted keys make the server's model file refuse unsigned manifests: the repository this run
        # writes (from graphs it has just verified) is signed with a key of this run only, which the
        # server trusts beside the given ones; nothing else can sign for it.
        session_key = SigningKey.generate()  # its private half never leaves this process
        public = atomic_write_bytes(workdir / f"serve-key-{os.getpid()}.pub", session_key.public_pem())
        keys.append(str(public.resolve()))
    export_repository(graphs, repository, backend="python", max_batch_size=max_batch_size,
                      max_queue_delay_us=max_queue_delay_us, instances=instances, trusted_keys=trusted_keys,
                      signing_key=session_key)
    verify_repository(repository, keys)  # what the server will load, checked just before it starts
    if grpc_port is None:
        grpc_port = http_port + 1 if http_port else 0
    server = TritonServer(repository, host=host, http_port=http_port, grpc_port=grpc_port, threads=threads,
                          workdir=workdir, startup_timeout=startup_timeout, trusted_keys=keys)
    server._own_workdir = owned
    return server.start()
