//! A busy, mixed filesystem workload that checks its own data, for the ublk recovery tests
//! (`tests/vm/ublk-recovery.sh`): buffered writes and reads, mmap writes, fallocate,
//! punch-hole, truncate, O_DIRECT writes and fsync on a few files, with an in-memory model
//! of every file. Reads are checked against the model as they happen; at the end every file
//! is synced, the page cache dropped (root), and every byte read back and compared.
//!
//! `fs_workload DIR SEED OPS SECONDS`: stops after OPS operations or SECONDS, whichever
//! comes first. Exit status 0 when every byte matched, 1 on any error or mismatch (the
//! message says which file and offset). With `FS_WORKLOAD_PROGRESS=FILE`, the count of
//! operations done is written to FILE after each one, so a test can act (kill the server)
//! once the workload is well under way however fast the machine is.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

const FILES: usize = 6;
const MAX_FILE: u64 = 6 << 20;
const PAGE: u64 = 4096;

struct Tracked {
    path: PathBuf,
    file: File,
    model: Vec<u8>,
}

fn fail(message: String) -> ! {
    eprintln!("fs_workload: FAIL: {message}");
    std::process::exit(1);
}

fn check<T>(result: std::io::Result<T>, what: &str, path: &Path) -> T {
    result.unwrap_or_else(|error| fail(format!("{what} {}: {error}", path.display())))
}

/// A buffer aligned for O_DIRECT.
fn aligned(len: usize) -> (*mut u8, std::alloc::Layout) {
    let layout = std::alloc::Layout::from_size_align(len, PAGE as usize).expect("layout");
    // SAFETY: the layout has a non-zero size (callers pass multiples of a page).
    let pointer = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!pointer.is_null(), "out of memory");
    (pointer, layout)
}

fn fill(rng: &mut rand::rngs::StdRng, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    data
}

