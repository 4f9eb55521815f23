//! Time as whole microseconds since the Unix epoch (UTC): the storage format
//! on both backends, and cheap to compare. Functions that judge expiry take
//! `now` as a parameter, and the code that needs "now" is handed a `Clock`:
//! `SystemClock` is the one place that reads the system clock (clippy's
//! `disallowed-methods` refuses it anywhere else), and tests can use a
//! `ManualClock` to move time instead of sleeping.

use std::{
    sync::atomic::{AtomicI64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Where "now" comes from.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one reader of the system clock
    fn now(&self) -> Timestamp {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX))
    }
}

/// A clock that moves only when told (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn starting_at(at: Timestamp) -> Self {
        Self(AtomicI64::new(at.micros()))
    }

    pub fn advance(&self, by: Duration) {
        let micros = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        self.0.fetch_add(micros, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    pub const fn micros(self) -> i64 {
        self.0
    }

    /// Whole seconds since the epoch, rounded down.
    pub const fn seconds(self) -> i64 {
        self.0.div_euclid(1_000_000)
    }

    pub fn plus(self, duration: Duration) -> Self {
        let micros = i64::try_from(duration.as_micros()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(micros))
    }

    /// Whole seconds from `self` until `later`, rounded down, never negative.
    pub fn whole_seconds_until(self, later: Self) -> i64 {
        (later.0 - self.0).max(0) / 1_000_000
    }

    pub fn to_proto(self) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: self.0.div_euclid(1_000_000),
            // The remainder is below 1,000,000, so the product fits.
            nanos: i32::try_from(self.0.rem_euclid(1_000_000) * 1000).unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_seconds_round_down_and_never_go_negative() {
        let start = Timestamp::from_micros(10_000_000);
        assert_eq!(
            start.whole_seconds_until(Timestamp::from_micros(12_999_999)),
            2
        );
        assert_eq!(start.whole_seconds_until(Timestamp::from_micros(5)), 0);
    }

    #[test]
    fn proto_conversion_keeps_microseconds() {
        let t = Timestamp::from_micros(1_700_000_000_123_456);
        let p = t.to_proto();
        assert_eq!(p.seconds, 1_700_000_000);
        assert_eq!(p.nanos, 123_456_000);
    }
}
