//! Whether the io_uring loop can run here, and the ring as every core builds it.

use std::io;
use std::time::Duration;

use io_uring::types::{SubmitArgs, Timespec};
use io_uring::{opcode, IoUring, Probe};

use super::bufring::BufRing;
use super::{CQ_ENTRIES, IO_URING_DISABLED, SQ_ENTRIES, TCP_GROUP};

/// Checks that the io_uring loop can run here: io_uring is not disabled, a ring builds with the
/// flags the loop uses, the kernel knows every operation it issues, a provided buffer ring
/// registers, and a submit-and-wait with a timeout completes an operation. The last step matters
/// because a sandbox's seccomp filter may allow `io_uring_setup` and still deny
/// `io_uring_enter` or `io_uring_register`.
///
/// The test ring lives on a thread of its own: when a ring is torn down the kernel queues work
/// on every thread that used it with `TWA_SIGNAL`, which interrupts that thread's next blocking
/// system call (a socket read with a timeout then fails with EINTR) — the caller's thread must
/// not get that.
///
/// # Errors
/// Why io_uring cannot be used (the message says what to change).
pub fn probe() -> io::Result<()> {
    // ENOMEM is transient when many rings are being created and torn down at once (several
    // servers starting in parallel, a killed run's rings still being freed): the kernel needs
    // contiguous pages for a ring. Try again a few times, bounded, before calling it unavailable.
    let mut attempt = 0;
    loop {
        let result = std::thread::Builder::new()
            .name("imedge-io-probe".to_owned())
            .spawn(probe_here)?
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the io_uring probe panicked")));
        match result {
            Err(error)
                if error.kind() == io::ErrorKind::OutOfMemory && attempt < ENOMEM_RETRIES =>
            {
                attempt += 1;
                tracing::debug!(attempt, %error, "io_uring probe: retrying");
                std::thread::sleep(ENOMEM_BACKOFF * attempt);
            }
            result => return result,
        }
    }
}

/// How many times the probe tries again after ENOMEM, waiting [`ENOMEM_BACKOFF`] × the attempt
/// number: 50 + 100 + … + 250 ms = 750 ms at most.
const ENOMEM_RETRIES: u32 = 5;
/// See [`ENOMEM_RETRIES`].
const ENOMEM_BACKOFF: Duration = Duration::from_millis(50);

pub(super) fn probe_here() -> io::Result<()> {
    let disabled = std::fs::read_to_string(IO_URING_DISABLED)
        .ok()
        .and_then(|text| text.trim().parse::<u8>().ok())
        .unwrap_or(0);
    if disabled >= 2 {
        return Err(unavailable(
            io::ErrorKind::PermissionDenied,
            "it is disabled by the kernel.io_uring_disabled sysctl (2)",
        ));
    }
    let ring = build_ring().map_err(|error| explain(&error, disabled))?;
    if !ring.params().is_feature_ext_arg() || !ring.params().is_feature_nodrop() {
        return Err(unavailable(
            io::ErrorKind::Unsupported,
            "the kernel lacks IORING_FEAT_EXT_ARG or IORING_FEAT_NODROP",
        ));
    }
    let mut ops = Probe::new();
    ring.submitter()
        .register_probe(&mut ops)
        .map_err(|error| explain(&error, disabled))?;
    let needed = [
        (opcode::Accept::CODE, "accept"),
        (opcode::Recv::CODE, "recv"),
        (opcode::RecvMsg::CODE, "recvmsg"),
        (opcode::Send::CODE, "send"),
        (opcode::Read::CODE, "read"),
        (opcode::AsyncCancel::CODE, "async_cancel"),
    ];
    if let Some((_, name)) = needed.iter().find(|(code, _)| !ops.is_supported(*code)) {
        return Err(unavailable(
            io::ErrorKind::Unsupported,
            &format!(
                "the kernel does not support IORING_OP_{}",
                name.to_uppercase()
            ),
        ));
    }
    let buffers = BufRing::new(TCP_GROUP, 1, 64)?;
    buffers
        .register(&ring)
        .map_err(|error| explain(&error, disabled))?;
    let _ = ring.submitter().unregister_buf_ring(TCP_GROUP);
    let mut ring = ring;
    let nop = opcode::Nop::new().build().user_data(1);
    // SAFETY: a no-op uses no memory.
    if unsafe { ring.submission().push(&nop) }.is_err() {
        return Err(unavailable(
            io::ErrorKind::Other,
            "its submission queue is full",
        ));
    }
    let timeout = Timespec::from(Duration::from_secs(1));
    let args = SubmitArgs::new().timespec(&timeout);
    ring.submitter()
        .submit_with_args(1, &args)
        .map_err(|error| explain(&error, disabled))?;
    if ring.completion().next().is_none_or(|cqe| cqe.result() != 0) {
        return Err(unavailable(
            io::ErrorKind::Other,
            "a no-op submitted to a test ring did not complete",
        ));
    }
    Ok(())
}

