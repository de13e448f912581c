"""Our metric wrappers against a real tritonserver, updated from many threads of one model at once.

Without the wrappers' lock, two threads updating one metric crash tritonserver (SIGSEGV in the
Python backend); that crash took the server down in the real-size engine benchmark.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from triton_helpers import metric

from granite_speech_triton.serving import server

pytestmark = pytest.mark.server
REPOSITORY = Path(__file__).parent / "fixtures" / "metrics_repository"
THREADS, UPDATES = 8, 200


def test_metrics_updated_from_many_threads_at_once_keep_the_server_up_and_count_exactly(tmp_path):
    http, grpc, metrics = server.free_port(), server.free_port(), server.free_port()
    options = server.ServerOptions(
        repositories=[REPOSITORY], build_dir=Path("build"), http_port=http, grpc_port=grpc, metrics_port=metrics
    )
    log_path = tmp_path / "server.log"
    process = server.start(options, log_path)
    try:
        server.wait_ready(http, process, log_path)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}", network_timeout=600.0)
        inputs = []
        for name, value in (("THREADS", THREADS), ("UPDATES", UPDATES)):
            inputs.append(httpclient.InferInput(name, [1], "INT32"))
            inputs[-1].set_data_from_numpy(np.array([value], dtype=np.int32))
        for _ in range(2):
            client.infer("thread_metrics", inputs)
        client.close()
        assert process.poll() is None, log_path.read_text()[-2000:]
        url = f"http://127.0.0.1:{metrics}/metrics"
        assert metric(url, "test_thread_updates_total", model="thread_metrics") == 2 * THREADS * UPDATES
        assert metric(url, "test_thread_values_count", model="thread_metrics") == 2 * THREADS * UPDATES
        assert metric(url, "test_thread_values_bucket", model="thread_metrics", le="0.5") == 0
    finally:
        server.stop(process)
