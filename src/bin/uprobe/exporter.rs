//! `uprobe exporter`: the metrics of every instrumented process of this user, over HTTP, for
//! Prometheus. Each scrape asks every reachable control socket for `metrics` (the Prometheus text
//! format), labels each sample with the process's `pid` and `comm`, and merges the families (one
//! HELP and TYPE each, their samples together), so that one exporter per host serves a fleet.
//!
//! Nothing a client or a process does can starve it:
//! - HTTP is served by one thread, from one `poll` loop: at most [`MAX_CONNECTIONS`] connections
//!   at once. When a new one comes and all are taken, the oldest that has not yet sent its
//!   request is dropped to make room (so idle connections cannot keep a scraper out; only when
//!   every one is being answered is the newcomer answered 503). A request must arrive whole,
//!   headers at most [`MAX_REQUEST`] bytes, within [`REQUEST_TIMEOUT`]; an answer must be taken
//!   within [`ANSWER_TIMEOUT`]. Slow clients are dropped, never waited for.
//! - Scrapes run on one worker thread; the requests that come while one runs get its result.
//!   A scrape asks every process at once, without blocking, and gives each [`SCRAPE_BUDGET`] in
//!   all (connect, write, read) and [`MAX_TARGET_ANSWER`] bytes: a stopped process, one whose
//!   socket's backlog is full, or one that floods, is a scrape error, and the others are served.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::client::{self, Target};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest request (line and headers) read.
pub const MAX_REQUEST: usize = 8192;
/// A request must arrive whole within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// An answer must be taken within this.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// What one scrape may take, every process together (under Prometheus's default timeout, and its
/// 1 s scrape interval's).
pub const SCRAPE_BUDGET: Duration = Duration::from_millis(800);
/// The longest `metrics` answer read from one process.
pub const MAX_TARGET_ANSWER: usize = 16 << 20;

/// Sockets that could not be read, over the exporter's life.
static SCRAPE_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Which processes and probes a scrape includes (`--comm`, `--pid`, `--probe`); empty lists take
/// everything.
#[derive(Default, Clone)]
pub struct Filters {
    pub comm: Vec<String>,
    pub pid: Vec<i32>,
    /// Globs (`*`, `?`) matched against a sample's `symbol` and `spec` labels.
    pub probe: Vec<String>,
}

impl Filters {
    fn process(&self, pid: i32, comm: &str) -> bool {
        (self.pid.is_empty() || self.pid.contains(&pid))
            && (self.comm.is_empty() || self.comm.iter().any(|c| c == comm))
    }

    /// Does a sample line pass `--probe`? (A sample without a probe is kept.)
    fn sample(&self, line: &str) -> bool {
        if self.probe.is_empty() {
            return true;
        }
        let labels = [label(line, "symbol"), label(line, "spec")];
        if labels.iter().all(Option::is_none) {
            return true;
        }
        labels.iter().flatten().any(|v| self.probe.iter().any(|g| glob(g, v)))
    }
}

/// The value of label `name` in a sample line (escapes undone).
fn label(line: &str, name: &str) -> Option<String> {
    let open = line.find('{')?;
    let mut rest = &line[open + 1..];
    loop {
        let eq = rest.find("=\"")?;
        let key = rest[..eq].trim_start_matches(',');
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return None,
                },
                '"' => {
                    end = Some(eq + 2 + i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end?;
        if key == name {
            return Some(value);
        }
        rest = &rest[end..];
    }
}

/// `*` and `?` globs.
fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| go(rest, &t[i..])),
            Some(('?', rest)) => !t.is_empty() && go(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    go(&p, &t)
}

/// The `metrics` answer of one process: its lines, up to the empty line that ends it (bounded in
/// size and time).
pub fn fetch(target: &Target) -> Result<String, String> {
    let s = target.connect(Duration::from_secs(2))?;
    // A stopped process must not hold the terminal for good.
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    client::send_all(&s, b"metrics\n").map_err(|e| format!("{}: {e}", target.path.display()))?;
    let mut text = Vec::new();
    let mut buf = [0u8; 65536];
    let mut r = &s;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Err(format!("{}: the answer stopped short", target.path.display())),
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("{}: {e}", target.path.display())),
        }
        if let Some(done) = complete(&text) {
            return done.map_err(|e| format!("{}: {e}", target.path.display()));
        }
        if text.len() > MAX_TARGET_ANSWER {
            return Err(format!(
                "{}: an answer longer than {MAX_TARGET_ANSWER} bytes",
                target.path.display()
            ));
        }
    }
}

