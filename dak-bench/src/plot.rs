//! The plots a run leaves behind, as SVG written by hand (no plotting crate):
//! the latency percentiles of every second of the run, and a histogram of all
//! latencies with the percentiles marked.

use std::fmt::{self, Write};

use hdrhistogram::Histogram;

use crate::measure::{quantile_ms, Latency};
use crate::{BenchArgs, Report};

/// The percentiles plotted: quantile, name, colour.
const PERCENTILES: [(f64, &str, &str); 3] = [
    (0.5, "p50", "#1f77b4"),
    (0.99, "p99", "#ff7f0e"),
    (0.999, "p99.9", "#d62728"),
];

/// Bars in the histogram plot.
const BUCKETS: usize = 40;

/// The picture, and the plot area inside it, in pixels.
const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 450.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 780.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 390.0;

/// Writes the run's two plots of `latency` into `--plot-dir` (unless
/// `--no-plot`, or nothing was recorded) and lists them in `report.plots`.
/// What cannot be written goes to `report.errors`; the run carries on.
pub(crate) fn write(report: &mut Report, args: &BenchArgs, run: &str, latency: &Latency) {
    if args.no_plot {
        return;
    }
    let all = latency.merged();
    if all.is_empty() {
        return;
    }
    let title = format!(
        "dak bench {}, run {run}: {} latency",
        report.scenario,
        report.latency.as_deref().unwrap_or("message")
    );
    let marks = PERCENTILES.map(|(q, ..)| quantile_ms(&all, q));
    let plots = [
        (
            "latency",
            latency_svg(
                &title,
                &percentiles(&latency.per_second()),
                report.duration_s,
            ),
        ),
        (
            "histogram",
            histogram_svg(&title, &buckets(&all, BUCKETS), marks),
        ),
    ];
    if let Err(e) = std::fs::create_dir_all(&args.plot_dir) {
        report
            .errors
            .push(format!("plots: creating {}: {e}", args.plot_dir.display()));
        return;
    }
    for (kind, svg) in plots {
        let path = args
            .plot_dir
            .join(format!("dak-bench-{}-{run}-{kind}.svg", report.scenario));
        match std::fs::write(&path, svg) {
            Ok(()) => report.plots.push(path.display().to_string()),
            Err(e) => report
                .errors
                .push(format!("plots: writing {}: {e}", path.display())),
        }
    }
}

/// p50, p99 and p99.9 (ms) of each second; `None` for a second without records.
pub(crate) fn percentiles(seconds: &[Histogram<u32>]) -> Vec<Option<[f64; 3]>> {
    seconds
        .iter()
        .map(|h| (!h.is_empty()).then(|| PERCENTILES.map(|(q, ..)| quantile_ms(h, q))))
        .collect()
}

/// One bar of the histogram: how many latencies fell in `[from_ms, to_ms)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Bucket {
    pub from_ms: f64,
    pub to_ms: f64,
    pub count: u64,
}

/// `n` log-spaced buckets from the smallest to the largest latency of `h`
/// (microseconds); the largest lands in the last bucket.
pub(crate) fn buckets(h: &Histogram<u64>, n: usize) -> Vec<Bucket> {
    if h.is_empty() || n == 0 {
        return Vec::new();
    }
    let (min, max) = (h.min().max(1) as f64, h.max().max(1) as f64);
    // One value only: a little room either side, so the scale is not empty.
    let (low, high) = if max > min {
        (min, max)
    } else {
        (min / 1.1, max * 1.1)
    };
    let span = (high / low).ln();
    let edge = |i: usize| low * (span * i as f64 / n as f64).exp() / 1000.0;
    let mut buckets: Vec<Bucket> = (0..n)
        .map(|i| Bucket {
            from_ms: edge(i),
            to_ms: edge(i + 1),
            count: 0,
        })
        .collect();
    for value in h.iter_recorded() {
        // A negative position (below `low`) saturates to bucket 0.
        let position = (value.value_iterated_to() as f64 / low).ln() / span * n as f64;
        buckets[(position as usize).min(n - 1)].count += value.count_since_last_iteration();
    }
    buckets
}

