//! The server's loop. It never trusts a client:
//! - the peer's credentials are checked on every connection (same uid or root);
//! - a request line is at most [`MAX_LINE`] bytes; at most [`MAX_CLIENTS`] clients are served at
//!   once; a client idle for [`IDLE`] is dropped;
//! - an answer is produced only while the client's unread answers are under [`MAX_PENDING`]: a
//!   client that sends requests and reads nothing cannot grow the program's memory, and is
//!   dropped when it has read nothing for [`IDLE`];
//! - clients are served in turn, one request each per round, so that a client that pipelines long
//!   operations (`add libc.so.6:*`) cannot hold the others;
//! - all I/O is non-blocking from one `poll`, so the program's own threads never wait on it.

use std::sync::atomic::Ordering;

use super::{protocol, sock, LISTENER, WAKE};
use crate::consumers::{self, events::Mark};
use crate::registry;
use crate::runtime::config::TraceFormat as Format;
use crate::runtime::{lock::Mutex, threads};
use crate::sigsafe::sys::{self, Errno};

/// The longest request line, newline excluded.
pub const MAX_LINE: usize = 4096;
/// Clients served at once; more are answered with an error and dropped.
pub const MAX_CLIENTS: usize = 256;
/// A client that sends nothing for this long is dropped (ns).
pub const IDLE: u64 = 10_000_000_000;
/// Unread answers beyond which no answer is produced, and the client is dropped.
pub const MAX_PENDING: usize = 1 << 20;
/// Input buffered per client at most (requests waiting for their turn).
const MAX_INPUT: usize = 64 * 1024;

struct Client {
    fd: i32,
    /// What `fd` is (device, inode): if the program closed the number and reused it, it is no
    /// longer this client's, and is never read, written or closed again.
    id: (u64, u64),
    input: Vec<u8>,
    output: Vec<u8>,
    /// When it last sent something, or read some of its answers.
    last: u64,
    closing: bool,
    /// It asked for the event stream (`events`), in this format.
    events: Option<Format>,
    /// Only these probes' events (empty: every probe's).
    only: Vec<u32>,
    /// `events ... mine`: the probes it adds join `only`.
    mine: bool,
    /// Events it did not read in time, not yet said to it.
    lost: u64,
    /// The ring's losses of its probes, in lines it could not take, not yet said to it.
    ring_lost: u64,
    /// It asked for `flush`: answered once the rings are drained into its stream.
    wants_flush: bool,
}

impl Client {
    fn ours(&self) -> bool {
        sys::fstat(self.fd).is_ok_and(|st| (st.st_dev, st.st_ino) == self.id)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.ours() {
            sys::close(self.fd);
        }
        if let Some(f) = self.events {
            if consumers::events::unsubscribe(f) {
                registry::with_registry(|r| r.retarget());
            }
        }
    }
}

/// The drain thread's events for the subscribers in `format` (see `consumers::events`): queued
/// on each (the probes it asked for), or counted lost for one that does not read them, which is
/// said to it in its stream once it reads again.
pub(super) fn push_events(format: Format, text: &str, marks: &[Mark]) {
    use consumers::events::ALL_PROBES;
    let mut clients = CLIENTS.lock();
    let mut any = false;
    for c in clients.iter_mut().filter(|c| c.events == Some(format) && !c.closing) {
        let mut from = 0;
        let mut mine = Vec::new();
        for m in marks {
            if (c.only.is_empty() && !c.mine) || m.probe == ALL_PROBES || c.only.contains(&m.probe)
            {
                mine.push((from, m));
            }
            from = m.end;
        }
        if c.output.len() >= MAX_PENDING {
            // Its events are lost to it (said later); a line that said the ring's losses is
            // not, but its count is: said with the next loss line it gets.
            let events = mine.iter().filter(|(_, m)| m.ring_lost == 0).count() as u64;
            c.lost += events;
            c.ring_lost += mine.iter().map(|(_, m)| m.ring_lost).sum::<u64>();
            consumers::events::LOST_SLOW_READER.fetch_add(events, Ordering::Relaxed);
            continue;
        }
        say_losses(c, format);
        if mine.len() == marks.len() {
            c.output.extend_from_slice(text.as_bytes());
        } else {
            for (a, m) in mine {
                c.output.extend_from_slice(&text.as_bytes()[a..m.end]);
            }
        }
        any = true;
    }
    drop(clients);
    if any {
        super::wake();
    }
}

