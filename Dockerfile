# One image with all three services; docker-compose.yml picks the command.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p command-svc -p projector -p query-svc

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 scaleout
COPY --from=build /src/target/release/command-svc /src/target/release/projector /src/target/release/query-svc /usr/local/bin/
USER scaleout
