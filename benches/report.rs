//! What the bench reports: one measurement (`Sample`), medians over repetitions, the agent/raw ratios, the
//! table on stdout, the JSON for machines and the SVG chart of throughput and latency per row and mode. Pure
//! formatting and arithmetic: no I/O besides the writers it is handed.

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use std::fmt::Write as _;

/// One repetition of one row in one mode.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub tasks: usize,
    pub secs: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Agent mode only: CPU seconds (user+system, all agent processes) per 1,000 tasks.
    pub cpu_per_1k: Option<f64>,
    /// Agent mode only: the largest VmHWM among the agent processes, MiB.
    pub peak_rss_mib: Option<f64>,
    /// Agent mode only: sum of VmHWM over the agent processes, MiB.
    pub total_rss_mib: Option<f64>,
    pub duplicates: u64,
}

impl Sample {
    pub fn from_hist(tasks: usize, secs: f64, h: &Histogram<u64>, duplicates: u64) -> Sample {
        let ms = |us: u64| us as f64 / 1000.0;
        Sample {
            tasks,
            secs,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            duplicates,
            ..Sample::default()
        }
    }

    pub fn tasks_per_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.tasks as f64 / self.secs
        } else {
            0.0
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "tasks": self.tasks, "secs": round(self.secs), "tasks_per_s": round(self.tasks_per_s()),
            "p50_ms": round(self.p50_ms), "p90_ms": round(self.p90_ms), "p99_ms": round(self.p99_ms),
            "max_ms": round(self.max_ms), "cpu_s_per_1k_tasks": self.cpu_per_1k.map(round),
            "peak_rss_mib": self.peak_rss_mib.map(round), "total_rss_mib": self.total_rss_mib.map(round),
            "duplicates": self.duplicates,
        })
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Medians over repetitions, metric by metric.
#[derive(Clone, Debug, Default)]
pub struct Medians {
    pub tasks_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub cpu_per_1k: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    pub total_rss_mib: Option<f64>,
}

impl Medians {
    pub fn of(samples: &[Sample]) -> Medians {
        let m = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        let opt = |f: &dyn Fn(&Sample) -> Option<f64>| {
            let v: Vec<f64> = samples.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| median(v))
        };
        Medians {
            tasks_per_s: m(&|s| s.tasks_per_s()),
            p50_ms: m(&|s| s.p50_ms),
            p90_ms: m(&|s| s.p90_ms),
            p99_ms: m(&|s| s.p99_ms),
            max_ms: m(&|s| s.max_ms),
            cpu_per_1k: opt(&|s| s.cpu_per_1k),
            peak_rss_mib: opt(&|s| s.peak_rss_mib),
            total_rss_mib: opt(&|s| s.total_rss_mib),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "tasks_per_s": round(self.tasks_per_s), "p50_ms": round(self.p50_ms), "p90_ms": round(self.p90_ms),
            "p99_ms": round(self.p99_ms), "max_ms": round(self.max_ms),
            "cpu_s_per_1k_tasks": self.cpu_per_1k.map(round), "peak_rss_mib": self.peak_rss_mib.map(round),
            "total_rss_mib": self.total_rss_mib.map(round),
        })
    }
}

/// One row of the matrix with every repetition of every mode it runs.
#[derive(Clone, Debug)]
pub struct Row {
    pub payload: usize,
    /// `None` = full blast, else tasks/s in total.
    pub rate: Option<f64>,
    pub endpoints: usize,
    /// Whether the row also runs the Python function as a pool and as a command.
    pub python: bool,
    /// Whether the row also runs `echo` through the service library's calls.
    pub library: bool,
    /// Whether the endpoint's tasks queue is a quorum queue (single active consumer) instead of a classic one.
    pub quorum: bool,
    /// Whether the row ran beside a process keeping one core busy (`--busy`), raw and agent alike.
    pub busy: bool,
    pub raw: Vec<Sample>,
    /// The agent running the built-in `echo`.
    pub agent: Vec<Sample>,
    /// The agent running a Python function that returns its payload on a pool of workers.
    pub pool: Vec<Sample>,
    /// The same Python function as a command (a process per task).
    pub command: Vec<Sample>,
    /// `echo` through `service_setup::Client::call` (submit and wait for that task's result).
    pub call: Vec<Sample>,
}

pub fn payload_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{}KiB", bytes / 1024)
    } else {
        format!("{bytes}B")
    }
}

impl Row {
    pub fn new(payload: usize, rate: Option<f64>, endpoints: usize) -> Row {
        Row {
            payload,
            rate,
            endpoints,
            python: false,
            library: false,
            quorum: false,
            busy: false,
            raw: vec![],
            agent: vec![],
            pool: vec![],
            command: vec![],
            call: vec![],
        }
    }

    pub fn pattern(&self) -> String {
        match self.rate {
            None => "blast".into(),
            Some(r) => format!("{r}/s"),
        }
    }

    pub fn label(&self) -> String {
        format!(
            "{} {} ep={}{}{}",
            payload_label(self.payload),
            self.pattern(),
            self.endpoints,
            if self.quorum { " quorum" } else { "" },
            if self.busy { " busy" } else { "" }
        )
    }

