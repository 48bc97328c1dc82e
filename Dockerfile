# syntax=docker/dockerfile:1
# Static (musl) binaries in an empty image: nothing to patch but DMR itself.
#   docker build -t dmr .
#   server: docker run -p 8075:8075 -e DMR_AMQP_URL=amqp://dmr:secret@rabbit:5672/dmr \
#             -v /etc/dmr/agents.json:/etc/dmr/agents.json:ro -e DMR_AGENTS_FILE=/etc/dmr/agents.json dmr
#   agent:  docker run --entrypoint /dmr-agent -v /etc/dmr/agents/police.key:/run/secrets/agent.key:ro \
#             -e DMR_LISTEN=0.0.0.0:8077 -e DMR_API_TOKEN=... -e DMR_API_HOST=police-agent dmr run --id police \
#             --key /run/secrets/agent.key --server wss://dmr.example/v1/ws --deliver-url ...
#           (DMR_API_HOST: the name the local service uses to reach the agent; other Host names get 421;
#            the key file must be mode 0600 or 0400)
# docs/OPERATIONS.md ("Containers") has the rest.
#
# The builder image, fully qualified so no registry search order applies. Pin it by digest for
# reproducible builds (a tag moves when Rust or Debian update):
#   docker buildx imagetools inspect docker.io/library/rust:1-bookworm    # prints "Digest: sha256:…"
#   (or: skopeo inspect docker://docker.io/library/rust:1-bookworm | jq -r .Digest)
#   docker build --build-arg RUST_IMAGE=docker.io/library/rust:1-bookworm@sha256:<digest> -t dmr .
# The default is the tag alone because a digest cannot be looked up where this file was written;
# CI that builds images should pass the pinned form.
ARG RUST_IMAGE=docker.io/library/rust:1-bookworm

FROM ${RUST_IMAGE} AS build
# musl-gcc: ring's C and assembly must be built for musl too.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
RUN rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target dir between builds; the binaries are copied
# out of it because a cache mount is not part of the image layer.
ENV CARGO_TARGET_DIR=/src/target
# The commit `--version` and dmr_build_info report (.git is usually not in the context):
# docker build --build-arg DMR_GIT_SHA="$(git rev-parse --short=12 HEAD)" …
ARG DMR_GIT_SHA=
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl --bins \
 && mkdir /out \
 && cp target/x86_64-unknown-linux-musl/release/dmr-server \
       target/x86_64-unknown-linux-musl/release/dmr-agent /out/

FROM scratch
COPY --from=build /out/dmr-server /out/dmr-agent /
# No ENV DMR_LISTEN: it would open an agent's API (same image, --entrypoint /dmr-agent) to
# the network without a token. Only the server's default command listens on all addresses,
# since the server's default 127.0.0.1 would be unreachable from outside the container; an
# agent's API is opened only by setting DMR_LISTEN together with DMR_API_TOKEN.
# To move the server's port, run it as `docker run -e DMR_LISTEN=0.0.0.0:9000 dmr run`, so the
# health check below reads the same address. Metrics can leave the agent-facing port with
# --metrics-listen (DMR_METRICS_LISTEN).
USER 65534:65534
EXPOSE 8075
# `dmr-server health` asks GET /healthz on DMR_LISTEN (default 127.0.0.1:8075, which the
# 0.0.0.0 listener below also answers) and exits 0 or 1; there is no shell or curl in a
# scratch image. An agent container (--entrypoint /dmr-agent) must not inherit it: run it with
# `docker run --no-healthcheck` (compose: `healthcheck: {disable: true}`) and probe the agent's
# /readyz from outside.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/dmr-server", "health"]
ENTRYPOINT ["/dmr-server"]
CMD ["run", "--listen", "0.0.0.0:8075"]
