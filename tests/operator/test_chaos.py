"""Chaos: 200 random sequences of spec edits, recalibrate tokens (new and reused), Job outcomes, CronJob runs,
child deletions, KubeRay reports, operator restarts (also mid-reconcile, on an API error) and API faults.

The reconcile functions run directly against an in-memory API server (`FakeApi`: merge patches, the status
subresource, resourceVersion preconditions, generations, canonical quantities); the fault-injection tests
in test_faults.py run the real kopf against kmock, but 200 kopf runs would be too slow for CI. After every
step the operator reconciles until it writes nothing more, then:
- the children are what the spec says (RayService unless scaled to zero, with the expected pattern and
  version in its user_config; CronJob iff scheduled, suspended while an on-demand run has the GPUs);
- status says the same: the pattern an independent oracle expects (the spec's, or the newest applied
  calibration folded in run-id order), the version bumped exactly when it changed, the running Job, the
  queued token;
- no older calibration is ever applied (the applied run id never goes down), no token ever gets a second
  Job, and no recalibration Job is ever created while another one runs.
Seeded: the seed is printed; INDEXCACHE_TEST_SEED=<seed> replays a failure.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import random
from dataclasses import dataclass, field

import pytest
import yaml

from indexcache_operator import builders as b
from indexcache_operator import kube as k
from indexcache_operator import mergepatch
from indexcache_operator.config import OperatorConfig
from indexcache_operator.context import Context, ReconcileError
from indexcache_operator.metrics import OperatorMetrics
from indexcache_operator.models import IndexCacheDeploymentSpec
from indexcache_operator.patterns import pattern_from_freq
from indexcache_operator.reconcile import ICDS, calibration_basis, reconcile

SEED = int(os.environ.get("INDEXCACHE_TEST_SEED", random.SystemRandom().randrange(2**32)))
SEQUENCES, STEPS = 200, 10
NS, NAME = "serving", "chat"
PATTERNS = ("FFSSFSSS", "FSSSFSSS", "FFFFFFFF", "FSFSFSFS", "FSSSSSSS")
CANONICAL = {"jobs", "cronjobs", "persistentvolumeclaims"}


# ---- an in-memory API server ----------------------------------------------------------------------------

def _canonical(node):
    """Quantities under resources.requests/limits as the API server stores them: strings."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("requests", "limits") and isinstance(value, dict):
                node[key] = {n: str(v) for n, v in value.items()}
            else:
                _canonical(value)
    elif isinstance(node, list):
        for item in node:
            _canonical(item)
    return node