    pub fn to_json(&self) -> Value {
        let (raw, agent) = (Medians::of(&self.raw), Medians::of(&self.agent));
        let mode = |samples: &[Sample]| json!({"median": Medians::of(samples).to_json(), "reps": samples.iter().map(Sample::to_json).collect::<Vec<_>>()});
        let mut doc = json!({
            "payload_bytes": self.payload, "pattern": self.pattern(), "rate_per_s": self.rate,
            "endpoints": self.endpoints,
            "tasks_queue": if self.quorum { "quorum" } else { "classic" },
            "busy": self.busy,
            "raw": mode(&self.raw),
            "agent": mode(&self.agent),
            "agent_over_raw": {
                "tasks_per_s": round(agent.tasks_per_s / raw.tasks_per_s),
                "p50_ms_delta": round(agent.p50_ms - raw.p50_ms),
                "p99_ms_delta": round(agent.p99_ms - raw.p99_ms),
            },
        });
        if self.python {
            let (pool, command) = (Medians::of(&self.pool), Medians::of(&self.command));
            doc["python_pool"] = mode(&self.pool);
            doc["python_command"] = mode(&self.command);
            doc["pool_over_echo"] = json!({
                "tasks_per_s": round(pool.tasks_per_s / agent.tasks_per_s),
                "p50_ms_delta": round(pool.p50_ms - agent.p50_ms),
            });
            doc["pool_over_command_tasks_per_s"] =
                json!(round(pool.tasks_per_s / command.tasks_per_s));
        }
        if self.library {
            let call = Medians::of(&self.call);
            doc["library_call"] = mode(&self.call);
            doc["call_over_agent"] = json!({
                "tasks_per_s": round(call.tasks_per_s / agent.tasks_per_s),
                "p50": round(call.p50_ms / agent.p50_ms),
                "p50_ms_delta": round(call.p50_ms - agent.p50_ms),
            });
        }
        doc
    }
}

