"""The operator and the serving app meet only through what the operator writes (a serve config, user_configs,
a calibrate Job's arguments) and what `indexcache calibrate` writes back (the result ConfigMap). Here every
one of those goes through the other side's own code: the serve config through Ray Serve's import-path
resolver and the app's builder, the user_configs through a live replica's reconfigure(), the Job arguments
through the `indexcache` CLI's parser, and a real calibration result through the running operator."""
import json

import pytest
import yaml
from ray._common.utils import import_attr

from indexcache import cli
from indexcache.model.checkpoint import save_checkpoint
from indexcache.model.config import ModelArgs
from indexcache.model.tiny import TINY_CONFIG
from indexcache.serving.kube import parse_configmap_target
from indexcache.serving.server import IndexCacheServer
from indexcache_contracts.calibration import check_calibration_result
from indexcache_contracts.serve_app import INGRESS_HEADROOM, check_ingress_config, parse_app_args, server_resources
from indexcache_operator import builders as b
from indexcache_operator.config import OperatorConfig
from indexcache_operator.models import IndexCacheDeploymentSpec
from indexcache_operator.reconcile import spec_pattern
from ray.serve import Application
from tiny_models import random_model

LAYERS = TINY_CONFIG["n_layers"]   # the specs describe the tiny model, so a live replica can take their patterns
OWNER = b.Owner(name="chat", namespace="serving", uid="1234")

SPECS = [
    {"indexCache": {"pattern": "FFSFSS"}},
    {"indexCache": {"freq": 2, "offset": 1}},
    {"indexCache": {"freq": 3}},
    {"indexCache": {}},                                                  # the checkpoint's own pattern
    {"replicas": 0, "autoscaling": {"minReplicas": 0, "maxReplicas": 3}, "indexCache": {"freq": 2}},
    {"replicas": 3, "maxOngoingRequests": 5, "traffic": {"sampleRate": 0.0}, "cost": {"gpuHourlyUSD": 0}},
    {"model": {"uri": "smollm2", "servedModelName": "small"}, "gpusPerReplica": 2},
]


def spec(over: dict) -> IndexCacheDeploymentSpec:
    base = {"model": {"uri": "/models/tiny", "numLayers": LAYERS}, "replicas": 2, "gpusPerReplica": 1,
            "cost": {"gpuHourlyUSD": 2.5}, "traffic": {"sampleRate": 0.1},
            "recalibration": {"schedule": "0 3 * * *", "targetFullFraction": 0.5}}
    base.update(over)
    return IndexCacheDeploymentSpec.model_validate(base)


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    """A live IndexCacheServer (the tiny model, in-process) with a samples volume, as on a worker pod."""
    server = IndexCacheServer(model="tiny", max_model_len=64, max_batch_size=1,
                              samples_dir=str(tmp_path_factory.mktemp("samples")))
    yield server
    server.engine.stop()
    server.sampler.stop()


@pytest.mark.parametrize("over", SPECS, ids=lambda o: json.dumps(o, sort_keys=True))
def test_every_serve_config_the_operator_builds_passes_the_serving_apps_own_parsers(over, replica):
    s = spec(over)
    pattern = spec_pattern(s)
    app = yaml.safe_load(b.rayservice(OWNER, s, OperatorConfig(), pattern, 4)["spec"]["serveConfigV2"])
    app = app["applications"][0]
    # Ray Serve resolves the import path the way a RayService does, and the builder takes the args
    builder = import_attr(app["import_path"])
    assert isinstance(builder(app["args"]), Application)
    assert parse_app_args(app["args"]).model == s.model.uri
    # gpusPerReplica is the replica's tensor-parallel size, and the app's own resource rule gives its bundles
    assert parse_app_args(app["args"]).tensor_parallel_size == s.gpus_per_replica
    server_options = {k: v for k, v in {d["name"]: d for d in app["deployments"]}["IndexCacheServer"].items()
                      if k in ("ray_actor_options", "placement_group_bundles", "placement_group_strategy")}
    assert server_options == server_resources(s.gpus_per_replica, 1, 1) if s.gpus_per_replica > 1 else \
        server_options == {"ray_actor_options": {"num_gpus": 1}}
    deployments = {d["name"]: d for d in app["deployments"]}
    # the server's user_config: a live replica applies it (no pattern key: it keeps the one it runs)
    before = replica.info()["pattern"]
    replica.reconfigure(deployments["IndexCacheServer"]["user_config"])
    info = replica.info()
    assert info["pattern_version"] == 4
    assert info["pattern"] == (pattern or before)
    assert replica.metrics.gpu_hourly_usd == s.cost.gpu_hourly_usd * s.gpus_per_replica
    # the ingress's user_config: the limit it enforces, and Serve's cap above it by the agreed headroom
    ingress = deployments["OpenAIIngress"]
    limit = check_ingress_config(ingress["user_config"])
    assert limit == b.app_max_ongoing_requests(s)
    assert ingress["max_ongoing_requests"] == limit + INGRESS_HEADROOM


@pytest.mark.parametrize("over", [o for o in SPECS if o.get("indexCache", {}).get("freq")])
def test_freq_and_offset_give_the_pattern_the_checkpoint_itself_would_use(over):
    """An operator spec and a checkpoint config with the same freq/offset mean the same layers."""
    s = spec(over)
    ic = s.index_cache
    hf_keys = {"index_topk_freq": ic.freq, **({"index_skip_topk_offset": ic.offset} if ic.offset else {})}
    args = ModelArgs(**{**TINY_CONFIG, **hf_keys})
    assert spec_pattern(s) == args.pattern


