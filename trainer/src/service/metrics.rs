//! Prometheus metrics on their own port (`GET /metrics`, text format 0.0.4): jobs by
//! state as this replica saw them end, the queue depth, whether a job is running, the
//! last step time, and readiness. Plain atomics: the model thread updates them without
//! locks and the exporter only reads.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::job_store::JobState;

#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }

    fn get(&self) -> i64 {
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

    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

#[derive(Default)]
pub struct Metrics {
    pub ready: Gauge,
    pub running: Gauge,
    pub queue_depth: Gauge,
    pub step_seconds: FloatGauge,
    succeeded: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    pub jobs_created: AtomicU64,
}

impl Metrics {
    pub fn finished(&self, state: JobState) {
        let counter = match state {
            JobState::Succeeded => &self.succeeded,
            JobState::Failed => &self.failed,
            JobState::Cancelled => &self.cancelled,
            JobState::Queued | JobState::Running => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            "coreg_trainer_ready",
            "1 once the base model is loaded and warmed up.",
            self.ready.get().to_string(),
        );
        gauge(
            "coreg_trainer_running_jobs",
            "Jobs this replica is training now (0 or 1).",
            self.running.get().to_string(),
        );
        gauge(
            "coreg_trainer_queue_depth",
            "Jobs not yet final in the shared store, at the last look.",
            self.queue_depth.get().to_string(),
        );
        gauge(
            "coreg_trainer_step_seconds",
            "Wall time of the last training step.",
            self.step_seconds.get().to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP coreg_trainer_jobs_ended_total Jobs this replica ended, by final state.\n\
             # TYPE coreg_trainer_jobs_ended_total counter"
        );
        for (state, counter) in [
            ("succeeded", &self.succeeded),
            ("failed", &self.failed),
            ("cancelled", &self.cancelled),
        ] {
            let _ = writeln!(
                out,
                "coreg_trainer_jobs_ended_total{{state=\"{state}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP coreg_trainer_jobs_created_total Jobs created through this replica.\n\
             # TYPE coreg_trainer_jobs_created_total counter\n\
             coreg_trainer_jobs_created_total {}",
            self.jobs_created.load(Ordering::Relaxed)
        );
        out
    }
}

/// Serves `GET /metrics` (anything else is 404) until the task is dropped. A minimal
/// HTTP/1.1 responder is enough for a scraper and keeps the dependency list short.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
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

/// Binds the metrics port; an error names the address.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_lists_every_metric_with_its_value() {
        let metrics = Metrics::default();
        metrics.ready.set(1);
        metrics.queue_depth.set(6);
        metrics.step_seconds.set(0.25);
        metrics.finished(JobState::Succeeded);
        metrics.finished(JobState::Succeeded);
        metrics.finished(JobState::Cancelled);
        let text = metrics.render();
        for line in [
            "coreg_trainer_ready 1",
            "coreg_trainer_queue_depth 6",
            "coreg_trainer_step_seconds 0.25",
            "coreg_trainer_jobs_ended_total{state=\"succeeded\"} 2",
            "coreg_trainer_jobs_ended_total{state=\"cancelled\"} 1",
            "coreg_trainer_jobs_ended_total{state=\"failed\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
    }
}
