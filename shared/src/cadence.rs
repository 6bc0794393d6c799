//! When a training stage checkpoints: often enough that a stopped job loses little,
//! rarely enough that checkpointing stays a small part of the job.
//!
//! On the tiny model a checkpoint is a few KB and every 50 steps costs nothing. A
//! stage-2 checkpoint of SD 2.1 is 10.4 GB: about 52 s at 200 MB/s, while a step takes
//! about 0.5 s on a GPU, so a checkpoint every 50 steps would spend twice as long
//! writing as training. The cadence therefore bounds the cost: a periodic checkpoint
//! is taken only once the training time since the last one is at least the last
//! write's duration divided by `max_cost_fraction` (default 5 %). Before any write has
//! been timed, the duration is estimated from the state's size at
//! [`ASSUMED_BYTES_PER_SECOND`].
//!
//! Periodic checkpoints come due by steps (`every_steps`) or by wall time
//! (`every_seconds`, which a user sets to bound the work a crash may lose; it is
//! honoured even past the cost bound). A stop (SIGTERM) always checkpoints. The end
//! of a stage checkpoints within the cost bound only: what follows the end (stage 2,
//! or writing the concept) is short next to redoing a stage.

use std::time::Duration;

/// The store throughput assumed before a checkpoint write was timed.
pub const ASSUMED_BYTES_PER_SECOND: f64 = 200e6;
/// The default bound on the share of a stage spent checkpointing.
pub const DEFAULT_MAX_COST_FRACTION: f64 = 0.05;

/// A stage's checkpoint policy (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CadencePolicy {
    /// A periodic checkpoint every this many steps (0: none by steps).
    pub every_steps: usize,
    /// A periodic checkpoint once this much wall time passed since the last one.
    pub every_seconds: Option<Duration>,
    /// The most of the stage's time that step-driven checkpoints may take.
    pub max_cost_fraction: f64,
}

/// Why [`Cadence::due`] asks for a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// The process is stopping: the checkpoint is what a resume starts from.
    Stopping,
    /// The step count or the wall time came round, within the cost bound.
    Periodic,
    /// The stage's last step, within the cost bound.
    StageEnd,
}

/// One stage's checkpoint clock. Times are given, not read, so that a policy can be
/// simulated (the scale figure in `bench/` does).
#[derive(Debug, Clone)]
pub struct Cadence {
    policy: CadencePolicy,
    /// Time spent training (not checkpointing) since the last checkpoint.
    training: Duration,
    /// Wall time since the last checkpoint.
    wall: Duration,
    /// How long the last checkpoint write took, or the estimate before one.
    write: Duration,
}

impl Cadence {
    /// A stage whose checkpoints hold `state_bytes`.
    pub fn new(policy: CadencePolicy, state_bytes: u64) -> Cadence {
        Cadence {
            policy,
            training: Duration::ZERO,
            wall: Duration::ZERO,
            write: Duration::from_secs_f64(state_bytes as f64 / ASSUMED_BYTES_PER_SECOND),
        }
    }

    /// A step of `took` finished.
    pub fn stepped(&mut self, took: Duration) {
        self.training += took;
        self.wall += took;
    }

    /// Whether the checkpoint after step `step` (1-based) of `total` is due, and why.
    pub fn due(&self, step: usize, total: usize, stopping: bool) -> Option<Due> {
        if stopping {
            return Some(Due::Stopping);
        }
        let affordable = self.policy.max_cost_fraction > 0.0
            && self.training.as_secs_f64() * self.policy.max_cost_fraction
                >= self.write.as_secs_f64();
        let by_time = self
            .policy
            .every_seconds
            .is_some_and(|every| self.wall >= every);
        let by_steps = self.policy.every_steps > 0 && step % self.policy.every_steps == 0;
        if step == total && affordable {
            Some(Due::StageEnd)
        } else if by_time || (by_steps && affordable) {
            Some(Due::Periodic)
        } else {
            None
        }
    }

