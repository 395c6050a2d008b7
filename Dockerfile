# syntax=docker/dockerfile:1
#
# One image for every llorch role: `apiserver`, `worker --node-id ID`, ...
#
#   docker build --build-arg VERSION=$(git describe --tags --always --dirty) -t llorch .
#
# The worker reads GPUs through NVML (go-nvml, cgo), which dlopens
# libnvidia-ml.so.1 at run time. Nothing NVIDIA is in this image: the NVIDIA
# Container Toolkit mounts the host driver's library into a container that is
# given a GPU (compose `deploy.resources.reservations.devices`, `docker run
# --gpus`). Without it the worker starts as a CPU-only node and says so.

ARG GO_VERSION=1.27.3

FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
# cgo for go-nvml; its headers use deprecated NVML declarations on purpose.
# The golang image pins GOTOOLCHAIN=local: its Go must be at least go.mod's.
ENV CGO_ENABLED=1 \
    CGO_CFLAGS="-O2 -g -Wno-deprecated-declarations" \
    GOFLAGS=-mod=readonly
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod \
    go mod download
COPY . .
ARG VERSION=dev
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    go build -trimpath -ldflags "-s -w -X main.buildVersion=${VERSION}" -o /out/llorch ./cmd/llorch \
 && /out/llorch version

# libllama for the built-in engine (`llorch engine`): node-llama-cpp's
# prebuilt CPU libraries, the same pin as `just tools`.
FROM node:20-bookworm-slim AS llama
ARG LLAMA_NPM_VERSION=3.21.1
RUN npm install --silent --no-audit --no-fund --prefix /opt/llama-npm @node-llama-cpp/linux-x64@${LLAMA_NPM_VERSION} \
 && mkdir -p /opt/llama \
 && cp /opt/llama-npm/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/*.so /opt/llama/ \
 && ln -s libllama.v0.4.0.so /opt/llama/libllama.so \
 && ln -s libggml.v0.4.0.so /opt/llama/libggml.so

# Same Debian release as the build stage: the binary links glibc dynamically
# (cgo), and NVML is loaded with dlopen.
FROM debian:bookworm-slim
ARG VERSION=dev
LABEL org.opencontainers.image.title="llorch" \
      org.opencontainers.image.description="llama.cpp inference across GPU machines, on Temporal" \
      org.opencontainers.image.version="${VERSION}"
# libffi8 and libgomp1: yzma calls libllama through libffi; ggml uses OpenMP.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libffi8 libgomp1 \
 && rm -rf /var/lib/apt/lists/*
# A fixed uid/gid so volumes and host bind mounts can be chowned to match.
# /var/lib/llorch is LLORCH_HOME: state dir and, on workers, the default
# model catalog (<home>/nodes/<node-id>/models); mount a volume there.
RUN groupadd --system --gid 10001 llorch \
 && useradd --system --uid 10001 --gid llorch --home-dir /var/lib/llorch --no-create-home \
      --shell /usr/sbin/nologin llorch \
 && install -d -o llorch -g llorch -m 0750 /var/lib/llorch
COPY --from=build /out/llorch /usr/local/bin/llorch
COPY --from=llama /opt/llama /opt/llama
ENV LLORCH_HOME=/var/lib/llorch \
    LLORCH_LOG_FORMAT=json \
    LLORCH_LLAMA_LIB_DIR=/opt/llama
WORKDIR /var/lib/llorch
USER 10001:10001
# 8080: apiserver REST API, /health, /metrics. 9200: a worker's /metrics and
# /health when run with --metrics-addr 0.0.0.0:9200.
EXPOSE 8080 9200
ENTRYPOINT ["llorch"]
CMD ["--help"]
