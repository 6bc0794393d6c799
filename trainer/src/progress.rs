//! Progress on the terminal for `run`: one line per reporting interval with the stage,
//! step, losses and an ETA from the mean step time so far.

use std::io::Write;
use std::time::{Duration, Instant};

pub struct Progress {
    stage: &'static str,
    total: usize,
    started: Instant,
    first_step: usize,
    every: usize,
}

impl Progress {
    /// `first_step` is where a resumed stage starts, so the ETA counts only the steps
    /// this process ran.
    pub fn new(stage: &'static str, first_step: usize, total: usize) -> Self {
        Progress {
            stage,
            total,
            started: Instant::now(),
            first_step,
            every: (total / 20).max(1),
        }
    }

    /// Reports step `step` (1-based) with named losses; prints every ~5% and at the end.
    pub fn step(&self, step: usize, losses: &[(&str, f64)]) {
        if step % self.every != 0 && step != self.total {
            return;
        }
        let done = step.saturating_sub(self.first_step).max(1);
        let per_step = self.started.elapsed() / done as u32;
        let eta = per_step * (self.total - step) as u32;
        let losses: Vec<String> = losses.iter().map(|(k, v)| format!("{k} {v:.5}")).collect();
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "{} step {step}/{} | {} | {:.2} s/step | eta {}",
            self.stage,
            self.total,
            losses.join(" "),
            per_step.as_secs_f64(),
            format_duration(eta)
        );
    }
}

fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