class FakeApi:
    """The calls `indexcache_operator.kube.Kube` makes, served from a dict, with what the operator relies on:
    resourceVersion on every write and as a patch precondition (409), generation bumps on spec changes,
    the status subresource (a main patch leaves status alone, a status patch leaves the rest), 404 and 409.
    `fail_after` raises an API error on the n-th next call (a fault, or a crash mid-reconcile)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.revision = 0
        self.clock = itertools.count(1)
        self.writes = 0
        self.fail_after: int | None = None
        self.job_creations: list[dict] = []  # every Job ever created, in order (who and while what ran)

    def _tick(self) -> None:
        if self.fail_after is not None:
            self.fail_after -= 1
            if self.fail_after <= 0:
                self.fail_after = None
                raise k.KubeError(500, "InternalError", "injected fault")

    def _bump(self, obj: dict) -> None:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)

    def get(self, res: k.Resource, ns: str, name: str) -> dict | None:
        self._tick()
        obj = self.objects.get((res.plural, ns, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, res: k.Resource, ns: str, labels: dict | None = None) -> list[dict]:
        self._tick()
        return [copy.deepcopy(o) for (plural, n, _), o in sorted(self.objects.items())
                if plural == res.plural and n == ns
                and all((o["metadata"].get("labels") or {}).get(key) == v for key, v in (labels or {}).items())]

    def create(self, res: k.Resource, ns: str, body: dict, by: str = "operator") -> dict:
        self._tick()
        key = (res.plural, ns, body["metadata"]["name"])
        if key in self.objects:
            raise k.KubeError(409, "AlreadyExists", f"{key} already exists")
        obj = copy.deepcopy(body)
        if res.plural in CANONICAL:
            _canonical(obj)
        seq = next(self.clock)
        obj["metadata"].update(uid=f"uid-{seq}", generation=1, creationTimestamp=f"2026-01-01T{seq // 3600:02d}:"
                               f"{seq // 60 % 60:02d}:{seq % 60:02d}Z", creationSeq=seq)
        self._bump(obj)
        if res.plural == "jobs":
            running = [o["metadata"]["name"] for (p, n, _), o in self.objects.items()
                       if p == "jobs" and n == ns and not _finished(o)]
            self.job_creations.append({"name": obj["metadata"]["name"], "by": by, "running": running,
                                       "token": (obj["metadata"].get("annotations") or {}).get("indexcache.io/token")})
        self.objects[key] = obj
        self.writes += 1
        return copy.deepcopy(obj)

    def patch(self, res: k.Resource, ns: str, name: str, patch: dict, subresource: str | None = None) -> dict:
        self._tick()
        obj = self.objects.get((res.plural, ns, name))
        if obj is None:
            raise k.KubeError(404, "NotFound", f"{res.plural} {name} not found")
        patch = copy.deepcopy(patch)
        expected = (patch.get("metadata") or {}).pop("resourceVersion", None)
        if expected is not None and expected != obj["metadata"]["resourceVersion"]:
            raise k.KubeError(409, "Conflict", "the object has been modified")
        if res.plural in CANONICAL:
            _canonical(patch)
        if subresource == "status":
            patch = {"status": patch.get("status")} if "status" in patch else {}
        else:
            patch.pop("status", None)
        updated = mergepatch.apply(obj, patch)
        if updated.get("spec") != obj.get("spec"):
            updated["metadata"]["generation"] = obj["metadata"]["generation"] + 1
        if updated != obj:
            self._bump(updated)
            self.objects[(res.plural, ns, name)] = updated
            self.writes += 1
        return copy.deepcopy(updated)

    def delete(self, res: k.Resource, ns: str, name: str) -> bool:
        self._tick()
        if self.objects.pop((res.plural, ns, name), None) is None:
            return False
        self.writes += 1
        return True


def _finished(job: dict) -> str | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            return cond["type"]
    return None


# ---- the oracle: what status must say, computed independently ------------------------------------------

def oracle_gate(spec: dict, loss_delta: float) -> bool:
    """Applied? (autoApply Never: no; Always: yes; Gated: loss delta within maxLossDelta)."""
    recal = spec.get("recalibration") or {}
    policy = recal.get("autoApply", "Gated")
    return policy == "Always" or (policy == "Gated" and loss_delta <= recal.get("maxLossDelta", 0.02))


@dataclass
class Oracle:
    last_id: int = 0
    applied: tuple[str, int, str] | None = None  # (pattern, run id, basis)
    applied_ids: list[int] = field(default_factory=list)

    def fold(self, api: FakeApi, spec: dict) -> None:
        """Fold the finished Jobs newer than the last folded, oldest run id first, as the contract says."""
        basis = calibration_basis(IndexCacheDeploymentSpec.model_validate(spec))
        done = []
        for (plural, _, name), job in api.objects.items():
            run = int((job["metadata"].get("annotations") or {}).get("indexcache.io/run-id", 0))
            if plural == "jobs" and _finished(job) and run > self.last_id:
                done.append((run, name, _finished(job)))
        for run, name, outcome in sorted(done):
            self.last_id = run
            cm = api.objects.get(("configmaps", NS, f"{name}-result"))
            if outcome != "Complete" or cm is None:
                continue
            result = json.loads(cm["data"]["result.json"])
            if oracle_gate(spec, result["loss_delta"]):
                self.applied = (result["pattern"], run, basis)
                self.applied_ids.append(run)

    def expected_pattern(self, spec: dict) -> tuple[str | None, str | None]:
        """(pattern, rule) the replicas must run."""
        basis = calibration_basis(IndexCacheDeploymentSpec.model_validate(spec))
        if self.applied is not None and self.applied[2] == basis:
            return self.applied[0], None
        self.applied = None  # a spec edit of model/indexCache retires an older calibration for good
        ic, layers = spec.get("indexCache") or {}, (spec.get("model") or {}).get("numLayers")
        if ic.get("pattern"):
            return ic["pattern"], None
        if ic.get("freq") is not None:
            offset = ic.get("offset", 2)
            if layers:
                return pattern_from_freq(layers, ic["freq"], offset), None
            return None, f"freq={ic['freq']},offset={offset}"
        return None, None


# ---- the world: the resource, the Job and CronJob controllers, KubeRay ----------------------------------

def random_spec(rng: random.Random) -> dict:
    model = {"uri": "/models/glm5-tiny"}
    if rng.random() < 0.75:
        model["numLayers"] = 8
    index_cache = rng.choice([{"pattern": rng.choice(PATTERNS)}, {"freq": rng.choice([1, 2, 4])},
                              {"freq": 4, "offset": rng.choice([1, 3])}, {}])
    recal = {"autoApply": rng.choice(["Gated", "Gated", "Always", "Never"]),
             "maxLossDelta": rng.choice([0.0, 0.02, 0.1])}
    if rng.random() < 0.5:
        recal.update(schedule="0 3 * * *", suspend=rng.random() < 0.2)
    return {"model": model, "replicas": rng.choice([0, 1, 2, 3]), "indexCache": index_cache,
            "recalibration": recal, "gpusPerReplica": rng.choice([1, 2])}


class World:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.api = FakeApi()
        self.events: list[tuple[str, str, str]] = []
        self.tokens: list[str] = []
        self.oracle = Oracle()
        self.log: list[str] = []
        self.restart()
        body = {"apiVersion": "indexcache.io/v1alpha1", "kind": "IndexCacheDeployment",
                "metadata": {"name": NAME, "namespace": NS}, "spec": random_spec(rng)}
        self.api.create(ICDS, NS, body, by="user")

    def restart(self) -> None:
        """A new operator process: fresh locks and metrics; everything else is in the API server."""
        self.ctx = Context(kube=self.api, config=OperatorConfig(), metrics=OperatorMetrics(),
                           events=lambda body, type_, reason, message: self.events.append((type_, reason, message)))

    @property
    def body(self) -> dict:
        return self.api.objects[("indexcachedeployments", NS, NAME)]

    def jobs(self) -> list[dict]:
        return [o for (p, _, _), o in self.api.objects.items() if p == "jobs"]

    def running(self) -> list[dict]:
        return [j for j in self.jobs() if not _finished(j)]

    # -- the actors --
    def edit_spec(self) -> str:
        spec = copy.deepcopy(self.body["spec"])
        fresh = random_spec(self.rng)
        key = self.rng.choice(list(fresh))
        spec[key] = fresh[key]
        self.api.patch(ICDS, NS, NAME, {"spec": {key: None}})  # replace the whole field
        self.api.patch(ICDS, NS, NAME, {"spec": {key: spec[key]}})
        return f"spec.{key} = {spec[key]}"

    def annotate(self, reuse: bool) -> str:
        if reuse and self.tokens:
            token = self.rng.choice(self.tokens[-3:])
        else:
            token = f"t{len(self.tokens)}"
            self.tokens.append(token)
        self.api.patch(ICDS, NS, NAME, {"metadata": {"annotations": {"indexcache.io/recalibrate": token}}})
        return f"annotate {token}"

    def finish_job(self) -> str:
        running = self.running()
        if not running:
            return "no Job to finish"
        job = self.rng.choice(running)
        name = job["metadata"]["name"]
        if self.rng.random() < 0.7:
            pattern, delta = self.rng.choice(PATTERNS), self.rng.choice([0.0, 0.01, 0.05, 0.3])
            self.api.create(k.CONFIGMAPS, NS, {"apiVersion": "v1", "kind": "ConfigMap",
                                               "metadata": {"name": f"{name}-result", "namespace": NS},
                                               "data": {"result.json": json.dumps({"pattern": pattern,
                                                                                   "loss_delta": delta,
                                                                                   "num_layers": 8})}}, by="job")
            cond = "Complete"
            what = f"{name} succeeds: {pattern} {delta:+.2f}"
        else:
            cond, what = "Failed", f"{name} fails"
        self.api.patch(k.JOBS, NS, name, {"status": {"conditions": [
            {"type": cond, "status": "True", "lastTransitionTime": "2026-01-02T00:00:00Z"}]}}, subresource="status")
        return what

    def cron_fires(self) -> str:
        cron = self.api.objects.get(("cronjobs", NS, f"{NAME}-recal"))
        if cron is None or cron["spec"]["suspend"]:
            return "CronJob absent or suspended"
        if any((j["metadata"].get("annotations") or {}).get("indexcache.io/trigger") == "schedule"
               for j in self.running()):
            return "CronJob: Forbid (its Job still runs)"
        template = cron["spec"]["jobTemplate"]
        name = f"{NAME}-recal-{29000000 + next(self.api.clock)}"
        self.api.create(k.JOBS, NS, {"apiVersion": "batch/v1", "kind": "Job",
                                     "metadata": {"name": name, "namespace": NS, **copy.deepcopy(template["metadata"])},
                                     "spec": copy.deepcopy(template["spec"])}, by="cronjob")
        return f"CronJob starts {name}"

    def delete_child(self) -> str:
        candidates = [key for key in self.api.objects if key[0] != "indexcachedeployments"]
        if not candidates:
            return "nothing to delete"
        key = self.rng.choice(sorted(candidates))
        del self.api.objects[key]
        return f"delete {key[0]}/{key[2]}"

    def kuberay_reports(self) -> str:
        rs = self.api.objects.get(("rayservices", NS, NAME))
        if rs is None:
            return "no RayService to report"
        ready = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"]
        self.api.patch(k.RAYSERVICES, NS, NAME, {"status": {
            "observedGeneration": rs["metadata"]["generation"],
            "activeServiceStatus": {
                "applicationStatuses": {"indexcache": {"status": "RUNNING", "serveDeploymentStatuses": {
                    "IndexCacheServer": {"status": "HEALTHY"}}}},
                "rayClusterStatus": {"desiredWorkerReplicas": ready, "readyWorkerReplicas": ready}}}},
            subresource="status")
        return "KubeRay reports healthy"

    def crash_mid_reconcile(self) -> str:
        """An API error part way through a reconcile, then a restart: whatever that reconcile did stays."""
        self.api.fail_after = self.rng.randint(2, 12)
        try:
            reconcile(self.ctx, NS, NAME)
        except ReconcileError:
            pass
        self.api.fail_after = None
        self.restart()
        return "operator crashed mid-reconcile and restarted"

    def delete_finished_job(self) -> str:
        """A finished Job goes (TTL, or by hand): its token must still never run again."""
        done = [j for j in self.jobs() if _finished(j)]
        if not done:
            return "no finished Job to delete"
        name = self.rng.choice(done)["metadata"]["name"]
        del self.api.objects[("jobs", NS, name)]
        return f"delete finished Job {name}"

    def outage(self) -> str:
        """The operator is down for a few steps (Jobs finish, the CronJob fires, users edit), then starts."""
        # Weighted to the CronJob and Jobs: several runs finish with nobody folding them in, which is when
        # the order of folding matters.
        quiet = [("cron_fires", 0.35), ("finish_job", 0.35), ("edit_spec", 0.1), ("annotate", 0.1),
                 ("delete_child", 0.05), ("kuberay_reports", 0.05)]
        if self.rng.random() < 0.5:  # scheduled runs back to back
            kinds = ["cron_fires", "finish_job"] * self.rng.randint(2, 3)
        else:
            kinds = self.rng.choices([k for k, _ in quiet], [w for _, w in quiet], k=self.rng.randint(2, 6))
        done = [self._act(kind) for kind in kinds]
        self.restart()
        return f"operator down during: {'; '.join(done)}; restarted"

    STEPS = (("edit_spec", 0.2), ("annotate", 0.13), ("reannotate", 0.06), ("finish_job", 0.2),
             ("cron_fires", 0.08), ("delete_child", 0.07), ("delete_finished_job", 0.04), ("kuberay_reports", 0.08),
             ("restart", 0.04), ("crash_mid_reconcile", 0.05), ("outage", 0.1))

    def step(self) -> None:
        kind = self.rng.choices([s for s, _ in self.STEPS], [w for _, w in self.STEPS])[0]
        self.log.append(self._act(kind))

    def _act(self, kind: str) -> str:
        if kind == "annotate":
            what = self.annotate(reuse=False)
        elif kind == "reannotate":
            what = self.annotate(reuse=True)
        elif kind == "restart":
            self.restart()
            what = "operator restarted"
        else:
            what = getattr(self, kind)()
        return what

    def converge(self) -> None:
        """Reconcile until a pass writes nothing (each reconcile is what an event or the resync starts); the
        first pass may hit an injected API fault, as a real one would."""
        if self.rng.random() < 0.15:
            self.api.fail_after = self.rng.randint(1, 10)
        for attempt in range(12):
            before = self.api.writes
            try:
                reconcile(self.ctx, NS, NAME)
            except ReconcileError:
                self.api.fail_after = None
                continue
            self.api.fail_after = None
            if self.api.writes == before:
                return
        raise AssertionError("the operator kept writing: no convergence in 12 reconciles")


# ---- the checks ------------------------------------------------------------------------------------------

def _server_user_config(rs: dict) -> dict:
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    return next(d for d in app["deployments"] if d["name"] == "IndexCacheServer")["user_config"]


def check(world: World, previous: dict) -> dict:
    api, body = world.api, world.body
    spec_dict, status = body["spec"], body.get("status") or {}
    spec = IndexCacheDeploymentSpec.model_validate(spec_dict)
    assert status["observedGeneration"] == body["metadata"]["generation"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Reconciled"] == "True"

    # Results folded in run-id order; the pattern the oracle expects, versioned.
    world.oracle.fold(api, spec_dict)
    pattern, rule = world.oracle.expected_pattern(spec_dict)
    assert (status.get("pattern"), status.get("patternRule")) == (pattern, rule)
    changed = (pattern, rule) != previous.get("pattern")
    assert status["patternVersion"] == previous.get("version", 0) + (1 if changed else 0)
    applied = (status.get("appliedCalibration") or {}).get("runId")
    assert applied == (world.oracle.applied[1] if world.oracle.applied else None)
    assert world.oracle.applied_ids == sorted(world.oracle.applied_ids), "an older calibration was applied"
    # Run ids follow creation order (the CronJob's Jobs get theirs at first sight, oldest first).
    ids = [int(j["metadata"]["annotations"]["indexcache.io/run-id"])
           for j in sorted(world.jobs(), key=lambda j: j["metadata"]["creationSeq"])]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), f"run ids out of creation order: {ids}"
    last = (status.get("recalibration") or {}).get("last") or {}
    assert (last.get("runId") or 0) == world.oracle.last_id

    # Children as the spec says.
    owner = b.Owner(NAME, NS, body["metadata"]["uid"])
    rs = api.objects.get(("rayservices", NS, NAME))
    if b.scaled_to_zero(spec):
        assert rs is None
    else:
        assert rs is not None
        cfg = _server_user_config(rs)
        assert (cfg.get("pattern"), cfg["pattern_version"]) == (pattern, status["patternVersion"])
        if rule:
            assert f"freq={cfg['freq']},offset={cfg['offset']}" == rule
        assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == spec.replicas
    for plural, name in (("persistentvolumeclaims", f"{NAME}-samples"), ("serviceaccounts", f"{NAME}-recalibration"),
                         ("roles", f"{NAME}-recalibration"), ("rolebindings", f"{NAME}-recalibration")):
        assert (plural, NS, name) in api.objects, f"{plural}/{name} missing"
    running = world.running()
    ondemand_running = any((j["metadata"].get("annotations") or {}).get("indexcache.io/token") for j in running)
    cron = api.objects.get(("cronjobs", NS, f"{NAME}-recal"))
    assert (cron is not None) == bool(spec.recalibration.schedule)
    if cron is not None:
        assert cron["spec"]["suspend"] == (spec.recalibration.suspend or ondemand_running)
        assert cron["spec"]["jobTemplate"]["spec"] == _canonical(
            b.recalibration_cronjob(owner, spec, OperatorConfig())["spec"]["jobTemplate"]["spec"])

    # Recalibration requests: one Job per token ever, never two running, the queue in status.
    rec = status.get("recalibration") or {}
    tokens = [c["token"] for c in api.job_creations if c["token"]]
    assert len(tokens) == len(set(tokens)), f"a token got a second Job: {tokens}"
    for creation in api.job_creations:
        assert not creation["running"], f"{creation['name']} ({creation['by']}) started while {creation['running']} ran"
    assert len(running) <= 1
    assert rec.get("activeJob") == (running[0]["metadata"]["name"] if running else None)
    token = (body["metadata"].get("annotations") or {}).get("indexcache.io/recalibrate")
    handled_before = previous.get("handled", set())
    if token and token in handled_before and token != previous.get("request_token"):
        assert ("Warning", "RecalibrationTokenReused") in {(t, r) for t, r, _ in world.events[previous.get("events", 0):]}, \
            f"reused token {token!r} was not refused with a warning"
    if token and token != rec.get("requestToken"):
        assert running and rec.get("queuedToken") == token, "a requested recalibration neither ran nor waits"
    else:
        assert "queuedToken" not in rec
    handled = handled_before | ({rec["requestToken"]} if rec.get("requestToken") else set())
    return {"pattern": (pattern, rule), "version": status["patternVersion"], "handled": handled,
            "request_token": rec.get("requestToken"), "events": len(world.events)}


@pytest.mark.timeout(600)
def test_random_sequences_converge_to_the_spec_and_never_go_back():
    print(f"INDEXCACHE_TEST_SEED={SEED}")
    for sequence in range(SEQUENCES):
        world = World(random.Random(SEED * 1000 + sequence))
        state: dict = {"pattern": (None, None), "version": 0}
        try:
            world.converge()
            state = check(world, state)
            for _ in range(STEPS):
                world.step()
                world.converge()
                state = check(world, state)
        except AssertionError as e:
            steps = "\n  ".join(world.log)
            raise AssertionError(f"sequence {sequence} (INDEXCACHE_TEST_SEED={SEED}) failed after:\n  {steps}\n{e}") from e
