//! `install-units` and `uninstall-units`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct InstallArgs {
    /// Install under this directory instead of / (a staged install, like DESTDIR).
    #[arg(long, default_value = "/")]
    root: PathBuf,
}

pub fn install(args: InstallArgs) -> Result<()> {
    let binary = std::env::current_exe().context("find this binary")?;
    for line in ublk_mirror::install::install(&args.root, &binary)? {
        println!("{line}");
    }
    if args.root == Path::new("/") {
        for line in ublk_mirror::install::reload_managers() {
            println!("{line}");
        }
        println!("next: ublk-mirror volume create --dir /var/lib/ublk-mirror/NAME ...; set [run] in its volume.toml; systemctl enable --now ublk-mirror@NAME");
    }
    Ok(())
}

pub fn uninstall(args: InstallArgs) -> Result<()> {
    for line in ublk_mirror::install::uninstall(&args.root)? {
        println!("{line}");
    }
    if args.root == Path::new("/") {
        for line in ublk_mirror::install::reload_managers() {
            println!("{line}");
        }
    }
    Ok(())
}
