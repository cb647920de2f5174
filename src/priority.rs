//! Scheduling priority of background threads (the volume's writeback, mirror senders): the
//! threads that acknowledge requests get the CPU first.

/// Makes the calling thread background work: its nice value goes up by `step`, and it is
/// scheduled as `SCHED_BATCH`, so that waking up (a sender polling its journal, writeback
/// taking the next record) never preempts the thread that is serving a request; it runs when
/// that thread blocks or at the next tick, and keeps its fair share of the CPU (nice, not
/// `SCHED_IDLE`: a saturated CPU must not starve replication). On a CPU shared with the
/// guest's I/O every such preemption costs the request path two context switches. Threads
/// the lowered thread starts inherit both (writeback's checkpointer, a sender's blocking
/// reads and compression): background work too.
/// Best effort: a failure leaves the scheduling as it is.
pub fn lower_current_thread(step: i32) {
    // SAFETY: gettid, getpriority and setpriority take no pointers; sched_setscheduler reads
    // `param`, which lives on this stack for the call. Failure only leaves the thread as is.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, current + step);
        // SCHED_BATCH keeps the nice value set above (its static priority must be 0).
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_lowered_thread_is_batch_work_with_a_higher_nice_value() {
        std::thread::spawn(|| {
            // SAFETY: no pointers; these only read the calling thread's scheduling.
            let nice_and_policy =
                || unsafe { (libc::getpriority(libc::PRIO_PROCESS, libc::syscall(libc::SYS_gettid) as libc::id_t), libc::sched_getscheduler(0)) };
            let (before, _) = nice_and_policy();
            super::lower_current_thread(5);
            let (after, policy) = nice_and_policy();
            assert_eq!(after, (before + 5).min(19), "nice value");
            assert_eq!(policy, libc::SCHED_BATCH, "scheduling policy");
        })
        .join()
        .unwrap();
    }
}