/// Tell a subscriber the losses it has not been told yet (before anything else it gets).
fn say_losses(c: &mut Client, format: Format) {
    use consumers::events::{lost_line, Loss};
    if c.lost > 0 {
        c.output.extend_from_slice(lost_line(format, c.lost, None, Loss::Reader).as_bytes());
        c.lost = 0;
    }
    if c.ring_lost > 0 {
        c.output.extend_from_slice(lost_line(format, c.ring_lost, None, Loss::Ring).as_bytes());
        c.ring_lost = 0;
    }
}

static CLIENTS: Mutex<Vec<Client>> = Mutex::new(Vec::new());

/// The server thread's body.
pub fn serve() {
    let (mut next_watch, mut next_round) = (0, 0);
    while !threads::stopping() {
        // Our descriptors may have been closed by the program, their numbers reused for its own
        // files: checked at each round, and made again elsewhere (never touching that number).
        if LISTENER.get().is_none() {
            super::rebind();
        }
        super::ensure_wake();
        let listener = LISTENER.raw();
        let wake = WAKE.raw();
        let mut fds = vec![
            libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: listener, events: libc::POLLIN, revents: 0 },
        ];
        {
            let clients = CLIENTS.lock();
            for c in clients.iter() {
                let out = if c.output.is_empty() { 0 } else { libc::POLLOUT };
                let inp = if c.input.len() < MAX_INPUT { libc::POLLIN } else { 0 };
                fds.push(libc::pollfd { fd: c.fd, events: inp | out, revents: 0 });
            }
        }
        let watching = registry::WATCHED.load(std::sync::atomic::Ordering::Relaxed) > 0;
        let ready = sys::poll(&mut fds, if watching { watch_due(next_watch) } else { 1000 });
        if watching && sys::monotonic_ns() >= next_watch {
            next_watch = sys::monotonic_ns() + registry::WATCH_NS;
            for (spec, why) in registry::watch() {
                crate::report::problem(&spec, &why);
            }
            // A timeout for the watch alone: the rest of the round waits for its second.
            if ready == Ok(0) && sys::monotonic_ns() < next_round {
                continue;
            }
        }
        next_round = sys::monotonic_ns() + 1_000_000_000;
        if matches!(ready, Err(e) if e != Errno(libc::EINTR)) {
            sys::sleep_ns(10_000_000);
            continue;
        }
        if fds[0].revents != 0 && WAKE.get() == Some(wake) {
            let mut b = [0u8; 8];
            let _ = sys::read(wake, &mut b);
        }
        // What startup left for this thread: the unwind information of the code it wrote.
        registry::emit_deferred_cfi(false);
        if let Some(why) = crate::xol::cfi::take_problem() {
            crate::report::problem("UPROBES_PERFMAP", &why);
        }
        if crate::runtime::config::get().attached {
            // Loaded into a running program: its later `sigaction` calls are not interposed; a
            // handler it installed over libuprobe's becomes its virtual one, and ours comes back.
            crate::sigsafe::chain::reclaim();
        }
        if registry::ifunc_pending() {
            // A probe on an IFUNC waits for its object's relocation: let the loader finish.
            crate::objects::loader::wait_until_idle("libc.so.6");
            let problems = registry::with_registry(|r| r.rescan(false)).unwrap_or_default();
            crate::report::problems(&problems);
        }
        if fds[1].revents != 0 && listener >= 0 && LISTENER.get() == Some(listener) {
            accept_all(listener);
        }
        let now = sys::monotonic_ns();
        let mut flush_wanted = false;
        let mut clients = CLIENTS.lock();
        // Read what came, then answer one request of each client, in turn.
        for (c, pfd) in clients.iter_mut().zip(&fds[2..]) {
            if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                read_input(c, now);
            }
        }
        for c in clients.iter_mut() {
            answer_one(c);
            flush(c);
            if c.wants_flush {
                flush_wanted = true;
            }
            // A subscriber may send nothing for hours; it is idle only when it stops reading.
            let idle = now.saturating_sub(c.last) > IDLE;
            if idle && (c.events.is_none() || !c.output.is_empty()) {
                c.closing = true;
            }
        }
        clients
            .retain(|c| !(c.closing && (c.output.is_empty() || now.saturating_sub(c.last) > IDLE)));
        drop(clients);
        if flush_wanted {
            // Every event recorded so far into the streams (not under the clients' lock: the
            // drain takes it to queue them), then the answer, after them.
            consumers::events::flush();
            let mut clients = CLIENTS.lock();
            for c in clients.iter_mut().filter(|c| c.wants_flush) {
                c.wants_flush = false;
                if let Some(f) = c.events {
                    say_losses(c, f);
                }
                c.output.extend_from_slice(b"{\"ok\":true,\"flushed\":true}\n");
                flush(c);
            }
        }
    }
}

