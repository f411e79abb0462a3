//! The `imedge` binary under faults a test process cannot survive in-process: running out of
//! file descriptors, and being killed with SIGKILL and restarted at once. Each test spawns the
//! binary on the backend `IMEDGE_TEST_IO` names (epoll by default) and polls with deadlines.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a test waits for the server to do something before failing.
const DEADLINE: Duration = Duration::from_secs(30);

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn io() -> &'static str {
    match std::env::var("IMEDGE_TEST_IO").as_deref() {
        Ok("uring") => "uring",
        Ok("auto") => "auto",
        _ => "epoll",
    }
}

/// A running `imedge` child and the lines it logged so far.
struct Imedge {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Imedge {
    /// Starts `imedge` serving TCP on `port` (UDP and WebSocket off); with `max_files`, under
    /// that RLIMIT_NOFILE.
    fn spawn(port: u16, data: &std::path::Path, max_files: Option<u64>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_imedge"));
        command
            .args(["--bind", "127.0.0.1", "--tcp-port", &port.to_string()])
            .args(["--udp-port", "off", "--ws-port", "off", "--threads", "1"])
            .args(["--io", io(), "--no-pin", "true"])
            .arg("--data-dir")
            .arg(data)
            .env("IMEDGE_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(max) = max_files {
            // SAFETY: setrlimit is async-signal-safe and touches only the child, between fork
            // and exec.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: max,
                        rlim_max: max,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    log.lock().unwrap().push(line);
                }
            });
        }
        Self { child, log }
    }

    fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until a logged line contains `needle`, or the process exits.
    fn wait_for_line(&mut self, needle: &str) -> bool {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if self.count(needle) > 0 {
                return true;
            }
            if self.child.try_wait().unwrap().is_some() {
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return self.count(needle) > 0;
            }
            assert!(
                Instant::now() < deadline,
                "no `{needle}` line: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Imedge {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP login frame for `uid`.
fn login_frame(uid: &str) -> Vec<u8> {
    let body = format!(
        r#"{{"bridge":false,"type":0,"dataContent":"{{\"loginUserId\":\"{uid}\",\"loginToken\":\"t\",\"firstLoginTime\":0}}","from":"{uid}","to":"0","QoS":false,"typeu":-1,"sm":-1}}"#
    );
    let mut frame = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(body.as_bytes());
    frame
}

/// Reads one TCP frame, waiting at most `wait`: `None` on timeout or close.
fn read_frame(stream: &mut TcpStream, wait: Duration) -> Option<String> {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
    stream.read_exact(&mut body).ok()?;
    String::from_utf8(body).ok()
}

/// Logs in as `uid` on a new connection and returns it once the server answered.
fn logged_in(port: u16, uid: &str) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .write_all(&login_frame(uid))
        .map_err(|e| e.to_string())?;
    match read_frame(&mut stream, Duration::from_secs(5)) {
        Some(reply) if reply.contains(r#""type":50"#) => Ok(stream),
        other => Err(format!("no login response: {other:?}")),
    }
}

/// Out of file descriptors, the server stops accepting for a moment instead of spinning on the
/// ready listener (a handful of pauses, not thousands of failed accepts), keeps serving the
/// connections it has, and accepts the waiting ones once descriptors are free again.
#[test]
fn running_out_of_descriptors_pauses_accepting() {
    let port = free_port();
    let data = std::env::temp_dir().join(format!("imedge-emfile-{}-{}", std::process::id(), io()));
    let mut server = Imedge::spawn(port, &data, Some(64));
    assert!(server.wait_for_line("TCP gateway listening"));

    // Connect until the server cannot take more; the kernel still completes the handshakes
    // into the listen backlog.
    let started = Instant::now();
    let mut served = Vec::new();
    let mut waiting = Vec::new();
    for i in 0..100 {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(&login_frame(&format!("u{i}"))).unwrap();
        match read_frame(&mut stream, Duration::from_millis(300)) {
            Some(_) => served.push(stream),
            None => waiting.push(stream),
        }
        if waiting.len() >= 5 {
            break;
        }
    }
    assert!(waiting.len() >= 5, "the descriptor limit was never hit");
    assert!(server.wait_for_line("pausing accept"));

    // Free descriptors: the waiting connections are accepted and answered.
    served.clear();
    for stream in &mut waiting {
        assert!(
            read_frame(stream, DEADLINE).is_some_and(|r| r.contains(r#""type":50"#)),
            "a connection waiting in the backlog was never served"
        );
    }
    // Pausing, not spinning: at most one pause per pause period (100 ms) while it lasted, with
    // a wide margin; a spinning loop would log thousands.
    let pauses = server.count("pausing accept");
    let bound = 5 + 2 * started.elapsed().as_millis() as usize / 100;
    assert!(
        pauses <= bound,
        "{pauses} pauses in {:?}",
        started.elapsed()
    );
    assert!(logged_in(port, "after").is_ok());
    server.kill();
    let _ = std::fs::remove_dir_all(&data);
}

/// Killed with SIGKILL in the middle of traffic and restarted at once on the same ports, the
/// server waits for the dead run's sockets to close (logged) instead of exiting "already in
/// use", and serves.
#[test]
fn a_restart_right_after_kill_9_serves() {
    let port = free_port();
    let data = std::env::temp_dir().join(format!("imedge-crash-{}-{}", std::process::id(), io()));
    let mut first = Imedge::spawn(port, &data, None);
    assert!(first.wait_for_line("TCP gateway listening"));

    // Traffic in flight: logged-in clients sending each other QoS messages, never reading (a
    // process with much to tear down takes longer to exit, and its sockets with it).
    const CLIENTS: usize = 100;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut clients: Vec<TcpStream> = (0..CLIENTS)
                .filter_map(|i| logged_in(port, &format!("s{i}")).ok())
                .collect();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, client) in clients.iter_mut().enumerate() {
                    let body = format!(
                        r#"{{"bridge":false,"type":2,"dataContent":"{}","from":"s{i}","to":"s{}","fp":"f{n}","QoS":true,"typeu":-1,"sm":-1}}"#,
                        "x".repeat(3000),
                        (i + 1) % CLIENTS
                    );
                    let mut frame = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
                    frame.extend_from_slice(body.as_bytes());
                    let _ = client.set_write_timeout(Some(Duration::from_millis(100)));
                    let _ = client.write_all(&frame);
                    n += 1;
                }
            }
        })
    };
    // Let messages flow for a moment.
    std::thread::sleep(Duration::from_millis(1000));
    // SIGKILL, and the restart at once, as a supervisor does (the dead one is reaped later).
    first.child.kill().unwrap();
    let mut second = Imedge::spawn(port, &data, None);
    let served = second.wait_for_line("TCP gateway listening");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.join().unwrap();
    assert!(served, "the restart did not start: {:?}", second.lines());
    let deadline = Instant::now() + DEADLINE;
    loop {
        match logged_in(port, "after-crash") {
            Ok(_) => break,
            Err(error) => assert!(Instant::now() < deadline, "{error}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    second.kill();
    let _ = std::fs::remove_dir_all(&data);
}
