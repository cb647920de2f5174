//! Reconnection: how soon a sender finds an applier that was away or restarted. Real
//! binaries, real QUIC on loopback.

mod common;
use common::pair::*;
use common::*;

use std::time::{Duration, Instant};

/// A volume served and replicating to an applier, which is then killed (-9): (applier dir,
/// volume dir, the applier's port, the served volume).
fn replicating_then_applier_killed(tmp: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, u16, Served) {
    let (adir, vdir, port) = setup(tmp, None);
    let mut applier = Applier::start(&adir, port);
    let served = Served::start(&vdir, &[]);
    wait_all_consistent(&vdir, 1);
    applier.kill9();
    (adir, vdir, port, served)
}

/// While its applier is away, the sender keeps trying often enough that a returning applier
/// is found within seconds: quinn alone resends an unanswered connection attempt after 1, 2,
/// 4 and 8 s, so one attempt that lasted the idle timeout (15 s by default) found the applier
/// up to 8 s late. Listened for on the applier's port with a plain UDP socket: a QUIC Initial
/// arrives at least every 2 s (attempts of 5 s, Initials at 0, 1 and 3 s, the next attempt at
/// once). Each attempt comes from a new socket, and the log says once that the applier is
/// unreachable, not once per attempt.
#[test]
fn an_applier_that_is_away_is_tried_every_few_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let (adir, vdir, port, served) = replicating_then_applier_killed(tmp.path());
    // The open connection dies of its idle timeout (nobody answers at the port).
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_json(&vdir)["mirrors"][0]["connected"] == true {
        assert!(Instant::now() < deadline, "the sender never noticed the applier died");
        std::thread::sleep(Duration::from_millis(50));
    }
    let listener = std::net::UdpSocket::bind(("127.0.0.1", port)).expect("the applier's port, free again");
    listener.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let listen_for = Duration::from_secs(14);
    let started = Instant::now();
    let mut arrivals: Vec<(Duration, u16)> = Vec::new();
    let mut buffer = [0u8; 2048];
    while started.elapsed() < listen_for {
        if let Ok((_, from)) = listener.recv_from(&mut buffer) {
            arrivals.push((started.elapsed(), from.port()));
        }
    }
    drop(listener);
    let first = arrivals.first().map(|(at, _)| *at).expect("no connection attempt reached the applier's port");
    let mut gaps: Vec<Duration> = arrivals.windows(2).map(|pair| pair[1].0 - pair[0].0).collect();
    gaps.push(listen_for - arrivals.last().unwrap().0);
    let widest = gaps.iter().copied().max().unwrap();
    let attempts: std::collections::BTreeSet<u16> = arrivals.iter().map(|(_, from)| *from).collect();
    eprintln!("first Initial after {first:?}; {} datagrams from {} attempts; widest gap {widest:?}", arrivals.len(), attempts.len());
    assert!(widest <= Duration::from_millis(3000), "the sender went {widest:?} without trying: {arrivals:?}");
    assert!(attempts.len() >= 2, "one attempt held for the whole outage: {arrivals:?}");
    // `reconnects` counts the lost connection and the outage's first failed attempt, not
    // every attempt; the last error says why.
    let mirror = status_json(&vdir)["mirrors"][0].clone();
    assert_eq!(mirror["reconnects"], 2, "{mirror}");
    assert!(mirror["last_error"].as_str().unwrap_or_default().starts_with("no answer from 127.0.0.1:"), "{mirror}");
    let _applier = Applier::start(&adir, port);
    wait_all_consistent(&vdir, 1);
    let log = served.log_text();
    assert_eq!(log.matches("cannot reach its applier").count(), 1, "{log}");
    assert!(log.contains("no answer from 127.0.0.1:"), "{log}");
}

/// An applier killed and started again at once answers the sender's packets for the dead
/// connection with a stateless reset the sender accepts (its key is derived from the
/// applier's identity, so it is the same after a restart): the sender reconnects at once,
/// not after its idle timeout (15 s here) with nothing to show why.
#[test]
fn a_restarted_applier_resets_the_connection_its_predecessor_had() {
    let tmp = tempfile::tempdir().unwrap();
    let (adir, vdir, port, served) = replicating_then_applier_killed(tmp.path());
    let restarted = Instant::now();
    let _applier = Applier::start(&adir, port);
    let deadline = Instant::now() + Duration::from_secs(60);
    while status_json(&vdir)["mirrors"][0]["reconnects"].as_u64().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "the sender never reconnected");
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("reconnected {:?} after the applier restarted", restarted.elapsed());
    wait_all_consistent(&vdir, 1);
    let log = served.log_text();
    assert!(log.contains("reset by peer"), "the dead connection was not reset: {log}");
}