/// Milliseconds until `at` (monotonic), for poll.
fn watch_due(at: u64) -> i32 {
    at.saturating_sub(sys::monotonic_ns()).div_ceil(1_000_000).min(1000) as i32
}

/// A runtime thread of its own for [`registry::watch`] where there is no control socket.
pub fn watch_only() {
    while !threads::stopping() {
        sys::sleep_ns(registry::WATCH_NS);
        for (spec, why) in registry::watch() {
            crate::report::problem(&spec, &why);
        }
    }
}

fn accept_all(listener: i32) {
    loop {
        let fd = match sock::accept(listener) {
            Ok(fd) => crate::runtime::fs::keep_high(fd),
            Err(_) => return,
        };
        let Ok(st) = sys::fstat(fd) else { continue };
        if let Err(reason) = check_peer(fd) {
            refuse(fd, &reason);
            crate::report::problem("control socket", &reason);
            continue;
        }
        let mut clients = CLIENTS.lock();
        if clients.len() >= MAX_CLIENTS {
            drop(clients);
            refuse(fd, &format!("too many clients (at most {MAX_CLIENTS} at once)"));
            continue;
        }
        clients.push(Client {
            fd,
            id: (st.st_dev, st.st_ino),
            input: Vec::new(),
            output: Vec::new(),
            last: sys::monotonic_ns(),
            closing: false,
            events: None,
            only: Vec::new(),
            mine: false,
            lost: 0,
            ring_lost: 0,
            wants_flush: false,
        });
    }
}

fn refuse(fd: i32, reason: &str) {
    let line = format!("{}\n", serde_json::json!({"ok": false, "error": reason}));
    let _ = sock::send(fd, line.as_bytes());
    sys::close(fd);
}

/// Only our own uid, or root, may talk to us.
fn check_peer(fd: i32) -> Result<(), String> {
    let cred = sock::peer_credentials(fd)
        .map_err(|e| format!("refused a client whose credentials cannot be read: {e}"))?;
    let me = sys::geteuid();
    if cred.uid == me || cred.uid == 0 {
        Ok(())
    } else {
        Err(format!(
            "refused a client of uid {} (pid {}): only uid {me} or root may control this process",
            cred.uid, cred.pid
        ))
    }
}

fn read_input(c: &mut Client, now: u64) {
    if !c.ours() {
        c.closing = true;
        c.output.clear();
        return;
    }
    let mut buf = [0u8; 8192];
    while c.input.len() < MAX_INPUT {
        match sys::read(c.fd, &mut buf) {
            Ok(0) => {
                c.closing = true;
                break;
            }
            Ok(n) => {
                c.input.extend_from_slice(&buf[..n]);
                c.last = now;
            }
            Err(Errno(libc::EAGAIN)) => break,
            Err(Errno(libc::EINTR)) => {}
            Err(_) => {
                c.closing = true;
                break;
            }
        }
    }
    if c.input.len() > MAX_LINE && !c.input[..MAX_LINE + 1].contains(&b'\n') {
        let answer = serde_json::json!({
            "ok": false,
            "error": format!("request longer than {MAX_LINE} bytes: dropped"),
        });
        c.output.extend_from_slice(format!("{answer}\n").as_bytes());
        c.input.clear();
        c.closing = true;
    }
}