fn resize(model: &mut Vec<u8>, len: u64) {
    model.resize(len as usize, 0);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        fail("usage: fs_workload DIR SEED OPS SECONDS".into());
    }
    let dir = PathBuf::from(&args[1]);
    let seed: u64 = args[2].parse().unwrap_or_else(|_| fail("SEED must be a number".into()));
    let ops: u64 = args[3].parse().unwrap_or_else(|_| fail("OPS must be a number".into()));
    let limit = Duration::from_secs(args[4].parse().unwrap_or_else(|_| fail("SECONDS must be a number".into())));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut files: Vec<Tracked> = (0..FILES)
        .map(|i| {
            let path = dir.join(format!("work{i}"));
            let file = check(OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path), "create", &path);
            Tracked { path, file, model: Vec::new() }
        })
        .collect();
    let mut counts = [0u64; 9];
    let names = ["write", "read", "mmap", "fallocate", "punch", "truncate", "direct", "fsync", "extend"];
    let progress = std::env::var_os("FS_WORKLOAD_PROGRESS").map(PathBuf::from);
    let started = Instant::now();
    let mut done = 0u64;
    while done < ops && started.elapsed() < limit {
        let t = &mut files[rng.gen_range(0..FILES)];
        let len = t.model.len() as u64;
        let kind = rng.gen_range(0..100u32);
        match kind {
            0..=29 => {
                // Buffered write at any byte offset.
                let offset = rng.gen_range(0..MAX_FILE - 65536);
                let size = rng.gen_range(1..65536);
                let data = fill(&mut rng, size);
                check(t.file.write_all_at(&data, offset), "write", &t.path);
                let end = offset + data.len() as u64;
                if end > len {
                    resize(&mut t.model, end);
                }
                t.model[offset as usize..end as usize].copy_from_slice(&data);
                counts[0] += 1;
            }
            30..=49 if len > 0 => {
                // Buffered read, checked now.
                let offset = rng.gen_range(0..len);
                let size = rng.gen_range(1..=(len - offset).min(131072));
                let mut data = vec![0u8; size as usize];
                check(t.file.read_exact_at(&mut data, offset), "read", &t.path);
                if data[..] != t.model[offset as usize..(offset + size) as usize] {
                    fail(format!("{}: read at {offset} ({size} bytes) differs from what was written", t.path.display()));
                }
                counts[1] += 1;
            }
            50..=61 => {
                // mmap write into pages that exist (the file is extended first if need be).
                let page = rng.gen_range(0..MAX_FILE / PAGE - 4);
                let pages = rng.gen_range(1..=4u64);
                let (start, end) = (page * PAGE, (page + pages) * PAGE);
                if end > len {
                    check(t.file.set_len(end), "extend for mmap", &t.path);
                    resize(&mut t.model, end);
                    counts[8] += 1;
                }
                let within = rng.gen_range(0..PAGE);
                let size = rng.gen_range(1..=(end - start - within) as usize);
                let data = fill(&mut rng, size);
                // SAFETY: a shared mapping of a range that lies inside the file (extended
                // above); it is written only through `map` and unmapped before the file
                // changes size again.
                unsafe {
                    let map = libc::mmap(
                        std::ptr::null_mut(),
                        (end - start) as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        t.file.as_raw_fd(),
                        start as libc::off_t,
                    );
                    if map == libc::MAP_FAILED {
                        fail(format!("mmap {}: {}", t.path.display(), std::io::Error::last_os_error()));
                    }
                    std::ptr::copy_nonoverlapping(data.as_ptr(), (map as *mut u8).add(within as usize), data.len());
                    if rng.gen_bool(0.5) && libc::msync(map, (end - start) as usize, libc::MS_SYNC) != 0 {
                        fail(format!("msync {}: {}", t.path.display(), std::io::Error::last_os_error()));
                    }
                    libc::munmap(map, (end - start) as usize);
                }
                let at = (start + within) as usize;
                t.model[at..at + data.len()].copy_from_slice(&data);
                counts[2] += 1;
            }
            62..=67 => {
                // fallocate (allocates, reads as before; may grow the file).
                let offset = rng.gen_range(0..MAX_FILE - 262144);
                let size = rng.gen_range(1..262144u64);
                check(rustix::fs::fallocate(&t.file, rustix::fs::FallocateFlags::empty(), offset, size).map_err(std::io::Error::from), "fallocate", &t.path);
                if offset + size > len {
                    resize(&mut t.model, offset + size);
                }
                counts[3] += 1;
            }
            68..=75 if len > 0 => {
                // Punch a hole: reads as zeros, size kept.
                let offset = rng.gen_range(0..len);
                let size = rng.gen_range(1..=(len - offset).min(262144));
                let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
                check(rustix::fs::fallocate(&t.file, flags, offset, size).map_err(std::io::Error::from), "punch hole", &t.path);
                t.model[offset as usize..(offset + size) as usize].fill(0);
                counts[4] += 1;
            }
            76..=80 => {
                // Truncate, shorter or longer.
                let new_len = rng.gen_range(0..MAX_FILE);
                check(t.file.set_len(new_len), "truncate", &t.path);
                resize(&mut t.model, new_len);
                counts[5] += 1;
            }
            81..=92 => {
                // O_DIRECT write of whole aligned blocks.
                let block = rng.gen_range(0..MAX_FILE / PAGE - 16);
                let blocks = rng.gen_range(1..=16u64);
                let size = (blocks * PAGE) as usize;
                let data = fill(&mut rng, size);
                let direct = check(OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&t.path), "open O_DIRECT", &t.path);
                let (pointer, layout) = aligned(size);
                // SAFETY: `pointer` is a live allocation of `size` bytes, freed below.
                let buffer = unsafe { std::slice::from_raw_parts_mut(pointer, size) };
                buffer.copy_from_slice(&data);
                let written = direct.write_all_at(buffer, block * PAGE);
                // SAFETY: allocated above with this layout; `buffer` is not used after this.
                unsafe { std::alloc::dealloc(pointer, layout) };
                check(written, "O_DIRECT write", &t.path);
                let end = block * PAGE + size as u64;
                if end > len {
                    resize(&mut t.model, end);
                }
                t.model[(block * PAGE) as usize..end as usize].copy_from_slice(&data);
                counts[6] += 1;
            }
            _ => {
                check(t.file.sync_all(), "fsync", &t.path);
                counts[7] += 1;
            }
        }
        done += 1;
        if let Some(progress) = &progress {
            // Renamed into place, so a reader never sees a half-written count.
            let partial = progress.with_extension("partial");
            check(std::fs::write(&partial, done.to_string()), "write progress", &partial);
            check(std::fs::rename(&partial, progress), "rename progress", progress);
        }
    }
    // Everything on the device, nothing from the page cache: then every byte is compared.
    for t in &files {
        check(t.file.sync_all(), "fsync", &t.path);
    }
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let mut verified = 0u64;
    for t in &files {
        let length = check(t.file.metadata(), "stat", &t.path).len();
        if length != t.model.len() as u64 {
            fail(format!("{} is {length} bytes, expected {}", t.path.display(), t.model.len()));
        }
        let data = check(std::fs::read(&t.path), "read back", &t.path);
        if let Some(at) = data.iter().zip(&t.model).position(|(a, b)| a != b) {
            fail(format!("{}: byte {at} reads {:#x}, expected {:#x}", t.path.display(), data[at], t.model[at]));
        }
        verified += length;
    }
    let summary: Vec<String> = names.iter().zip(counts).map(|(name, count)| format!("{name} {count}")).collect();
    println!("fs_workload: {done} operations in {:.1} s ({}); {verified} bytes in {FILES} files verified", started.elapsed().as_secs_f64(), summary.join(", "));
}
