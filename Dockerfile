# syntax=docker/dockerfile:1
# Static (musl) binaries in an empty image: nothing to patch but DMR itself.
#   docker build -t dmr .
#   docker run -p 8075:8075 -e DMR_AMQP_URL=amqp://user:pass@rabbit:5672/%2f \
#     -v /etc/dmr/agents.json:/etc/dmr/agents.json:ro -e DMR_AGENTS_FILE=/etc/dmr/agents.json dmr
#   agent: docker run --entrypoint /dmr-agent dmr run --id ... --key /run/secrets/agent.key ...

FROM rust:1-bookworm AS build
# musl-gcc: ring's C and assembly must be built for musl too.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
RUN rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target/ between builds; the binaries are copied out of
# the cached target/ because a cache mount is not part of the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl --bins \
 && mkdir /out \
 && cp target/x86_64-unknown-linux-musl/release/dmr-server \
       target/x86_64-unknown-linux-musl/release/dmr-agent /out/

FROM scratch
COPY --from=build /out/dmr-server /out/dmr-agent /
# Inside a container the default 127.0.0.1 would be unreachable from outside it.
ENV DMR_LISTEN=0.0.0.0:8075
USER 65534:65534
EXPOSE 8075
ENTRYPOINT ["/dmr-server"]
CMD ["run"]
