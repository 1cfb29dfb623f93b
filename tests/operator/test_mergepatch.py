"""The status writer's merge patch against RFC 7386's own algorithm, on fresh random documents."""
import os
import random

from indexcache_operator import mergepatch

SEED = int(os.environ.get("INDEXCACHE_TEST_SEED", random.SystemRandom().randrange(2**32)))


def _document(rng: random.Random, depth: int = 0) -> dict:
    """A status-like document: nested objects, lists, strings, numbers and booleans; no nulls (the
    operator's status is dumped without them)."""
    keys = rng.sample(["phase", "pattern", "last", "recalibration", "conditions", "job", "lossDelta", "n",
                       "decision", "appliedCalibration", "a", "b"], rng.randint(0, 6))
    out = {}
    for key in keys:
        kind = rng.random()
        if kind < 0.3 and depth < 3:
            out[key] = _document(rng, depth + 1)
        elif kind < 0.45:
            out[key] = [rng.choice(["x", 1, 2.5, {"type": "Ready"}]) for _ in range(rng.randint(0, 3))]
        elif kind < 0.7:
            out[key] = rng.choice(["FSSF", "Applied", "", "Failed"])
        elif kind < 0.9:
            out[key] = rng.choice([0, 1, -3, 0.01, 2.5])
        else:
            out[key] = rng.choice([True, False])
    return out


def _mutate(rng: random.Random, doc: dict) -> dict:
    """`doc` with some keys dropped, changed or added, at any depth."""
    out = {}
    for key, value in doc.items():
        roll = rng.random()
        if roll < 0.2:
            continue
        if roll < 0.5 and isinstance(value, dict):
            out[key] = _mutate(rng, value)
        elif roll < 0.65:
            out[key] = _document(rng, 2) if rng.random() < 0.3 else rng.choice(["new", 7, [1], {"k": "v"}])
        else:
            out[key] = value
    out.update(_document(rng, 2) if rng.random() < 0.3 else {})
    return out


def test_diff_takes_any_status_to_any_other_under_rfc7386():
    rng = random.Random(SEED)
    print(f"INDEXCACHE_TEST_SEED={SEED}")
    for _ in range(2000):
        before = _document(rng)
        after = _mutate(rng, before) if rng.random() < 0.8 else _document(rng)
        patch = mergepatch.diff(before, after)
        assert mergepatch.apply(before, patch) == after, (SEED, before, after, patch)
        if before == after:
            assert patch == {}


def test_a_failed_run_replaces_the_previous_run_whole():
    before = {"recalibration": {"last": {"job": "a", "pattern": "FSSS", "lossDelta": 0.01, "decision": "Applied"},
                                "recommendedPattern": "FFSS"}, "phase": "Ready"}
    after = {"recalibration": {"last": {"job": "b", "result": "Failed", "decision": "None"}}, "phase": "Ready"}
    patch = mergepatch.diff(before, after)
    assert patch == {"recalibration": {"last": {"job": "b", "pattern": None, "lossDelta": None, "result": "Failed",
                                                "decision": "None"}, "recommendedPattern": None}}
    # What the old writer sent ({"status": after} with only top-level nulls) kept the stale keys.
    assert mergepatch.apply(before, after)["recalibration"]["last"]["pattern"] == "FSSS"
