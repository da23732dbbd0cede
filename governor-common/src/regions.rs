//! Who faulted each 2 MiB region in: the values of `REGIONS`, and the rules
//! the programs keep them by (pure, so that they are tested here).
//!
//! Mappings are not 2 MiB aligned, so a region often holds the end of one
//! engine's mapping and the start of another's. A region therefore has an
//! owner (the engine that faulted in most of it, or first) and, where a
//! second engine faulted pages in it, that engine and the span of the
//! region's 64 KiB units its faults covered. A release (munmap, madvise,
//! brk) of a range weighs each region's units of the range between the two:
//! an engine's block that shares both its regions with its neighbours is
//! charged back to it, not to the neighbour that faulted a shared region
//! last.

use crate::{REGION_SHIFT, region_owner};

/// A region's units: 64 KiB each.
pub const UNIT_SHIFT: u32 = 16;
/// Units per region (32).
pub const UNITS: u32 = 1 << (REGION_SHIFT - UNIT_SHIFT);
/// No second engine.
pub const NONE: u32 = u32::MAX;

/// A `REGIONS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionOwners {
    /// [`region_owner::pack`] of the engine holding the region's units
    /// outside `other`'s span (its slot, and the node it last faulted on).
    pub owner: u32,
    /// [`region_owner::pack`] of a second engine that faulted pages here,
    /// or [`NONE`].
    pub other: u32,
    /// The units `other`'s faults covered: first in bits 0..8, last in
    /// bits 8..16 (meaningless without `other`).
    pub span: u32,
}

impl RegionOwners {
    /// No entry: nobody faulted the region in.
    pub const EMPTY: Self = Self {
        owner: NONE,
        other: NONE,
        span: 0,
    };

    /// A region all of whose faults were `owner`'s.
    pub const fn sole(owner: u32) -> Self {
        Self {
            owner,
            other: NONE,
            span: 0,
        }
    }

    /// The unit of the region that `addr` falls in.
    pub const fn unit(addr: u64) -> u32 {
        ((addr >> UNIT_SHIFT) & (UNITS as u64 - 1)) as u32
    }

    /// `other`'s span, first and last unit.
    pub const fn span(&self) -> (u32, u32) {
        (self.span & 0xff, (self.span >> 8) & 0xff)
    }

    const fn with_span(self, other: u32, first: u32, last: u32) -> Self {
        if first == 0 && last == UNITS - 1 {
            // The second engine faulted the whole region: it is the owner.
            return Self::sole(other);
        }
        Self {
            owner: self.owner,
            other,
            span: first | (last << 8),
        }
    }

    /// The slot owning the whole region, if one does.
    pub const fn sole_slot(&self) -> Option<u32> {
        if self.other == NONE {
            Some(region_owner::slot(self.owner))
        } else {
            None
        }
    }

    /// Whether `slot` holds any of the region.
    pub const fn holds(&self, slot: u32) -> bool {
        region_owner::slot(self.owner) == slot
            || (self.other != NONE && region_owner::slot(self.other) == slot)
    }

    /// The value after a fault at `unit` by the engine `mine`
    /// ([`region_owner::pack`]) in a region that held `prev` ([`Self::EMPTY`]
    /// for none); the same value when nothing changes. (No `Option`s: the
    /// programs' verifier refuses the copies of an uninitialised payload
    /// the compiler may make of one.)
    ///
    /// * The second engine's faults widen its span (once it spans the
    ///   whole region, it owns it); the owner's faults at either end of
    ///   that span take the unit back.
    /// * A new engine becomes the second one; with two there already, it
    ///   takes over the side its fault is on (the last to fault there holds
    ///   it, as memory reused after an unmap does).
    pub fn after_fault(v: Self, mine: u32, unit: u32) -> Self {
        if v.owner == NONE {
            return Self::sole(mine);
        }
        let me = region_owner::slot(mine);
        let (first, last) = v.span();
        let in_span = v.other != NONE && first <= unit && unit <= last;
        if region_owner::slot(v.owner) == me {
            let v = Self { owner: mine, ..v };
            match (v.other == NONE, in_span) {
                (true, _) | (false, false) => v,
                (false, true) if first == last => Self::sole(mine),
                (false, true) if unit == first => v.with_span(v.other, first + 1, last),
                (false, true) if unit == last => v.with_span(v.other, first, last - 1),
                (false, true) => v,
            }
        } else if v.other != NONE && region_owner::slot(v.other) == me {
            v.with_span(mine, first.min(unit), last.max(unit))
        } else if v.other == NONE {
            v.with_span(mine, unit, unit)
        } else if in_span {
            v.with_span(mine, first, last)
        } else {
            Self { owner: mine, ..v }
        }
    }

    /// The value once the units `first..=last` are unmapped: an engine
    /// all of whose units went is dropped ([`Self::EMPTY`] when both
    /// went), so that memory mapped there again starts with no owner and
    /// its first fault (one for a whole huge page) owns it.
    pub const fn released(self, first: u32, last: u32) -> Self {
        if first == 0 && last == UNITS - 1 {
            return Self::EMPTY;
        }
        if self.other == NONE {
            return self;
        }
        let (lo, hi) = self.span();
        let other_gone = first <= lo && hi <= last;
        // The owner's units are those below the span and above it.
        let below = lo == 0 || (first == 0 && last + 1 >= lo);
        let above = hi == UNITS - 1 || (last == UNITS - 1 && first <= hi + 1);
        let owner_gone = below && above;
        match (owner_gone, other_gone) {
            (true, true) => Self::EMPTY,
            (true, false) => Self::sole(self.other),
            (false, true) => Self::sole(self.owner),
            (false, false) => self,
        }
    }

