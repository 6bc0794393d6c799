//! A real `coreg-trainer serve` or `coreg-sampler serve` child process on loopback,
//! for the services' end-to-end tests: started with `COREG_…` settings, its bound
//! addresses read from its stdout, probed with `grpc.health.v1`, scraped, signalled;
//! and the check of a finished command's exit code and message.
//!
//! Exists because both services are started, probed and stopped the same way; what
//! differs (the binary, the client) is in [`crate::trainer`] and [`crate::sampler`].

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How long a server may take to bind its port and load the tiny model.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// One service child process. Killed (SIGKILL) when dropped.
pub struct Server {
    child: Option<Child>,
    pub address: String,
    /// Where `/metrics` is served.
    pub metrics: String,
    log: PathBuf,
}

impl Server {
    /// Starts `binary serve` on an ephemeral loopback port with the model in `model`,
    /// the store at `store` and `extra` `COREG_…` settings on top, and waits until it
    /// listens. Its log goes to `log`.
    pub fn spawn(
        binary: &Path,
        model: &Path,
        store: &str,
        log: &Path,
        extra: &[(&str, &str)],
    ) -> Server {
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .env("COREG_LISTEN", "127.0.0.1:0")
            .env("COREG_MODEL__PATH", model)
            .env("COREG_MODEL__DEVICE", "cpu")
            .env("COREG_STORE__URL", store)
            // Metrics on their own ephemeral port: tests run servers side by side.
            .env("COREG_METRICS_LISTEN", "127.0.0.1:0")
            // Several servers share the test machine's cores.
            .env("OMP_NUM_THREADS", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap());
        for (key, value) in extra {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} serve: {e}", binary.display()));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut metrics = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(address) = line.strip_prefix("metrics on ") {
                    metrics = address.to_string();
                }
                if let Some(address) = line.strip_prefix("listening on ") {
                    let _ = tx.send((address.to_string(), metrics.clone()));
                }
            }
        });
        let mut server = Server {
            child: Some(child),
            address: String::new(),
            metrics: String::new(),
            log: log.to_path_buf(),
        };
        (server.address, server.metrics) = match rx.recv_timeout(START_TIMEOUT) {
            Ok(addresses) => addresses,
            Err(_) => panic!("the server never listened; its log:\n{}", server.log_text()),
        };
        server
    }

    /// The child's process id (while it runs).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server runs").id()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until health says SERVING (the model is loaded and warmed up).
    pub async fn wait_serving(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.health("").await {
                if status == ServingStatus::Serving {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the server never became SERVING; its log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The health of `service` (`""`: the whole server), or None when unreachable.
    pub async fn health(&self, service: &str) -> Option<ServingStatus> {
        let channel = Channel::from_shared(self.url())
            .ok()?
            .connect()
            .await
            .ok()?;
        let mut client = HealthClient::new(channel);
        let response = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .ok()?;
        ServingStatus::try_from(response.into_inner().status).ok()
    }

    /// The Prometheus exposition text from `GET /metrics`.
    pub fn scrape_metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&self.metrics).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.") && response.contains(" 200 "),
            "{response}"
        );
        response
    }

    /// SIGKILL: no clean shutdown, no release of the job it holds.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `timeout` for the process to end by itself; its exit code, or
    /// `None` if it still runs (or died of a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits for the process to exit; returns its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        child.wait().unwrap().code()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Asserts that a finished command exited with `code` and said `needle` on stderr.
pub fn assert_exit(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr:\n{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in:\n{stderr}");
}