/// The table printed at the end: one line per row and mode, medians over repetitions. The ratio is to raw for
/// `agent` (echo), to `agent` for `pool` and `call`, and the pool's to the command's for `cmd`.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<22} {:<5} {:>4} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "row",
        "mode",
        "reps",
        "tasks/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "cpu/1k",
        "rss MiB",
        "sum rss",
        "ratio"
    );
    for r in rows {
        let (raw, agent) = (Medians::of(&r.raw), Medians::of(&r.agent));
        let (pool, command) = (Medians::of(&r.pool), Medians::of(&r.command));
        let call = Medians::of(&r.call);
        let mut modes = vec![
            ("raw", &raw, r.raw.len(), String::new()),
            (
                "agent",
                &agent,
                r.agent.len(),
                format!("{:.3}", agent.tasks_per_s / raw.tasks_per_s),
            ),
        ];
        if r.python {
            modes.push((
                "pool",
                &pool,
                r.pool.len(),
                format!("{:.3}", pool.tasks_per_s / agent.tasks_per_s),
            ));
            modes.push((
                "cmd",
                &command,
                r.command.len(),
                format!("1/{:.1}", pool.tasks_per_s / command.tasks_per_s),
            ));
        }
        if r.library {
            modes.push((
                "call",
                &call,
                r.call.len(),
                format!("{:.3}", call.tasks_per_s / agent.tasks_per_s),
            ));
        }
        for (mode, m, n, ratio) in modes {
            let opt = |x: Option<f64>, p: usize| x.map_or("-".to_owned(), |v| format!("{v:.p$}"));
            let _ = writeln!(
                out,
                "{:<22} {:<5} {:>4} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>8} {:>8} {:>8} {:>8}",
                r.label(),
                mode,
                n,
                m.tasks_per_s,
                m.p50_ms,
                m.p90_ms,
                m.p99_ms,
                m.max_ms,
                opt(m.cpu_per_1k, 3),
                opt(m.peak_rss_mib, 1),
                opt(m.total_rss_mib, 0),
                ratio
            );
        }
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A two-panel SVG: median tasks/s per row (raw vs agent bars), and median p50 and p99 latency per row (log
/// scale), with the agent/raw ratio written over each throughput pair.
pub fn svg(rows: &[Row], title: &str) -> String {
    let (w, panel_h, left, top) = (1100.0, 300.0, 70.0, 50.0);
    let n = rows.len().max(1) as f64;
    let plot_w = w - left - 20.0;
    let slot = plot_w / n;
    let h = top + 2.0 * panel_h + 170.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="{left}" y="22" font-size="15">{}</text>"#,
        esc(title)
    );
    let (raw_c, agent_c) = ("#4e79a7", "#f28e2b");
    let _ = write!(
        s,
        r#"<rect x="{}" y="30" width="10" height="10" fill="{raw_c}"/><text x="{}" y="39">raw broker</text><rect x="{}" y="30" width="10" height="10" fill="{agent_c}"/><text x="{}" y="39">endpoint-agent</text>"#,
        w - 260.0,
        w - 245.0,
        w - 160.0,
        w - 145.0
    );
    // Panel 1: throughput.
    let meds: Vec<(Medians, Medians)> = rows
        .iter()
        .map(|r| (Medians::of(&r.raw), Medians::of(&r.agent)))
        .collect();
    let max_tp = meds
        .iter()
        .flat_map(|(r, a)| [r.tasks_per_s, a.tasks_per_s])
        .filter(|x| x.is_finite())
        .fold(1.0, f64::max)
        * 1.1;
    let y0 = top + panel_h;
    axis(&mut s, left, top, plot_w, panel_h, "tasks/s (median)");
    for i in 0..=4 {
        let v = max_tp * f64::from(i) / 4.0;
        let y = y0 - panel_h * f64::from(i) / 4.0;
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{:.0}</text>"#,
            left - 4.0,
            y + 4.0,
            v
        );
    }
    for (i, (raw, agent)) in meds.iter().enumerate() {
        let x = left + slot * i as f64;
        let bw = slot * 0.35;
        for (j, (v, c)) in [(raw.tasks_per_s, raw_c), (agent.tasks_per_s, agent_c)]
            .iter()
            .enumerate()
        {
            let v = if v.is_finite() { *v } else { 0.0 };
            let bh = panel_h * v / max_tp;
            let _ = write!(
                s,
                r#"<rect x="{:.1}" y="{:.1}" width="{bw:.1}" height="{bh:.1}" fill="{c}"/>"#,
                x + slot * 0.12 + bw * j as f64,
                y0 - bh
            );
        }
        let ratio = agent.tasks_per_s / raw.tasks_per_s;
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{ratio:.2}x</text>"#,
            x + slot / 2.0,
            y0 - panel_h * raw.tasks_per_s.max(agent.tasks_per_s).max(0.0) / max_tp - 4.0
        );
    }
    // Panel 2: latency, log scale from 0.1 ms.
    let top2 = y0 + 60.0;
    let y02 = top2 + panel_h;
    let max_lat = meds
        .iter()
        .flat_map(|(r, a)| [r.p99_ms, a.p99_ms])
        .filter(|x| x.is_finite())
        .fold(1.0, f64::max);
    let (lo, hi) = (0.1f64.log10(), (max_lat * 1.5).log10().ceil());
    let ly = |ms: f64| y02 - panel_h * ((ms.max(0.1).log10() - lo) / (hi - lo));
    axis(
        &mut s,
        left,
        top2,
        plot_w,
        panel_h,
        "latency ms (median p50 bar, p99 tick), log scale",
    );
    let mut decade = lo;
    while decade <= hi + 1e-9 {
        let v = 10f64.powf(decade);
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v}</text>"##,
            left + plot_w,
            left - 4.0,
            ly(v) + 4.0,
            y = ly(v)
        );
        decade += 1.0;
    }
    for (i, (raw, agent)) in meds.iter().enumerate() {
        let x = left + slot * i as f64;
        let bw = slot * 0.35;
        for (j, (m, c)) in [(raw, raw_c), (agent, agent_c)].iter().enumerate() {
            let bx = x + slot * 0.12 + bw * j as f64;
            let y50 = ly(m.p50_ms);
            let _ = write!(
                s,
                r#"<rect x="{bx:.1}" y="{y50:.1}" width="{bw:.1}" height="{:.1}" fill="{c}"/>"#,
                (y02 - y50).max(0.0)
            );
            let y99 = ly(m.p99_ms);
            let _ = write!(
                s,
                r#"<line x1="{bx:.1}" x2="{:.1}" y1="{y99:.1}" y2="{y99:.1}" stroke="black" stroke-width="2"/><line x1="{:.1}" x2="{:.1}" y1="{y50:.1}" y2="{y99:.1}" stroke="black"/>"#,
                bx + bw,
                bx + bw / 2.0,
                bx + bw / 2.0
            );
        }
    }
    // Row labels under the second panel, rotated.
    for (i, r) in rows.iter().enumerate() {
        let x = left + slot * i as f64 + slot / 2.0;
        let _ = write!(
            s,
            r#"<text transform="translate({x:.1},{:.1}) rotate(-40)" text-anchor="end">{}</text>"#,
            y02 + 14.0,
            esc(&r.label())
        );
    }
    s.push_str("</svg>\n");
    s
}

fn axis(s: &mut String, left: f64, top: f64, w: f64, h: f64, label: &str) {
    let _ = write!(
        s,
        r#"<line x1="{left}" x2="{left}" y1="{top}" y2="{}" stroke="black"/><line x1="{left}" x2="{}" y1="{}" y2="{}" stroke="black"/><text x="{left}" y="{}" font-size="12">{}</text>"#,
        top + h,
        left + w,
        top + h,
        top + h,
        top - 6.0,
        esc(label)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn labels() {
        assert_eq!(payload_label(100), "100B");
        assert_eq!(payload_label(4096), "4KiB");
        assert_eq!(payload_label(65536), "64KiB");
    }
}
