//! The status page (`/`), in the spirit of Sidekiq's web UI: the endpoint, its state and link, the counts, a
//! throughput chart (inline SVG), the pool workers and the recent failures, rendered on the server from the
//! same [`Snapshot`] `/api/status` returns. One self-contained document: inline CSS, and a few lines of inline
//! JS that fetch the page again every 2 s and swap its `#main` in (parsed by `DOMParser`, which runs no
//! scripts), so there is one renderer and no external asset. Everything that comes from tasks or the database
//! is HTML-escaped here.

use super::snapshot::{Rate, Snapshot};
use std::fmt::Write;

/// Escapes text for HTML element content and quoted attribute values.
pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// At most `max` characters of `text` on one line (control characters and runs of white space become one
/// space), with an ellipsis when cut.
fn one_line(text: &str, max: usize) -> String {
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect();
    let joined = words.join(" ");
    if joined.chars().count() <= max {
        return joined;
    }
    let mut cut: String = joined.chars().take(max).collect();
    cut.push('…');
    cut
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f4f5f7;color:#222}
header{background:#8b1d1d;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}
header .ep{font-family:ui-monospace,monospace}
main{padding:16px 24px;max-width:1200px}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;font-weight:600;font-size:12px;text-transform:uppercase}
.ok{background:#d5f5dd;color:#176b2c}.warn{background:#fff0c2;color:#7a5a00}.bad{background:#ffd9d9;color:#9b1c1c}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{background:#fff;border-radius:6px;padding:10px 16px;min-width:120px;box-shadow:0 1px 2px #0002}
.card .n{font-size:26px;font-weight:600}.card .l{color:#666;font-size:12px;text-transform:uppercase}
section{background:#fff;border-radius:6px;padding:12px 16px;margin:12px 0;box-shadow:0 1px 2px #0002}
h2{font-size:15px;margin:0 0 8px}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eee;vertical-align:top}
th{color:#666;font-weight:600;font-size:12px;text-transform:uppercase}
td.mono,span.mono{font-family:ui-monospace,monospace;font-size:12px}td.mono{white-space:nowrap}
td.err{font-family:ui-monospace,monospace;font-size:12px;color:#9b1c1c;word-break:break-all}
.muted{color:#777}.line{margin:4px 0}
footer{padding:8px 24px;color:#777;font-size:12px}footer a{color:#8b1d1d}
#offline{background:#9b1c1c;color:#fff;padding:6px 24px}
";

/// Fetches the page every 2 s and swaps the new `#main` in; shows a banner while the agent does not answer.
const SCRIPT: &str = "
setInterval(async () => {
  try {
    const r = await fetch(location.pathname, {cache: 'no-store'});
    if (!r.ok) throw new Error('HTTP ' + r.status);
    const next = new DOMParser().parseFromString(await r.text(), 'text/html').getElementById('main');
    if (next) document.getElementById('main').replaceWith(next);
    document.getElementById('offline').hidden = true;
  } catch (e) {
    document.getElementById('offline').hidden = false;
  }
}, 2000);
";

/// The whole page.
pub(super) fn render(s: &Snapshot) -> String {
    let mut html = String::with_capacity(16 * 1024);
    let ep = escape(&s.endpoint_id);
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>endpoint-agent {ep}</title><style>{STYLE}</style></head><body>\
         <header><h1>endpoint-agent</h1><span class=\"ep\">{ep}</span><span>v{}</span></header>\
         <div id=\"offline\" hidden>the agent does not answer: showing the last status it gave</div>",
        escape(s.agent_version)
    );
    render_main(&mut html, s);
    let _ = writeln!(
        html,
        "<footer>refreshes every 2 s · <a href=\"/api/status\">/api/status</a> · \
         <a href=\"/metrics\">/metrics</a> · <a href=\"/healthz\">/healthz</a> · \
         <a href=\"/readyz\">/readyz</a></footer><script>{SCRIPT}</script></body></html>"
    );
    html
}

fn state_class(state: &str, ready: bool) -> &'static str {
    match state {
        "running" | "standby" if ready => "ok",
        "disk_full" | "blocked" | "stopped" => "bad",
        _ if ready => "ok",
        _ => "warn",
    }
}

fn render_main(html: &mut String, s: &Snapshot) {
    let _ = write!(
        html,
        "<main id=\"main\"><div class=\"line\">state <span id=\"state\" class=\"badge {}\">{}</span> \
         <span id=\"ready\" data-ready=\"{}\">{}: {}</span></div>",
        state_class(&s.state, s.ready),
        escape(&s.state),
        s.ready,
        if s.ready { "ready" } else { "not ready" },
        escape(&s.ready_reason)
    );
    let link = s.link.as_deref().unwrap_or("not recorded yet");
    let _ = write!(
        html,
        "<div class=\"line\">broker link: <span id=\"link\">{}</span> · node: <span id=\"node\">{}</span> · reconnects: <span id=\"reconnects\">{}</span></div>",
        escape(link),
        escape(s.node.as_deref().unwrap_or("none yet")),
        s.reconnects
    );
    if let Some(b) = &s.publishing_blocked {
        let _ = write!(
            html,
            "<div class=\"line\"><span class=\"badge bad\">publishing blocked</span> {}</div>",
            escape(b)
        );
    }
    if let Some(d) = &s.disk_full {
        let _ = write!(
            html,
            "<div class=\"line\"><span class=\"badge bad\">disk full</span> {}</div>",
            escape(d)
        );
    }
    if let Some(e) = &s.store_error {
        let _ = write!(
            html,
            "<div class=\"line\"><span class=\"badge bad\">database</span> {}</div>",
            escape(e)
        );
    }
    html.push_str("<div class=\"cards\">");
    for (id, label, n) in [
        ("tasks_queued", "queued", s.tasks_queued.to_string()),
        ("tasks_running", "running", s.tasks_running.to_string()),
        ("tasks_done", "done", s.tasks_done.to_string()),
        (
            "results_pending",
            "results pending",
            s.results_pending.to_string(),
        ),
        (
            "slots_busy",
            "slots busy",
            format!("{}/{}", s.slots_busy, s.slots),
        ),
    ] {
        let _ = write!(
            html,
            "<div class=\"card\"><div class=\"n\" id=\"{id}\">{n}</div><div class=\"l\">{label}</div></div>"
        );
    }
    html.push_str("</div>");
    render_chart(html, &s.throughput.points, s.throughput.every_secs);
    render_workers(html, s);
    render_failures(html, s);
    let _ = write!(
        html,
        "<div class=\"muted\">as of <span id=\"time\">{}</span></div></main>",
        escape(&s.time)
    );
}

/// Received and finished tasks per second, one point per sample, as an inline SVG.
fn render_chart(html: &mut String, points: &[Rate], every_secs: u64) {
    const W: f64 = 1000.0;
    const H: f64 = 160.0;
    const PAD: f64 = 24.0;
    let max = points
        .iter()
        .flat_map(|p| [p.received_per_sec, p.finished_per_sec])
        .fold(0.0_f64, f64::max);
    let top = nice_ceiling(max);
    let _ = write!(
        html,
        "<section><h2>throughput (tasks/s, every {every_secs} s, last {})</h2>\
         <svg id=\"throughput\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" style=\"max-width:100%;height:auto\" \
         role=\"img\" aria-label=\"throughput\">\
         <line x1=\"{PAD}\" y1=\"{PAD}\" x2=\"{W}\" y2=\"{PAD}\" stroke=\"#eee\"/>\
         <line x1=\"{PAD}\" y1=\"{y0}\" x2=\"{W}\" y2=\"{y0}\" stroke=\"#ccc\"/>\
         <text x=\"2\" y=\"{ty}\" font-size=\"11\" fill=\"#777\">{top}</text>\
         <text x=\"2\" y=\"{y0}\" font-size=\"11\" fill=\"#777\">0</text>",
        window(points.len() as u64 * every_secs),
        y0 = H - PAD,
        ty = PAD + 4.0,
    );
    if points.len() < 2 {
        let _ = write!(
            html,
            "<text x=\"{}\" y=\"{}\" font-size=\"13\" fill=\"#999\" text-anchor=\"middle\">collecting samples…</text>",
            W / 2.0,
            H / 2.0
        );
    } else {
        let step = (W - PAD) / (points.len() - 1) as f64;
        let y = |v: f64| H - PAD - v / top * (H - 2.0 * PAD);
        for (pick, color, dash) in [(0, "#3b6fb6", "4 3"), (1, "#8b1d1d", "none")] {
            let coords: Vec<String> = points
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let v = if pick == 0 {
                        p.received_per_sec
                    } else {
                        p.finished_per_sec
                    };
                    format!("{:.1},{:.1}", PAD + i as f64 * step, y(v))
                })
                .collect();
            let _ = write!(
                html,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\" points=\"{}\"/>",
                coords.join(" ")
            );
        }
    }
    let last = points.last();
    let _ = write!(
        html,
        "</svg><div class=\"muted\"><span style=\"color:#8b1d1d\">━ finished</span> \
         <span id=\"finished_per_sec\">{}</span>/s · <span style=\"color:#3b6fb6\">┅ received</span> \
         <span id=\"received_per_sec\">{}</span>/s (latest)</div></section>",
        last.map_or(0.0, |p| p.finished_per_sec),
        last.map_or(0.0, |p| p.received_per_sec)
    );
}

/// The span the chart covers: seconds under two minutes, else whole minutes.
fn window(secs: u64) -> String {
    if secs < 120 {
        format!("{secs} s")
    } else {
        format!("{} min", secs / 60)
    }
}

/// 1, 2 or 5 times a power of ten, at least `v` (and at least 1).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 1.0 {
        return 1.0;
    }
    let mut p = 1.0;
    while p * 10.0 < v {
        p *= 10.0;
    }
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

fn render_workers(html: &mut String, s: &Snapshot) {
    if s.workers.is_empty() {
        return;
    }
    html.push_str(
        "<section><h2>pool workers</h2><table id=\"workers\"><tr><th>function</th><th>idle</th>\
         <th>busy</th><th>starting</th><th>failing</th><th>external</th></tr>",
    );
    for (function, w) in &s.workers {
        let failing = if w.failing > 0 { " class=\"err\"" } else { "" };
        let _ = write!(
            html,
            "<tr><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td>{}</td><td{failing}>{}</td><td>{}</td></tr>",
            escape(function),
            w.idle,
            w.busy,
            w.starting,
            w.failing,
            w.external
        );
    }
    html.push_str("</table></section>");
}

fn render_failures(html: &mut String, s: &Snapshot) {
    let _ = write!(
        html,
        "<section><h2>recent failures ({})</h2>",
        s.recent_failures.len()
    );
    if s.recent_failures.is_empty() {
        html.push_str("<div class=\"muted\" id=\"failures\">none</div></section>");
        return;
    }
    html.push_str(
        "<table id=\"failures\"><tr><th>time</th><th>task id</th><th>function</th><th>status</th>\
         <th>error</th></tr>",
    );
    for f in &s.recent_failures {
        let class = if f.status == "rejected" {
            "warn"
        } else {
            "bad"
        };
        let _ = write!(
            html,
            "<tr><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td>\
             <td><span class=\"badge {class}\">{}</span></td><td class=\"err\">{}</td></tr>",
            escape(&f.time),
            escape(&f.task_id),
            escape(&f.function),
            escape(&f.status),
            escape(&one_line(&f.error, 160))
        );
    }
    html.push_str("</table></section>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::snapshot::{Failure, Throughput};

    fn snapshot() -> Snapshot {
        Snapshot {
            endpoint_id: "ep".into(),
            agent_version: "0.1.0",
            state: "running".into(),
            ready: true,
            ready_reason: "consuming".into(),
            broker_connected: true,
            link: Some("connected since T".into()),
            node: Some("amqp://u:***@h:5672/%2f".into()),
            reconnects: 2,
            publishing_blocked: None,
            disk_full: None,
            tasks_queued: 7,
            tasks_running: 1,
            tasks_done: 42,
            results_pending: 3,
            slots: 4,
            slots_busy: 1,
            throughput: Throughput::default(),
            recent_failures: vec![Failure {
                task_id: "<script>alert(1)</script>".into(),
                function: "f\"x".into(),
                status: "failed".into(),
                time: "T".into(),
                error: "bad & <b>worse</b>\nsecond line".into(),
            }],
            workers: Default::default(),
            store_error: None,
            time: "T".into(),
        }
    }

    #[test]
    fn task_text_is_escaped_and_counts_shown() {
        let html = render(&snapshot());
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("f&quot;x"));
        assert!(html.contains("bad &amp; &lt;b&gt;worse&lt;/b&gt; second line"));
        for (id, n) in [
            ("tasks_queued", "7"),
            ("tasks_done", "42"),
            ("results_pending", "3"),
        ] {
            assert!(html.contains(&format!("id=\"{id}\">{n}<")), "{id}");
        }
        // Exactly one script: the page's own.
        assert_eq!(html.matches("<script>").count(), 1);
    }

    #[test]
    fn helpers() {
        assert_eq!(one_line("a \n\t b", 10), "a b");
        assert_eq!(one_line("abcdef", 3), "abc…");
        assert_eq!(nice_ceiling(0.3), 1.0);
        assert_eq!(nice_ceiling(13.0), 20.0);
        assert_eq!(nice_ceiling(4500.0), 5000.0);
        assert_eq!(nice_ceiling(100.0), 100.0);
        assert_eq!(window(0), "0 s");
        assert_eq!(window(45), "45 s");
        assert_eq!(window(600), "10 min");
    }
}
