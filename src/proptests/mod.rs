//! Property tests of the decoders (issue 20 item 4): whatever bytes come from a disk, a file
//! or the network, decoding never panics, and what it accepts is within range (extents that
//! do not overflow, LSNs that follow on, values a `validate()` has bounded).
//!
//! Every property runs `PROPTEST_CASES` cases (proptest's variable; 256 unless set), those
//! that touch files a fraction of it, so CI stays quick; a long campaign is
//! `PROPTEST_CASES=100000 cargo test --lib proptests`. The NBD frontend's and the dirty map's
//! properties need private items and live with their modules (`frontend/nbd/proptests.rs`,
//! `dirty_map.rs`); their test names contain `proptests` too.

mod configs;
mod files;
mod journal;
mod wire;

use proptest::test_runner::Config;

/// Proptest's configuration (`PROPTEST_CASES` honoured) with the case count divided by
/// `divisor`, for properties whose cases each write files.
pub(crate) fn cases_divided_by(divisor: u32) -> Config {
    let config = Config::default();
    Config { cases: (config.cases / divisor).max(1), ..config }
}
