//! The source half of a planned swap (`mirror switchover`): writes are held (the frontends
//! keep them queued), the mirror applies everything, the applier promotes the replica at that
//! LSN on a connection of its own, and the volume is fenced: the writes queued meanwhile and
//! every later one fail (EIO), so nothing is written here after the branch and nothing has
//! to be resent when the new primary mirrors back. If the applier's answer is lost after the
//! request went out, the volume is fenced too (the replica may have been promoted): nothing
//! is written on two sides; `applier status` on the replica's host tells, `volume demote`
//! or a restart of `run` continues.

use std::time::{Duration, Instant};

use super::generations::PromotionSeen;
use super::link::{connect, hello_of};
use super::senders::Senders;
use super::{config, MirrorError};
use crate::generation::Generation;
use crate::protocol::framing::{read_frame, write_control, LinkError};
use crate::protocol::tls;
use crate::protocol::wire::{history_from_wire, Control, Frame};
use crate::volume::Volume;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SwitchoverRequest {
    pub mirror: String,
    /// The new primary's volume directory on the replica's host (empty: the applier's default).
    #[serde(default)]
    pub to: String,
    /// Where the new primary reaches the applier that will hold this volume's replica.
    pub applier_address: String,
    pub applier_fingerprint: String,
    /// How long the mirror may take to apply everything (writes are held meanwhile).
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SwitchedOver {
    pub to: String,
    pub generation: uuid::Uuid,
    pub branch_lsn: u64,
    pub fingerprint: String,
    pub history: Vec<Generation>,
    /// How long writes were held (microseconds).
    pub held_us: u64,
}

/// Performs the swap; on success the volume is fenced and `run` should stop.
pub fn switchover(volume: &Volume, senders: &Senders, request: &SwitchoverRequest) -> Result<SwitchedOver, MirrorError> {
    let dir = volume.dir();
    let mirror = config::load(dir, &request.mirror)?;
    let timeout = Duration::from_millis(request.timeout_ms.clamp(1000, 600_000));
    let started = Instant::now();
    let hold = volume.hold_writes_for(timeout + Duration::from_secs(60)).map_err(|e| MirrorError::Invalid(format!("hold writes: {e}")))?;
    let last = volume.journal().written_lsn();
    let deadline = Instant::now() + timeout;
    loop {
        let applied = senders.statuses().into_iter().find(|s| s.name == request.mirror).map_or(0, |s| s.applied_lsn);
        if applied >= last && volume.journal().synced_lsn() >= last {
            break;
        }
        if Instant::now() >= deadline {
            // Dropping the hold lets the queued writes go on: nothing changed.
            return Err(MirrorError::Invalid(format!(
                "mirror {} applied through LSN {applied} of {last} within {} s; nothing was changed (writes go on here)",
                request.mirror,
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|source| MirrorError::Io { context: "start a runtime".into(), source })?;
    let asked = std::sync::atomic::AtomicBool::new(false);
    let answer = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(60), ask(volume, &mirror, request, &asked)).await });
    let answer = match answer {
        Ok(result) => result,
        Err(_) => Err(LinkError::Protocol("the applier did not answer within 60 s".into())),
    };
    let switched = match answer {
        Ok(switched) => switched,
        Err(error) if asked.load(std::sync::atomic::Ordering::SeqCst) => {
            let _ = hold.fence();
            return Err(MirrorError::Invalid(format!(
                "the switchover was sent but not answered ({error}); the volume is fenced in case the replica was promoted: see `applier status` on its host, then `volume demote` here (if it was) or restart `run` (if not)"
            )));
        }
        Err(error) => return Err(MirrorError::Invalid(format!("switchover: {error}; nothing was changed (writes go on here)"))),
    };
    hold.fence().map_err(|e| MirrorError::Invalid(format!("fence the volume: {e}")))?;
    let held_us = started.elapsed().as_micros() as u64;
    // The history came checked from the wire.
    if let Ok(history) = crate::generation::History::try_from(switched.history.clone()) {
        PromotionSeen::of(&switched.to, &history, switched.branch_lsn).save(dir, &request.mirror);
    }
    Ok(SwitchedOver { held_us, ..switched })
}

async fn ask(
    volume: &Volume,
    mirror: &config::MirrorConfig,
    request: &SwitchoverRequest,
    asked: &std::sync::atomic::AtomicBool,
) -> Result<SwitchedOver, LinkError> {
    let identity = tls::Identity::load(&volume.dir().identity())?;
    let (_endpoint, connection) = connect(
        &identity,
        &mirror.address,
        &mirror.fingerprint,
        mirror.idle_timeout(),
        mirror.congestion.unwrap_or_default(),
        "applier",
        mirror.idle_timeout(),
    )
    .await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let message = Control::Switchover {
        hello: hello_of(volume),
        to: request.to.clone(),
        mirror: request.mirror.clone(),
        applier_address: request.applier_address.clone(),
        applier_fingerprint: request.applier_fingerprint.clone(),
    };
    asked.store(true, std::sync::atomic::Ordering::SeqCst);
    write_control(&mut send, &message).await?;
    let reply = read_frame(&mut recv).await?;
    connection.close(0u32.into(), b"switchover done");
    match reply {
        Some(Frame::Control(Control::SwitchedOver { to, generation, branch_lsn, fingerprint, history })) => {
            let history = history_from_wire(&history).map_err(LinkError::Protocol)?;
            Ok(SwitchedOver {
                to,
                generation: uuid::Uuid::from_bytes(generation),
                branch_lsn,
                fingerprint,
                history: history.generations().to_vec(),
                held_us: 0,
            })
        }
        Some(Frame::Control(Control::Refused(refusal))) => {
            // Refused: the applier changed nothing.
            asked.store(false, std::sync::atomic::Ordering::SeqCst);
            Err(LinkError::Refused(refusal))
        }
        other => Err(LinkError::Protocol(format!("expected SwitchedOver, got {other:?}"))),
    }
}