pub(super) fn unavailable(kind: io::ErrorKind, why: &str) -> io::Error {
    io::Error::new(kind, format!("io_uring is unavailable: {why}"))
}

/// Turns a failed io_uring system call into the reason io_uring is unavailable.
pub(super) fn explain(error: &io::Error, disabled: u8) -> io::Error {
    let why = match error.raw_os_error() {
        Some(libc::ENOSYS) => {
            "the kernel has no io_uring (ENOSYS: too old, built without it, or hidden by a seccomp \
             filter)"
                .to_owned()
        }
        Some(libc::EPERM | libc::EACCES) if disabled == 1 => {
            "not permitted: kernel.io_uring_disabled=1 limits it to privileged processes and \
             kernel.io_uring_group"
                .to_owned()
        }
        Some(libc::EPERM | libc::EACCES) => {
            "not permitted (EPERM: a seccomp filter or container policy denies it)".to_owned()
        }
        Some(libc::EINVAL) => {
            "the kernel rejects IORING_SETUP_SINGLE_ISSUER/DEFER_TASKRUN or a provided buffer \
             ring (EINVAL: Linux 6.1 or later is needed)"
                .to_owned()
        }
        Some(libc::ENOMEM) => {
            "the kernel cannot allocate the ring (ENOMEM: memory or RLIMIT_MEMLOCK)".to_owned()
        }
        _ => format!("{error}"),
    };
    unavailable(error.kind(), &why)
}

/// A ring as every core's loop uses it: one submitter thread, completions produced only when
/// that thread waits, and every SQE of a submission attempted even if one fails.
/// ENOMEM is tried again as in [`probe`].
pub(super) fn build_ring() -> io::Result<IoUring> {
    let mut attempt = 0;
    loop {
        let result = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_submit_all()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES);
        match result {
            Err(error)
                if error.raw_os_error() == Some(libc::ENOMEM) && attempt < ENOMEM_RETRIES =>
            {
                attempt += 1;
                std::thread::sleep(ENOMEM_BACKOFF * attempt);
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use std::time::Duration;

    use super::*;

    #[test]
    fn unavailability_is_explained() {
        let text =
            |errno, disabled| explain(&io::Error::from_raw_os_error(errno), disabled).to_string();
        assert!(text(libc::ENOSYS, 0).contains("ENOSYS"));
        assert!(text(libc::EPERM, 0).contains("seccomp"));
        assert!(text(libc::EPERM, 1).contains("io_uring_disabled=1"));
        assert!(text(libc::EINVAL, 0).contains("6.1"));
        assert!(text(libc::EIO, 0).starts_with("io_uring is unavailable"));
    }

    /// Tearing down a ring interrupts the threads that used it (see `probe`): the caller of
    /// `probe` must not have its next blocking call fail with EINTR.
    #[test]
    fn probing_does_not_interrupt_the_calling_thread() {
        if let Err(error) = probe() {
            eprintln!("skipped: {error}");
            return;
        }
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        for _ in 0..4 {
            let error = socket.recv(&mut [0; 8]).unwrap_err();
            assert!(
                matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "{error}"
            );
        }
    }
}
