//! RFC 1982 serial number arithmetic for iSCSI's 32-bit sequence numbers.
//!
//! RFC 7143 §4.2.2.1 says that CmdSN, ExpCmdSN, MaxCmdSN, StatSN, ExpStatSN, DataSN, R2TSN and
//! ExpDataSN are compared with serial number arithmetic ([RFC 1982], `SERIAL_BITS` = 32). This
//! module provides that comparison and nothing else: it does not know which counter a number
//! belongs to, does not keep windows or queues, and never panics.
//!
//! # The undefined case
//!
//! RFC 1982 §3.2 leaves the comparison of `a` and `b` undefined when they are exactly 2^31
//! apart. Here such a pair is *incomparable*: `lt`, `gt`, `le` and `ge` all return `false`
//! (unless the numbers are equal, which they cannot be when 2^31 apart). This is symmetric — the
//! answer does not depend on the order of the operands — so `a.lt(b) == b.gt(a)` always holds,
//! and a number 2^31 away from a window edge is never inside the window. Because serial order is
//! not transitive, [`Sn`] deliberately implements neither `PartialOrd` nor `Ord`.
//!
//! [RFC 1982]: https://www.rfc-editor.org/rfc/rfc1982

use core::cmp::Ordering;

/// Half of the 32-bit serial number space, 2^(SERIAL_BITS - 1).
const HALF: u32 = 1 << 31;

/// A 32-bit iSCSI sequence number (CmdSN, StatSN, DataSN, ...), compared per RFC 1982.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Sn(pub u32);

impl Sn {
    /// Serial-order comparison: `Some(Less)` when `self` precedes `other`, `None` when the two
    /// are exactly 2^31 apart (undefined in RFC 1982; see the module documentation).
    pub fn compare(self, other: Sn) -> Option<Ordering> {
        let d = other.0.wrapping_sub(self.0);
        match d {
            0 => Some(Ordering::Equal),
            HALF => None,
            d if d < HALF => Some(Ordering::Less),
            _ => Some(Ordering::Greater),
        }
    }

    /// `self < other` in serial order.
    pub fn lt(self, other: Sn) -> bool {
        self.compare(other) == Some(Ordering::Less)
    }

    /// `self <= other` in serial order.
    pub fn le(self, other: Sn) -> bool {
        matches!(self.compare(other), Some(Ordering::Less | Ordering::Equal))
    }

    /// `self > other` in serial order.
    pub fn gt(self, other: Sn) -> bool {
        self.compare(other) == Some(Ordering::Greater)
    }

    /// `self >= other` in serial order.
    pub fn ge(self, other: Sn) -> bool {
        matches!(
            self.compare(other),
            Some(Ordering::Greater | Ordering::Equal)
        )
    }

    /// Serial addition (RFC 1982 §3.1), wrapping modulo 2^32.
    ///
    /// RFC 1982 only defines additions of `n < 2^31`; larger `n` still wrap, but the result no
    /// longer compares greater than `self`.
    #[allow(clippy::should_implement_trait)] // also implemented as `ops::Add<u32>`
    pub fn add(self, n: u32) -> Sn {
        Sn(self.0.wrapping_add(n))
    }

    /// Whether `exp <= self <= max` in serial order: the CmdSN acceptance test of RFC 7143
    /// §4.2.2.1 with `exp` = ExpCmdSN and `max` = MaxCmdSN.
    ///
    /// The window is the run of numbers from `exp` up to `max`; it is empty when `max` precedes
    /// `exp` (MaxCmdSN = ExpCmdSN - 1 means the target's queue is closed). Numbers in it are
    /// measured forward from `exp`, so a window wider than 2^31 still behaves sensibly.
    pub fn in_window(self, exp: Sn, max: Sn) -> bool {
        if max.lt(exp) {
            return false;
        }
        exp.distance(self) <= exp.distance(max)
    }

    /// How many steps forward `later` is from `self` (`later - self` modulo 2^32).
    pub fn distance(self, later: Sn) -> u32 {
        later.0.wrapping_sub(self.0)
    }
}

impl core::ops::Add<u32> for Sn {
    type Output = Sn;
    fn add(self, n: u32) -> Sn {
        Sn(self.0.wrapping_add(n))
    }
}

