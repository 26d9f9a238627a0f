//! Unix stream sockets with raw system calls: the server never enters the program's libc (where
//! `read`, `write`, `accept` may be probed).

use crate::sigsafe::sys::{self, Errno};

fn sockaddr(path: &[u8]) -> Result<(libc::sockaddr_un, u32), Errno> {
    // SAFETY: zeroed sockaddr_un is valid.
    let mut a: libc::sockaddr_un = unsafe { core::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as u16;
    if path.len() >= a.sun_path.len() {
        return Err(Errno(libc::ENAMETOOLONG));
    }
    for (d, s) in a.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    Ok((a, (2 + path.len() + 1) as u32))
}

/// A listening socket at `path` (non-blocking, close-on-exec).
pub fn listen(path: &[u8]) -> Result<i32, Errno> {
    let (addr, len) = sockaddr(path)?;
    let ty = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: no memory is passed.
    let fd =
        unsafe { sys::call(libc::SYS_socket, [libc::AF_UNIX as usize, ty as usize, 0, 0, 0, 0]) }?
            as i32;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    let r = unsafe {
        sys::call(libc::SYS_bind, [fd as usize, &addr as *const _ as usize, len as usize, 0, 0, 0])
    }
    // SAFETY: no memory is passed.
    .and_then(|_| unsafe { sys::call(libc::SYS_listen, [fd as usize, 128, 0, 0, 0, 0]) });
    if let Err(e) = r {
        sys::close(fd);
        return Err(e);
    }
    Ok(fd)
}

/// Can something be reached at `path` (a live server)?
pub fn connectable(path: &[u8]) -> bool {
    let Ok((addr, len)) = sockaddr(path) else { return false };
    let ty = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    // SAFETY: no memory is passed.
    let Ok(fd) =
        (unsafe { sys::call(libc::SYS_socket, [libc::AF_UNIX as usize, ty as usize, 0, 0, 0, 0]) })
    else {
        return false;
    };
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    let ok = unsafe {
        sys::call(libc::SYS_connect, [fd, &addr as *const _ as usize, len as usize, 0, 0, 0])
    }
    .is_ok();
    sys::close(fd as i32);
    ok
}

/// Accept a client (non-blocking, close-on-exec).
pub fn accept(listener: i32) -> Result<i32, Errno> {
    let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: null address and length: the peer address is not wanted.
    unsafe { sys::call(libc::SYS_accept4, [listener as usize, 0, 0, flags as usize, 0, 0]) }
        .map(|fd| fd as i32)
}

/// The credentials of the peer of a connected Unix socket (`SO_PEERCRED`).
pub fn peer_credentials(fd: i32) -> Result<libc::ucred, Errno> {
    let mut cred = libc::ucred { pid: 0, uid: u32::MAX, gid: u32::MAX };
    let mut len = core::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writing; the kernel writes at most `len` bytes.
    unsafe {
        sys::call(
            libc::SYS_getsockopt,
            [
                fd as usize,
                libc::SOL_SOCKET as usize,
                libc::SO_PEERCRED as usize,
                &mut cred as *mut _ as usize,
                &mut len as *mut _ as usize,
                0,
            ],
        )
    }?;
    Ok(cred)
}

/// An eventfd (non-blocking, close-on-exec), to wake the server's poll.
pub fn eventfd() -> Result<i32, Errno> {
    let flags = libc::EFD_CLOEXEC | libc::EFD_NONBLOCK;
    // SAFETY: no memory is passed.
    unsafe { sys::call(libc::SYS_eventfd2, [0, flags as usize, 0, 0, 0, 0]) }.map(|fd| fd as i32)
}

/// Send on a socket without SIGPIPE.
pub fn send(fd: i32, buf: &[u8]) -> Result<usize, Errno> {
    // SAFETY: `buf` is readable.
    unsafe {
        sys::call(
            libc::SYS_sendto,
            [fd as usize, buf.as_ptr() as usize, buf.len(), libc::MSG_NOSIGNAL as usize, 0, 0],
        )
    }
}
