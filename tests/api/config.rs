//! Configuration layering through the real binary: file < env < flag, and
//! clear startup errors with exit code 2.

use crate::helpers::run_to_end;

fn print_config(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["serve", "--print-config"];
    all.extend_from_slice(args);
    let output = run_to_end(&all, env);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn write_config(text: &str) -> tempfile_path::TempPath {
    tempfile_path::TempPath::with(text)
}

#[test]
fn env_overrides_the_file_and_a_flag_overrides_env() {
    let file = write_config("[runtime]\nflavor = \"current_thread\"\nmax_blocking_threads = 4\n");
    let path = file.path();

    let out = print_config(&["--config", path], &[]);
    assert!(
        out.contains("flavor = \"current_thread\"  # config file"),
        "{out}"
    );
    assert!(out.contains("max_blocking_threads = 4"), "{out}");

    let env = [("STALL_LAB__RUNTIME__FLAVOR", "multi_thread")];
    let out = print_config(&["--config", path], &env);
    assert!(
        out.contains(
            "flavor = \"multi_thread\"  # environment variable STALL_LAB__RUNTIME__FLAVOR"
        ),
        "{out}"
    );
    assert!(
        out.contains("max_blocking_threads = 4"),
        "file values stay: {out}"
    );

    let out = print_config(&["--config", path, "--flavor", "current_thread"], &env);
    assert!(
        out.contains("flavor = \"current_thread\"  # command-line flag --flavor"),
        "{out}"
    );
}

#[test]
fn an_unknown_key_exits_2_and_names_the_key_and_its_origin() {
    let output = run_to_end(&["serve"], &[("STALL_LAB__RUNTIME__WORKERS", "2")]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("runtime.workers") && stderr.contains("STALL_LAB__RUNTIME__WORKERS"),
        "{stderr}"
    );

    let file = write_config("[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = 10\n");
    let output = run_to_end(&["serve", "--config", file.path()], &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("server.shutdown_grace") && stderr.contains(file.path()),
        "{stderr}"
    );
}

#[test]
fn a_bad_value_exits_2_and_names_the_key() {
    let output = run_to_end(&["serve"], &[("STALL_LAB__RUNTIME__FLAVOR", "parallel")]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("runtime.flavor") && stderr.contains("STALL_LAB__RUNTIME__FLAVOR"),
        "{stderr}"
    );

    let file = write_config("[limits]\nmax_ms = \"lots\"\n");
    let output = run_to_end(&["serve", "--config", file.path()], &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("limits.max_ms"), "{stderr}");

    let output = run_to_end(&["serve", "--workers", "lots"], &[]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "clap's usage errors exit 2 too"
    );
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = run_to_end(&["serve", "--listen", &addr], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&addr) && stderr.contains("server.listen"),
        "{stderr}"
    );
}

/// A config file in the temp dir, removed on drop (no extra crate needed).
mod tempfile_path {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub struct TempPath(PathBuf, String);

    impl TempPath {
        pub fn with(text: &str) -> TempPath {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("stall-lab-test-{}-{n}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            let display = path.display().to_string();
            TempPath(path, display)
        }

        pub fn path(&self) -> &str {
            &self.1
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
