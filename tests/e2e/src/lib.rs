//! Cross-service tests for coreg: a `coreg-trainer serve` and a `coreg-sampler serve`
//! child process sharing one store, driven end to end by the clients (Python, Go).
//!
//! The tests are in `tests/integration` (one test binary); this library is empty. Both
//! services' binaries come from `coreg_test_support::binaries`, which builds them with
//! the test's cargo when missing or stale, so `cargo test -p coreg-e2e` needs nothing
//! built first.
