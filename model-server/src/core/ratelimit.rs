//! Per-user send rate limit: a token bucket driven by the time the runtime hands in.

use crate::ids::Millis;

/// A token bucket holding up to `burst` tokens, refilled at `rate_per_sec`.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Tokens in thousandths, so that refill needs no floating point.
    milli_tokens: u64,
    last: Millis,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn full(burst: u32, now: Millis) -> Self {
        TokenBucket {
            milli_tokens: u64::from(burst) * 1000,
            last: now,
        }
    }

    /// Takes one token, or says how long until one is available.
    pub fn try_take(&mut self, rate_per_sec: u32, burst: u32, now: Millis) -> Result<(), u64> {
        let cap = u64::from(burst.max(1)) * 1000;
        let elapsed = now.since(self.last);
        self.milli_tokens = (self.milli_tokens + elapsed * u64::from(rate_per_sec)).min(cap);
        self.last = self.last.max(now);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            Ok(())
        } else {
            let missing = 1000 - self.milli_tokens;
            let rate = u64::from(rate_per_sec.max(1));
            Err(missing.div_ceil(rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_allowed_then_refused_with_retry_after() {
        let mut b = TokenBucket::full(3, Millis(0));
        for _ in 0..3 {
            assert!(b.try_take(10, 3, Millis(0)).is_ok());
        }
        assert_eq!(b.try_take(10, 3, Millis(0)), Err(100));
        assert!(
            b.try_take(10, 3, Millis(100)).is_ok(),
            "refilled after 100 ms at 10/s"
        );
    }
}