impl core::ops::AddAssign<u32> for Sn {
    fn add_assign(&mut self, n: u32) {
        self.0 = self.0.wrapping_add(n);
    }
}

impl From<u32> for Sn {
    fn from(v: u32) -> Self {
        Sn(v)
    }
}

impl From<Sn> for u32 {
    fn from(v: Sn) -> Self {
        v.0
    }
}

impl core::fmt::Display for Sn {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn basic_order() {
        assert!(Sn(1).lt(Sn(2)));
        assert!(Sn(2).gt(Sn(1)));
        assert!(Sn(1).le(Sn(1)));
        assert!(Sn(1).ge(Sn(1)));
        assert!(!Sn(1).lt(Sn(1)));
    }

    #[test]
    fn wraps_around() {
        assert!(Sn(u32::MAX).lt(Sn(0)));
        assert!(Sn(0).gt(Sn(u32::MAX)));
        assert!(Sn(0xFFFF_FFF0).lt(Sn(0x10)));
        assert_eq!(Sn(u32::MAX).add(1), Sn(0));
        assert_eq!(Sn(u32::MAX) + 2, Sn(1));
        let mut s = Sn(u32::MAX);
        s += 1;
        assert_eq!(s, Sn(0));
    }

    #[test]
    fn half_way_is_incomparable() {
        let a = Sn(0);
        let b = Sn(HALF);
        for (x, y) in [(a, b), (b, a)] {
            assert!(!x.lt(y) && !x.gt(y) && !x.le(y) && !x.ge(y));
            assert_eq!(x.compare(y), None);
        }
    }

    #[test]
    fn rfc1982_examples() {
        // RFC 1982 §5.2, SERIAL_BITS = 2 scaled up: 0 < 1 < 2^31 - 1 and 2^31 + 1 < 0.
        assert!(Sn(0).lt(Sn(HALF - 1)));
        assert!(Sn(HALF + 1).lt(Sn(0)));
    }

    #[test]
    fn windows() {
        assert!(Sn(5).in_window(Sn(5), Sn(5)));
        assert!(Sn(5).in_window(Sn(3), Sn(10)));
        assert!(!Sn(11).in_window(Sn(3), Sn(10)));
        assert!(!Sn(2).in_window(Sn(3), Sn(10)));
        // Across the wrap.
        assert!(Sn(1).in_window(Sn(u32::MAX - 1), Sn(3)));
        assert!(Sn(u32::MAX).in_window(Sn(u32::MAX - 1), Sn(3)));
        assert!(!Sn(4).in_window(Sn(u32::MAX - 1), Sn(3)));
        // MaxCmdSN = ExpCmdSN - 1: closed window.
        assert!(!Sn(7).in_window(Sn(7), Sn(6)));
        assert!(!Sn(6).in_window(Sn(7), Sn(6)));
    }

    #[test]
    fn distances() {
        assert_eq!(Sn(3).distance(Sn(10)), 7);
        assert_eq!(Sn(u32::MAX).distance(Sn(2)), 3);
        assert_eq!(Sn(0).distance(Sn(0)), 0);
    }

    proptest! {
        #[test]
        fn antisymmetric(a: u32, b: u32) {
            let (a, b) = (Sn(a), Sn(b));
            prop_assert_eq!(a.lt(b), b.gt(a));
            prop_assert_eq!(a.le(b), b.ge(a));
            prop_assert!(!(a.lt(b) && b.lt(a)));
            if a != b && a.distance(b) != HALF {
                prop_assert!(a.lt(b) ^ b.lt(a));
            }
        }

        #[test]
        fn add_moves_forward(a: u32, n in 1u32..HALF) {
            let a = Sn(a);
            prop_assert!(a.lt(a.add(n)));
            prop_assert_eq!(a.distance(a.add(n)), n);
        }

        #[test]
        fn window_members(exp: u32, width in 0u32..HALF, off in 0u32..HALF) {
            let exp = Sn(exp);
            let max = exp.add(width);
            let x = exp.add(off);
            prop_assert_eq!(x.in_window(exp, max), off <= width);
            prop_assert!(!exp.add(width).add(1).in_window(exp, max) || width == u32::MAX);
        }
    }
}
