"""One Predictor shared by 8 threads gives exactly the results of serial calls (the soak benchmark,
benchmarks/soak.py, runs mixed requests for minutes; this is its fast, exact core)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from runtime.predictor import Predictor


def test_eight_threads_match_serial_results(tiny_graph, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(24):
        h, w = rng.integers(20, 90, size=2)
        path = tmp_path / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    paths.insert(3, tmp_path / "broken.png")
    # Each request: a different slice, batch size and entry point.
    requests = [(paths[i % 7: i % 7 + 5 + i % 11], 1 + i % 4) for i in range(64)]
    arrays = np.random.default_rng(1).normal(size=(16, 3, 32, 32)).astype(np.float32)

    with Predictor.load(tiny_graph.path) as predictor:
        def run(k):
            chunk, batch = requests[k]
            if k % 5 == 4:
                return predictor.predict_arrays(arrays[k % 8: k % 8 + batch])
            return [(p.label, p.index, p.error, None if p.probabilities is None else p.probabilities.tobytes())
                    for p in predictor.predict_paths(chunk, batch_size=batch, on_error="skip")]

        serial = [run(k) for k in range(len(requests))]
        with ThreadPoolExecutor(max_workers=8) as pool:
            threaded = list(pool.map(run, range(len(requests))))
            threaded_again = list(pool.map(run, reversed(range(len(requests)))))[::-1]
    for a, b, c in zip(serial, threaded, threaded_again):
        if isinstance(a, tuple):  # predict_arrays: (probabilities, logits), bit-exact
            for x, y, z in zip(a, b, c):
                np.testing.assert_array_equal(x, y)
                np.testing.assert_array_equal(x, z)
        else:
            assert a == b == c
    assert any(p[2] for r in serial if isinstance(r, list) for p in r)  # the broken file was in the mix
