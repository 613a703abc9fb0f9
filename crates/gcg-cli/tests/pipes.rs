//! `gcg … | head`: a reader that goes away ends the command quietly (the SIGPIPE default, as
//! other Unix tools), never with a panic (exit 101, "failed printing to stdout").

use std::process::{Command, Stdio};

#[test]
fn a_closed_stdout_pipe_ends_the_command_without_a_panic() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gcg"))
        .args([
            "bench",
            "train-step",
            "--preset",
            "tiny",
            "--batch",
            "1",
            "--iters",
            "1",
            "--frames",
            "8",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running gcg");
    // Close the read end before the command prints its JSON.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("waiting for gcg");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "gcg panicked on a closed pipe: {stderr}");
    assert_ne!(out.status.code(), Some(101), "exit status {:?}, stderr {stderr}", out.status);
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(13), "ended by SIGPIPE; status {:?}", out.status);
    }
}
