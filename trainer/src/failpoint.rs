//! Failpoints: named moments of a job's life where a test makes the worst thing happen
//! at exactly that moment — a panic on the model thread, a process that dies between
//! the manifest and the result, a write phase that outlasts the lease.
//!
//! `COREG_FAILPOINTS="name=action;name=action"`, read once per process. Actions:
//! `panic`, `abort` (the process dies at once, as under `kill -9` or the OOM killer),
//! `sleep(ms)`; `N*action` fires N times and then turns off.
//!
//! Only debug builds (the ones tests run) read the variable: in a release build every
//! failpoint compiles to nothing, so a stray variable in production changes nothing.

#[cfg(debug_assertions)]
mod armed {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    #[derive(Debug, Clone, Copy)]
    enum Action {
        Panic,
        Abort,
        Sleep(Duration),
    }

    /// Each armed failpoint with the number of times it still fires (`None`: always).
    type Armed = HashMap<String, (Action, Option<u32>)>;

    fn parse_action(text: &str) -> Option<(Action, Option<u32>)> {
        let (count, action) = match text.split_once('*') {
            Some((count, action)) => (Some(count.trim().parse().ok()?), action.trim()),
            None => (None, text.trim()),
        };
        let action = match action {
            "panic" => Action::Panic,
            "abort" => Action::Abort,
            sleep => {
                let ms = sleep.strip_prefix("sleep(")?.strip_suffix(')')?;
                Action::Sleep(Duration::from_millis(ms.trim().parse().ok()?))
            }
        };
        Some((action, count))
    }

    fn parse(spec: &str) -> Armed {
        spec.split(';')
            .filter(|entry| !entry.trim().is_empty())
            .filter_map(|entry| {
                let parsed = entry.split_once('=').and_then(|(name, action)| {
                    Some((name.trim().to_owned(), parse_action(action)?))
                });
                if parsed.is_none() {
                    eprintln!("COREG_FAILPOINTS: ignoring {entry:?}");
                }
                parsed
            })
            .collect()
    }

    fn armed() -> &'static Mutex<Armed> {
        static ARMED: OnceLock<Mutex<Armed>> = OnceLock::new();
        ARMED.get_or_init(|| {
            Mutex::new(parse(
                &std::env::var("COREG_FAILPOINTS").unwrap_or_default(),
            ))
        })
    }

    pub fn hit(name: &str) {
        let action = {
            let mut armed = armed().lock().unwrap_or_else(|e| e.into_inner());
            let Some((action, remaining)) = armed.get_mut(name) else {
                return;
            };
            let action = *action;
            match remaining {
                Some(0) => return,
                Some(n) => *n -= 1,
                None => {}
            }
            action
        };
        tracing::warn!(failpoint = name, ?action, "failpoint fired");
        match action {
            Action::Panic => panic!("failpoint `{name}`"),
            Action::Abort => std::process::abort(),
            Action::Sleep(duration) => std::thread::sleep(duration),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn specs_parse_with_counts_and_sleeps() {
            let armed = parse("a=panic; b=2*sleep(150);c=abort;bad;d=explode");
            assert!(matches!(armed["a"], (Action::Panic, None)));
            assert!(
                matches!(armed["b"], (Action::Sleep(d), Some(2)) if d == Duration::from_millis(150))
            );
            assert!(matches!(armed["c"], (Action::Abort, None)));
            assert_eq!(armed.len(), 3);
        }
    }
}

/// Fires the failpoint `name` if the process armed it (debug builds only).
#[inline]
pub fn hit(name: &str) {
    #[cfg(debug_assertions)]
    armed::hit(name);
    #[cfg(not(debug_assertions))]
    let _ = name;
}
