"""Shared serving fixtures: the tiny random model (same weights as `indexcache serve --tiny`) and its tokenizer."""
import random

import pytest

from indexcache.model.tiny import CharTokenizer, tiny_model


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model's matmuls are far too small to gain from threads; on a 2-core CI machine shared with
    Ray's processes, two torch threads made these tests ~5x slower. Restored after each test, so other
    areas' tests keep torch's default."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def tokenizer():
    return CharTokenizer()


@pytest.fixture
def random_prompts(model):
    """Factory: n fresh random prompts (token ids, no specials) of lengths in [lo, hi]."""
    def make(n, lo=3, hi=40, seed=None):
        rng = random.Random(seed)
        return [[rng.randrange(2, model.args.vocab_size) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    return make


# ---------------------------------------------------------------------------------------------------
# one Ray Serve instance for the whole test session, deployed the way KubeRay does (a Serve config with
# the import path, builder args and IndexCacheServer's user_config), so pattern changes are real
# user_config updates through reconfigure()
# ---------------------------------------------------------------------------------------------------
import os  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

SERVING_DIR = str(Path(__file__).resolve().parents[2] / "serving")
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeApp:
    def __init__(self, port, app_args):
        self.port, self.app_args = port, app_args
        self.url = f"http://127.0.0.1:{port}"
        self.api_key = API_KEY

    def config(self, user_config, ingress_user_config=None):
        from ray.serve.schema import ServeDeploySchema
        deployments = [{"name": "IndexCacheServer", "user_config": user_config}]
        if ingress_user_config is not None:
            deployments.append({"name": "OpenAIIngress", "user_config": ingress_user_config})
        return ServeDeploySchema.model_validate({
            "http_options": {"host": "127.0.0.1", "port": self.port},
            "applications": [{
                "name": "indexcache", "route_prefix": "/", "import_path": "indexcache.serving.app:build_app",
                "runtime_env": {"env_vars": {"PYTHONPATH": SERVING_DIR}}, "args": self.app_args,
                "deployments": deployments}]})

    def deploy(self, user_config, ingress_user_config=None):
        """Apply a Serve config (what KubeRay does on a RayService update) and wait until it is live."""
        from ray import serve
        from ray.serve.context import _get_global_client
        _get_global_client().deploy_apps(self.config(user_config, ingress_user_config), _blocking=True)
        want = user_config.get("pattern_version")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            app = serve.status().applications.get("indexcache")
            if app is not None and app.status == "RUNNING":
                info = self.server().info.remote().result()
                if want is None or info["pattern_version"] == want:
                    return info
            time.sleep(0.1)
        raise TimeoutError(f"the app did not reach user_config {user_config}")

    def server(self):
        from ray import serve
        return serve.get_deployment_handle("IndexCacheServer", "indexcache")

    def client(self, **kw):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0, **kw)


@pytest.fixture(scope="session")
def serve_app(tmp_path_factory):
    import ray
    from ray import serve

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from indexcache.serving.app import local_serve_env
    port = free_port()
    # the Serve settings `indexcache serve` runs with (set before Ray starts: its processes inherit them)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": SERVING_DIR, **local_serve_env()}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = ServeApp(port, {"model": "tiny", "max_model_len": 256, "max_batch_size": 4, "max_ongoing_requests": 6,
                          "api_key": API_KEY, "gpu_hourly_usd": 3.6, "deployment": "test-icd",
                          "samples_dir": str(tmp_path_factory.mktemp("samples"))})
    app.deploy({"pattern": "FFFFFF", "pattern_version": 1})
    yield app
    serve.shutdown()
    ray.shutdown()


def make_faulty_engine(poison: int, after: int):
    """An Engine that raises inside its (batched) forward once a request whose prompt starts with token
    `poison` has produced `after` tokens: a fault only that request triggers. Built inside this function
    so that Ray pickles the class by value into the Serve replica (a test module is not importable there)."""
    from indexcache.engine import Engine

    class FaultyEngine(Engine):
        POISON = poison

        def _forward(self, tokens, starts, slots, pattern, logits_at):
            if any(r.prompt[0] == poison and r.slot in slots and len(r.output) >= after for r in self.running):
                raise RuntimeError("injected fault")
            return super()._forward(tokens, starts, slots, pattern, logits_at)

    return FaultyEngine


@pytest.fixture(scope="session")
def faulty_engine():
    """Factory: make_faulty_engine(poison, after)."""
    return make_faulty_engine
