//! Shared by the tests that run `gcg serve`: a server on a free loopback port, stopped (SIGTERM)
//! or killed when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

pub fn gcg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gcg"))
}

pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub base: String,
}

impl Server {
    /// `gcg serve` for `run`, its ask cache and data folder under `data`, with `extra` arguments.
    pub fn start(run: &Path, data: &Path, extra: &[&str]) -> Self {
        let child = gcg()
            .args(["serve", "--addr", "127.0.0.1:0", "--run"])
            .arg(run)
            .arg("--cache")
            .arg(data.join("cache"))
            .arg("--data")
            .arg(data.join("serve"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self::listening(child)
    }

    /// A started `gcg serve` (stdout and stderr piped), once it prints where it listens.
    pub fn listening(mut child: Child) -> Self {
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let Some(base) = line.trim().strip_prefix("listening on ") else {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            let _ = child.kill();
            panic!("gcg serve did not start: {line:?} {err}");
        };
        let base = base.trim_end_matches('/').to_string();
        Server { child, base }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGTERM, then the exit status and stderr.
    pub fn stop(mut self) -> (ExitStatus, String) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        (status, err)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
