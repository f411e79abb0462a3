//! echo-tokio: the echo benchmark's tokio server — the same echo as `imedge --bench-echo` (TCP:
//! 4-byte big-endian length-prefixed frames sent back whole; UDP: each datagram back to its
//! sender), written the way a tokio user would: a current-thread runtime (one core, like imedge's
//! `--threads 1`), one task per TCP connection, one task for the UDP socket.
//!
//! Each TCP read takes everything the socket holds (up to [`READ_CHUNK`]) and every whole frame
//! in it goes back in one `write_all` — the batching a `BufReader`/`BufWriter` pair gives when it
//! flushes once the input runs dry, without copying the frames. A partial frame waits in the
//! buffer for the next read.
//!
//! Run: `echo-tokio --bind 127.0.0.1 --tcp-port 19001 --udp-port 19002`; it prints one
//! "listening" line per socket on stderr and runs until killed.

use anyhow::Context;
use bytes::BytesMut;
use clap::Parser;
use imedge_benches::echo::wire::{whole_frames_len, MAX_UDP_DATAGRAM};
use std::io;
use std::net::IpAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Bytes one TCP read may take: room for ten of the largest frames, so a burst from one client
/// is echoed in one write.
const READ_CHUNK: usize = 64 * 1024;

/// The command line.
#[derive(Debug, Parser)]
#[command(about = "Tokio echo server for scripts/bench_echo.sh")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// TCP port, or `off`.
    #[arg(long, default_value = "19001", value_parser = parse_port)]
    tcp_port: Port,
    /// UDP port, or `off`.
    #[arg(long, default_value = "19002", value_parser = parse_port)]
    udp_port: Port,
}

/// A port number, or `None` for `off`.
#[derive(Debug, Clone, Copy)]
struct Port(Option<u16>);

fn parse_port(s: &str) -> Result<Port, String> {
    if s == "off" {
        return Ok(Port(None));
    }
    s.parse()
        .map(|p| Port(Some(p)))
        .map_err(|e| format!("{s}: {e}"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    if let Port(Some(port)) = args.tcp_port {
        let listener = TcpListener::bind((args.bind, port))
            .await
            .with_context(|| format!("binding TCP {}:{port}", args.bind))?;
        eprintln!("echo-tokio: TCP listening on {}", listener.local_addr()?);
        tokio::spawn(accept(listener));
    }
    if let Port(Some(port)) = args.udp_port {
        let socket = UdpSocket::bind((args.bind, port))
            .await
            .with_context(|| format!("binding UDP {}:{port}", args.bind))?;
        eprintln!("echo-tokio: UDP listening on {}", socket.local_addr()?);
        tokio::spawn(echo_udp(socket));
    }
    // The spawned tasks do the work; this one only keeps the runtime alive until the process is
    // killed.
    std::future::pending::<()>().await;
    Ok(())
}

async fn accept(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    // A broken or misbehaving connection ends its own task, nothing else.
                    let _ = echo_tcp(stream).await;
                });
            }
            // EMFILE and friends: keep serving the connections there are.
            Err(e) => eprintln!("echo-tokio: accept: {e}"),
        }
    }
}

async fn echo_tcp(mut stream: TcpStream) -> io::Result<()> {
    // imedge sets TCP_NODELAY on every connection (SPEC §1.1); so does this.
    stream.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        buf.reserve(READ_CHUNK);
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        // A body over MAX_TCP_BODY closes the connection, as imedge's decoder does.
        let whole =
            whole_frames_len(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if whole > 0 {
            let frames = buf.split_to(whole);
            stream.write_all(&frames).await?;
        }
    }
}

async fn echo_udp(socket: UdpSocket) {
    // One byte more than the limit, so an oversized datagram shows as such instead of truncated.
    let mut buf = vec![0u8; MAX_UDP_DATAGRAM + 1];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            // ECONNREFUSED from an earlier send to a closed port, and the like: not fatal.
            continue;
        };
        let Some(datagram) = buf.get(..len).filter(|d| d.len() <= MAX_UDP_DATAGRAM) else {
            continue;
        };
        // A full send buffer or an unreachable peer drops the echo, as UDP would.
        let _ = socket.send_to(datagram, peer).await;
    }
}