/// A whole `metrics` answer in `text` (ended by an empty line), or a refusal, if either is there.
fn complete(text: &[u8]) -> Option<Result<String, String>> {
    if text.starts_with(b"{\"ok\":false") {
        let end = text.iter().position(|&b| b == b'\n')?;
        return Some(Err(String::from_utf8_lossy(&text[..end]).into_owned()));
    }
    let end =
        if text.starts_with(b"\n") { 0 } else { text.windows(2).position(|w| w == b"\n\n")? + 1 };
    Some(String::from_utf8(text[..end].to_vec()).map_err(|_| "an answer that is not UTF-8".into()))
}

/// Families in order of first appearance: name -> (HELP line, TYPE line, samples).
#[derive(Default)]
pub struct Families {
    order: Vec<String>,
    by_name: HashMap<String, (String, String, Vec<String>)>,
}

impl Families {
    /// Add one process's exposition, each sample labelled with `extra` (`pid="1",comm="x"`), the
    /// samples `keep` takes.
    pub fn add(&mut self, text: &str, extra: &str, keep: impl Fn(&str) -> bool) {
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) =
                line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE "))
            {
                let name = rest.split(' ').next().unwrap_or_default().to_string();
                let family = self.family(&name);
                if line.starts_with("# HELP ") {
                    family.0 = line.to_string();
                } else {
                    family.1 = line.to_string();
                }
                current = name;
                continue;
            }
            if line.is_empty() || line.starts_with('#') || !keep(line) {
                continue;
            }
            let labelled = match line.find(['{', ' ']) {
                Some(i) if line.as_bytes()[i] == b'{' => {
                    let sep = if line[i + 1..].starts_with('}') { "" } else { "," };
                    format!("{}{{{extra}{sep}{}", &line[..i], &line[i + 1..])
                }
                Some(i) => format!("{}{{{extra}}}{}", &line[..i], &line[i..]),
                None => continue,
            };
            let family = if current.is_empty() {
                let name = line.split(['{', ' ']).next().unwrap_or_default().to_string();
                self.family(&name)
            } else {
                self.family(&current.clone())
            };
            family.2.push(labelled);
        }
    }

    fn family(&mut self, name: &str) -> &mut (String, String, Vec<String>) {
        if !self.by_name.contains_key(name) {
            self.order.push(name.to_string());
        }
        self.by_name.entry(name.to_string()).or_default()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for name in &self.order {
            let (help, ty, samples) = &self.by_name[name];
            for l in [help, ty].into_iter().filter(|l| !l.is_empty()) {
                out += l;
                out.push('\n');
            }
            for s in samples {
                out += s;
                out.push('\n');
            }
        }
        out
    }
}

/// One process being scraped.
struct Scraping {
    pid: i32,
    comm: String,
    target: Target,
    stream: Option<UnixStream>,
    sent: usize,
    got: Vec<u8>,
    done: Option<Result<String, String>>,
}

