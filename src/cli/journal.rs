//! `journal dump`: the journal's records, read-only (safe while the volume runs).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use ublk_mirror::journal::{Journal, JournalReader};
use ublk_mirror::layout::VolumeDir;

#[derive(Subcommand)]
pub enum JournalCommand {
    /// Print the journal's records (read-only; safe while the volume runs).
    Dump(DumpArgs),
}

#[derive(Args)]
pub struct DumpArgs {
    /// State directory of the volume.
    #[arg(long)]
    dir: PathBuf,
    /// First LSN to print (default: the oldest retained).
    #[arg(long)]
    from: Option<u64>,
    /// Print at most this many records.
    #[arg(long)]
    limit: Option<u64>,
    /// One JSON object per line: lsn, kind, offset, length, flags, timestamp_us, payload_crc32c.
    #[arg(long)]
    json: bool,
}

pub fn execute(command: JournalCommand) -> Result<()> {
    match command {
        JournalCommand::Dump(args) => dump(args),
    }
}

fn dump(args: DumpArgs) -> Result<()> {
    let volume_dir = VolumeDir::new(&args.dir);
    if !volume_dir.holds_volume() {
        bail!("{} holds no volume", args.dir.display());
    }
    let config = ublk_mirror::volume::VolumeConfig::load(&volume_dir)?;
    // Reading needs no write access: a journal on a filesystem remounted read-only can be dumped.
    let dir = &ublk_mirror::volume::check_journal(&volume_dir, &config, false)?.segments;
    let (journal, report) = Journal::open_read_only(dir).with_context(|| format!("read journal {}", dir.display()))?;
    let mut reader = JournalReader::new(journal, args.from.unwrap_or(report.first_lsn))?;
    let mut printed = 0;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    use std::io::Write;
    while let Some(record) = reader.next_record()? {
        if args.limit.is_some_and(|limit| printed >= limit) {
            break;
        }
        let h = record.header;
        let crc = crc32c::crc32c(&record.payload);
        if args.json {
            let line = serde_json::json!({
                "lsn": h.lsn, "kind": h.kind.name(), "offset": h.offset, "length": h.length,
                "flags": h.flags, "timestamp_us": h.timestamp_us, "payload_crc32c": format!("{crc:08x}"),
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{:>10} {:<12} offset {:>14} length {:>10} flags {:#x} crc32c {crc:08x}", h.lsn, h.kind.name(), h.offset, h.length, h.flags)?;
        }
        printed += 1;
    }
    Ok(())
}
