"""OpenVINO backend against ONNX Runtime on the exported backbone (f32 and bf16 hints)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.backends import Runner, create_runner
from runtime.errors import ArtifactError, BackendUnavailable
from runtime.preprocess import PreprocessConfig, load_image, preprocess_image

openvino = pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'h2t-edge[openvino]'")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def reference(lite0_onnx, photos):
    """Real photos preprocessed for the backbone, and ONNX Runtime's outputs on them."""
    path, layout = lite0_onnx
    cfg = PreprocessConfig.from_dict(layout["preprocess"], source="layout")
    x = np.stack([preprocess_image(load_image(p), cfg) for p in photos.values()])
    with create_runner(path, "onnxruntime", providers=["CPUExecutionProvider"]) as ort_runner:
        return x, ort_runner.infer({"images": x})


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def ov_outputs(request, lite0_onnx, reference):
    x, _ = reference
    runner = create_runner(lite0_onnx[0], "openvino", precision=request.param)
    assert isinstance(runner, Runner)
    with runner:
        return request.param, runner.name, runner.output_names, runner.infer({"images": x})


def test_openvino_matches_onnxruntime(ov_outputs, reference):
    precision, name, names, outputs = ov_outputs
    _, expected = reference
    assert names == list(expected)
    # Tolerance: f32 differs from ORT by summation order only (1e-4 on unit-norm features);
    # bf16 keeps 8 mantissa bits, so unit-norm features move by up to about 5e-2.
    atol = 1e-4 if precision == "fp32" or "f32" in name else 5e-2
    for key, value in expected.items():
        np.testing.assert_allclose(outputs[key], value, atol=atol, err_msg=f"{name} tap {key}")


def test_openvino_logits_argmax_agrees(ov_outputs, reference):
    _, name, _, outputs = ov_outputs
    assert (outputs["logits"].argmax(1) == reference[1]["logits"].argmax(1)).all(), name


def test_openvino_reports_precision_and_checks_feed(lite0_onnx):
    with create_runner(lite0_onnx[0], "openvino", precision="bf16") as runner:
        assert runner.name.startswith("openvino[CPU,")
        assert runner.input_names == ["images"] and runner.input_shapes()["images"][1:] == [3, 224, 224]
        with pytest.raises(ArtifactError, match="float64"):
            runner.infer({"images": np.zeros((1, 3, 224, 224))})


def test_openvino_says_when_it_runs_f32_for_bf16(lite0_onnx):
    """A bf16 hint on a CPU without native bf16 runs f32: that is said (a warning), and the
    runner's name and `supports_precision` agree with what ran."""
    import warnings

    from runtime.backends.openvino import supports_precision

    native = supports_precision("bf16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with create_runner(lite0_onnx[0], "openvino", precision="bf16") as runner:
            ran = runner.precision
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "OpenVINO runs" in str(w.message)]
    assert ran == ("bf16" if native else "f32")
    if native:
        assert not said
    else:
        assert len(said) == 1 and "not the requested bf16" in said[0] and "in f32" in said[0]
    assert supports_precision("fp32")


def test_openvino_errors_are_typed(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        create_runner(tmp_path / "missing.onnx", "openvino").activate()
    with pytest.raises(BackendUnavailable, match="precision"):
        create_runner(tmp_path / "x.onnx", "openvino", precision="int4")
    with pytest.raises(BackendUnavailable, match="takes no option"):
        create_runner(tmp_path / "x.onnx", "openvino", providers=["CPU"])
