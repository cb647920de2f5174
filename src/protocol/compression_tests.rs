//! The compression setting, the per-batch choice and the bounded decoder (`compression.rs`).
use super::*;

#[test]
fn settings_parse_print_and_refuse_with_the_accepted_forms() {
    for (text, setting) in [
        ("off", Compression::Off),
        ("auto", Compression::Auto),
        ("zstd", Compression::Zstd(1)),
        ("zstd:19", Compression::Zstd(19)),
        ("zstd:-5", Compression::Zstd(-5)),
    ] {
        assert_eq!(text.parse::<Compression>().unwrap(), setting, "{text}");
    }
    assert_eq!(Compression::Zstd(3).to_string(), "zstd:3");
    assert_eq!(Compression::default(), Compression::Auto);
    let max = *level_range().end();
    for bad in ["", "on", "zstd:", "zstd:0", "zstd:x", "lz4", "ZSTD:3", &format!("zstd:{}", max + 1), "zstd:3 "] {
        let error = bad.parse::<Compression>().unwrap_err().to_string();
        assert!(error.contains("\"off\", \"auto\" or \"zstd:LEVEL\"") && error.contains(&format!("..={max}")), "{bad:?}: {error}");
    }
}

#[test]
fn compressible_batches_shrink_and_round_trip() {
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog. ".iter().copied().cycle().take(64 << 10).collect();
    let payloads = [&text[..4096], &text[4096..12288], &[][..], &text[12288..]];
    let mut compressor = BatchCompressor::new();
    let block = compressor.compress(1, payloads.iter().copied()).expect("text compresses");
    assert!(block.len() * 10 < text.len(), "{} bytes from {}", block.len(), text.len());
    assert_eq!(decompress(&block, text.len() as u64).unwrap(), text);
    // The context is reused, also at another level.
    let again = compressor.compress(19, payloads.iter().copied()).unwrap();
    assert_eq!(decompress(&again, text.len() as u64).unwrap(), text);
}

#[test]
fn incompressible_and_tiny_batches_go_raw() {
    use rand::{RngCore, SeedableRng};
    let mut random = vec![0u8; 1 << 20];
    rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut random);
    let mut compressor = BatchCompressor::new();
    assert_eq!(compressor.compress(1, [&random[..]].into_iter()), None, "random bytes do not shrink by 5%");
    assert_eq!(compressor.compress(1, [&[0u8; 100][..]].into_iter()), None, "too small to bother");
    // Barely compressible: 96% random, 4% zeros saves less than 5%.
    random[..40 << 10].fill(0);
    assert_eq!(compressor.compress(1, [&random[..]].into_iter()), None);
    random[..100 << 10].fill(0);
    assert!(compressor.compress(1, [&random[..]].into_iter()).is_some(), "10% zeros is worth it");
}

#[test]
fn bombs_corrupt_frames_and_wrong_claims_are_refused() {
    let zeros = vec![0u8; 8 << 20];
    let bomb = BatchCompressor::new().compress(3, [&zeros[..]].into_iter()).unwrap();
    assert!(bomb.len() < 4096);
    // The header claims less than the frame holds: zstd stops at the claim.
    assert!(matches!(decompress(&bomb, 4096), Err(CompressionError::Corrupt(_))));
    // More than a batch may hold is refused before decompressing.
    assert_eq!(decompress(&bomb, MAX_DECOMPRESSED as u64 + 1), Err(CompressionError::TooLarge(MAX_DECOMPRESSED as u64 + 1)));
    // Claims more than there is.
    assert_eq!(decompress(&bomb, (8 << 20) + 1), Err(CompressionError::WrongLength { expected: (8 << 20) + 1, got: 8 << 20 }));
    assert_eq!(decompress(&bomb, 8 << 20).unwrap().len(), 8 << 20);
    for damaged in [bomb[..bomb.len() / 2].to_vec(), vec![0xee; 64], Vec::new(), [&bomb[..], &[1, 2, 3]].concat()] {
        assert!(decompress(&damaged, 8 << 20).is_err(), "{} bytes", damaged.len());
    }
}

#[test]
fn auto_compresses_only_while_the_link_is_the_bottleneck() {
    let start = Instant::now();
    let mut policy = AutoPolicy::default();
    let at = |ms: u64| start + Duration::from_millis(ms);
    assert_eq!(policy.level(Compression::Off, true, at(0)), None);
    assert_eq!(policy.level(Compression::Zstd(7), false, at(0)), Some(7));
    assert_eq!(policy.level(Compression::Auto, false, at(0)), None, "nothing says the link limits");
    assert_eq!(policy.level(Compression::Auto, true, at(0)), Some(DEFAULT_LEVEL), "a max rate is set");
    // Waiting on the window 10% of a period: link-bound from the next period on.
    for ms in (0..1000).step_by(100) {
        policy.stalled(Duration::from_millis(10), at(ms));
    }
    assert_eq!(policy.level(Compression::Auto, false, at(1000)), Some(DEFAULT_LEVEL));
    assert!(policy.link_bound());
    // A period without waiting (the sender is CPU-bound, or caught up): off again.
    policy.stalled(Duration::from_millis(1), at(1500));
    assert_eq!(policy.level(Compression::Auto, false, at(2100)), None);
    // Batches that do not shrink: auto backs off even under a rate limit, then tries again.
    for _ in 0..RAW_STREAK {
        assert!(policy.level(Compression::Auto, true, at(3000)).is_some());
        policy.outcome(false, at(3000));
    }
    assert_eq!(policy.level(Compression::Auto, true, at(3001)), None);
    let retry = at(3000) + BACKOFF;
    assert!(policy.level(Compression::Auto, true, retry).is_some());
    policy.outcome(false, retry);
    assert_eq!(policy.level(Compression::Auto, true, retry + Duration::from_secs(1)), None, "one failed retry backs off again");
    let later = retry + BACKOFF;
    policy.outcome(true, later);
    assert!(policy.level(Compression::Auto, true, later).is_some());
    // The fixed setting ignores the backoff: the user asked for it.
    assert_eq!(policy.level(Compression::Zstd(3), false, retry), Some(3));
}

