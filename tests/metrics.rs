//! Prometheus metrics: the socket's `metrics` answer, checked by promtool (Debian's `prometheus`
//! package, which `.ci/run` installs), and a real Prometheus server scraping `uprobe exporter`.

mod common;
use common::served::Served;
use common::*;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn uprobe() -> Command {
    lib();
    Command::new(env!("CARGO_BIN_EXE_uprobe"))
}

/// `uprobe ctl --socket S metrics`: the exposition text.
fn metrics(s: &Served) -> String {
    let out = uprobe().args(["ctl", "--socket"]).arg(&s.socket).arg("metrics").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Samples: `name{labels}` -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

/// promtool's verdict on an exposition; the test fails (not skips) without promtool.
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's `prometheus` package; .ci/run installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "promtool: {said}\n{text}");
}

/// 1,000 calls under an entry probe, a return probe and a probe whose spec holds `"` and `\`:
/// exact counters, the label values escaped, the histogram cumulative with `+Inf` = `_count` =
/// calls, and promtool accepts it all.
#[test]
fn the_socket_answers_metrics_that_promtool_accepts() {
    let mut s = Served::start();
    let specs = [r#"serve:target%return"#, r#"serve:targe[t"\]"#];
    for spec in specs {
        assert_eq!(s.req(&format!("add {spec}"))["ok"], true, "{spec}");
    }
    assert_eq!(s.tell("call 1000"), "done 1000");
    let text = metrics(&s);
    promtool_check(&text);
    let v = samples(&text);
    let object = std::fs::canonicalize(fixture("serve")).unwrap();
    let labels = |id: u32, spec: &str| {
        format!(r#"probe="{id}",spec="{spec}",symbol="target",object="{}""#, object.display())
    };
    let ret = labels(1, "serve:target%return");
    let odd = labels(2, r#"serve:targe[t\"\\]"#);
    assert_eq!(v[&format!("uprobe_hits_total{{{ret}}}")], 1000.0, "{text}");
    assert_eq!(v[&format!("uprobe_hits_total{{{odd}}}")], 1000.0, "{text}");
    assert_eq!(v[&format!("uprobe_missed_total{{{ret}}}")], 0.0);
    assert_eq!(v["uprobe_events_lost_total"], 0.0);
    assert_eq!(v[&format!("uprobe_duration_seconds_count{{{ret}}}")], 1000.0);
    assert_eq!(v[&format!("uprobe_duration_seconds_bucket{{{ret},le=\"+Inf\"}}")], 1000.0);
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("uprobe_duration_seconds_bucket"))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
        .collect();
    assert!(buckets.len() > 10 && buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert!(v[&format!("uprobe_duration_seconds_sum{{{ret}}}")] > 0.0);
    s.quit();
}

/// A child process that is killed when dropped.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET `path` from 127.0.0.1:`port`: (status line, body).
fn get(port: u16, path: &str) -> Option<(String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

/// A real Prometheus scrapes `uprobe exporter`, and its query API returns the count the fixture
/// made, labelled with the fixture's pid.
#[test]
fn a_real_prometheus_scrapes_the_exporter() {
    let mut s = Served::start();
    assert_eq!(s.req("add serve:target")["ok"], true);
    let pid = s.child.id();
    let exporter_port = free_port();
    let _exporter = Killed(
        uprobe()
            .args(["exporter", "--listen", &format!("127.0.0.1:{exporter_port}")])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The exporter's own page, and what it serves: every series labelled with pid and comm.
    let start = Instant::now();
    let page = loop {
        if let Some((status, body)) = get(exporter_port, "/metrics") {
            break (status, body);
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the exporter does not answer");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(page.0.contains("200"), "{}", page.0);
    promtool_check(&page.1);
    assert!(page.1.contains(&format!("pid=\"{pid}\",comm=\"serve\",probe=\"1\"")), "{}", page.1);
    assert!(get(exporter_port, "/nothing").unwrap().0.contains("404"));

    assert_eq!(s.tell("call 4321"), "done 4321");
    let dir = scratch("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: uprobe\n    \
             static_configs:\n      - targets: ['127.0.0.1:{exporter_port}']\n"
        ),
    )
    .unwrap();
    let prom_port = free_port();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian's `prometheus` package; .ci/run installs it)"),
    );
    let query = format!("/api/v1/query?query=uprobe_hits_total%7Bpid%3D%22{pid}%22%7D");
    let start = Instant::now();
    let value = loop {
        let answer = get(prom_port, &query)
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok());
        let value = answer.as_ref().and_then(|a| {
            let r = &a["data"]["result"][0];
            assert!(r.is_null() || r["metric"]["comm"] == "serve", "{a}");
            r["value"][1].as_str().map(str::to_string)
        });
        if let Some(v) = value {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "Prometheus never had the series");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(value, "4321");
    s.quit();
    let _ = std::fs::remove_dir_all(&dir);
}
