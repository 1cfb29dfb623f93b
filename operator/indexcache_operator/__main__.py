"""`indexcache-operator`: run kopf with this package's handlers.

Watches all namespaces unless INDEXCACHE_OPERATOR_NAMESPACES (comma-separated) is set; liveness is
served with the metrics (/healthz on INDEXCACHE_OPERATOR_METRICS_PORT)."""
from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    import kopf

    import indexcache_operator.handlers  # noqa: F401  (registers the handlers)

    logging.basicConfig(level=os.environ.get("INDEXCACHE_OPERATOR_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    namespaces = [n for n in os.environ.get("INDEXCACHE_OPERATOR_NAMESPACES", "").split(",") if n]
    kopf.run(standalone=os.environ.get("INDEXCACHE_OPERATOR_STANDALONE", "1") == "1",
             clusterwide=not namespaces, namespaces=namespaces or None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
