# syntax=docker/dockerfile:1
# One image with the Tether binaries; compose and Kubernetes pick the command.
#
# The build stage's toolchain follows the workspace's `rust-version`
# (Cargo.toml); `scripts/check-deploy.sh toolchain` fails CI when it is older
# than what any crate in Cargo.lock declares.
ARG RUST_VERSION=1.89

# Dependencies are compiled in a layer of their own (cargo-chef): a change to
# Tether's sources rebuilds only Tether's crates.
FROM rust:${RUST_VERSION}-bookworm AS chef
RUN cargo install --locked cargo-chef --version 0.1.78
WORKDIR /src

FROM chef AS plan
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=plan /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir /out \
 && find target/release -maxdepth 1 -type f -executable -name 'tether-*' -exec cp {} /out/ \;

# Runtime: Debian slim, a non-root user, and curl for container health checks
# (`curl -fsS http://localhost:PORT/ready`). `sh` stays: the session-state
# StatefulSet derives its shard range from the pod ordinal with it.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tether \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tether
COPY --from=build /out/ /usr/local/bin/
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
ENV RUST_LOG=info
