"""`indexcache-operator`: run kopf with this package's handlers.

    indexcache-operator [-n NS ...] [--peering NAME | --standalone] [-v | -d | -q] [--log-format text|json]

Every option also reads an environment variable (the chart sets them): INDEXCACHE_OPERATOR_NAMESPACES
(comma-separated; none: all namespaces), INDEXCACHE_OPERATOR_PEERING (several replicas, one active: see
peering.py), INDEXCACHE_OPERATOR_LOG_LEVEL, INDEXCACHE_LOG_FORMAT. Liveness is served with the metrics
(/healthz on INDEXCACHE_OPERATOR_METRICS_PORT).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Options:
    namespaces: tuple[str, ...]
    peering: str | None  # None: standalone
    log_level: str
    log_format: str


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="indexcache-operator", description=__doc__.splitlines()[0])
    p.add_argument("-n", "--namespace", action="append", default=None, dest="namespaces", metavar="NS",
                   help="watch this namespace (repeatable; default: all, or $INDEXCACHE_OPERATOR_NAMESPACES)")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="watch all namespaces (the default)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--peering", metavar="NAME", help="run as one of several replicas: kopf peering object "
                      "NAME (default: $INDEXCACHE_OPERATOR_PEERING; none: standalone)")
    mode.add_argument("--standalone", action="store_true", help="the only replica: no peering")
    level = p.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", action="store_const", const="DEBUG", dest="log_level")
    level.add_argument("-d", "--debug", action="store_const", const="DEBUG", dest="log_level")
    level.add_argument("-q", "--quiet", action="store_const", const="WARNING", dest="log_level")
    p.add_argument("--log-format", choices=LOG_FORMATS, help="text (default) or json: one JSON object per line "
                   "(default: $INDEXCACHE_LOG_FORMAT)")
    return p


def parse(argv: list[str], env: dict[str, str]) -> Options:
    """Options from the command line, then the environment; a bad value exits naming it (argparse)."""
    p = parser()
    args = p.parse_args(argv)
    namespaces = args.namespaces or [n for n in env.get("INDEXCACHE_OPERATOR_NAMESPACES", "").split(",") if n]
    if args.all_namespaces and args.namespaces:
        p.error("--all-namespaces and --namespace exclude each other")
    if args.all_namespaces:
        namespaces = []
    peering = None if args.standalone else (args.peering or env.get("INDEXCACHE_OPERATOR_PEERING") or None)
    level = (args.log_level or env.get("INDEXCACHE_OPERATOR_LOG_LEVEL") or "INFO").upper()
    if level not in LOG_LEVELS:
        p.error(f"INDEXCACHE_OPERATOR_LOG_LEVEL={level!r}: use one of {', '.join(LOG_LEVELS)}")
    log_format = (args.log_format or env.get("INDEXCACHE_LOG_FORMAT") or "text").lower()
    if log_format not in LOG_FORMATS:
        p.error(f"INDEXCACHE_LOG_FORMAT={log_format!r}: use text or json")
    return Options(tuple(namespaces), peering, level, log_format)


def configure_logging(options: Options) -> None:
    """kopf's handlers on the root logger: text, or one JSON object per line (kopf's JSON formatter, which
    adds the object a message is about); the operator's own loggers propagate to it."""
    import kopf

    kopf.configure(debug=options.log_level == "DEBUG", quiet=options.log_level in ("WARNING", "ERROR"),
                   log_format=kopf.LogFormat.JSON if options.log_format == "json" else kopf.LogFormat.FULL)
    logging.getLogger().setLevel(options.log_level)


def main(argv: list[str] | None = None) -> int:
    options = parse(sys.argv[1:] if argv is None else argv, dict(os.environ))
    configure_logging(options)
    import kopf

    import indexcache_operator.handlers  # noqa: F401  (registers the handlers)

    if options.namespaces:  # the startup handler creates the peering objects in these namespaces
        os.environ["INDEXCACHE_OPERATOR_NAMESPACES"] = ",".join(options.namespaces)
    kopf.run(standalone=options.peering is None, peering_name=options.peering,
             clusterwide=not options.namespaces, namespaces=list(options.namespaces) or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
