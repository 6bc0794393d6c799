//! The sampler's Prometheus metrics (exported by [`coreg_serving::metrics`]):
//! readiness, generations by outcome, images made, denoising steps run, the last step
//! time, admitted generations, and the concept cache's size and hit rate.

use coreg_serving::metrics::{Counter, Exposition, FloatGauge, Gauge, Render};

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// The client went away (or its deadline passed) first.
    Cancelled,
    Failed,
    /// Refused before it started: busy, bad input, unknown or corrupt concept.
    Rejected,
}

#[derive(Default)]
pub struct Metrics {
    pub ready: Gauge,
    /// Generations admitted and not yet ended (running or waiting for the model).
    pub in_flight: Gauge,
    pub step_seconds: FloatGauge,
    /// Denoising steps run, across all requests: a cancelled request's count stops
    /// growing within one step.
    pub denoising_steps: Counter,
    pub images: Counter,
    pub cache_bytes: Gauge,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    completed: Counter,
    cancelled: Counter,
    failed: Counter,
    rejected: Counter,
}

impl Metrics {
    pub fn ended(&self, outcome: Outcome) {
        match outcome {
            Outcome::Completed => &self.completed,
            Outcome::Cancelled => &self.cancelled,
            Outcome::Failed => &self.failed,
            Outcome::Rejected => &self.rejected,
        }
        .inc();
    }
}

impl Render for Metrics {
    fn render(&self) -> String {
        let mut out = Exposition::default();
        out.gauge(
            "coreg_sampler_ready",
            "1 once the base model is loaded and warmed up.",
            self.ready.get(),
        );
        out.gauge(
            "coreg_sampler_in_flight_generations",
            "Generations admitted and not yet ended.",
            self.in_flight.get(),
        );
        out.gauge(
            "coreg_sampler_step_seconds",
            "Wall time of the last denoising step.",
            self.step_seconds.get(),
        );
        out.gauge(
            "coreg_sampler_concept_cache_bytes",
            "Bytes of verified concepts held in memory.",
            self.cache_bytes.get(),
        );
        out.counter(
            "coreg_sampler_generations_total",
            "Generate calls, by how they ended.",
            Some("outcome"),
            &[
                ("completed", self.completed.get()),
                ("cancelled", self.cancelled.get()),
                ("failed", self.failed.get()),
                ("rejected", self.rejected.get()),
            ],
        );
        out.counter(
            "coreg_sampler_images_total",
            "Images generated.",
            None,
            &[("", self.images.get())],
        );
        out.counter(
            "coreg_sampler_denoising_steps_total",
            "Denoising steps run (one U-Net call per step for all of a prompt's images).",
            None,
            &[("", self.denoising_steps.get())],
        );
        out.counter(
            "coreg_sampler_concept_cache_lookups_total",
            "Concept lookups, by whether the cache held the concept.",
            Some("result"),
            &[
                ("hit", self.cache_hits.get()),
                ("miss", self.cache_misses.get()),
            ],
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
        metrics.in_flight.set(3);
        metrics.ended(Outcome::Completed);
        metrics.ended(Outcome::Completed);
        metrics.ended(Outcome::Rejected);
        metrics.denoising_steps.inc();
        metrics.cache_hits.inc();
        let text = metrics.render();
        for line in [
            "coreg_sampler_ready 1",
            "coreg_sampler_in_flight_generations 3",
            "coreg_sampler_generations_total{outcome=\"completed\"} 2",
            "coreg_sampler_generations_total{outcome=\"rejected\"} 1",
            "coreg_sampler_generations_total{outcome=\"cancelled\"} 0",
            "coreg_sampler_denoising_steps_total 1",
            "coreg_sampler_concept_cache_lookups_total{result=\"hit\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
    }
}
