//! `uprobe exporter`: the metrics of every instrumented process of this user, over HTTP, for
//! Prometheus. Each scrape asks every reachable control socket for `metrics` (the Prometheus text
//! format), labels each sample with the process's `pid` and `comm`, and merges the families (one
//! HELP and TYPE each, their samples together), so that one exporter per host serves a fleet.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sockets that could not be read, over the exporter's life.
static SCRAPE_ERRORS: AtomicU64 = AtomicU64::new(0);

/// The `metrics` answer of one process: its lines, up to the empty line that ends it.
pub fn fetch(socket: &Path) -> Result<String, String> {
    let s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    // A stopped process must not hold the whole scrape past Prometheus's timeout (10 s).
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    super::send_all(&s, b"metrics\n").map_err(|e| format!("{}: {e}", socket.display()))?;
    let mut text = String::new();
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return Err(format!("{}: the answer stopped short", socket.display())),
            Ok(_) if line == "\n" => return Ok(text),
            Ok(_) if line.starts_with("{\"ok\":false") => {
                return Err(format!("{}: {}", socket.display(), line.trim()))
            }
            Ok(_) => text += &line,
            Err(e) => return Err(format!("{}: {e}", socket.display())),
        }
    }
}

/// Families in order of first appearance: name -> (HELP line, TYPE line, samples).
#[derive(Default)]
pub struct Families {
    order: Vec<String>,
    by_name: HashMap<String, (String, String, Vec<String>)>,
}

impl Families {
    /// Add one process's exposition, each sample labelled with `extra` (`pid="1",comm="x"`).
    pub fn add(&mut self, text: &str, extra: &str) {
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
            if line.is_empty() || line.starts_with('#') {
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

/// One scrape: every reachable process of this user.
pub fn scrape(sockets: &[(i32, std::path::PathBuf)]) -> String {
    let mut families = Families::default();
    let mut targets = 0;
    for (pid, socket) in sockets {
        match fetch(socket) {
            Ok(text) => {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let extra = format!(
                    "pid=\"{pid}\",comm=\"{}\"",
                    comm.trim_end().replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
                );
                families.add(&text, &extra);
                targets += 1;
            }
            Err(_) => {
                // A process that exited between the listing and the request is not an error.
                if Path::new(&format!("/proc/{pid}")).exists() {
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

/// Serve `GET /metrics` on `listen` until killed.
pub fn serve(
    listen: &str,
    sockets: impl Fn() -> Vec<(i32, std::path::PathBuf)>,
) -> Result<(), String> {
    let server =
        tiny_http::Server::http(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    eprintln!("uprobe exporter: serving http://{listen}/metrics");
    let text_type = "text/plain; version=0.0.4; charset=utf-8";
    let header = |v: &str| {
        tiny_http::Header::from_bytes(&b"Content-Type"[..], v.as_bytes()).expect("a valid header")
    };
    for request in server.incoming_requests() {
        let get = *request.method() == tiny_http::Method::Get;
        let path = request.url().split('?').next().unwrap_or_default().to_string();
        let response = match (get, path.as_str()) {
            (true, "/metrics") => {
                tiny_http::Response::from_string(scrape(&sockets())).with_header(header(text_type))
            }
            (true, "/") => tiny_http::Response::from_string(
                "<html><body><h1>uprobe exporter</h1><p><a href=\"/metrics\">/metrics</a>: the \
                 probes of every instrumented process of this user.</p></body></html>\n",
            )
            .with_header(header("text/html; charset=utf-8")),
            (true, _) => tiny_http::Response::from_string("not found\n").with_status_code(404),
            (false, _) => tiny_http::Response::from_string("only GET\n").with_status_code(405),
        };
        let _ = request.respond(response);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_merge_across_processes_with_their_labels() {
        let a = "# HELP x_total X.\n# TYPE x_total counter\nx_total{probe=\"1\"} 5\n# HELP y Y.\n# TYPE y gauge\ny 1\n";
        let b = "# HELP x_total X.\n# TYPE x_total counter\nx_total{probe=\"1\"} 7\n";
        let mut f = Families::default();
        f.add(a, "pid=\"1\",comm=\"a\"");
        f.add(b, "pid=\"2\",comm=\"b\"");
        assert_eq!(
            f.render(),
            "# HELP x_total X.\n# TYPE x_total counter\nx_total{pid=\"1\",comm=\"a\",probe=\"1\"} 5\n\
             x_total{pid=\"2\",comm=\"b\",probe=\"1\"} 7\n# HELP y Y.\n# TYPE y gauge\n\
             y{pid=\"1\",comm=\"a\"} 1\n"
        );
    }
}
