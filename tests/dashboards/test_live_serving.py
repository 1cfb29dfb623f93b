"""A real Prometheus scrapes a real `indexcache serve --tiny` under a short load; every panel over serving
metrics must then show data. Starts Ray (about a minute on a 2-core machine), hence `slow`:
    pytest -m slow tests/dashboards/test_live_serving.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prom_helpers import Prometheus, free_port, substitute

from dashboards import build
from dashboards.definitions import DASHBOARDS

SERVE = [sys.executable, "-c", "import sys; from indexcache.cli import main; sys.exit(main())", "serve"]


def serving_queries() -> dict[str, str]:
    """Panel queries over serving metrics (operator panels need the operator, not the server)."""
    return {substitute(expr): f"{dash.uid}: {title}" for dash in DASHBOARDS for title, expr in dash.queries()
            if "indexcache_operator_" not in expr and "up{" not in expr}


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(build.ROOT / "serving"), str(build.ROOT / "operator"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    help_text = subprocess.run(SERVE + ["--help"], capture_output=True, text=True, env=_env(), timeout=120)
    if help_text.returncode != 0 or "--tiny" not in help_text.stdout:
        pytest.fail("`indexcache serve --tiny` is not available in this checkout (the serving app provides it):\n"
                    + help_text.stdout[-500:] + help_text.stderr[-1500:])
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    proc = subprocess.Popen(SERVE + ["--tiny", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"indexcache serve --tiny did not become healthy:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _load(url: str, stop: threading.Event) -> int:
    from openai import OpenAI
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
    model = client.models.list().data[0].id
    done = 0

    def one(i: int) -> None:
        stream = client.completions.create(model=model, prompt=f"Request {i}: the quick brown fox", max_tokens=8,
                                           temperature=0, stream=True)
        assert sum(1 for _ in stream) > 0

    with ThreadPoolExecutor(max_workers=3) as pool:
        while not stop.is_set():
            list(pool.map(one, range(done, done + 3)))
            done += 3
    return done


@pytest.mark.slow
def test_every_serving_panel_shows_data_from_a_live_server(tiny_server):
    stop = threading.Event()
    result: dict = {}
    loader = threading.Thread(target=lambda: result.setdefault("requests", _load(tiny_server, stop)), daemon=True)
    with Prometheus({"indexcache-serving": tiny_server.removeprefix("http://")}) as prom:
        loader.start()
        queries = serving_queries()
        empty = prom.wait_for(list(queries), timeout=120)
        stop.set()
        loader.join(timeout=120)
        assert result.get("requests", 0) > 0, "the load generator finished no request"
        assert not empty, "panels without data:\n" + "\n".join(f"  {queries[e]}: {e}" for e in empty)