/// The percentiles-over-time plot: `seconds[s]` are the percentiles of second
/// `s` (see [`percentiles`]); a dashed line marks the end of sending at
/// `sending_s`.
pub(crate) fn latency_svg(title: &str, seconds: &[Option<[f64; 3]>], sending_s: f64) -> String {
    let mut svg = String::new();
    draw_latency(&mut svg, title, seconds, sending_s).expect("formatting into a String");
    svg
}

fn draw_latency(
    svg: &mut String,
    title: &str,
    seconds: &[Option<[f64; 3]>],
    sending_s: f64,
) -> fmt::Result {
    let span = (seconds.len() as f64).max(sending_s.ceil()).max(1.0);
    let (x_step, x_top) = ticks(span, 1.0);
    let highest = seconds
        .iter()
        .flatten()
        .flatten()
        .fold(0.0_f64, |a, &b| a.max(b));
    let (y_step, y_top) = ticks(highest, 0.0);
    let x = |s: f64| LEFT + s / x_top * (RIGHT - LEFT);
    let y = |ms: f64| BOTTOM - ms / y_top * (BOTTOM - TOP);

    header(svg, title)?;
    let x_ticks: Vec<(f64, String)> = steps(x_step, x_top).map(|s| (x(s), number(s))).collect();
    let y_ticks: Vec<(f64, String)> = steps(y_step, y_top).map(|ms| (y(ms), number(ms))).collect();
    axes(
        svg,
        &x_ticks,
        &y_ticks,
        "seconds since sending began",
        "latency (ms)",
    )?;
    if sending_s > 0.0 && sending_s < x_top {
        let at = x(sending_s);
        writeln!(
            svg,
            r##"<line x1="{at:.1}" y1="{TOP}" x2="{at:.1}" y2="{BOTTOM}" stroke="#888" stroke-dasharray="4 4"/>"##
        )?;
        writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" fill="#888">sending ends</text>"##,
            at + 4.0,
            BOTTOM - 6.0
        )?;
    }
    for (i, (_, name, colour)) in PERCENTILES.iter().enumerate() {
        let mut points = String::new();
        for (s, second) in seconds.iter().enumerate() {
            if let Some(values) = second {
                if !points.is_empty() {
                    points.push(' ');
                }
                // Each second's value sits in the middle of that second.
                write!(points, "{:.1},{:.1}", x(s as f64 + 0.5), y(values[i]))?;
            }
        }
        writeln!(
            svg,
            r#"<polyline class="{name}" points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>"#
        )?;
    }
    // The legend, top left inside the plot area.
    for (i, (_, name, colour)) in PERCENTILES.iter().enumerate() {
        let row = TOP + 16.0 + 18.0 * i as f64;
        writeln!(
            svg,
            r#"<line x1="{:.1}" y1="{row:.1}" x2="{:.1}" y2="{row:.1}" stroke="{colour}" stroke-width="2"/>"#,
            LEFT + 12.0,
            LEFT + 36.0
        )?;
        writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{name}</text>"#,
            LEFT + 42.0,
            row + 4.0
        )?;
    }
    footer(svg)
}

/// The histogram plot: bars of `buckets` (see [`buckets`]) on a log latency
/// scale, and a vertical line at each of `marks` (p50, p99, p99.9 in ms).
pub(crate) fn histogram_svg(title: &str, buckets: &[Bucket], marks: [f64; 3]) -> String {
    let mut svg = String::new();
    draw_histogram(&mut svg, title, buckets, marks).expect("formatting into a String");
    svg
}

