"""Kept so RayServices deployed with the old import path `indexcache.serve_app:build_app` keep working."""
from .serving.app import build_app  # noqa: F401
