//! A log-linear latency histogram: exact below 64 ns, then 32 buckets per power of two
//! (at most 3.2 % error), fixed size, no allocation per sample, mergeable across workers.

/// Sub-buckets per power of two, as a power of two.
const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
/// Values below this get a bucket each.
const EXACT: u64 = 1 << (SUB_BITS + 1);
/// Enough buckets for any u64: the highest index is `(63 - SUB_BITS) * SUB + 2 * SUB - 1`.
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

/// Counts of nanosecond samples.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < EXACT {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    shift as usize * SUB + (v >> shift) as usize
}

/// The smallest value in bucket `i`, and the bucket's width.
fn bucket_range(i: usize) -> (u64, u64) {
    if (i as u64) < EXACT {
        return (i as u64, 1);
    }
    let shift = (i / SUB - 1) as u32;
    let sub = (i % SUB + SUB) as u64;
    (sub << shift, 1 << shift)
}

impl Histogram {
    pub fn record(&mut self, nanos: u64) {
        self.counts[index(nanos)] += 1;
        self.total += 1;
        self.sum += u128::from(nanos);
        self.min = self.min.min(nanos);
        self.max = self.max.max(nanos);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at quantile `q` (0.5 = median): the middle of the bucket holding the
    /// sample of that rank, kept within the observed minimum and maximum (exact for 1.0).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        if q >= 1.0 {
            return self.max;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, width) = bucket_range(i);
                return (low + width / 2).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for v in (0..5000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let i = index(v);
            assert!(i < BUCKETS);
            assert!(i >= last);
            last = i;
            let (low, width) = bucket_range(i);
            assert!(
                low <= v && v - low < width,
                "{v}: bucket {i} = {low}+{width}"
            );
        }
    }

    #[test]
    fn quantiles_within_a_few_percent() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        for (q, want) in [
            (0.5, 50_000_000.0),
            (0.99, 99_000_000.0),
            (0.999, 99_900_000.0),
        ] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.035, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.max(), 100_000_000);
        assert_eq!(h.quantile(1.0), 100_000_000);
        assert!((h.mean() - 50_000_500.0).abs() < 1.0);

        let mut other = Histogram::default();
        other.record(7);
        h.merge(&other);
        assert_eq!(h.count(), 100_001);
        assert_eq!(h.quantile(0.0), 7);
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }
}
