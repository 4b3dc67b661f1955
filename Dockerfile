# Image of the image similarity search service (`python -m app` on port 8000).
#
#   docker build -t image-similarity-search .                       # CPU-only torch (default)
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 \
#                -t image-similarity-search:cuda .                  # a CUDA build of the same torch version
#
# Usually built and run through docker-compose.yml, which also starts PostgreSQL + pgvector.
# Needs BuildKit for the pip cache mounts: the default builder of `docker compose` and of Docker Engine 23+;
# with an older `docker build` set DOCKER_BUILDKIT=1. There is deliberately no `# syntax=docker/dockerfile:1`
# line: it makes BuildKit pull a frontend image from Docker Hub, so the image could not be built where no
# container registry is reachable (air-gapped sites, PyPI-only mirrors). The engine's built-in frontend reads
# everything used here (RUN --mount needs Dockerfile syntax 1.2, built in since Engine 20.10); keep to that
# syntax, e.g. no heredocs or COPY --link.

# ---------------------------------------------------------------------------------------------------------
# builder: a virtual environment in /opt/venv with torch, the project and its pinned dependencies.
# Every dependency ships manylinux wheels for CPython 3.12, so no compiler or -dev package is needed.
# ---------------------------------------------------------------------------------------------------------
FROM python:3.12-slim AS builder

# Which PyTorch wheel index torch/torchvision come from: .../whl/cpu (default, no CUDA libraries, far
# smaller image) or a CUDA variant such as .../whl/cu130 (see https://pytorch.org/get-started/locally/).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

# 1. torch + torchvision alone from the PyTorch index (same versions as constraints.txt). --no-deps keeps
#    the index to these two packages; their own dependencies are resolved from PyPI in step 2. The index
#    names its builds 2.14.1+cpu / 2.14.1+cu130, which satisfy the constraint torch==2.14.1 (PEP 440 ignores
#    the local label), so step 2 keeps them instead of pulling the CUDA build from PyPI.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1

WORKDIR /src

# 2. Every other dependency, pinned by constraints.txt. Only pyproject.toml and constraints.txt are copied, so
#    this layer (several GB) is rebuilt when they change, not on every source or README edit. pyproject's
#    `readme` only needs the file to exist here: step 3 installs the project again with the real README.md.
#    The pip cache mount saves the downloads only where the engine keeps cache mounts between builds: the
#    Engine 20.10.24 that `make test-docker` ran on did not, so there each rebuild of this layer downloads again.
COPY pyproject.toml constraints.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    touch README.md \
    && pip install -c constraints.txt .

# 3. The project itself, non-editable (dependencies are already in place); then drop the in-tree build
#    leftovers so /src is a clean copy of the sources for the runtime stage.
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps --force-reinstall . \
    && pip check \
    && rm -rf build ./*.egg-info

# ---------------------------------------------------------------------------------------------------------
# runtime: the venv, the sources (app/, ui/, sql/, scripts/) and a non-root user.
# ---------------------------------------------------------------------------------------------------------
FROM python:3.12-slim AS runtime

# The wheels bundle their native libraries (Pillow, pillow-heif's libheif/libde265/x265, pillow-avif-plugin's
# libavif, psycopg's libpq, torch's libgomp); what they link from the system (glibc, libstdc++, zlib) is in
# the slim base image, so no apt packages are installed.

# Unprivileged user with a fixed uid/gid (10001), so host-side volume permissions are predictable. Not
# --system: system accounts live below SYS_UID_MAX (999), and useradd warns about 10001. --no-log-init keeps
# /var/log/lastlog and faillog from growing a sparse entry for a high uid (hadolint DL3046).
# /data/images and /models are created here, owned by that user: Docker copies a path's ownership into a new
# named volume mounted on it, so the compose volumes start out writable by the service. /photos, where
# docker-compose.yml mounts PHOTOS_DIR read-only (the library indexed in place), stays root's: the service only
# reads it, and as part of the image the mount point adds nothing to the container's own layer.
RUN groupadd --gid 10001 app \
    && useradd --no-log-init --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /data/images /models/hf /models/torch /photos \
    && chown -R app:app /data /models

COPY --from=builder /opt/venv /opt/venv

# Sources stay root-owned (read-only to the service). `python -m app` runs from /app, so paths relative to
# the project root (sql/init.sql, ui/ assets) resolve exactly as in a checkout.
WORKDIR /app
COPY --from=builder /src /app

# GRADIO_TEMP_DIR: the web UI's uploads, thumbnails and cached originals stay in this container's own /tmp (one
# service per container, so no other instance can serve them), not on the /data volume (docs/web-ui.md).
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATA_DIR=/data \
    GRADIO_TEMP_DIR=/tmp/gradio \
    MODEL_CACHE_DIR=/models \
    HF_HOME=/models/hf \
    TORCH_HOME=/models/torch

USER 10001:10001

EXPOSE 8000

# slim has no curl: probe /health with the standard library. Exec form, so PORT is read by Python from the
# environment (no shell expansion). A long start period: the first start downloads the CLIP weights (~600 MB).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=5)"]

CMD ["python", "-m", "app"]
