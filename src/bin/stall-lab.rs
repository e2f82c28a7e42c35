//! Run with `cargo run --release` (or `stall-lab serve --help`).

/// jemalloc rather than glibc's malloc. Every traced request allocates on an
/// app worker what the exporter's thread frees (the span's attributes, its
/// batch, the encoded protobuf), the pattern glibc handles worst: profiles of
/// `cargo bench --bench overhead` put 2.2 µs of each `/healthz` request with
/// OTLP on in `malloc`/`free`. jemalloc cuts OTLP-only from 16.5 to 14.8 µs
/// per request with the same peak memory (mimalloc saved as much CPU but
/// tripled the peak, 15 → 57 MiB). The bench's bare axum server uses the same
/// allocator, so its ratios compare instrumentation, not allocators.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    stall_lab::cli::main()
}
