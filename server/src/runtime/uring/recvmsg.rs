//! Datagrams out of the buffers a multishot `RecvMsg` fills.

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;

use imedge_protocol::frame::udp;
use io_uring::types::RecvMsgOut;

use super::{RECVMSG_OUT_LEN, UDP_NAME_LEN};

/// Size of a UDP buffer: the recvmsg header, the sender's address and a payload that can tell a
/// datagram of `max` bytes from a longer one.
pub(super) fn udp_buffer_size(max_datagram: usize) -> usize {
    RECVMSG_OUT_LEN + UDP_NAME_LEN + udp::recv_buffer_len(max_datagram)
}

/// A socket address as the kernel wrote it (`sockaddr_in` or `sockaddr_in6`).
pub(super) fn sockaddr(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(name.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(name.get(2..4)?.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET => {
            let ip: [u8; 4] = name.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(ip.into(), port)))
        }
        libc::AF_INET6 => {
            // Like std, the flow label and scope id are taken as the kernel stores them.
            let flowinfo = u32::from_ne_bytes(name.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = name.get(8..24)?.try_into().ok()?;
            let scope_id = u32::from_ne_bytes(name.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip.into(),
                port,
                flowinfo,
                scope_id,
            )))
        }
        _ => None,
    }
}

/// A datagram out of a multishot `RecvMsg` buffer: the sender, the datagram's real length
/// (larger than the bytes kept if it was truncated) and where the bytes kept lie in `buffer`
/// (after the header, the name field and the control field, as `RecvMsgOut::parse` lays them
/// out), to be decoded there.
// `msg_controllen` is a `usize` with glibc and a `u32` with musl.
#[allow(clippy::useless_conversion)]
pub(super) fn datagram(
    buffer: &[u8],
    msg: &libc::msghdr,
) -> Option<(SocketAddr, usize, Range<usize>)> {
    let out = RecvMsgOut::parse(buffer, msg).ok()?;
    let from = sockaddr(out.name_data())?;
    let received = usize::try_from(out.incoming_payload_len()).unwrap_or(usize::MAX);
    let start = RECVMSG_OUT_LEN
        + usize::try_from(msg.msg_namelen).ok()?
        + usize::try_from(msg.msg_controllen).ok()?;
    let kept = start..start + out.payload_data().len();
    Some((from, received, kept))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;

    /// The bytes of `addr` as the kernel writes a socket address.
    fn kernel_bytes(addr: SocketAddr) -> Vec<u8> {
        let addr = socket2::SockAddr::from(addr);
        let len = usize::try_from(addr.len()).unwrap();
        // SAFETY: `as_ptr` points at a sockaddr of `len` initialised bytes owned by `addr`.
        unsafe { std::slice::from_raw_parts(addr.as_ptr().cast::<u8>(), len) }.to_vec()
    }

    #[test]
    fn socket_addresses_parse_as_the_kernel_writes_them() {
        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 7901);
        let v6 = SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
            3000,
            0x12345,
            3,
        ));
        assert_eq!(sockaddr(&kernel_bytes(v4)), Some(v4));
        assert_eq!(sockaddr(&kernel_bytes(v6)), Some(v6));
        // Truncated or of another family: no address.
        assert_eq!(sockaddr(&kernel_bytes(v4)[..6]), None);
        assert_eq!(sockaddr(&kernel_bytes(v6)[..20]), None);
        assert_eq!(sockaddr(&[0; 16]), None);
        assert_eq!(sockaddr(&[]), None);
    }

    /// A buffer as a multishot `RecvMsg` fills it: header, name field, payload.
    fn recvmsg_buffer(from: SocketAddr, payload: &[u8], incoming: u32, truncated: bool) -> Vec<u8> {
        let name = kernel_bytes(from);
        let mut buffer = Vec::new();
        buffer.extend_from_slice(&u32::try_from(name.len()).unwrap().to_ne_bytes());
        buffer.extend_from_slice(&0u32.to_ne_bytes());
        buffer.extend_from_slice(&incoming.to_ne_bytes());
        let flags = if truncated { libc::MSG_TRUNC as u32 } else { 0 };
        buffer.extend_from_slice(&flags.to_ne_bytes());
        assert_eq!(buffer.len(), RECVMSG_OUT_LEN);
        let mut field = name;
        field.resize(UDP_NAME_LEN, 0);
        buffer.extend_from_slice(&field);
        buffer.extend_from_slice(payload);
        buffer
    }

    fn template() -> libc::msghdr {
        // SAFETY: an all-zero msghdr is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_namelen = UDP_NAME_LEN as u32;
        msg
    }

    #[test]
    fn datagrams_come_out_of_recvmsg_buffers_with_their_real_length() {
        let from: SocketAddr = "10.1.2.3:4567".parse().unwrap();
        let buffer = recvmsg_buffer(from, b"{\"type\":0}", 10, false);
        let (addr, received, kept) = datagram(&buffer, &template()).unwrap();
        assert_eq!(
            (addr, received, &buffer[kept]),
            (from, 10, &b"{\"type\":0}"[..])
        );

        // Longer than the buffer: the kept bytes are cut, the length says how long it was, and
        // the shard's size check sees the real length.
        let max = 8;
        let kept = udp::recv_buffer_len(max);
        let buffer = recvmsg_buffer(from, &vec![b'x'; kept], 5000, true);
        let (_, received, bytes) = datagram(&buffer, &template()).unwrap();
        assert_eq!((received, bytes.len()), (5000, kept));
        assert_eq!(bytes.end, buffer.len());
        assert!(udp::decode(received, max).is_err());

        // A buffer too short for the header and name: nothing.
        assert!(datagram(&buffer[..RECVMSG_OUT_LEN], &template()).is_none());
    }

    #[test]
    fn udp_buffers_hold_a_datagram_one_byte_over_the_limit() {
        let size = udp_buffer_size(2048);
        assert_eq!(size, RECVMSG_OUT_LEN + UDP_NAME_LEN + 2049);
    }
}
