//! The `imedge` binary itself: it starts with its flags, serves, and on SIGTERM drains and exits 0.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn serves_then_exits_cleanly_on_sigterm() {
    let port = free_port();
    let data = std::env::temp_dir().join(format!("imedge-bin-test-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_imedge"))
        .args([
            "--bind",
            "127.0.0.1",
            "--tcp-port",
            &port.to_string(),
            "--udp-port",
            "off",
            "--ws-port",
            "off",
        ])
        .args([
            "--threads",
            "2",
            "--tcp-sense-mode",
            "5s",
            "--no-pin",
            "true",
        ])
        .arg("--data-dir")
        .arg(&data)
        .env("IMEDGE_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(child.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|l: &String| l.contains("TCP gateway listening"))
    {
        assert!(Instant::now() < deadline, "no ready line: {lines:?}");
        let mut line = String::new();
        if log.read_line(&mut line).unwrap() == 0 {
            break;
        }
        lines.push(line);
    }
    let ready = lines
        .iter()
        .find(|l| l.contains("TCP gateway listening"))
        .unwrap();
    assert!(
        ready.contains("idle_secs=11"),
        "sense mode 5s → 11 s idle: {ready}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("UDP gateway")),
        "UDP is off"
    );

    // It serves: a login over TCP is answered.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = br#"{"bridge":false,"type":0,"dataContent":"{\"loginUserId\":\"alice\",\"loginToken\":\"secret-token\",\"firstLoginTime\":0}","from":"alice","to":"0","QoS":false,"typeu":-1,"sm":-1}"#;
    s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).unwrap();
    let mut reply = vec![0u8; u32::from_be_bytes(prefix) as usize];
    s.read_exact(&mut reply).unwrap();
    assert!(String::from_utf8(reply).unwrap().contains(r#""type":50"#));

    // SIGTERM: the open connection is closed and the process exits 0.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut rest = Vec::new();
    assert_eq!(
        s.read_to_end(&mut rest).unwrap(),
        0,
        "connection closed by the server"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit status {exit:?}");
    let mut tail = String::new();
    log.read_to_string(&mut tail).unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let all = format!("{}{tail}{stderr}", lines.concat());
    assert!(all.contains("stopped"), "{all}");
    assert!(!all.contains("secret-token"), "tokens are never logged");
    let _ = std::fs::remove_dir_all(&data);
}
