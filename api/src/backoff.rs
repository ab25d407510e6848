//! The pace of work retried in the background: a wait before each attempt, doubling up to a
//! longest wait, for a number of attempts.

use std::time::Duration;

/// Waits before retries: `first`, then twice as long each time, at most `longest`, for
/// `attempts` retries.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    longest: Duration,
    /// Retries left; `None` for no end.
    left: Option<u32>,
}

impl Backoff {
    pub(crate) fn new(first: Duration, longest: Duration, attempts: u32) -> Backoff {
        Backoff {
            next: first,
            longest,
            left: Some(attempts),
        }
    }

    /// As [`Backoff::new`], for as many retries as it takes.
    pub(crate) fn without_end(first: Duration, longest: Duration) -> Backoff {
        Backoff {
            next: first,
            longest,
            left: None,
        }
    }

    /// Waits before the next retry and answers true; answers false at once when every retry is
    /// spent.
    pub(crate) async fn wait(&mut self) -> bool {
        match &mut self.left {
            Some(0) => return false,
            Some(left) => *left -= 1,
            None => {}
        }
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.longest);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_double_up_to_the_longest_for_the_attempts_given() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(300), 4);
        let mut waited = Vec::new();
        let mut last = tokio::time::Instant::now();
        while backoff.wait().await {
            let now = tokio::time::Instant::now();
            waited.push((now - last).as_millis());
            last = now;
        }
        assert_eq!(waited, [100, 200, 300, 300]);
        assert!(!backoff.wait().await, "spent: no more retries");
        assert_eq!(
            tokio::time::Instant::now(),
            last,
            "a spent backoff does not wait"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_without_end_keeps_waiting_the_longest() {
        let mut backoff =
            Backoff::without_end(Duration::from_millis(100), Duration::from_millis(300));
        for _ in 0..1000 {
            assert!(backoff.wait().await);
        }
        let before = tokio::time::Instant::now();
        assert!(backoff.wait().await);
        assert_eq!((tokio::time::Instant::now() - before).as_millis(), 300);
    }
}
