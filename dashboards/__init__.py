"""Grafana dashboards and Prometheus alert rules, generated from Python (`python -m dashboards.build`)."""
