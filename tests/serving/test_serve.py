"""`h2t_edge.serving.serve`: a real Triton server (the nvidia-pytriton wheel's tritonserver) on loopback,
queried concurrently with tritonclient over HTTP and gRPC, answers checked against runtime.Predictor."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from h2t_edge.core.errors import ServingError
from h2t_edge.serving.serve import find_triton, serve
from runtime.predictor import Predictor
from runtime.trust import seal

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")


def _triton_or_skip():
    try:
        return find_triton()
    except ServingError as exc:
        pytest.skip(f"no Triton server here: {exc}")


@pytest.fixture
def server(task_graphs, tmp_path):
    _triton_or_skip()
    with serve(task_graphs, http_port=0, grpc_port=0, workdir=tmp_path / "serve", max_queue_delay_us=2000,
               threads=1) as running:
        yield running
    assert not running.running


def test_concurrent_http_and_grpc_answers_equal_predictor(server, task_graphs):
    predictors = {g.stem: Predictor.load(g) for g in task_graphs}
    rng = np.random.default_rng(0)
    requests = [(model, protocol, rng.normal(size=(int(rng.integers(1, 4)), 3, 32, 32)).astype(np.float32))
                for model in predictors for protocol in ("http", "grpc") for _ in range(12)]

    def send(request):
        model, protocol, images = request
        module = tritonclient_http if protocol == "http" else tritonclient_grpc
        inputs = [module.InferInput("images", list(images.shape), "FP32")]
        inputs[0].set_data_from_numpy(images)
        # One client per request: the HTTP client (gevent) must stay on the thread that made it.
        client = module.InferenceServerClient(server.endpoints.http if protocol == "http" else server.endpoints.grpc)
        result = client.infer(model, inputs)
        return result.as_numpy("probabilities"), result.as_numpy("logits")

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, requests))
    for (model, _, images), (probabilities, logits) in zip(requests, answers):
        expected = predictors[model].predict_arrays(images)
        np.testing.assert_array_equal(probabilities, expected[0])
        np.testing.assert_array_equal(logits, expected[1])
    # Every request went through Triton's dynamic batcher; with 16 in flight it formed real batches.
    stats = tritonclient_http.InferenceServerClient(server.endpoints.http).get_inference_statistics("tiny")
    stats = stats["model_stats"][0]
    assert stats["inference_count"] == sum(len(r[2]) for r in requests if r[0] == "tiny")
    assert stats["execution_count"] < stats["inference_count"]


def test_models_labels_and_preprocessing_contract(server):
    client = tritonclient_grpc.InferenceServerClient(server.endpoints.grpc)
    assert sorted(m.name for m in client.get_model_repository_index().models) == ["tiny", "tiny2"]
    assert all(client.is_model_ready(name) for name in ("tiny", "tiny2"))
    config = client.get_model_config("tiny").config
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert '"input_size": [3, 32, 32]' in config.parameters["h2t_edge.preprocess"].string_value
    images = np.zeros((1, 3, 32, 32), np.float32)
    inputs = [tritonclient_grpc.InferInput("images", [1, 3, 32, 32], "FP32")]
    inputs[0].set_data_from_numpy(images)
    top = client.infer("tiny", inputs, outputs=[tritonclient_grpc.InferRequestedOutput("probabilities", class_count=1)])
    score, index, label = top.as_numpy("probabilities")[0, 0].decode().split(":")
    assert label == ["cat", "coffee", "astronaut", "other"][int(index)]


def test_cli_serve_starts_and_stops_on_sigint(task_graphs, tmp_path):
    _triton_or_skip()
    from h2t_edge.serving.serve import free_port

    port = free_port()
    # started with SIGINT ignored, as a background job of a shell is: serve must still stop on it
    process = subprocess.Popen([sys.executable, "-m", "h2t_edge.cli", "serve", str(task_graphs[0]), "--port",
                                str(port), "--grpc-port", "0", "--workdir", str(tmp_path / "w")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        first = process.stdout.readline()  # printed once the server is ready
        assert f"serving on http://127.0.0.1:{port}" in first
        assert tritonclient_http.InferenceServerClient(f"127.0.0.1:{port}").is_model_ready("tiny")
    finally:
        process.send_signal(signal.SIGINT)
        try:  # graceful stop: Triton's 10 s exit timeout, then 20 s before SIGKILL; slack for a loaded box
            out, _ = process.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
            log = tmp_path / "w" / "tritonserver.log"
            pytest.fail(f"serve did not exit 150 s after SIGINT; output: {out!r}; "
                        f"log tail: {log.read_text()[-2000:] if log.exists() else '(none)'}")
    assert process.returncode == 0, first + out


def test_startup_failure_names_the_log(task_graphs, tmp_path):
    _triton_or_skip()
    from h2t_edge.serving.serve import TritonServer, free_port

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "bad").mkdir()
    (tmp_path / "empty" / "bad" / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: 1\n')
    with pytest.raises(ServingError, match="tritonserver exited with code .*tritonserver.log"):
        TritonServer(tmp_path / "empty", http_port=free_port(), grpc_port=0, workdir=tmp_path / "w").start()


def test_client_follows_the_served_preprocessing_contract(server, task_graphs, photo_paths):
    """A client that knows only the server: it reads the contract from the model config, preprocesses
    real photos with it and gets what Predictor.predict_paths gives for the same files."""
    from h2t_edge.serving.triton_repo import preprocess_contract
    from runtime.preprocess import preprocess_batch

    client = tritonclient_http.InferenceServerClient(server.endpoints.http)
    images = preprocess_batch(photo_paths, preprocess_contract(client.get_model_config("tiny2")))
    inputs = [tritonclient_http.InferInput("images", list(images.shape), "FP32")]
    inputs[0].set_data_from_numpy(images)
    served = client.infer("tiny2", inputs).as_numpy("probabilities")
    with Predictor.load(task_graphs[1]) as predictor:
        expected = np.stack([p.probabilities for p in predictor.predict_paths(photo_paths)])
    np.testing.assert_array_equal(served, expected)


def test_multi_task_graph_is_served_with_every_output(multi_task_graph, tmp_path):
    _triton_or_skip()
    images = np.random.default_rng(5).normal(size=(3, 3, 32, 32)).astype(np.float32)
    with Predictor.load(multi_task_graph) as predictor:
        expected = predictor.runner.infer({"images": images})
    with serve([multi_task_graph], http_port=0, grpc_port=0, workdir=tmp_path / "serve") as server:
        client = tritonclient_grpc.InferenceServerClient(server.endpoints.grpc)
        inputs = [tritonclient_grpc.InferInput("images", list(images.shape), "FP32")]
        inputs[0].set_data_from_numpy(images)
        result = client.infer("animals_objects", inputs)
    assert len(expected) == 4
    for name, array in expected.items():
        np.testing.assert_array_equal(result.as_numpy(name), array)


def test_serve_with_trusted_keys_signs_its_repository_and_the_models_check_it(tmp_path):
    """With trusted keys, the served repository is signed by a key of the run (which the server trusts
    beside the given one), checked before the server starts, and each model checks it at load."""
    _triton_or_skip()
    pytest.importorskip("cryptography")
    from conftest import write_task

    from h2t_edge.serving.triton_python_model import MANIFEST_FILE
    from runtime.trust import SigningKey

    key = SigningKey.generate()
    pub = key.save(tmp_path / "keys")[1]
    graph = write_task(tmp_path / "graphs", "cats", 0)
    graph.with_suffix(".json").write_text(json.dumps(seal(json.loads(graph.with_suffix(".json").read_text()), key)))
    with serve([graph], http_port=0, grpc_port=0, workdir=tmp_path / "serve", threads=1,
               trusted_keys=[pub]) as running:
        client = tritonclient_http.InferenceServerClient(running.endpoints.http)
        assert client.is_model_ready("cats")
        manifest = json.loads((tmp_path / "serve" / "model_repository" / "cats" / MANIFEST_FILE).read_text())
        assert manifest["signature"]["key_id"] != key.key_id  # signed by the run's own key
    unsigned = write_task(tmp_path / "other", "dogs", 1)
    with pytest.raises(ServingError, match="is not signed"):
        serve([unsigned], http_port=0, grpc_port=0, workdir=tmp_path / "serve2", trusted_keys=[pub])
