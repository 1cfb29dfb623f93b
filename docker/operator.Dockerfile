# The operator image: kopf + the Kubernetes client + pydantic. No torch and no Ray: the operator only
# writes manifests, so the image stays small and starts fast.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY serving/ serving/
# The distribution holds both packages; only the operator extra's dependencies are installed.
RUN pip install --no-deps . && pip install ".[operator]" \
    && python -c "import indexcache_operator.handlers, indexcache_contracts" \
    && rm -rf /src
WORKDIR /
USER 65532:65532
EXPOSE 9090
# /healthz and /metrics on INDEXCACHE_OPERATOR_METRICS_PORT (9090).
ENTRYPOINT ["indexcache-operator"]
