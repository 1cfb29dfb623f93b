"""Kept so RayServices deployed with the old import path (indexcache_contracts.serve_app.LEGACY_SERVE_IMPORT_PATH)
keep working."""
from .serving.app import build_app  # noqa: F401
