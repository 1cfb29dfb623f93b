"""indexCache.freq without model.numLayers (issue 19 item 12): the operator passes freq/offset through the
RayService's user_config and the replica, which knows its layer count, resolves them by the upstream rule."""
import importlib

import pytest
import yaml

from indexcache_operator import builders as b
from indexcache_operator.config import OperatorConfig
from indexcache_operator.models import IndexCacheDeploymentSpec

OWNER = b.Owner(name="chat", namespace="serving", uid="1")


def _server_user_config(spec: dict, pattern=None) -> dict:
    rs = b.rayservice(OWNER, IndexCacheDeploymentSpec.model_validate(spec), OperatorConfig(), pattern, 1)
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    return next(d for d in app["deployments"] if d["name"] == "IndexCacheServer")["user_config"]


def test_freq_travels_to_the_replica_when_the_layer_count_is_unknown():
    cfg = _server_user_config({"model": {"uri": "/m"}, "indexCache": {"freq": 4}})
    assert (cfg["freq"], cfg["offset"], "pattern" in cfg) == (4, 2, False)
    cfg = _server_user_config({"model": {"uri": "/m"}, "indexCache": {"freq": 4, "offset": 3}})
    assert (cfg["freq"], cfg["offset"]) == (4, 3)
    # A calibrated (or expanded) pattern wins: no rule next to it.
    cfg = _server_user_config({"model": {"uri": "/m"}, "indexCache": {"freq": 4}}, pattern="FFSS")
    assert cfg["pattern"] == "FFSS" and "freq" not in cfg
    cfg = _server_user_config({"model": {"uri": "/m", "numLayers": 8}, "indexCache": {"freq": 4}})
    assert "freq" not in cfg  # the operator expanded it (spec_pattern); the builder got the pattern


def test_the_replica_resolves_freq_and_offset_with_its_layer_count():
    from indexcache.model.pattern import resolve_pattern
    from indexcache.serving.server import IndexCacheServer
    server = IndexCacheServer(model="tiny")
    try:
        layers = server.model.args.n_layers
        cfg = _server_user_config({"model": {"uri": "/models/tiny"}, "indexCache": {"freq": 2, "offset": 1}})
        server.reconfigure(cfg)
        assert server.engine.pattern == resolve_pattern(layers, freq=2, offset=1) != "F" * layers
        assert server.engine.pattern_version == 1
        with pytest.raises(ValueError, match=r"user_config\.freq must be an integer >= 1"):
            server.reconfigure({**cfg, "freq": 0})
    finally:
        server.engine.stop()


def test_on_kmock_status_shows_the_rule_and_the_resource_is_not_refused(api, operator, kit):
    body = kit.icd("chat")
    body["spec"] = {"model": {"uri": "/models/glm5"}, "replicas": 1, "indexCache": {"freq": 4}}
    api.kube.create(kit.ICDS, kit.NS, body)
    rs = kit.wait_for(lambda: api.get(kit.k.RAYSERVICES, "chat"), what="RayService")
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    server = next(d for d in app["deployments"] if d["name"] == "IndexCacheServer")
    assert (server["user_config"]["freq"], server["user_config"]["offset"]) == (4, 2)
    status = kit.wait_for(lambda: (api.get(kit.ICDS, "chat").get("status") or {}).get("patternRule") and
                          api.get(kit.ICDS, "chat")["status"], what="status")
    assert status["patternRule"] == "freq=4,offset=2" and "pattern" not in status
    assert kit.condition({"status": status}, "Degraded")["status"] == "False"
