//! The spanning tree's frames: one `AF_PACKET` socket that sees the BPDUs
//! arriving on every interface (a classic BPF filter keeps all but frames
//! to the bridge group address 01:80:C2:00:00:00 in the kernel) and sends
//! ours out of one port, past the bridge. It sees a frame before the
//! bridge does, so it reads BPDUs on ports the nftables states discard.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use socket2::{SockFilter, SockRef};

/// `PACKET_OUTGOING` (linux/if_packet.h): a frame we sent, looped to the
/// socket.
const PACKET_OUTGOING: u8 = 4;
/// `PACKET_IGNORE_OUTGOING` (linux/if_packet.h, Linux 4.20).
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// Frames to 01:80:C2:00:00:00, whole; nothing else.
fn filter() -> [SockFilter; 6] {
    // Classic BPF (linux/filter.h): ld/ldh absolute, jeq, ret.
    const LD_W_ABS: u16 = 0x20;
    const LD_H_ABS: u16 = 0x28;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    [
        SockFilter::new(LD_W_ABS, 0, 0, 0),
        SockFilter::new(JEQ_K, 0, 3, 0x0180_c200),
        SockFilter::new(LD_H_ABS, 0, 0, 4),
        SockFilter::new(JEQ_K, 0, 1, 0),
        SockFilter::new(RET_K, 0, 0, 0x0004_0000),
        SockFilter::new(RET_K, 0, 0, 0),
    ]
}

/// Raw frames in and out, not blocking.
pub struct BpduSocket {
    fd: OwnedFd,
}

impl BpduSocket {
    /// Needs root (CAP_NET_RAW).
    pub fn open() -> io::Result<BpduSocket> {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments; the result is checked
        // before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::c_int::from(protocol),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        SockRef::from(&fd).attach_filter(&filter())?;
        let on: libc::c_int = 1;
        // SAFETY: a c_int option value of the size passed, on our socket.
        // Where the option is unknown (before 4.20), looped frames are
        // told apart by their packet type instead.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_IGNORE_OUTGOING,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let socket = BpduSocket { fd };
        // Frames queued between socket(2) and the filter: not BPDUs.
        let mut buf = [0u8; 64];
        while let Ok(Some(_)) = socket.receive_raw(&mut buf) {}
        Ok(socket)
    }

    /// The descriptor, for readiness.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The next frame that arrived: the interface's index and its length
    /// in `buf` (truncated to it). `None` when none waits.
    pub fn receive(&self, buf: &mut [u8]) -> io::Result<Option<(u32, usize)>> {
        loop {
            match self.receive_raw(buf)? {
                None => return Ok(None),
                Some((_, _, PACKET_OUTGOING)) => continue,
                Some((index, n, _)) => return Ok(Some((index, n))),
            }
        }
    }

    fn receive_raw(&self, buf: &mut [u8]) -> io::Result<Option<(u32, usize, u8)>> {
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are valid for the lengths passed and
        // outlive the call.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                io::ErrorKind::Interrupted => self.receive_raw(buf),
                _ => Err(e),
            };
        }
        let index = u32::try_from(from.sll_ifindex).unwrap_or(0);
        Ok(Some((index, n.unsigned_abs(), from.sll_pkttype)))
    }

    /// Sends `frame` (from its Ethernet header on) out of interface
    /// `index`, to 01:80:C2:00:00:00.
    pub fn send(&self, index: u32, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = (libc::ETH_P_802_2 as u16).to_be();
        to.sll_ifindex = i32::try_from(index)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index"))?;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&rstp_group());
        // SAFETY: `frame` and `to` are valid for the lengths passed and
        // outlive the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn rstp_group() -> [u8; 6] {
    bgp4mesh_rstp::BRIDGE_GROUP_ADDRESS
}

/// An 802.3 frame with LLC: to the bridge group address from `source`,
/// padded to Ethernet's minimum of 60 bytes.
pub fn frame(source: [u8; 6], llc_and_bpdu: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(60.max(14 + llc_and_bpdu.len()));
    frame.extend_from_slice(&rstp_group());
    frame.extend_from_slice(&source);
    let length = u16::try_from(llc_and_bpdu.len()).unwrap_or(u16::MAX);
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(llc_and_bpdu);
    frame.resize(frame.len().max(60), 0);
    frame
}

/// The LLC PDU in a received 802.3 frame: after the 14-byte header, as
/// long as its length field says. `None` for Ethernet II frames and
/// truncated ones.
pub fn llc_payload(frame: &[u8]) -> Option<&[u8]> {
    let length = usize::from(u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?));
    if length >= 0x0600 {
        return None;
    }
    frame.get(14..14 + length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_padded_and_read_back() {
        let bytes = [0x42, 0x42, 0x03, 0, 0, 0, 0x80];
        let f = frame([2, 0, 0, 0, 0, 1], &bytes);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..6], &[0x01, 0x80, 0xc2, 0, 0, 0]);
        assert_eq!(&f[12..14], &[0, 7]);
        assert_eq!(llc_payload(&f), Some(&bytes[..]));
    }

    #[test]
    fn ethernet_ii_and_truncated_frames_carry_no_llc() {
        let mut f = frame([2, 0, 0, 0, 0, 1], &[0x42, 0x42, 0x03]);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(llc_payload(&f), None);
        f[12..14].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(llc_payload(&f), None);
        assert_eq!(llc_payload(&f[..10]), None);
    }
}