/// Ask every process at once, without blocking, within [`SCRAPE_BUDGET`]; the answers in hand
/// when it is over (the others are errors).
fn fetch_all(targets: Vec<(i32, String, Target)>) -> Vec<(i32, String, Result<String, String>)> {
    const REQUEST: &[u8] = b"metrics\n";
    let deadline = Instant::now() + SCRAPE_BUDGET;
    let mut all: Vec<Scraping> = targets
        .into_iter()
        .map(|(pid, comm, target)| Scraping {
            pid,
            comm,
            target,
            stream: None,
            sent: 0,
            got: Vec::new(),
            done: None,
        })
        .collect();
    loop {
        for s in all.iter_mut().filter(|s| s.done.is_none() && s.stream.is_none()) {
            match s.target.connect_once() {
                Ok(Some(stream)) => s.stream = Some(stream),
                Ok(None) => {} // a full backlog: next round
                Err(e) => s.done = Some(Err(e)),
            }
        }
        for s in all.iter_mut().filter(|s| s.done.is_none()) {
            let Some(stream) = &s.stream else { continue };
            let mut w = stream;
            while s.sent < REQUEST.len() {
                match w.write(&REQUEST[s.sent..]) {
                    Ok(n) => s.sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        s.done = Some(Err(e.to_string()));
                        break;
                    }
                }
            }
            let mut buf = [0u8; 65536];
            loop {
                match w.read(&mut buf) {
                    Ok(0) => {
                        s.done = s.done.take().or(Some(Err("the answer stopped short".into())));
                        break;
                    }
                    Ok(n) => {
                        s.got.extend_from_slice(&buf[..n]);
                        if s.got.len() > MAX_TARGET_ANSWER {
                            s.done = Some(Err(format!(
                                "an answer longer than {MAX_TARGET_ANSWER} bytes"
                            )));
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        s.done = Some(Err(e.to_string()));
                        break;
                    }
                }
            }
            if s.done.is_none() {
                s.done = complete(&s.got);
            }
        }
        if all.iter().all(|s| s.done.is_some()) || Instant::now() >= deadline {
            break;
        }
        // Wait for any of them (a connect that must be tried again: at most 10 ms).
        let mut fds: Vec<libc::pollfd> = all
            .iter()
            .filter(|s| s.done.is_none())
            .filter_map(|s| s.stream.as_ref())
            .map(|st| libc::pollfd {
                fd: st.as_raw_fd(),
                events: libc::POLLIN | libc::POLLOUT,
                revents: 0,
            })
            .collect();
        let waiting_connect = all.iter().any(|s| s.done.is_none() && s.stream.is_none());
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = if waiting_connect { left.min(Duration::from_millis(10)) } else { left };
        // Only POLLIN matters once the request is out: don't spin on POLLOUT.
        for (f, s) in
            fds.iter_mut().zip(all.iter().filter(|s| s.done.is_none() && s.stream.is_some()))
        {
            if s.sent >= REQUEST.len() {
                f.events = libc::POLLIN;
            }
        }
        // SAFETY: `fds` is a valid array of pollfd.
        unsafe {
            libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait.as_millis() as i32 + 1)
        };
    }
    all.into_iter()
        .map(|s| {
            let r = s.done.unwrap_or_else(|| {
                Err(format!("no whole answer within {} ms", SCRAPE_BUDGET.as_millis()))
            });
            (s.pid, s.comm, r)
        })
        .collect()
}