    /// A checkpoint was written in `took`: the clock starts again.
    pub fn wrote(&mut self, took: Duration) {
        self.write = took;
        self.training = Duration::ZERO;
        self.wall = Duration::ZERO;
    }
}

/// What a policy costs over one stage, simulated with fixed step and write times.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CadenceCost {
    pub checkpoints: usize,
    /// Checkpoint time over the stage's whole time (training plus checkpoints).
    pub fraction: f64,
    /// The most training time between two checkpoints (what a crash could lose).
    pub longest_gap: Duration,
}

/// Runs `policy` over `steps` steps of `step` each, every write taking `write`.
pub fn simulate(
    policy: CadencePolicy,
    steps: usize,
    step: Duration,
    state_bytes: u64,
    write: Duration,
) -> CadenceCost {
    let mut cadence = Cadence::new(policy, state_bytes);
    let (mut checkpoints, mut gap, mut longest_gap) = (0, Duration::ZERO, Duration::ZERO);
    for done in 1..=steps {
        cadence.stepped(step);
        gap += step;
        if cadence.due(done, steps, false).is_some() {
            cadence.wrote(write);
            checkpoints += 1;
            longest_gap = longest_gap.max(gap);
            gap = Duration::ZERO;
        }
    }
    let writing = write.as_secs_f64() * checkpoints as f64;
    let training = step.as_secs_f64() * steps as f64;
    CadenceCost {
        checkpoints,
        fraction: writing / (writing + training),
        longest_gap: longest_gap.max(gap),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD21_STAGE2_STATE: u64 = 10_400_000_000;

    fn policy(every_steps: usize, every_seconds: Option<u64>) -> CadencePolicy {
        CadencePolicy {
            every_steps,
            every_seconds: every_seconds.map(Duration::from_secs),
            max_cost_fraction: DEFAULT_MAX_COST_FRACTION,
        }
    }

    #[test]
    fn small_states_checkpoint_every_n_steps_and_at_the_end() {
        let cost = simulate(
            policy(50, None),
            120,
            Duration::from_millis(50),
            10_000,
            Duration::from_millis(1),
        );
        // Steps 50 and 100, and the end.
        assert_eq!(cost.checkpoints, 3);
        assert!(cost.fraction < 0.01, "{cost:?}");
    }

    #[test]
    fn a_full_size_stage_2_stays_within_the_cost_bound() {
        let write = Duration::from_secs_f64(SD21_STAGE2_STATE as f64 / 200e6);
        for steps in [200, 1000, 5000] {
            let cost = simulate(
                policy(50, None),
                steps,
                Duration::from_millis(500),
                SD21_STAGE2_STATE,
                write,
            );
            assert!(cost.fraction <= 0.05, "{steps} steps: {cost:?}");
        }
        // A long stage still checkpoints: every ~17.5 minutes of training.
        let long = simulate(
            policy(50, None),
            20_000,
            Duration::from_millis(500),
            SD21_STAGE2_STATE,
            write,
        );
        assert!(long.checkpoints >= 7, "{long:?}");
        assert!(long.longest_gap <= Duration::from_secs(1100), "{long:?}");
    }

    #[test]
    fn every_seconds_is_honoured_and_a_stop_always_checkpoints() {
        let mut cadence = Cadence::new(policy(0, Some(60)), SD21_STAGE2_STATE);
        cadence.stepped(Duration::from_secs(59));
        assert_eq!(cadence.due(10, 1000, false), None);
        cadence.stepped(Duration::from_secs(1));
        assert_eq!(cadence.due(11, 1000, false), Some(Due::Periodic));
        cadence.wrote(Duration::from_secs(52));
        assert_eq!(cadence.due(12, 1000, true), Some(Due::Stopping));
        assert_eq!(cadence.due(1000, 1000, false), None, "not affordable yet");
    }
}