fn draw_histogram(
    svg: &mut String,
    title: &str,
    buckets: &[Bucket],
    marks: [f64; 3],
) -> fmt::Result {
    header(svg, title)?;
    let (Some(first), Some(last)) = (buckets.first(), buckets.last()) else {
        writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">no latencies recorded</text>"#,
            WIDTH / 2.0,
            HEIGHT / 2.0
        )?;
        return footer(svg);
    };
    let (low, high) = (first.from_ms, last.to_ms);
    let x = |ms: f64| LEFT + (ms.clamp(low, high) / low).ln() / (high / low).ln() * (RIGHT - LEFT);
    let most = buckets.iter().map(|b| b.count).max().unwrap_or(0);
    let (y_step, y_top) = ticks(most as f64, 1.0);
    let y = |count: f64| BOTTOM - count / y_top * (BOTTOM - TOP);

    let mut x_ticks: Vec<(f64, String)> = log_ticks(low, high)
        .into_iter()
        .map(|ms| (x(ms), number(ms)))
        .collect();
    if x_ticks.len() < 2 {
        x_ticks = vec![(x(low), number(low)), (x(high), number(high))];
    }
    let y_ticks: Vec<(f64, String)> = steps(y_step, y_top)
        .map(|count| (y(count), number(count)))
        .collect();
    axes(
        svg,
        &x_ticks,
        &y_ticks,
        "latency (ms, log scale)",
        "messages",
    )?;
    for bucket in buckets.iter().filter(|b| b.count > 0) {
        let (left, right) = (x(bucket.from_ms), x(bucket.to_ms));
        // At least a pixel tall, so that a few outliers still show.
        let top = y(bucket.count as f64).min(BOTTOM - 1.0);
        writeln!(
            svg,
            r##"<rect class="bar" x="{left:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="#9ecae1" stroke="#3182bd" stroke-width="0.5"><title>{} to {} ms: {}</title></rect>"##,
            (right - left).max(0.5),
            BOTTOM - top,
            number(bucket.from_ms),
            number(bucket.to_ms),
            bucket.count
        )?;
    }
    for (i, ((_, name, colour), ms)) in PERCENTILES.iter().zip(marks).enumerate() {
        let at = x(ms);
        writeln!(
            svg,
            r#"<line class="mark" x1="{at:.1}" y1="{TOP}" x2="{at:.1}" y2="{BOTTOM}" stroke="{colour}" stroke-width="1.5"/>"#
        )?;
        // Labels stacked, so that close marks stay readable; left of the
        // line near the right edge.
        let (label_x, anchor) = if at > RIGHT - 130.0 {
            (at - 4.0, "end")
        } else {
            (at + 4.0, "start")
        };
        writeln!(
            svg,
            r#"<text x="{label_x:.1}" y="{:.1}" text-anchor="{anchor}" fill="{colour}">{name} {} ms</text>"#,
            TOP + 14.0 + 16.0 * i as f64,
            number(ms)
        )?;
    }
    footer(svg)
}

fn header(svg: &mut String, title: &str) -> fmt::Result {
    writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    )?;
    writeln!(
        svg,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    )?;
    writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    )
}

fn footer(svg: &mut String) -> fmt::Result {
    writeln!(svg, "</svg>")
}

/// The frame of the plot area, grid lines and labels at the ticks (positions
/// in pixels), and the axis titles.
fn axes(
    svg: &mut String,
    x_ticks: &[(f64, String)],
    y_ticks: &[(f64, String)],
    x_title: &str,
    y_title: &str,
) -> fmt::Result {
    for (at, label) in x_ticks {
        writeln!(
            svg,
            r##"<line x1="{at:.1}" y1="{TOP}" x2="{at:.1}" y2="{:.1}" stroke="#e5e5e5"/>"##,
            BOTTOM + 5.0
        )?;
        writeln!(
            svg,
            r#"<text x="{at:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            BOTTOM + 19.0
        )?;
    }
    for (at, label) in y_ticks {
        writeln!(
            svg,
            r##"<line x1="{:.1}" y1="{at:.1}" x2="{RIGHT}" y2="{at:.1}" stroke="#e5e5e5"/>"##,
            LEFT - 5.0
        )?;
        writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"#,
            LEFT - 8.0,
            at + 4.0
        )?;
    }
    writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="black"/>"#,
        RIGHT - LEFT,
        BOTTOM - TOP
    )?;
    writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        (LEFT + RIGHT) / 2.0,
        HEIGHT - 14.0,
        escape(x_title)
    )?;
    writeln!(
        svg,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (TOP + BOTTOM) / 2.0,
        escape(y_title)
    )
}