/// One scrape: every reachable process of this user that the filters take.
pub fn scrape(targets: Vec<(i32, Target)>, filters: &Filters) -> String {
    let chosen: Vec<(i32, String, Target)> = targets
        .into_iter()
        .filter_map(|(pid, t)| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let comm = comm.trim_end().to_string();
            filters.process(pid, &comm).then_some((pid, comm, t))
        })
        .collect();
    let mut families = Families::default();
    let mut targets = 0;
    for (pid, comm, answer) in fetch_all(chosen) {
        match answer {
            Ok(text) => {
                let extra = format!(
                    "pid=\"{pid}\",comm=\"{}\"",
                    comm.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
                );
                families.add(&text, &extra, |l| filters.sample(l));
                targets += 1;
            }
            Err(_) => {
                // A process that exited between the listing and the request is not an error.
                if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    SCRAPE_ERRORS.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    let mut out = families.render();
    out += "# HELP uprobe_exporter_targets Instrumented processes scraped.\n";
    out += "# TYPE uprobe_exporter_targets gauge\n";
    out += &format!("uprobe_exporter_targets {targets}\n");
    out += "# HELP uprobe_exporter_scrape_errors_total Processes whose socket could not be read.\n";
    out += "# TYPE uprobe_exporter_scrape_errors_total counter\n";
    out +=
        &format!("uprobe_exporter_scrape_errors_total {}\n", SCRAPE_ERRORS.load(Ordering::Relaxed));
    out
}

/// An HTTP connection.
struct Conn {
    stream: TcpStream,
    accepted: Instant,
    input: Vec<u8>,
    output: Vec<u8>,
    /// It asked for /metrics and waits for the scrape.
    waiting: bool,
    /// When it must have sent its request, or taken its answer.
    deadline: Instant,
}

fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What to do with a whole request (its first line).
enum Route {
    Metrics,
    Answer(Vec<u8>),
}

fn route(request: &[u8]) -> Route {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics,
        ("GET", "/") => Route::Answer(response(
            "200 OK",
            "text/html; charset=utf-8",
            "<html><body><h1>uprobe exporter</h1><p><a href=\"/metrics\">/metrics</a>: the probes \
             of every instrumented process of this user.</p></body></html>\n",
        )),
        ("GET", _) => Route::Answer(response("404 Not Found", "text/plain", "not found\n")),
        _ => Route::Answer(response("405 Method Not Allowed", "text/plain", "only GET\n")),
    }
}

/// Serve `GET /metrics` on `listen` until killed.
pub fn serve(
    listen: &str,
    filters: Filters,
    targets: fn() -> Vec<(i32, Target)>,
) -> Result<(), String> {
    let listener =
        TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    eprintln!("uprobe exporter: serving http://{listen}/metrics");
    // The scrape worker: one scrape at a time; its result comes back through `done`, and a byte
    // on the pipe wakes the loop.
    let mut ends = [0i32; 2];
    // SAFETY: `ends` is writable for two descriptors.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: two descriptors the pipe just made, ours alone.
    let (wake_r, wake_w) = unsafe {
        use std::os::fd::FromRawFd;
        (std::fs::File::from_raw_fd(ends[0]), std::fs::File::from_raw_fd(ends[1]))
    };
    let (ask, asked) = mpsc::channel::<()>();
    let done: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    {
        let done = done.clone();
        let mut wake_w = wake_w;
        std::thread::spawn(move || {
            for () in asked {
                let text = scrape(targets(), &filters);
                *done.lock().expect("scrape result") = Some(text);
                let _ = wake_w.write_all(b"x");
            }
        });
    }
    let mut wake_r = wake_r;
    // SAFETY: setting O_NONBLOCK on our own pipe.
    unsafe { libc::fcntl(wake_r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let text_type = "text/plain; version=0.0.4; charset=utf-8";
    let mut conns: Vec<Conn> = Vec::new();
    let mut scraping = false;
    loop {
        let mut fds = vec![
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake_r.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        for c in &conns {
            let events = if !c.output.is_empty() {
                libc::POLLOUT
            } else if c.waiting {
                0
            } else {
                libc::POLLIN
            };
            fds.push(libc::pollfd { fd: c.stream.as_raw_fd(), events, revents: 0 });
        }
        let now = Instant::now();
        let next = conns.iter().map(|c| c.deadline).min();
        let wait = next.map_or(1000, |d| d.saturating_duration_since(now).as_millis() as i32 + 1);
        // SAFETY: `fds` is a valid array of pollfd.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait.min(1000)) };
        // New connections: served up to the limit, else told so and closed.
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if conns.len() >= MAX_CONNECTIONS {
                        // Room from the oldest connection still silent, if any.
                        let silent = conns
                            .iter()
                            .enumerate()
                            .filter(|(_, c)| !c.waiting && c.output.is_empty())
                            .min_by_key(|(_, c)| c.accepted)
                            .map(|(i, _)| i);
                        if let Some(i) = silent {
                            conns.swap_remove(i);
                        }
                    }
                    if conns.len() >= MAX_CONNECTIONS {
                        let mut s = stream;
                        let _ = s.set_nonblocking(true);
                        let _ = s.write(&response(
                            "503 Service Unavailable",
                            "text/plain",
                            "too many connections\n",
                        ));
                        continue;
                    }
                    let _ = stream.set_nonblocking(true);
                    conns.push(Conn {
                        stream,
                        accepted: Instant::now(),
                        input: Vec::new(),
                        output: Vec::new(),
                        waiting: false,
                        deadline: Instant::now() + REQUEST_TIMEOUT,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
        // A scrape finished: every waiting connection gets it.
        let mut b = [0u8; 64];
        if wake_r.read(&mut b).is_ok_and(|n| n > 0) {
            if let Some(text) = done.lock().expect("scrape result").take() {
                scraping = false;
                let answer = response("200 OK", text_type, &text);
                for c in conns.iter_mut().filter(|c| c.waiting) {
                    c.waiting = false;
                    c.output = answer.clone();
                    c.deadline = Instant::now() + ANSWER_TIMEOUT;
                }
            }
        }
        let mut want_scrape = false;
        for c in conns.iter_mut() {
            if c.waiting || !c.output.is_empty() {
                continue;
            }
            let mut buf = [0u8; 4096];
            match c.stream.read(&mut buf) {
                Ok(0) => c.deadline = Instant::now(), // gone
                Ok(n) => c.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => c.deadline = Instant::now(),
            }
            if c.input.windows(4).any(|w| w == b"\r\n\r\n")
                || c.input.windows(2).any(|w| w == b"\n\n")
            {
                match route(&c.input) {
                    Route::Metrics => {
                        c.waiting = true;
                        c.deadline = Instant::now() + SCRAPE_BUDGET + ANSWER_TIMEOUT;
                        want_scrape = true;
                    }
                    Route::Answer(a) => {
                        c.output = a;
                        c.deadline = Instant::now() + ANSWER_TIMEOUT;
                    }
                }
            } else if c.input.len() > MAX_REQUEST {
                c.output =
                    response("431 Request Header Fields Too Large", "text/plain", "too long\n");
                c.deadline = Instant::now() + ANSWER_TIMEOUT;
            }
        }
        if want_scrape && !scraping {
            scraping = ask.send(()).is_ok();
        }
        for c in conns.iter_mut().filter(|c| !c.output.is_empty()) {
            match c.stream.write(&c.output) {
                Ok(n) => {
                    c.output.drain(..n);
                    if c.output.is_empty() {
                        c.deadline = Instant::now(); // answered: closed
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    c.output.clear();
                    c.deadline = Instant::now();
                }
            }
        }
        let now = Instant::now();
        // Timed out, answered, or gone (each sets its deadline to now).
        conns.retain(|c| c.deadline > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_merge_across_processes_with_their_labels() {
        let a = "# HELP x_total X.\n# TYPE x_total counter\nx_total{probe=\"1\"} 5\n# HELP y Y.\n# TYPE y gauge\ny 1\n";
        let b = "# HELP x_total X.\n# TYPE x_total counter\nx_total{probe=\"1\"} 7\n";
        let mut f = Families::default();
        f.add(a, "pid=\"1\",comm=\"a\"", |_| true);
        f.add(b, "pid=\"2\",comm=\"b\"", |_| true);
        assert_eq!(
            f.render(),
            "# HELP x_total X.\n# TYPE x_total counter\nx_total{pid=\"1\",comm=\"a\",probe=\"1\"} 5\n\
             x_total{pid=\"2\",comm=\"b\",probe=\"1\"} 7\n# HELP y Y.\n# TYPE y gauge\n\
             y{pid=\"1\",comm=\"a\"} 1\n"
        );
    }

    #[test]
    fn probe_filters_read_escaped_labels() {
        let line =
            r#"uprobe_hits_total{probe="1",spec="a\"b%return",symbol="malloc",object="/x"} 5"#;
        assert_eq!(label(line, "spec").as_deref(), Some("a\"b%return"));
        assert_eq!(label(line, "symbol").as_deref(), Some("malloc"));
        let f = Filters { probe: vec!["mal*".into()], ..Filters::default() };
        assert!(f.sample(line));
        assert!(f.sample("uprobe_events_lost_total 0"));
        let g = Filters { probe: vec!["free".into()], ..Filters::default() };
        assert!(!g.sample(line));
        assert!(glob("a?c*", "abcdef") && !glob("a?c", "abcd"));
    }
}
