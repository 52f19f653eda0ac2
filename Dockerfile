# One image with all three services; docker-compose.yml picks the command.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p command-svc -p projector -p query-svc

FROM debian:bookworm-slim
# What the binaries link beyond the base image (`ldd`): projector and query-svc
# link the system OpenSSL for the Couchbase SDK's TLS (libssl.so.3 and
# libcrypto.so.3, both in libssl3); command-svc links only libc and libgcc_s.
# ca-certificates gives OpenSSL the system roots that verify a couchbases://
# server (the SDK itself carries only Capella's).
# tests/python/test_image.py reads this package list and runs every binary on a
# bookworm root that has only these packages.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 scaleout
COPY --from=build /src/target/release/command-svc /src/target/release/projector /src/target/release/query-svc /usr/local/bin/
USER scaleout
