//! Configuration files: arbitrary text parsed as TOML and validated never panics, and a
//! structured config with arbitrary numbers is either refused by `validate()` or in range.

use std::path::PathBuf;

use proptest::prelude::*;

use crate::applier::config::ApplierConfig;
use crate::journal::OnFull;
use crate::marker::{Groups, Schedule, MAX_INTERVAL, MIN_INTERVAL};
use crate::mirror::config::MirrorConfig;
use crate::volume::config::{BackingWrites, JournalConfig, RunConfig, VolumeConfig, MAX_IO_SIZE};

/// TOML-looking text: keys these files have, values of every shape, in arbitrary order.
fn tomlish() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("format_version"),
        Just("name"),
        Just("uuid"),
        Just("size"),
        Just("backing"),
        Just("capacity"),
        Just("segment_size"),
        Just("pending_window"),
        Just("on_full"),
        Just("every"),
        Just("prefix"),
        Just("freeze"),
        Just("volumes"),
        Just("listen"),
        Just("metrics"),
        Just("idle_timeout"),
        Just("keep"),
        Just("journal_dir"),
        Just("address"),
        Just("fingerprint"),
        Just("max_rate"),
        Just("verify_every"),
        Just("nbd"),
        Just("queues"),
        Just("depth"),
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        "\"[0-9]{1,25}(ns|us|ms|s|m|h|d|w|M|y|K|G|T)?\"",
        "\"[a-z0-9:./_-]{0,20}\"",
        Just("\"00000000-0000-0000-0000-000000000001\"".to_string()),
        Just("true".to_string()),
        Just("[\"/a\", \"/b\"]".to_string()),
        "\\PC{0,10}",
    ];
    let line = prop_oneof![
        4 => (key, value).prop_map(|(k, v)| format!("{k} = {v}\n")),
        1 => prop_oneof![Just("[journal]"), Just("[run]"), Just("[markers]"), Just("[snapshots]"), Just("[snapshots.volumes.db]"), Just("[group.db]")].prop_map(|t| format!("{t}\n")),
        1 => "\\PC{0,20}",
    ];
    proptest::collection::vec(line, 0..20).prop_map(|lines| lines.concat())
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![any::<u64>(), (0u64..1 << 20).prop_map(|n| n * 4096), Just(0), Just(u64::MAX), (1u64..64).prop_map(|n| 1 << n)]
}

fn interval() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof!["[0-9]{1,25}(s|m|h|d|y)", "[0-9]{1,4}ms", "\\PC{0,6}"])
}

fn schedule() -> impl Strategy<Value = Schedule> {
    (interval(), proptest::option::of("[a-z./-]{0,8}"), proptest::collection::vec("/?[a-z]{1,4}", 0..2)).prop_map(|(every, prefix, freeze)| Schedule {
        every,
        prefix,
        freeze: freeze.into_iter().map(PathBuf::from).collect(),
    })
}

fn volume_config() -> impl Strategy<Value = VolumeConfig> {
    let run = (proptest::option::of(any::<u16>()), proptest::option::of(any::<u16>()), any::<bool>()).prop_map(|(queues, depth, ublk)| RunConfig {
        queues,
        depth,
        ublk,
        ..RunConfig::default()
    });
    let writes = prop_oneof![Just(BackingWrites::Buffered), Just(BackingWrites::Direct)];
    (0u32..3, size(), size(), size(), size(), run, schedule(), writes).prop_map(
        |(format_version, size, capacity, segment_size, pending_window, run, markers, backing_writes)| VolumeConfig {
            format_version,
            name: "vol".into(),
            uuid: uuid::Uuid::nil(),
            size,
            backing: PathBuf::from("/dev/null"),
            journal: JournalConfig { capacity, segment_size, pending_window, on_full: OnFull::default() },
            run,
            markers,
            backing_writes,
        },
    )
}

/// A validated schedule's interval is a usable one: a deadline that far ahead exists.
fn assert_interval_in_range(interval: Option<std::time::Duration>) {
    if let Some(interval) = interval {
        assert!((MIN_INTERVAL..=MAX_INTERVAL).contains(&interval), "{interval:?}");
        assert!(std::time::Instant::now().checked_add(interval).is_some());
        assert!(u64::try_from(interval.as_micros()).is_ok());
    }
}

