# kvstore node image: one `kvstore node` per container, data in the /data volume.
#
#   docker build -t kvstore:latest .        # official python:3.11-slim base, wheels from the package index
#   scripts/build-offline-image.sh          # no registry: local Debian base + wheels built on the host
#
# Stage "build" turns kvstore and its dependencies into wheels and installs them
# into a venv at /opt/kvstore; the final stage copies only that venv onto a clean
# copy of the same base. Works with the classic builder and with BuildKit.
#
# Run: KVSTORE_CONFIG (cluster file) and KVSTORE_NODE_ID pick the node; the
# arguments (CMD) go to `kvstore node`, e.g. `--listen 0.0.0.0:7002 --data-dir /data`.

# Any base with a Python 3.11 that has the venv module: python:3.11-slim, or the
# Debian 12 base that scripts/build-offline-image.sh imports (kvstore-base:bookworm).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# The base image's interpreter (both python:3.11-slim and Debian answer to python3).
ARG PYTHON=python3
# OFFLINE=1: every dependency wheel comes from build/docker-wheels in the build
# context (made on the host by scripts/build-offline-image.sh); pip never uses the network.
ARG OFFLINE=0
# Lets scripts/build-offline-image.sh find (and prune) its own stale build-stage images.
LABEL org.kvstore.stage=build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN "${PYTHON}" -m venv /opt/kvstore
# Dependencies (and setuptools/wheel to build kvstore) in their own layer, rebuilt only
# when pyproject.toml or the offline wheels change. The pattern build/docker-wheel[s]
# matches nothing in an online build; offline it copies the wheels into /deps.
COPY pyproject.toml build/docker-wheel[s] /deps/
RUN set -eu; \
    if [ "${OFFLINE}" = 1 ]; then set -- --no-index --find-links /deps; else set --; fi; \
    /opt/kvstore/bin/python -c 'import tomllib; p = tomllib.load(open("/deps/pyproject.toml", "rb")); print("\n".join(p["build-system"]["requires"] + p["project"]["dependencies"]))' >/deps/requirements.txt; \
    /opt/kvstore/bin/pip install --quiet "$@" --requirement /deps/requirements.txt
# The context is filtered by .dockerignore: pyproject.toml, README.md, kvstore/, configs/, build/docker-wheels/.
COPY . /src
RUN set -eu; \
    /opt/kvstore/bin/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir /wheels /src; \
    /opt/kvstore/bin/pip install --quiet --no-index --no-deps /wheels/kvstore-*.whl; \
    /opt/kvstore/bin/pip uninstall --quiet --yes pip setuptools wheel; \
    /opt/kvstore/bin/python -c "import kvstore, aiohttp, msgpack, pydantic, yaml"

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="kvstore" \
      org.opencontainers.image.description="A replicated key-value store node" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.kvstore.stage=node
# A fixed non-root uid/gid; written directly so the base needs no useradd.
RUN set -eu; \
    echo 'kvstore:x:10001:' >> /etc/group; \
    echo 'kvstore:x:10001:10001:kvstore:/data:/usr/sbin/nologin' >> /etc/passwd; \
    mkdir -p /data /etc/kvstore; \
    chown 10001:10001 /data
# The default config runs one node; compose mounts a cluster file over it.
COPY configs/single-node.yaml /etc/kvstore/kvstore.yaml
ENV PATH=/opt/kvstore/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KVSTORE_CONFIG=/etc/kvstore/kvstore.yaml \
    KVSTORE_NODE_ID=n1 \
    KVSTORE_HEALTH_URL=http://127.0.0.1:7001/ready
USER kvstore
WORKDIR /data
VOLUME ["/data"]
EXPOSE 7001 7002 7003 6379
STOPSIGNAL SIGTERM
# Healthy = ready (GET /ready: recovered, and a leader known and reachable, or W peers up).
# Set KVSTORE_HEALTH_URL to the node's own port when it is not 7001.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['KVSTORE_HEALTH_URL'], timeout=2).read()"]
ENTRYPOINT ["kvstore", "node"]
CMD ["--listen", "0.0.0.0:7001", "--data-dir", "/data"]
# Last, so that every step above stays cached when only the code changes. Owned by root: read-only for the node.
COPY --from=build /opt/kvstore /opt/kvstore
