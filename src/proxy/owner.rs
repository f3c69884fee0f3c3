//! Who owns the socket at the other end of an upstream connection.
//!
//! Issue 10 #2 (traffic stealing): when an app's web process exits,
//! another app could bind its loopback port before it comes back. The
//! proxy therefore checks, on every new upstream connection, that the
//! socket it reached belongs to the app's own user before a byte of the
//! request is written. An accepted socket carries the uid of the listening
//! socket it came from, so the server end of our connection names the
//! user whose process will read the request. Two processes of different
//! users cannot share a listening port (SO_REUSEPORT requires the same
//! uid), so a matching owner is the app.
//!
//! The kernel is asked for exactly that one socket over NETLINK_SOCK_DIAG
//! (what `ss` uses): one round trip, however many sockets the host has.
//! Reading /proc/net/tcp instead costs a scan of every socket, TIME_WAIT
//! ones included, per upstream connection.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::net::TcpStream;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_NOCOOKIE: u32 = !0;
const TCP_SYN_RECV: u8 = 3;
const TCP_NEW_SYN_RECV: u8 = 12;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

#[repr(C)]
struct Request {
    header: libc::nlmsghdr,
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

fn words(ip: IpAddr) -> [u32; 4] {
    let mut w = [0u32; 4];
    match ip {
        IpAddr::V4(v4) => w[0] = u32::from_ne_bytes(v4.octets()),
        IpAddr::V6(v6) => {
            for (i, chunk) in v6.octets().chunks_exact(4).enumerate() {
                w[i] = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
    }
    w
}

/// The uid owning the server end of the TCP connection from `ours` to
/// `theirs`, or `None` when the kernel does not know it (yet).
pub fn server_end_owner(theirs: SocketAddr, ours: SocketAddr) -> io::Result<Option<u32>> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own; OwnedFd closes it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let req = Request {
        header: libc::nlmsghdr {
            nlmsg_len: std::mem::size_of::<Request>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: libc::NLM_F_REQUEST as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        family: if theirs.is_ipv4() { libc::AF_INET as u8 } else { libc::AF_INET6 as u8 },
        protocol: libc::IPPROTO_TCP as u8,
        ext: 0,
        pad: 0,
        states: !0,
        // The server end: its source is the upstream, its destination us.
        id: SockId {
            sport: theirs.port().to_be(),
            dport: ours.port().to_be(),
            src: words(theirs.ip()),
            dst: words(ours.ip()),
            interface: 0,
            cookie: [INET_DIAG_NOCOOKIE; 2],
        },
    };
    send(&fd, &req)?;
    let mut buf = [0u8; 1024];
    // SAFETY: recv writes at most buf.len() bytes into buf.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let header_len = std::mem::size_of::<libc::nlmsghdr>();
    if n < header_len {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short netlink answer"));
    }
    // SAFETY: buf holds at least a header's bytes; read_unaligned copes with alignment.
    let header: libc::nlmsghdr = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
    match header.nlmsg_type {
        t if t == libc::NLMSG_ERROR as u16 => {
            // An nlmsgerr: a negative errno; ENOENT means no such socket.
            let errno = if n >= header_len + 4 {
                i32::from_ne_bytes([buf[header_len], buf[header_len + 1], buf[header_len + 2], buf[header_len + 3]])
            } else {
                -libc::EIO
            };
            if errno == -libc::ENOENT || errno == 0 {
                Ok(None)
            } else {
                Err(io::Error::from_raw_os_error(-errno))
            }
        }
        SOCK_DIAG_BY_FAMILY if n >= header_len + std::mem::size_of::<DiagMsg>() => {
            // SAFETY: the length was checked; read_unaligned copes with alignment.
            let msg: DiagMsg = unsafe { std::ptr::read_unaligned(buf[header_len..].as_ptr().cast()) };
            // Until the server has our final ACK, or our first byte when it
            // defers accepting (uWSGI sets TCP_DEFER_ACCEPT), the kernel
            // holds only a request socket, reported with uid 0. It hangs
            // off the listening socket on that port: ask for its owner.
            if msg.state == TCP_SYN_RECV || msg.state == TCP_NEW_SYN_RECV {
                return listener_owner(&fd, theirs);
            }
            Ok(Some(msg.uid))
        }
        t => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected netlink answer type {t}"))),
    }
}

/// Fail unless the server end of `stream` belongs to `uid`.
pub async fn verify(stream: &TcpStream, uid: u32) -> io::Result<()> {
    let (theirs, ours) = (stream.peer_addr()?, stream.local_addr()?);
    // connect() returns on the SYN-ACK; the server end is listed once the
    // kernel has processed our ACK, which on loopback is at once, or
    // nearly: look a few times before calling it missing.
    for attempt in 0..20u32 {
        match server_end_owner(theirs, ours)? {
            Some(found) if found == uid => return Ok(()),
            Some(found) => {
                tracing::warn!(upstream = %theirs, expected = uid, found, "upstream port is held by another user; refusing to send it the app's traffic");
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{theirs} is owned by uid {found}, not the app's uid {uid}"),
                ));
            }
            None if attempt < 3 => tokio::task::yield_now().await,
            None => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, format!("the server end of the connection to {theirs} is not listed")))
}

const TCP_LISTEN: u32 = 10;

/// The owner of the sockets listening on `addr` (on its address or the
/// wildcard), by a dump of the host's listening TCP sockets: `None` when
/// there is none, or when they do not all belong to one user.
fn listener_owner(fd: &OwnedFd, addr: SocketAddr) -> io::Result<Option<u32>> {
    let req = Request {
        header: libc::nlmsghdr {
            nlmsg_len: std::mem::size_of::<Request>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            nlmsg_seq: 2,
            nlmsg_pid: 0,
        },
        family: if addr.is_ipv4() { libc::AF_INET as u8 } else { libc::AF_INET6 as u8 },
        protocol: libc::IPPROTO_TCP as u8,
        ext: 0,
        pad: 0,
        states: 1 << TCP_LISTEN,
        id: SockId::default(),
    };
    send(fd, &req)?;
    let (want_port, want_ip) = (addr.port().to_be(), words(addr.ip()));
    let mut owner: Option<u32> = None;
    let mut buf = vec![0u8; 32 * 1024];
    let header_len = std::mem::size_of::<libc::nlmsghdr>();
    loop {
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let mut at = 0;
        while at + header_len <= n {
            // SAFETY: bounds checked above; read_unaligned copes with alignment.
            let header: libc::nlmsghdr = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
            let len = header.nlmsg_len as usize;
            if len < header_len || at + len > n {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed netlink answer"));
            }
            match header.nlmsg_type {
                t if t == libc::NLMSG_DONE as u16 => return Ok(owner),
                t if t == libc::NLMSG_ERROR as u16 => return Err(io::Error::other("netlink dump refused")),
                SOCK_DIAG_BY_FAMILY if len >= header_len + std::mem::size_of::<DiagMsg>() => {
                    // SAFETY: the length was checked; read_unaligned copes with alignment.
                    let msg: DiagMsg = unsafe { std::ptr::read_unaligned(buf[at + header_len..].as_ptr().cast()) };
                    if msg.id.sport == want_port && (msg.id.src == want_ip || msg.id.src == [0; 4]) {
                        if owner.is_some_and(|o| o != msg.uid) {
                            return Ok(None);
                        }
                        owner = Some(msg.uid);
                    }
                }
                _ => {}
            }
            // Messages are aligned to 4 bytes.
            at += (len + 3) & !3;
        }
    }
}

fn send(fd: &OwnedFd, req: &Request) -> io::Result<()> {
    // SAFETY: sockaddr_nl is plain data; zero is the kernel's address.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: we pass a pointer to `req` and its exact size, and a valid sockaddr_nl.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            (req as *const Request).cast(),
            std::mem::size_of::<Request>(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_owner_of_another_users_listener() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        // A socket belongs to the fsuid that created it; setfsuid is per thread.
        let listener = std::thread::spawn(|| {
            // SAFETY: setfsuid changes only this thread's filesystem uid.
            unsafe { libc::setfsuid(4242) };
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind")
        })
        .join()
        .expect("thread");
        let theirs = listener.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(theirs).expect("connect");
        let ours = client.local_addr().expect("local");
        assert_eq!(server_end_owner(theirs, ours).expect("ask"), Some(4242));
        // SAFETY: socket(2) with constant arguments; checked below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        assert_eq!(listener_owner(&fd, theirs).expect("dump"), Some(4242));
    }

    #[test]
    fn finds_the_owner_of_our_own_connection() {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(bind) else { continue };
            let theirs = listener.local_addr().expect("addr");
            let client = std::net::TcpStream::connect(theirs).expect("connect");
            let _server = listener.accept().expect("accept");
            let ours = client.local_addr().expect("local");
            assert_eq!(server_end_owner(theirs, ours).expect("ask"), Some(me), "{bind}");
            let elsewhere = SocketAddr::new(theirs.ip(), 1);
            assert_eq!(server_end_owner(elsewhere, ours).expect("ask"), None, "{bind}");
        }
    }
}