/// A linear axis from 0 past `max`: the step between ticks (1, 2 or 5 × 10ᵏ,
/// at least `min_step`, about five ticks) and the top of the axis (a whole
/// number of steps).
fn ticks(max: f64, min_step: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let rough = max / 5.0;
    let magnitude = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&step| step >= rough)
        .unwrap_or(10.0 * magnitude)
        .max(min_step);
    (step, (max / step).ceil() * step)
}

/// 0, `step`, 2 × `step` … up to `top`.
fn steps(step: f64, top: f64) -> impl Iterator<Item = f64> {
    let n = (top / step).round() as usize;
    (0..=n).map(move |i| i as f64 * step)
}

/// 1, 2 and 5 × 10ᵏ between `low` and `high`, for a log axis.
fn log_ticks(low: f64, high: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    for exponent in (low.log10().floor() as i32)..=(high.log10().ceil() as i32) {
        for m in [1.0, 2.0, 5.0] {
            let tick = m * 10f64.powi(exponent);
            if (low..=high).contains(&tick) {
                ticks.push(tick);
            }
        }
    }
    ticks
}

/// A tick or mark value: up to three decimals, without trailing zeros.
fn number(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn near(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= expected * 0.01
    }

    /// Second 0: 1..=100 ms once each; second 1: nothing; second 2: 990 × 10 ms
    /// and 10 × 200 ms.
    fn synthetic() -> Latency {
        let latency = Latency::new();
        for ms in 1..=100u64 {
            latency.record_at(ms as usize, 0, Duration::from_millis(ms));
        }
        for i in 0..1000 {
            let ms = if i < 990 { 10 } else { 200 };
            latency.record_at(i, 2, Duration::from_millis(ms));
        }
        latency
    }

    #[test]
    fn percentiles_are_per_second() {
        let seconds = percentiles(&synthetic().per_second());
        assert_eq!(seconds.len(), 3);
        let [p50, p99, p999] = seconds[0].expect("second 0 has records");
        assert!(near(p50, 50.0), "p50 {p50}");
        assert!(near(p99, 99.0), "p99 {p99}");
        assert!(near(p999, 100.0), "p99.9 {p999}");
        assert_eq!(seconds[1], None);
        let [p50, p99, p999] = seconds[2].expect("second 2 has records");
        assert!(near(p50, 10.0), "p50 {p50}");
        assert!(near(p99, 10.0), "p99 {p99}");
        assert!(near(p999, 200.0), "p99.9 {p999}");
    }

    #[test]
    fn the_latency_plot_has_a_line_per_percentile() {
        let seconds = percentiles(&synthetic().per_second());
        let svg = latency_svg("a & b", &seconds, 2.0);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
        assert_eq!(svg.matches("<svg").count(), 1);
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert!(svg.contains("a &amp; b"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        for name in ["p50", "p99", "p99.9"] {
            let polyline = svg
                .lines()
                .find(|l| l.starts_with(&format!(r#"<polyline class="{name}""#)))
                .unwrap_or_else(|| panic!("no {name} line in {svg}"));
            // Seconds 0 and 2; the empty second 1 has no point.
            let points = polyline.split('"').nth(3).unwrap();
            assert_eq!(points.split(' ').count(), 2, "{polyline}");
            assert!(svg.contains(&format!(">{name}</text>")), "no {name} legend");
        }
        // The y axis reaches the highest value, 200 ms, and the end of sending
        // is marked.
        assert!(svg.contains(">200</text>"), "{svg}");
        assert!(svg.contains("sending ends"));
    }

    #[test]
    fn the_histogram_counts_every_latency_in_log_spaced_buckets() {
        let all = synthetic().merged();
        let buckets = buckets(&all, 10);
        assert_eq!(buckets.len(), 10);
        assert_eq!(buckets.iter().map(|b| b.count).sum::<u64>(), 1100);
        assert!(near(buckets[0].from_ms, 1.0), "{buckets:?}");
        assert!(near(buckets[9].to_ms, 200.0), "{buckets:?}");
        let ratio = buckets[0].to_ms / buckets[0].from_ms;
        for b in &buckets {
            assert!((b.to_ms / b.from_ms - ratio).abs() < 1e-9, "{buckets:?}");
        }
        // 10 ms (990 + second 0's 10 ms) is in one bucket; 200 ms in the last.
        let ten = buckets
            .iter()
            .find(|b| b.from_ms <= 10.0 && 10.0 < b.to_ms)
            .unwrap();
        assert!(ten.count >= 991, "{buckets:?}");
        assert!(buckets[9].count >= 10, "{buckets:?}");
    }

    #[test]
    fn a_single_value_still_makes_a_bucket() {
        let latency = Latency::new();
        latency.record_at(0, 0, Duration::from_millis(5));
        let buckets = buckets(&latency.merged(), 4);
        assert_eq!(buckets.iter().map(|b| b.count).sum::<u64>(), 1);
        assert!(
            buckets[0].from_ms <= 5.0 && 5.0 <= buckets[3].to_ms,
            "{buckets:?}"
        );
    }

    #[test]
    fn the_histogram_plot_has_its_bars_and_marks() {
        let all = synthetic().merged();
        let buckets = buckets(&all, BUCKETS);
        let filled = buckets.iter().filter(|b| b.count > 0).count();
        assert!(filled >= 3);
        let svg = histogram_svg("h", &buckets, [50.0, 99.0, 200.0]);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
        assert_eq!(svg.matches(r#"<rect class="bar""#).count(), filled);
        assert_eq!(svg.matches(r#"<line class="mark""#).count(), 3);
        for label in ["p50 50 ms", "p99 99 ms", "p99.9 200 ms"] {
            assert!(svg.contains(label), "no {label:?} in {svg}");
        }
        // 1-2-5 ticks on the log axis, 1 ms to 200 ms.
        for tick in [">1</text>", ">10</text>", ">100</text>", ">200</text>"] {
            assert!(svg.contains(tick), "no {tick} tick in {svg}");
        }
    }

    #[test]
    fn linear_ticks_are_round() {
        assert_eq!(ticks(200.0, 0.0), (50.0, 200.0));
        assert_eq!(ticks(7.3, 0.0), (2.0, 8.0));
        assert_eq!(ticks(0.0, 0.0), (0.2, 1.0));
        assert_eq!(ticks(3.0, 1.0), (1.0, 3.0));
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(40.0), "40");
    }

    fn args(plot_dir: &std::path::Path, more: &[&str]) -> BenchArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let dir = plot_dir.to_str().unwrap();
        let base = ["bench", "--secret", "s", "--plot-dir", dir];
        Cli::try_parse_from(base.iter().chain(more)).unwrap().bench
    }

    #[test]
    fn plots_are_written_to_a_new_directory_or_the_error_is_reported() {
        let root = std::env::temp_dir().join(format!("dak-bench-plots-{}", std::process::id()));
        let dir = root.join("nested");
        let mut report = Report {
            scenario: "direct".into(),
            duration_s: 2.0,
            ..Report::default()
        };
        write(&mut report, &args(&dir, &[]), "abc", &synthetic());
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            report.plots,
            [
                dir.join("dak-bench-direct-abc-latency.svg"),
                dir.join("dak-bench-direct-abc-histogram.svg")
            ]
            .map(|p| p.display().to_string())
        );
        for plot in &report.plots {
            let svg = std::fs::read_to_string(plot).unwrap();
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        }

        // A file where the directory should be: reported, not a panic.
        let blocked = root.join("a-file");
        std::fs::write(&blocked, "").unwrap();
        let mut report = Report::default();
        write(&mut report, &args(&blocked, &[]), "abc", &synthetic());
        assert!(report.plots.is_empty());
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        assert!(
            report.errors[0].starts_with("plots: "),
            "{:?}",
            report.errors
        );

        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn no_plot_writes_nothing() {
        let mut report = Report::default();
        let dir = std::env::temp_dir().join(format!("dak-bench-no-plots-{}", std::process::id()));
        write(&mut report, &args(&dir, &[]), "abc", &Latency::new());
        assert!(report.plots.is_empty(), "nothing recorded, nothing plotted");
        assert!(!dir.exists());
        let mut report = Report::default();
        write(
            &mut report,
            &args(&dir, &["--no-plot"]),
            "abc",
            &synthetic(),
        );
        assert!(report.plots.is_empty() && report.errors.is_empty());
        assert!(!dir.exists());
    }
}
