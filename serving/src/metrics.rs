//! Prometheus metrics on their own port (`GET /metrics`, text format 0.0.4). Each
//! service keeps its values in plain atomics — the model thread updates them without
//! locks, the exporter only reads — and renders them with [`Exposition`].

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn add(&self, delta: i64) {
        self.0.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A floating-point gauge, stored as its bits.
#[derive(Default)]
pub struct FloatGauge(AtomicU64);

impl FloatGauge {
    pub fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The text exposition format, written one metric family at a time.
#[derive(Default)]
pub struct Exposition(String);

impl Exposition {
    pub fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        let _ = writeln!(
            self.0,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }

    /// A counter family with one sample per `(label value, count)`, or a single
    /// unlabelled sample when `label` is `None`.
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        label: Option<&str>,
        samples: &[(&str, u64)],
    ) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} counter");
        for (value, count) in samples {
            let _ = match label {
                Some(label) => writeln!(self.0, "{name}{{{label}=\"{value}\"}} {count}"),
                None => writeln!(self.0, "{name} {count}"),
            };
        }
    }

    pub fn finish(self) -> String {
        self.0
    }
}

/// What a service exports.
pub trait Render: Send + Sync + 'static {
    fn render(&self) -> String;
}

/// Binds `address` and serves `GET /metrics` (anything else is 404) in a task until
/// the runtime ends; returns the bound address. A minimal HTTP/1.1 responder is enough
/// for a scraper and keeps the dependency list short.
pub async fn spawn_exporter<M: Render>(
    address: SocketAddr,
    metrics: Arc<M>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, metrics));
    Ok(bound)
}

async fn serve<M: Render>(listener: TcpListener, metrics: Arc<M>) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut request = vec![0u8; 4096];
            let n = match socket.read(&mut request).await {
                Ok(n) => n,
                Err(_) => return,
            };
            let head = String::from_utf8_lossy(&request[..n]);
            let (status, body) = if head.starts_with("GET /metrics ") {
                ("200 OK", metrics.render())
            } else {
                ("404 Not Found", "not found\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Two;

    impl Render for Two {
        fn render(&self) -> String {
            let mut out = Exposition::default();
            out.gauge("x_ready", "Ready.", 1);
            out.counter("x_total", "Things.", Some("kind"), &[("a", 2), ("b", 0)]);
            out.finish()
        }
    }

    #[tokio::test]
    async fn the_exporter_answers_metrics_and_404_otherwise() {
        let address = spawn_exporter("127.0.0.1:0".parse().unwrap(), Arc::new(Two))
            .await
            .unwrap();
        let get = |path: &'static str| async move {
            let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
            socket
                .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut text = String::new();
            socket.read_to_string(&mut text).await.unwrap();
            text
        };
        let text = get("/metrics").await;
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        for line in [
            "# TYPE x_ready gauge",
            "x_ready 1",
            "x_total{kind=\"a\"} 2",
            "x_total{kind=\"b\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
    }
}
