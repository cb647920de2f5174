//! Scheduling priority of background threads (the volume's writeback, mirror senders): the
//! threads that acknowledge requests get the CPU first.

/// Raises the calling thread's nice value by `step` (Linux: setpriority on a thread id).
/// Best effort: a failure leaves the priority as it is.
pub fn lower_current_thread(step: i32) {
    // SAFETY: gettid and setpriority take no pointers; failure only leaves the priority as is.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, current + step);
    }
}