def test_the_recalibration_job_arguments_parse_as_indexcache_calibrate():
    s = spec({})
    argv = [a.replace("$(POD_NAMESPACE)", "serving").replace("$(JOB_NAME)", "chat-recal-1")
            for a in b.calibrate_args(s)]
    args = cli.build_parser().parse_args(argv)
    assert args.func is cli.cmd_calibrate
    assert (args.model, args.samples, args.target_full) == (s.model.uri, [b.SAMPLES_DIR], 0.5)
    assert parse_configmap_target(args.report_configmap) == ("serving", "chat-recal-1-result")
    assert args.out.startswith(b.RESULTS_DIR + "/")


def test_a_real_calibrate_result_reaches_the_running_operator(api, operator, kit, tmp_path):
    # `indexcache calibrate` on a tiny 8-layer checkpoint, as the Job runs it
    ckpt = save_checkpoint(random_model("gqa", seed=1, indexer_layers=None, projection_std=0.3, n_layers=8),
                           tmp_path / "ckpt")
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"token_ids": [2 + (7 * i + j) % 90 for j in range(40)],
                                           "tokenizer": "ckpt"}) + "\n" for i in range(6)))
    out = tmp_path / "result.json"
    assert cli.main(["calibrate", "--model", str(ckpt), "--samples", str(samples), "--target-full", "0.25",
                     "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    result = check_calibration_result(json.loads(out.read_text()))
    assert result["num_layers"] == 8 and result["full_layers"] == 2

    # the operator reads it from the ConfigMap and rolls the pattern out through the gate
    k = kit.k
    api.kube.create(kit.ICDS, kit.NS, kit.icd("chat", recalibration={"autoApply": "Gated",
                                                                      "maxLossDelta": abs(result["loss_delta"]) + 1}))
    kit.wait_for(lambda: api.get(k.RAYSERVICES, "chat"), what="RayService")
    kit.kuberay_reports_healthy(api, "chat", ready=2)
    operator.wait_idle()
    api.kube.patch(kit.ICDS, kit.NS, "chat", {"metadata": {"annotations": {"indexcache.io/recalibrate": "now"}}})
    job = kit.wait_for(lambda: next(iter(api.names(k.JOBS)), None), what="the recalibration Job")
    kit.job_finishes(api, job, json.loads(out.read_text()))
    last = kit.wait_for(lambda: ((api.get(kit.ICDS, "chat").get("status") or {}).get("recalibration") or {})
                        .get("last", {}).get("job") == job
                        and api.get(kit.ICDS, "chat")["status"]["recalibration"]["last"], what="the result read")
    assert (last["result"], last["decision"], last["pattern"]) == ("Succeeded", "Applied", result["pattern"])
    assert last["lossDelta"] == pytest.approx(result["loss_delta"])
    assert last["fullLayers"] == 2
    kit.wait_for(lambda: yaml.safe_load(api.get(k.RAYSERVICES, "chat")["spec"]["serveConfigV2"])
                 ["applications"][0]["deployments"][0]["user_config"].get("pattern") == result["pattern"],
                 what="the calibrated pattern in the replicas' user_config")


def test_what_indexcache_fetch_reports_is_what_the_operator_reads(tmp_path, monkeypatch):
    """The fetch-model init container the operator builds, run through the real `indexcache fetch`; its
    termination message, read back as the kubelet reports it, becomes status.model (the bundled tiny model:
    a revision and a cache path) or ModelReady's reason (a Hub-compatible endpoint refusing the token)."""
    from indexcache_operator import delivery
    from model_sources import FakeHub

    import huggingface_hub.constants   # no telemetry call to the endpoint read at import (the real Hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    message = tmp_path / "termination-log"
    monkeypatch.setenv("INDEXCACHE_TERMINATION_LOG", str(message))
    for var in ("INDEXCACHE_OFFLINE", "HF_HUB_OFFLINE", "INDEXCACHE_MODEL_CACHE"):
        monkeypatch.delenv(var, raising=False)

    def run_init_container(uri: str, **env) -> delivery.ModelReport:
        init = b.fetch_model_container(IndexCacheDeploymentSpec.model_validate({"model": {"uri": uri}}), "image")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        exit_code = cli.main([str(tmp_path / "cache") if a == b.MODEL_CACHE_DIR else a for a in init["args"]])
        pod = {"metadata": {"name": "chat-gpu-a", "labels": {"app.kubernetes.io/component": "serving"}},
               "spec": {"initContainers": [init]},
               "status": {"initContainerStatuses": [{"name": init["name"], "state": {"terminated": {
                   "exitCode": exit_code, "message": message.read_text(), "finishedAt": "2026-12-01T10:00:00Z"}}}]}}
        return delivery.model_report(uri, [delivery.fetch_outcome(pod)], None)

    fetched = run_init_container("tiny")
    assert (fetched.ready, fetched.reason) == (True, "Fetched")
    assert fetched.model.revision and (tmp_path / "cache" / fetched.model.path.rsplit("/", 1)[-1] / "config.json").is_file()

    repo = FakeHub.make_repo({"config.json": b"{}"}, token="hf_right")
    with FakeHub({"acme/glm5": repo}) as hub:
        refused = run_init_container("hf://acme/glm5", HF_ENDPOINT=hub.url, HF_TOKEN="hf_wrong",
                                     HF_HOME=str(tmp_path / "hf-home"))
    assert (refused.ready, refused.reason, refused.serving_failed) == (False, "Auth", True)
    assert "HF_TOKEN" in refused.message and refused.model is None
