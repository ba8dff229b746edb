//! CPU time of this process (all threads), for "how much CPU did the client spend".

use std::time::Duration;

/// User and system CPU time consumed so far by the whole process.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

impl CpuTime {
    /// Now, from getrusage(RUSAGE_SELF); zero if the call fails.
    pub fn now() -> CpuTime {
        // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage(2) only writes the struct we pass, which lives for the call.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
            return CpuTime::default();
        }
        let duration = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec.max(0) as u64)
                + Duration::from_micros(t.tv_usec.max(0) as u64)
        };
        CpuTime {
            user: duration(usage.ru_utime),
            system: duration(usage.ru_stime),
        }
    }

    /// The CPU used since `earlier`.
    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }

    /// Percent of one core over `wall` (100 = one core busy).
    pub fn percent_of(duration: Duration, wall: Duration) -> f64 {
        if wall.is_zero() {
            0.0
        } else {
            duration.as_secs_f64() / wall.as_secs_f64() * 100.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_work() {
        let before = CpuTime::now();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let used = CpuTime::now().since(before);
        assert!(
            used.user + used.system > Duration::from_millis(5),
            "{used:?}"
        );
        assert_eq!(
            CpuTime::percent_of(Duration::from_millis(500), Duration::from_secs(1)),
            50.0
        );
    }
}
