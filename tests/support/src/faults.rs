//! Store faults on loopback: toxiproxy (the real fault-injecting TCP proxy, built at a
//! pinned version by `make setup`, found through `COREG_TOXIPROXY`) in front of another
//! server — the S3 API of [`crate::moto`] — adding latency, throttling bandwidth,
//! resetting a share of connections, and partitioning the store away for a while.
//!
//! Exists so that a test can make what real stores do happen on the tiny model: an
//! upload that outlasts the lease, a brownout in the middle of a job.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The proxy's name in toxiproxy.
const PROXY: &str = "store";

/// Which traffic a toxic acts on.
#[derive(Clone, Copy, Debug)]
pub enum Way {
    /// From the client to the store: requests, uploads.
    Up,
    /// From the store to the client: responses, downloads.
    Down,
}

/// A toxiproxy server with one proxy in front of `upstream`. Killed when dropped.
pub struct FaultProxy {
    child: Child,
    api: String,
    listen: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl FaultProxy {
    /// Starts toxiproxy and a proxy from a free loopback port to `upstream`
    /// (`host:port`), passing traffic unchanged until faults are added.
    pub fn start(upstream: &str) -> FaultProxy {
        let program = std::env::var("COREG_TOXIPROXY")
            .expect("COREG_TOXIPROXY names the toxiproxy-server binary; run through `make test`");
        let port = free_port();
        let child = Command::new(&program)
            .args(["-host", "127.0.0.1", "-port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}"));
        let proxy = FaultProxy {
            child,
            api: format!("127.0.0.1:{port}"),
            listen: format!("127.0.0.1:{}", free_port()),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&proxy.api).is_err() {
            assert!(Instant::now() < deadline, "toxiproxy did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        proxy.call(
            "POST",
            "/proxies",
            json!({"name": PROXY, "listen": proxy.listen, "upstream": upstream, "enabled": true}),
        );
        proxy
    }

    /// The proxied server's URL, for clients to use instead of the real one.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// The trainer's and sampler's environment for a store with `options` (a
    /// [`crate::moto::MotoServer`]'s), reached through this proxy instead.
    pub fn store_env(&self, options: &[(String, String)]) -> Vec<(String, String)> {
        options
            .iter()
            .map(|(key, value)| {
                let value = if key == "aws_endpoint" {
                    self.endpoint()
                } else {
                    value.clone()
                };
                (
                    format!("COREG_STORE__OPTIONS__{}", key.to_uppercase()),
                    value,
                )
            })
            .collect()
    }

    /// Adds toxic `name` of `kind` (`latency`, `bandwidth`, `reset_peer`, `timeout`,
    /// …) to the traffic going `way`, on a `toxicity` share of connections.
    pub fn add(&self, name: &str, kind: &str, way: Way, toxicity: f64, attributes: Value) {
        self.call(
            "POST",
            &format!("/proxies/{PROXY}/toxics"),
            json!({
                "name": name,
                "type": kind,
                "stream": match way {
                    Way::Up => "upstream",
                    Way::Down => "downstream",
                },
                "toxicity": toxicity,
                "attributes": attributes,
            }),
        );
    }

    pub fn remove(&self, name: &str) {
        self.call(
            "DELETE",
            &format!("/proxies/{PROXY}/toxics/{name}"),
            Value::Null,
        );
    }

    /// Cuts the store off (`true`: connections refused, open ones closed) or brings it
    /// back.
    pub fn partition(&self, cut: bool) {
        self.call(
            "POST",
            &format!("/proxies/{PROXY}"),
            json!({ "enabled": !cut }),
        );
    }

    /// One call of toxiproxy's HTTP API; panics unless it succeeds.
    fn call(&self, method: &str, path: &str, body: Value) -> String {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let mut stream = TcpStream::connect(&self.api).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.api,
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response.split(' ').nth(1).unwrap_or_default();
        assert!(
            status.starts_with('2'),
            "toxiproxy {method} {path}: {response}"
        );
        response
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
