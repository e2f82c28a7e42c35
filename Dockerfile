# syntax=docker/dockerfile:1
#
# stall-lab container image.
#
#   docker build -t stall-lab:local .        (or: docker compose build)
#   docker run --rm -p 127.0.0.1:3000:3000 stall-lab:local
#
# Two stages: a Rust toolchain image that compiles the release binary, and a
# slim Debian image that only carries the binary, its container config and
# curl (for the healthcheck). The toolchain never ships.

# ---------------------------------------------------------------------------
# Build stage
# ---------------------------------------------------------------------------
# Toolchain 1.95 on bookworm: the same Debian release as the runtime stage, so
# the binary links against the glibc it will actually run with.
FROM rust:1.95-slim-bookworm AS build

WORKDIR /app

# --- Layer 1: dependencies only -------------------------------------------
# Only the manifest, the lockfile and .cargo/ are copied here, so this layer
# (and the slow dependency compile below) is reused until one of them changes;
# editing src/ does not invalidate it.
#
# .cargo/config.toml sets `rustflags = ["--cfg", "tokio_unstable"]`. It MUST be
# in place before the first cargo invocation: the cfg changes how tokio and
# console-subscriber compile, so dependencies built without it would be a
# different (and wrong) build. We deliberately never set RUSTFLAGS anywhere in
# this file: an exported RUSTFLAGS replaces build.rustflags instead of adding
# to it, which would silently drop tokio_unstable. The first RUN below fails
# fast if a base image or the environment ever sets one.
COPY Cargo.toml Cargo.lock ./
COPY crates/stall-watch/Cargo.toml ./crates/stall-watch/
COPY .cargo ./.cargo

# The slim toolchain image has gcc but not make, which tikv-jemalloc-sys needs
# to build jemalloc (the binary's allocator) from source.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

# Cargo refuses to read a manifest whose declared targets point at missing
# files, so each target in the two Cargo.toml files gets a stub: stall-lab's
# lib, binary and overhead bench; stall-watch's lib, and its example and test
# (never built here, they only have to exist). A new declared target needs
# its stub here too; the build below fails loudly until it has one.
#
# The final `cargo clean` forgets the stub builds of our own two crates while
# keeping every dependency. Without it cargo may judge the real
# sources copied below as up to date (COPY keeps the build context's mtimes,
# which are older than the stub artifacts) and ship the empty stub binary.
RUN set -eu; \
    if [ -n "${RUSTFLAGS:-}${CARGO_BUILD_RUSTFLAGS:-}${CARGO_ENCODED_RUSTFLAGS:-}" ]; then \
      echo "error: a RUSTFLAGS-style variable is set; it would replace the" \
           "--cfg tokio_unstable from .cargo/config.toml" >&2; \
      exit 1; \
    fi; \
    mkdir -p src/bin benches crates/stall-watch/src crates/stall-watch/examples crates/stall-watch/tests; \
    : > src/lib.rs; \
    echo 'fn main() {}' > src/bin/stall-lab.rs; \
    echo 'fn main() {}' > benches/overhead.rs; \
    : > crates/stall-watch/src/lib.rs; \
    echo 'fn main() {}' > crates/stall-watch/examples/axum_app.rs; \
    : > crates/stall-watch/tests/axum_app.rs; \
    cargo build --release --locked; \
    cargo clean --release --package stall-lab --package stall-watch

# --- Layer 2: the real crate ----------------------------------------------
# config/default.toml and the dashboard (crates/stall-watch/src/admin/) are
# embedded with include_str!, so they are compile inputs and must be present
# before the build, not just at run time.
COPY src ./src
COPY config ./config
COPY crates ./crates
RUN cargo build --release --locked \
    && install -D -m 0755 target/release/stall-lab /out/stall-lab

# ---------------------------------------------------------------------------
# Runtime stage
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# curl exists only for HEALTHCHECK / the compose healthcheck: slim images have
# no HTTP client. --no-install-recommends keeps ca-certificates out on purpose:
# every connection this container makes (OTLP to jaeger) is plain http on the
# compose network, so there is no TLS to verify.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged uid/gid: the server binds only ports > 1024 and writes
# nothing, so it needs no root. Numeric USER lets orchestrators verify
# runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 10001 stall \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin stall

COPY --from=build /out/stall-lab /usr/local/bin/stall-lab
# Baked-in copy so `docker run stall-lab:local` works without any mount;
# docker-compose.yml additionally bind-mounts the same path read-only so the
# file can be edited without rebuilding the image.
COPY config/docker.toml /etc/stall-lab/docker.toml

USER 10001:10001

# 3000 scenario server, 3001 admin server, 6669 tokio-console (console-subscriber).
EXPOSE 3000 3001 6669

# Same probe as the compose healthcheck, so a plain `docker run` is covered too:
# the admin server's /healthz (3001), never the app's, whose probes would be
# traced requests and victims of the stalls fired on purpose.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:3001/healthz"]

# SIGTERM is what `docker stop` sends; stated explicitly because the shutdown
# path (stop accepting, drain for shutdown_grace_ms, flush OTLP spans) hangs
# off it.
STOPSIGNAL SIGTERM

# Exec form, no shell and no init: the binary is PID 1 and receives SIGTERM
# itself (a `sh -c` wrapper would swallow it and the spans would never be
# flushed). The binary installs its own SIGTERM/SIGINT handlers, which is what
# PID 1 needs, since the kernel gives PID 1 no default signal actions.
ENTRYPOINT ["/usr/local/bin/stall-lab"]
CMD ["serve", "--config", "/etc/stall-lab/docker.toml"]