/// Answer the client's next request, if it has one and reads its answers.
fn answer_one(c: &mut Client) {
    if c.output.len() >= MAX_PENDING {
        // It does not read its answers: no more until it does (dropped when idle too long).
        return;
    }
    let Some(nl) = c.input.iter().position(|&b| b == b'\n') else { return };
    let line: Vec<u8> = c.input.drain(..=nl).collect();
    let line = &line[..line.len() - 1];
    // `metrics` is answered in the Prometheus text format, not JSON: its lines, then an empty
    // line that ends the answer (the format allows empty lines).
    if line.trim_ascii() == b"metrics" {
        c.output.extend_from_slice(super::metrics::exposition().as_bytes());
        c.output.push(b'\n');
        return;
    }
    if line.trim_ascii() == b"flush" {
        c.wants_flush = true;
        return;
    }
    let answer = if line.len() > MAX_LINE {
        serde_json::json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")})
    } else if let Some((format, only, mine)) = events_request(line) {
        subscribe(c, format, only, mine)
    } else {
        let answer = protocol::handle(line);
        if c.mine && line.starts_with(b"add ") {
            // The probes this subscriber adds are its own (queued with the answer, under the
            // clients' lock: no event of theirs can go by unseen).
            for p in answer["probes"].as_array().into_iter().flatten() {
                if let Some(id) = p["id"].as_u64().and_then(|i| u32::try_from(i).ok()) {
                    c.only.push(id);
                }
            }
        }
        answer
    };
    c.output.extend_from_slice(format!("{answer}\n").as_bytes());
}

/// `events [text|json|chrome] [ID...] [mine]`: the format asked for (text by default), the
/// probes (every probe's when none is named), and `mine` (the probes this connection adds). None
/// when the line is not that.
fn events_request(line: &[u8]) -> Option<(Format, Vec<u32>, bool)> {
    let mut words = std::str::from_utf8(line).ok()?.split_whitespace();
    if words.next()? != "events" {
        return None;
    }
    let mut format = Format::Text;
    let mut only = Vec::new();
    let mut mine = false;
    for (i, w) in words.enumerate() {
        match w {
            "text" if i == 0 => format = Format::Text,
            "json" if i == 0 => format = Format::Json,
            "chrome" if i == 0 => format = Format::Chrome,
            "mine" => mine = true,
            id => only.push(id.parse().ok()?),
        }
    }
    Some((format, only, mine))
}

/// The client gets every event from now on, after this answer, until it disconnects.
fn subscribe(c: &mut Client, format: Format, only: Vec<u32>, mine: bool) -> serde_json::Value {
    if c.events.is_some() {
        return serde_json::json!({"ok": false, "error": "this connection already gets the events"});
    }
    if let Err(e) = crate::runtime::ensure_setup() {
        return serde_json::json!({"ok": false, "error": e});
    }
    if let Err(e) = consumers::events::subscribe(format) {
        return serde_json::json!({"ok": false, "error": e});
    }
    c.events = Some(format);
    c.only = only;
    c.mine = mine;
    registry::with_registry(|r| r.retarget());
    let name = match format {
        Format::Text => "text",
        Format::Json => "json",
        Format::Chrome => "chrome",
    };
    serde_json::json!({"ok": true, "events": name})
}

fn flush(c: &mut Client) {
    if !c.output.is_empty() && !c.ours() {
        c.closing = true;
        c.output.clear();
        return;
    }
    while !c.output.is_empty() {
        match sock::send(c.fd, &c.output) {
            Ok(n) => {
                drop(c.output.drain(..n));
                c.last = sys::monotonic_ns();
            }
            Err(Errno(libc::EAGAIN)) => return,
            Err(Errno(libc::EINTR)) => {}
            Err(_) => {
                c.closing = true;
                c.output.clear();
                return;
            }
        }
    }
}

pub(super) fn lock_for_fork() {
    CLIENTS.lock_raw();
}

pub(super) fn unlock_in_parent() {
    // SAFETY: taken by lock_for_fork on this thread.
    unsafe { CLIENTS.unlock_raw() };
}

/// In a forked child: the clients are the parent's (their descriptors, copies, are closed).
pub(super) fn unlock_in_child() {
    // SAFETY: taken by lock_for_fork on the forking thread, which is this one.
    unsafe {
        CLIENTS.get_locked().clear();
        CLIENTS.unlock_raw();
    }
}
