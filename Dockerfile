# One image with all four Tether binaries; compose and Kubernetes pick the command.
FROM rust:1.85-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir /out \
 && cp target/release/tether-ingress target/release/tether-scheduler \
       target/release/tether-session-state target/release/tether-engine-sim /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 tether
COPY --from=build /out/ /usr/local/bin/
USER tether