proptest! {
    #[test]
    fn arbitrary_text_parses_and_validates_without_panicking(text in tomlish()) {
        if let Ok(config) = toml::from_str::<VolumeConfig>(&text) {
            if config.validate().is_ok() {
                assert_interval_in_range(config.markers.interval());
            }
        }
        if let Ok(config) = toml::from_str::<MirrorConfig>(&text) {
            if config.validate().is_ok() {
                assert_interval_in_range(config.verify_interval());
            }
        }
        if let Ok(config) = toml::from_str::<ApplierConfig>(&text) {
            if config.validate().is_ok() {
                prop_assert!(config.idle_timeout().as_secs() >= 1);
            }
        }
        if let Ok(groups) = toml::from_str::<Groups>(&text) {
            if groups.validate().is_ok() {
                for group in groups.group.values() {
                    prop_assert!(group.volumes.len() >= 2);
                    assert_interval_in_range(group.schedule.interval());
                }
            }
        }
    }

    #[test]
    fn volume_configs_validate_only_in_range(config in volume_config()) {
        if config.validate().is_err() {
            return Ok(());
        }
        prop_assert!(config.size > 0 && config.size % 512 == 0);
        let options = config.journal_options();
        prop_assert!(options.validate().is_ok(), "{:?}", options);
        let max_io = config.max_io();
        prop_assert!((4096..=MAX_IO_SIZE).contains(&max_io));
        prop_assert!(max_io <= options.max_payload(), "the largest I/O fits one record");
        prop_assert!(max_io <= config.journal.pending_window && config.journal.pending_window <= config.journal.capacity / 2);
        if let Some(queues) = config.run.queues {
            prop_assert!((1..=64).contains(&queues));
        }
        if let Some(depth) = config.run.depth {
            prop_assert!((1..=4096).contains(&depth));
        }
        assert_interval_in_range(config.markers.interval());
        // What is saved reads back the same (TOML integers end at i64::MAX: larger sizes do
        // not serialise, and no file can hold them).
        if let Ok(text) = toml::to_string(&config) {
            prop_assert_eq!(toml::from_str::<VolumeConfig>(&text).unwrap(), config);
        }
    }

    #[test]
    fn schedules_validate_only_in_range(schedule in schedule()) {
        if schedule.validate("markers").is_ok() {
            assert_interval_in_range(schedule.interval());
            prop_assert!(crate::name::validate(schedule.prefix()).is_ok());
            prop_assert!(schedule.freeze.iter().all(|path| path.is_absolute()));
        }
    }

    #[test]
    fn mirror_configs_validate_only_in_range(max_rate in proptest::option::of(any::<u64>()), idle_timeout in proptest::option::of(any::<u64>()), verify_every in interval()) {
        let config = MirrorConfig {
            name: "m".into(),
            address: "applier:7420".into(),
            fingerprint: format!("sha256:{}", "ab".repeat(32)),
            max_rate,
            idle_timeout,
            congestion: None,
            verify_every,
            compression: None,
            coalesce: None,
        };
        if config.validate().is_ok() {
            prop_assert!(config.max_rate.is_none_or(|rate| rate >= crate::mirror::config::MIN_RATE));
            prop_assert!((1..=600).contains(&config.idle_timeout().as_secs()));
            assert_interval_in_range(config.verify_interval());
        }
    }

    #[test]
    fn applier_configs_validate_only_in_range(idle_timeout in proptest::option::of(any::<u64>()), keep in proptest::option::of(0usize..4), journal_dir in proptest::option::of("/?[a-z]{1,5}")) {
        let mut config = ApplierConfig { idle_timeout, journal_dir: journal_dir.map(PathBuf::from), ..ApplierConfig::default() };
        config.snapshots.keep = keep;
        if config.validate().is_ok() {
            prop_assert!((1..=600).contains(&config.idle_timeout().as_secs()));
            prop_assert!(config.keep_snapshots("any") >= 1);
            prop_assert!(config.journal_dir.as_ref().is_none_or(|dir| dir.is_absolute()));
        }
    }
}

proptest! {
    /// The values inside config files and command lines: sizes, addresses, fingerprints.
    #[test]
    fn config_values_parse_or_refuse(text in "\\PC{0,30}", digits in "[0-9]{1,25} ?[kKmMgGtT]?(i?[bB])?", n in any::<u64>()) {
        if let Ok(size) = crate::size::parse_size(&digits) {
            prop_assert_eq!(crate::size::parse_size(&crate::size::format_size(size)), Ok(size));
        }
        prop_assert_eq!(crate::size::parse_size(&crate::size::format_size(n)), Ok(n));
        let _ = crate::size::parse_size(&text);
        let _ = crate::address::parse_listen_address(&text);
        let _ = crate::address::check_host_port(&text);
        let _ = text.parse::<crate::address::NbdAddress>();
        if let Ok(fingerprint) = crate::identity::parse_fingerprint(&text) {
            prop_assert_eq!(fingerprint.len(), "sha256:".len() + 64);
        }
    }

    /// A mirror's `compression`: accepted only with a level zstd takes, and printed back to
    /// the same setting (the file keeps what `mirror set` was given).
    #[test]
    fn compression_settings_parse_in_range_or_refuse(text in "\\PC{0,12}", level in any::<i64>(), prefix in prop_oneof![Just("zstd:"), Just("zstd"), Just("zstd: "), Just("")]) {
        use crate::protocol::compression::{level_range, Compression};
        for candidate in [text.clone(), format!("{prefix}{level}")] {
            if let Ok(setting) = candidate.parse::<Compression>() {
                prop_assert_eq!(setting.to_string().parse::<Compression>(), Ok(setting));
                if let Compression::Zstd(level) = setting {
                    prop_assert!(level != 0 && level_range().contains(&level));
                }
            }
        }
    }
}

/// Found writing the properties above: intervals too long for a deadline were accepted (the
/// marker scheduler panicked on `Instant::now() + interval`; a verify interval wrapped in
/// microseconds).
#[test]
fn regression_intervals_beyond_a_century_are_refused() {
    let long = humantime::parse_duration("400000000000y").unwrap();
    assert!(std::time::Instant::now().checked_add(long).is_none(), "the deadline overflows");
    let schedule = Schedule { every: Some("400000000000y".into()), ..Schedule::default() };
    assert!(schedule.validate("markers").unwrap_err().contains("longer than a century"));
    assert!(Schedule { every: Some("99y".into()), ..Schedule::default() }.validate("markers").is_ok());
    let mirror = MirrorConfig {
        name: "m".into(),
        address: "applier:7420".into(),
        fingerprint: format!("sha256:{}", "ab".repeat(32)),
        max_rate: None,
        idle_timeout: None,
        congestion: None,
        verify_every: Some("400000000000y".into()),
        compression: None,
        coalesce: None,
    };
    assert!(mirror.validate().unwrap_err().contains("longer than a century"));
}
