//! The pace of work retried in the background: a wait before each attempt, doubling up to a
//! longest wait, for a number of attempts.

use std::time::Duration;

/// Waits before retries: `first`, then twice as long each time, at most `longest`, for
/// `attempts` retries.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    longest: Duration,
    left: u32,
}

impl Backoff {
    pub(crate) fn new(first: Duration, longest: Duration, attempts: u32) -> Backoff {
        Backoff {
            next: first,
            longest,
            left: attempts,
        }
    }

    /// Waits before the next retry and answers true; answers false at once when every retry is
    /// spent.
    pub(crate) async fn wait(&mut self) -> bool {
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
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
}