    /// How many of the units `first..=last` each engine holds: the owner's
    /// and the second engine's ([`NONE`] and 0 when there is none).
    pub const fn split(&self, first: u32, last: u32) -> [(u32, u32); 2] {
        let all = last - first + 1;
        if self.other == NONE {
            return [(self.owner, all), (NONE, 0)];
        }
        let (lo, hi) = self.span();
        let lo = if lo > first { lo } else { first };
        let hi = if hi < last { hi } else { last };
        let theirs = if lo <= hi { hi - lo + 1 } else { 0 };
        [(self.owner, all - theirs), (self.other, theirs)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region_owner::pack;

    const A: u32 = pack(1, 0);
    const B: u32 = pack(2, 0);
    const C: u32 = pack(3, 1);

    /// Faults `units` in order, from `v`, by `who`.
    fn faults(mut v: RegionOwners, who: u32, units: impl Iterator<Item = u32>) -> RegionOwners {
        for u in units {
            v = RegionOwners::after_fault(v, who, u);
        }
        v
    }

    /// The new value, or `None` when the fault changed nothing.
    fn after(v: RegionOwners, who: u32, unit: u32) -> Option<RegionOwners> {
        let next = RegionOwners::after_fault(v, who, unit);
        (next != v).then_some(next)
    }

    #[test]
    fn one_engine_s_faults_change_nothing_after_the_first() {
        let v = after(RegionOwners::EMPTY, A, 5).unwrap();
        assert_eq!(v, RegionOwners::sole(A));
        assert_eq!(v.sole_slot(), Some(1));
        for u in 0..UNITS {
            assert_eq!(after(v, A, u), None);
        }
        // The node it last faulted on is kept.
        let moved = after(v, pack(1, 1), 3).unwrap();
        assert_eq!(moved, RegionOwners::sole(pack(1, 1)));
    }

    #[test]
    fn two_engines_meeting_in_a_region_each_keep_their_side() {
        // A's block ends halfway into the region, B's starts there and was
        // faulted after A's: the case of two neighbouring mappings.
        let v = faults(RegionOwners::EMPTY, A, 0..16);
        let v = faults(v, B, 16..UNITS);
        assert_eq!(v.sole_slot(), None);
        assert_eq!(v.split(0, 15), [(A, 16), (B, 0)]);
        assert_eq!(v.split(16, 31), [(A, 0), (B, 16)]);
        assert_eq!(v.split(0, 31), [(A, 16), (B, 16)]);
        assert!(v.holds(1) && v.holds(2) && !v.holds(3));
        // Faulted the other way round (mmap hands out addresses downward):
        // the same split.
        let w = faults(RegionOwners::EMPTY, B, 16..UNITS);
        let w = faults(w, A, 0..16);
        assert_eq!(w.split(0, 15), [(B, 0), (A, 16)]);
        assert_eq!(w.split(16, 31), [(B, 16), (A, 0)]);
    }

    #[test]
    fn a_second_engine_faulting_the_whole_region_owns_it() {
        // Memory unmapped by A and reused by B.
        let v = faults(RegionOwners::EMPTY, A, 0..UNITS);
        let v = faults(v, B, 0..UNITS);
        assert_eq!(v, RegionOwners::sole(B));
    }

    #[test]
    fn the_owner_takes_back_the_ends_of_the_second_engine_s_span() {
        let v = faults(RegionOwners::EMPTY, A, 0..8);
        let v = faults(v, B, 8..12);
        assert_eq!(v.span(), (8, 11));
        let v = after(v, A, 8).unwrap();
        assert_eq!(v.span(), (9, 11));
        // Inside the span: left to B.
        assert_eq!(after(v, A, 10), None);
        let v = after(v, A, 11).unwrap();
        assert_eq!(v.span(), (9, 10));
        let v = faults(v, A, [10, 9].into_iter());
        assert_eq!(v, RegionOwners::sole(A));
    }

    #[test]
    fn an_unmap_drops_the_engines_whose_units_all_went() {
        let v = faults(RegionOwners::EMPTY, A, 0..16);
        let v = faults(v, B, 16..UNITS);
        // B's blocks (the upper half) unmapped: A's alone.
        assert_eq!(v.released(16, 31), RegionOwners::sole(A));
        assert_eq!(v.released(10, 31), RegionOwners::sole(A));
        // A's (the lower half): B's alone.
        assert_eq!(v.released(0, 15), RegionOwners::sole(B));
        // Part of each: both stay.
        assert_eq!(v.released(8, 20), v);
        // All of it: nobody's, and the next fault, a huge page's perhaps,
        // owns all of it.
        assert_eq!(v.released(0, 31), RegionOwners::EMPTY);
        assert_eq!(
            RegionOwners::after_fault(v.released(0, 31), C, 7),
            RegionOwners::sole(C)
        );
        // A span in the middle: the owner holds both sides.
        let m = faults(faults(RegionOwners::EMPTY, A, 0..UNITS), B, 8..12);
        assert_eq!(m.released(8, 11), RegionOwners::sole(A));
        assert_eq!(m.released(0, 20), RegionOwners::sole(A));
        assert_eq!(m.released(0, 7), m);
        // One engine's region, partly unmapped: still its own.
        let a = RegionOwners::sole(A);
        assert_eq!(a.released(3, 9), a);
    }

    #[test]
    fn a_third_engine_takes_over_the_side_it_faults() {
        let v = faults(RegionOwners::EMPTY, A, 0..16);
        let v = faults(v, B, 16..24);
        // C in B's span: C holds the span.
        let c_in = after(v, C, 20).unwrap();
        assert_eq!(c_in.split(16, 23), [(A, 0), (C, 8)]);
        // C outside it: C holds the rest.
        let c_out = after(v, C, 28).unwrap();
        assert_eq!(c_out.split(0, 31), [(C, 24), (B, 8)]);
    }
}
