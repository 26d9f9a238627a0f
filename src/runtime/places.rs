//! Where a process's control socket lives. Shared by the runtime (which creates it) and by
//! `uprobe ctl` (which finds it): compiled into both, since the launcher never links the runtime.

use std::path::PathBuf;

/// The directories where sockets of this user's processes may be, in the order they are tried:
/// `$XDG_RUNTIME_DIR/uprobe`, then `/tmp/uprobe-<uid>`.
pub fn socket_dirs(uid: u32, xdg_runtime_dir: Option<&str>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(xdg) = xdg_runtime_dir.filter(|v| !v.is_empty()) {
        dirs.push(PathBuf::from(xdg).join("uprobe"));
    }
    dirs.push(PathBuf::from(format!("/tmp/uprobe-{uid}")));
    dirs
}

/// The socket of process `pid` when `UPROBES_SOCKET` does not say otherwise. A process whose
/// socket is elsewhere leaves a symbolic link to it here, so that `uprobe ctl PID` finds it.
pub fn default_socket(uid: u32, xdg_runtime_dir: Option<&str>, pid: i32) -> PathBuf {
    socket_dirs(uid, xdg_runtime_dir)[0].join(format!("{pid}.sock"))
}
