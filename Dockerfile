# The metronome image: `metronome process` (the StatefulSet), `metronome archive` (the CronJob),
# every other subcommand too. Build: docker build -t metronome:0.1.0 .

# Build stage: the toolchain and what the vendored librdkafka and RocksDB need to compile.
FROM rust:1.85-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libclang-dev libcurl4-openssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin metronome \
 && install -D -m 0755 target/release/metronome /out/metronome

# Run stage: glibc and libstdc++ only, no shell, no package manager; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/metronome /usr/local/bin/metronome
USER 65532:65532
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/metronome"]
CMD ["process"]