/// A connection that starts behind compresses from its first batch; after a period with no
/// stall (the link was not the bottleneck after all) it stops.
#[test]
fn auto_assumes_the_link_bound_at_a_backlog_for_one_period() {
    let start = Instant::now();
    let mut policy = AutoPolicy::default();
    assert_eq!(policy.level(Compression::Auto, false, start), None);
    policy.assume_link_bound(start, None);
    assert_eq!(policy.level(Compression::Auto, false, start + Duration::from_millis(10)), Some(DEFAULT_LEVEL));
    assert_eq!(policy.level(Compression::Auto, false, start + PERIOD / 2), Some(DEFAULT_LEVEL));
    assert_eq!(policy.level(Compression::Auto, false, start + PERIOD + Duration::from_millis(1)), None);
    // Stalls in the period keep it on.
    policy.assume_link_bound(start, None);
    policy.stalled(PERIOD / 5, start + PERIOD / 2);
    assert_eq!(policy.level(Compression::Auto, false, start + PERIOD + Duration::from_millis(1)), Some(DEFAULT_LEVEL));
    // Off stays off.
    policy.assume_link_bound(start, None);
    assert_eq!(policy.level(Compression::Off, false, start), None);
}

/// A backlog found on a host that was idle while the mirror was away starts at the top
/// level; a busy one at the default. Waiting little on the window brings the level down.
#[test]
fn auto_starts_a_backlog_at_the_top_level_when_the_host_was_idle() {
    let start = Instant::now();
    let mut policy = AutoPolicy::default();
    policy.assume_link_bound(start, Some(RAISE_IDLE_CPU / 2.0));
    assert_eq!(policy.level(Compression::Auto, false, start), Some(DEFAULT_LEVEL), "a busy host starts low");
    policy.assume_link_bound(start, None);
    assert_eq!(policy.level(Compression::Auto, false, start), Some(DEFAULT_LEVEL), "unknown: low");
    policy.assume_link_bound(start, Some(1.5));
    assert_eq!(policy.level(Compression::Auto, false, start), Some(MAX_AUTO_LEVEL));
    policy.stalled(PERIOD / 10, start + PERIOD / 2);
    assert_eq!(policy.level(Compression::Auto, false, start + PERIOD), Some(MAX_AUTO_LEVEL - 1), "a compressor that cannot keep up: one down");
}

/// Waiting on the window is no reason to compress while the source host has no CPU to spare
/// (the guest's writes need it); with spare CPU the same waiting is.
#[test]
fn auto_leaves_a_busy_host_uncompressed() {
    let start = Instant::now();
    let at = |ms: u64| start + Duration::from_millis(ms);
    let mut policy = AutoPolicy::default();
    policy.idle_cpu(SPARE_CPU / 2.0);
    policy.stalled(Duration::from_millis(400), at(100));
    assert_eq!(policy.level(Compression::Auto, false, at(1000)), None, "a busy host: no compression");
    assert!(!policy.link_bound());
    assert_eq!(policy.level(Compression::Auto, true, at(1000)), Some(DEFAULT_LEVEL), "a max rate still compresses");
    policy.idle_cpu(1.5);
    policy.stalled(Duration::from_millis(300), at(1100));
    assert_eq!(policy.level(Compression::Auto, false, at(2000)), Some(DEFAULT_LEVEL), "spare CPU: compress");
}

/// A link far slower than the compressor, with CPU to spare: the level climbs one per period
/// to its cap; waiting less brings it down, and a busy host or a link that stopped limiting
/// sends it back to the default at once.
#[test]
fn auto_spends_spare_cpu_on_a_better_ratio_while_the_link_is_far_behind() {
    let start = Instant::now();
    let at = |ms: u64| start + Duration::from_millis(ms);
    let mut policy = AutoPolicy::default();
    policy.idle_cpu(1.0);
    assert_eq!(policy.level(Compression::Auto, false, at(0)), None, "the first period starts");
    let mut now = 0;
    let mut period = |policy: &mut AutoPolicy, stalled_ms: u64| {
        policy.stalled(Duration::from_millis(stalled_ms), at(now + 100));
        now += 1000;
        policy.level(Compression::Auto, false, at(now))
    };
    assert_eq!(period(&mut policy, 800), Some(DEFAULT_LEVEL + 1));
    assert_eq!(period(&mut policy, 800), Some(DEFAULT_LEVEL + 2));
    for _ in 0..5 {
        assert_eq!(period(&mut policy, 800), Some(MAX_AUTO_LEVEL), "capped");
    }
    assert_eq!(period(&mut policy, 350), Some(MAX_AUTO_LEVEL), "between the thresholds: kept");
    assert_eq!(period(&mut policy, 100), Some(MAX_AUTO_LEVEL - 1), "waiting less: one down");
    policy.idle_cpu(RAISE_IDLE_CPU / 2.0);
    assert_eq!(period(&mut policy, 800), Some(MAX_AUTO_LEVEL - 1), "not idle enough to climb");
    assert_eq!(period(&mut policy, 10), None, "the link stopped limiting: raw");
    policy.idle_cpu(1.0);
    assert_eq!(period(&mut policy, 100), Some(DEFAULT_LEVEL), "and back at the default level");
}
