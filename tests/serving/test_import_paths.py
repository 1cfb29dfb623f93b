"""The Ray Serve import paths: what the operator writes into new RayServices, and the path RayServices
deployed before the package was laid out by role still carry. Both must resolve, through Ray Serve's own
resolver, to the same application builder, or an old RayService stops deploying after an upgrade."""
from ray._common.utils import import_attr
from ray.serve import Application

from indexcache_contracts.serve_app import LEGACY_SERVE_IMPORT_PATH as OLD_IMPORT_PATH
from indexcache_operator.builders import SERVE_IMPORT_PATH


def test_the_operator_deploys_the_new_path_and_the_old_one_resolves_to_the_same_builder():
    assert SERVE_IMPORT_PATH == "indexcache.serving.app:build_app"
    new, old = import_attr(SERVE_IMPORT_PATH), import_attr(OLD_IMPORT_PATH)
    assert old is new
    app = old({"model": "tiny", "max_batch_size": 2})     # building binds deployments; nothing starts
    assert isinstance(app, Application)
