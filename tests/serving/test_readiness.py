"""Readiness: while a replica loads its model, the ingress answers at once (liveness 200, readiness and API
calls 503 with Retry-After in OpenAI's shape) instead of letting requests hang; once loaded, /readyz is 200
and requests are served. The replica's own port (metrics_port, what Kubernetes probes) says the same."""
import threading
import time
import urllib.request

import httpx
import pytest

MODEL = "indexcache-tiny"


def gated_server_class(gate_path: str):
    """IndexCacheServer whose constructor waits for `gate_path` to exist before loading: a slow model load
    the test controls. Built in a function so Ray pickles it by value into the replica."""
    from indexcache.serving.server import IndexCacheServer

    class GatedServer(IndexCacheServer):
        def __init__(self, *args, **kwargs):
            import os
            while not os.path.exists(gate_path):
                time.sleep(0.05)
            super().__init__(*args, **kwargs)

    return GatedServer


def test_while_the_model_loads_requests_get_503_with_retry_after_then_are_served(serve_app, tmp_path):
    from ray import serve

    from indexcache.serving.ingress import OpenAIIngress

    gate = tmp_path / "loaded"
    server = serve.deployment(gated_server_class(str(gate)), name="IndexCacheServer").options(
        ray_actor_options={"num_cpus": 0})
    ingress = serve.deployment(OpenAIIngress, name="OpenAIIngress").options(ray_actor_options={"num_cpus": 0})
    app = ingress.bind(server.bind(model="tiny", max_model_len=128, max_batch_size=2, deployment="loading"))
    # serve.run waits for the whole app: run it aside, as `indexcache serve` does while the port already listens
    deploying = threading.Thread(target=serve.run, args=(app,), kwargs=dict(name="loading", route_prefix="/loading"),
                                 daemon=True)
    deploying.start()
    url = serve_app.url + "/loading"
    try:
        deadline = time.monotonic() + 60   # the ingress comes up; the server is stuck "loading"
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        live = httpx.get(f"{url}/healthz", timeout=5)
        assert live.status_code == 200 and live.json()["ready"] is False
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.headers["retry-after"] and ready.json()["status"] == "not ready"
        for method, path, body in (("POST", "/v1/completions", {"prompt": "x"}),
                                   ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                                   ("GET", "/v1/models", None)):
            t0 = time.monotonic()
            r = httpx.request(method, url + path, json=body, timeout=30)
            assert time.monotonic() - t0 < 10, "the request hung instead of getting its 503"
            assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, (path, r.text)
            assert r.json()["error"]["code"] == "model_not_ready" and set(r.json()["error"]) == {
                "message", "type", "param", "code"}
        # bad input is still refused as bad input, loading or not
        assert httpx.post(f"{url}/v1/completions", json={"prompt": [True]}, timeout=10).status_code == 400

        gate.touch()   # the model "finishes loading"
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.2)
        assert httpx.get(f"{url}/readyz", timeout=10).json()["model"] == MODEL
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "ready now", "max_tokens": 3, "temperature": 0},
                       timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        # the 503s were counted as rejections while the model loaded
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = httpx.get(f"{url}/metrics", timeout=10).text
            line = next(l for l in text.splitlines() if l.startswith("indexcache_requests_rejected_total{")
                        and 'reason="not_ready"' in l)
            if float(line.rsplit(" ", 1)[1]) >= 3:
                break
            time.sleep(0.3)
        assert float(line.rsplit(" ", 1)[1]) >= 3
    finally:
        gate.touch()
        deploying.join(60)
        serve.delete("loading")


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers
    except OSError:
        return None, b"", {}


def test_the_replica_port_is_not_ready_while_loading_then_ready_with_metrics(monkeypatch):
    """What the operator's worker readiness probe asks (/readyz on metrics_port), in-process."""
    import socket

    from indexcache.serving import server as server_module

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    release, real_load = threading.Event(), server_module.load_model

    def slow_load(*args, **kwargs):
        release.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(server_module, "load_model", slow_load)
    built = []
    loader = threading.Thread(target=lambda: built.append(server_module.IndexCacheServer(
        model="tiny", max_model_len=64, max_batch_size=1, metrics_port=port)))
    loader.start()
    try:
        deadline = time.monotonic() + 10
        while _get(port, "/healthz")[0] != 200:
            assert time.monotonic() < deadline, "the replica port never came up"
            time.sleep(0.05)
        status, body, headers = _get(port, "/readyz")
        assert status == 503 and b"loading" in body and headers["Retry-After"]
        release.set()
        loader.join(30)
        status, body, _ = _get(port, "/readyz")
        assert status == 200 and b'"ready"' in body
        status, body, _ = _get(port, "/metrics")
        assert status == 200 and b"indexcache_layers" in body
        built[0].engine.stop()
        assert _get(port, "/readyz")[0] == 503   # a dead engine is not ready
    finally:
        release.set()
        loader.join(30)
        if built:
            built[0].port.close()
