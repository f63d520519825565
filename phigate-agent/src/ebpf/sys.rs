//! The three bpf(2) commands aya 0.14 does not expose and pinned-state adoption needs:
//! open a pinned object, read a link's cgroup and attach type, and swap the program
//! under a link in place (`BPF_LINK_UPDATE`: an upgrade without a protection gap).
//!
//! Only thin, checked syscall wrappers live here; policy about when to use them is in
//! the parent module.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Attach types of the cgroup hooks phigate uses (`enum bpf_attach_type`).
pub mod attach_type {
    pub const INET_EGRESS: u32 = 1;
    pub const INET_SOCK_CREATE: u32 = 2;
    pub const SOCK_OPS: u32 = 3;
    pub const INET4_CONNECT: u32 = 10;
    pub const INET6_CONNECT: u32 = 11;
    pub const INET4_GETPEERNAME: u32 = 29;
    pub const INET6_GETPEERNAME: u32 = 30;
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// The prefix of `struct bpf_link_info` phigate reads; the union starts at offset 16.
#[repr(C, align(8))]
struct RawLinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _rest: [u8; 228],
}

/// What the kernel says about a cgroup link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    pub link_type: u32,
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// `BPF_LINK_TYPE_CGROUP`.
pub const LINK_TYPE_CGROUP: u32 = 3;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a properly sized, initialised bpf_attr prefix; the kernel
    // zero-extends shorter attrs.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Open a pinned bpf object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::other("pin path contains a NUL byte"))?;
    let mut attr = ObjGetAttr { pathname: c.as_ptr() as u64, ..Default::default() };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // SAFETY: all-zero is a valid RawLinkInfo.
    let mut info: RawLinkInfo = unsafe { std::mem::zeroed() };
    let mut attr =
        InfoAttr { bpf_fd: link.as_raw_fd() as u32, info_len: std::mem::size_of::<RawLinkInfo>() as u32, info: &mut info as *mut RawLinkInfo as u64 };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkInfo { link_id: info.id, prog_id: info.prog_id, link_type: info.type_, cgroup_id: info.cgroup_id, attach_type: info.attach_type })
}

/// Replace the program behind `link` with `prog`, atomically for the kernel hook.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr { link_fd: link.as_raw_fd() as u32, new_prog_fd: prog.as_raw_fd() as u32, ..Default::default() };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}
