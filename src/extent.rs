//! A range of device bytes: the one shape an I/O's offset and length have from the frontend
//! (NBD, ublk) through the journal and the pending index to the store, on both ends of a
//! mirror. Pure arithmetic; every bound check against a device size lives here.

/// `length` bytes of a device starting at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl Extent {
    pub const fn new(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    /// The first byte after the extent; `None` if it would overflow (input from a client
    /// or the network may claim anything).
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.length)
    }

    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// True when every byte lies inside a device of `size` bytes.
    pub fn fits(&self, size: u64) -> bool {
        self.end().is_some_and(|end| end <= size)
    }

    /// The part of `self` that `other` also covers, if any.
    pub fn intersection(&self, other: &Extent) -> Option<Extent> {
        let start = self.offset.max(other.offset);
        let end = self.end()?.min(other.end()?);
        (start < end).then(|| Extent::new(start, end - start))
    }
}

impl std::fmt::Display for Extent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "offset {} length {}", self.offset, self.length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_never_overflow() {
        assert!(Extent::new(0, 4096).fits(4096));
        assert!(!Extent::new(1, 4096).fits(4096));
        assert!(!Extent::new(u64::MAX, 2).fits(u64::MAX));
        assert_eq!(Extent::new(u64::MAX, 2).end(), None);
        assert_eq!(Extent::new(100, 100).intersection(&Extent::new(150, 100)), Some(Extent::new(150, 50)));
        assert_eq!(Extent::new(100, 100).intersection(&Extent::new(200, 100)), None);
    }
}
