//! Run with `cargo run --release` (or `stall-lab serve --help`).

fn main() -> std::process::ExitCode {
    stall_lab::cli::main()
}
