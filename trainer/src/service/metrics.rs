//! The trainer's Prometheus metrics (exported by [`coreg_serving::metrics`]): jobs by
//! state as this replica saw them end, the queue depth, whether a job is running, the
//! last step time, and readiness.

use std::sync::atomic::{AtomicU64, Ordering};

use coreg_serving::metrics::{Exposition, FloatGauge, Gauge, Render};

use crate::job_store::JobState;

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
}

impl Render for Metrics {
    fn render(&self) -> String {
        let mut out = Exposition::default();
        out.gauge(
            "coreg_trainer_ready",
            "1 once the base model is loaded and warmed up.",
            self.ready.get(),
        );
        out.gauge(
            "coreg_trainer_running_jobs",
            "Jobs this replica is training now (0 or 1).",
            self.running.get(),
        );
        out.gauge(
            "coreg_trainer_queue_depth",
            "Jobs not yet final in the shared store, at the last look.",
            self.queue_depth.get(),
        );
        out.gauge(
            "coreg_trainer_step_seconds",
            "Wall time of the last training step.",
            self.step_seconds.get(),
        );
        let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out.counter(
            "coreg_trainer_jobs_ended_total",
            "Jobs this replica ended, by final state.",
            Some("state"),
            &[
                ("succeeded", count(&self.succeeded)),
                ("failed", count(&self.failed)),
                ("cancelled", count(&self.cancelled)),
            ],
        );
        out.counter(
            "coreg_trainer_jobs_created_total",
            "Jobs created through this replica.",
            None,
            &[("", count(&self.jobs_created))],
        );
        out.finish()
    }
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
