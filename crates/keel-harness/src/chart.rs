//! The report's charts, drawn the way Jepsen draws its timelines: every
//! operation a point (latency on a log axis, coloured by outcome) over
//! time, the throughput in a panel of its own below on the same time axis,
//! and the faults as a lane of bands above, one row and one colour per
//! kind, the kind named on its row, each heal's recovery marked. The
//! resources chart stacks RSS, CPU and open files the same way.
//!
//! Pure functions: [`fill`] turns a [`History`] into the [`Series`] a chart
//! needs (sampled to a bounded number of points), [`timeline`] and
//! [`resources`] draw a series as SVG.

use plotters::coord::Shift;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use crate::history::{History, Outcome};
use crate::report::Series;

/// Chart width in px; the HTML scales it to the page's width.
pub const WIDTH: u32 = 1300;
/// At most this many acknowledged operations are drawn as points (one in
/// `ok_stride`, evenly over the run); failed and unknown ones too.
pub const OK_POINTS: usize = 2_500;
/// At most this many acknowledged operations slower than the run's p99.
pub const TAIL_POINTS: usize = 1_000;
/// At most this many failed or unknown operations drawn.
pub const BAD_POINTS: usize = 1_500;
/// The finest window for rates and percentiles, seconds: a 5-second fault
/// spans 50 of them.
pub const MIN_WINDOW_S: f64 = 0.1;
/// At most this many windows over a run (longer runs get wider windows).
pub const MAX_WINDOWS: f64 = 1_000.0;

const LABEL_W: u32 = 150;
const OK: RGBColor = RGBColor(31, 119, 180);
const FAILED: RGBColor = RGBColor(214, 39, 40);
const UNKNOWN: RGBColor = RGBColor(255, 127, 14);
const P50: RGBColor = RGBColor(44, 160, 44);
const P99: RGBColor = RGBColor(20, 20, 20);
const OWN: RGBColor = RGBColor(148, 103, 189);
/// One colour per fault kind, in the order kinds first appear.
const KINDS: [RGBColor; 10] = [
    RGBColor(230, 120, 40),
    RGBColor(120, 90, 200),
    RGBColor(200, 60, 120),
    RGBColor(60, 150, 150),
    RGBColor(150, 110, 60),
    RGBColor(90, 160, 60),
    RGBColor(220, 170, 20),
    RGBColor(70, 110, 200),
    RGBColor(160, 160, 160),
    RGBColor(190, 90, 60),
];

fn micros_s(m: u64) -> f64 {
    m as f64 / 1e6
}

/// Every operation of `h` (publishes and the others) as (invoke s, done s,
/// latency ms, outcome: 0 ok, 1 failed, 2 unknown).
fn operations(h: &History) -> impl Iterator<Item = (f64, f64, f64, u8)> + '_ {
    let of = |o: &Outcome| match o {
        Outcome::Ok { .. } => 0u8,
        Outcome::Fail { .. } => 1,
        Outcome::Info => 2,
    };
    let publishes = h
        .publishes
        .iter()
        .map(move |p| (p.invoke, p.done, of(&p.outcome)));
    let ops = h
        .ops
        .iter()
        .map(move |o| (o.invoke, o.done, of(&o.outcome)));
    publishes.chain(ops).map(|(i, d, o)| {
        (
            micros_s(i),
            micros_s(d),
            d.saturating_sub(i) as f64 / 1e3,
            o,
        )
    })
}

/// Fills the operation-level parts of `s` from the history: the sampled
/// points, the rates and percentiles per window, and when each fault was
/// recovered from (the first acknowledged operation invoked after its
/// heal, when it completed). Leaves them empty when the history has no
/// operations (the scenario's own series are drawn then).
pub fn fill(s: &mut Series, h: &History) {
    let mut counts = [0u64; 3];
    let mut span: f64 = 0.0;
    for (_, done, _, o) in operations(h) {
        counts[o as usize] += 1;
        span = span.max(done);
    }
    s.op_counts = counts;
    s.recovered = vec![None; s.faults.len()];
    if counts.iter().sum::<u64>() == 0 {
        return;
    }
    let window = (span / MAX_WINDOWS).max(MIN_WINDOW_S);
    s.window_s = window;
    // The slowest acknowledged operations are what a fault does: every
    // one above the run's p99 is drawn (up to TAIL_POINTS, evenly), the
    // rest one in `ok_stride`.
    let mut oks: Vec<f32> = operations(h)
        .filter(|o| o.3 == 0)
        .map(|o| o.2 as f32)
        .collect();
    // Compared as f32 on both sides: an operation exactly at the p99 is
    // not "slower" than it.
    let tail_from: f32 = if oks.is_empty() {
        f32::MAX
    } else {
        let k = ((oks.len() - 1) as f64 * 0.99).round() as usize;
        *oks.select_nth_unstable_by(k, f32::total_cmp).1
    };
    drop(oks);
    let slow = |ms: f64| ms as f32 > tail_from;
    let tail = operations(h).filter(|o| o.3 == 0 && slow(o.2)).count();
    let tail_stride = tail.div_ceil(TAIL_POINTS).max(1) as u64;
    let ok_stride = (counts[0] as usize - tail).div_ceil(OK_POINTS).max(1) as u64;
    let bad = (counts[1] + counts[2]) as usize;
    let bad_stride = bad.div_ceil(BAD_POINTS).max(1) as u64;
    s.ok_stride = ok_stride;
    s.tail_from_ms = if tail > 0 { f64::from(tail_from) } else { 0.0 };
    s.tail_stride = tail_stride;
    s.bad_stride = bad_stride;
    let n = (span / window) as usize + 1;
    let mut ok_rate = vec![0u64; n];
    let mut bad_rate = vec![0u64; n];
    let mut lat: Vec<(u32, f32)> = Vec::with_capacity(counts[0] as usize);
    let (mut seen_ok, mut seen_tail, mut seen_bad) = (0u64, 0u64, 0u64);
    let mut ok_invokes: Vec<(f64, f64)> = Vec::new();
    for (invoke, done, ms, o) in operations(h) {
        let w = ((done / window) as usize).min(n - 1);
        if o == 0 {
            ok_rate[w] += 1;
            lat.push((w as u32, ms as f32));
            ok_invokes.push((invoke, done));
            if slow(ms) {
                if seen_tail % tail_stride == 0 {
                    s.ops.push((done, ms, o));
                }
                seen_tail += 1;
            } else {
                if seen_ok % ok_stride == 0 {
                    s.ops.push((done, ms, o));
                }
                seen_ok += 1;
            }
        } else {
            bad_rate[w] += 1;
            if seen_bad % bad_stride == 0 {
                s.ops.push((done, ms, o));
            }
            seen_bad += 1;
        }
    }
    s.rate = (0..n)
        .map(|w| {
            (
                w as f64 * window,
                ok_rate[w] as f64 / window,
                bad_rate[w] as f64 / window,
            )
        })
        .collect();
    lat.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let mut i = 0;
    while i < lat.len() {
        let w = lat[i].0;
        let j = i + lat[i..].iter().take_while(|x| x.0 == w).count();
        let run = &lat[i..j];
        let at = |q: f64| run[((run.len() - 1) as f64 * q).round() as usize].1 as f64;
        s.op_latency
            .push(((w as f64 + 0.5) * window, at(0.5), at(0.99)));
        i = j;
    }
    // Recovered: the earliest completion of an acknowledged operation
    // invoked at or after the heal (a suffix minimum over invoke order).
    ok_invokes.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let mut earliest = vec![f64::INFINITY; ok_invokes.len() + 1];
    for i in (0..ok_invokes.len()).rev() {
        earliest[i] = earliest[i + 1].min(ok_invokes[i].1);
    }
    for (k, (_, end, _)) in s.faults.iter().enumerate() {
        let from = ok_invokes.partition_point(|(invoke, _)| invoke < end);
        s.recovered[k] = Some(earliest[from]).filter(|t| t.is_finite());
    }
}

/// The end of the time axis: the last thing any part of `s` saw.
fn x_end(s: &Series) -> f64 {
    let mut end: f64 = 1.0;
    let points = s
        .latency
        .iter()
        .map(|x| x.0 + 1.0)
        .chain(s.throughput.iter().map(|x| x.0 + 1.0))
        .chain(s.resources.iter().map(|x| x.0))
        .chain(s.faults.iter().map(|x| x.1))
        .chain(s.ops.iter().map(|x| x.0))
        .chain(s.rate.iter().map(|x| x.0 + s.window_s));
    for t in points {
        end = end.max(t);
    }
    end * 1.01
}

/// The fault kinds of `s`, in the order they first appear.
fn kinds(s: &Series) -> Vec<&str> {
    let mut kinds: Vec<&str> = Vec::new();
    for (_, _, k) in &s.faults {
        if !kinds.contains(&k.as_str()) {
            kinds.push(k);
        }
    }
    kinds
}

fn kind_color(i: usize) -> RGBColor {
    KINDS[i % KINDS.len()]
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Points = Vec<(f64, f64)>;
type Failed = Box<dyn std::error::Error>;

/// Draws into an SVG string `WIDTH` x `height`, scaling to its container.
fn svg(height: u32, draw: impl FnOnce(&Area<'_>) -> Result<(), Failed>) -> String {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, height)).into_drawing_area();
        let _ = root.fill(&WHITE);
        if let Err(e) = draw(&root) {
            let _ = root.draw(&Text::new(
                format!("chart failed: {e}"),
                (10, 20),
                ("sans-serif", 13).into_font().color(&FAILED),
            ));
        }
        let _ = root.present();
    }
    out
}

/// A row of coloured words: a caption, then (label, colour) keys.
fn header(area: &Area<'_>, caption: &str, keys: &[(String, RGBColor)]) -> Result<(), Failed> {
    area.draw(&Text::new(
        caption.to_owned(),
        (LABEL_W as i32 - 140, 6),
        ("sans-serif", 15).into_font().style(FontStyle::Bold),
    ))?;
    let mut x = LABEL_W as i32 + 260;
    for (label, color) in keys {
        area.draw(&Rectangle::new([(x, 9), (x + 10, 19)], color.filled()))?;
        area.draw(&Text::new(
            label.clone(),
            (x + 14, 7),
            ("sans-serif", 12).into_font(),
        ))?;
        x += 24 + 6 * label.chars().count() as i32;
    }
    Ok(())
}

/// The fault lane: one row per kind, named on the left, a band from each
/// fault's start to its heal, a black tick where it was recovered from.
fn fault_lane(area: &Area<'_>, s: &Series, end: f64) -> Result<(), Failed> {
    let kinds = kinds(s);
    let rows = kinds.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .margin_right(20)
        .y_label_area_size(LABEL_W)
        .build_cartesian_2d(0f64..end, (0..rows).into_segmented())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_labels(rows)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => kinds.get(*i).map_or(String::new(), |k| {
                let n = s.faults.iter().filter(|f| f.2 == *k).count();
                format!("{k} ({n})")
            }),
            _ => String::new(),
        })
        .y_label_style(("sans-serif", 12))
        .light_line_style(WHITE)
        .draw()?;
    let min_w = end / 600.0;
    for (k, (start, stop, kind)) in s.faults.iter().enumerate() {
        let row = kinds.iter().position(|x| x == kind).unwrap_or(0);
        let color = kind_color(row);
        let stop = stop.max(start + min_w);
        chart.draw_series(std::iter::once(Rectangle::new(
            [
                (*start, SegmentValue::Exact(row)),
                (stop, SegmentValue::Exact(row + 1)),
            ],
            color.mix(0.75).filled(),
        )))?;
        if let Some(Some(at)) = s.recovered.get(k) {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![
                    (*at, SegmentValue::Exact(row)),
                    (*at, SegmentValue::Exact(row + 1)),
                ],
                BLACK.stroke_width(2),
            )))?;
        }
    }
    Ok(())
}

/// Light bands behind a panel where faults were active.
fn shade<DB: DrawingBackend>(
    chart: &mut ChartContext<
        '_,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, impl Ranged<ValueType = f64>>,
    >,
    s: &Series,
    (lo, hi): (f64, f64),
    end: f64,
) -> Result<(), Failed>
where
    DB::ErrorType: 'static,
{
    let kinds = kinds(s);
    let min_w = end / 600.0;
    for (start, stop, kind) in &s.faults {
        let row = kinds.iter().position(|x| x == kind).unwrap_or(0);
        let stop = stop.max(start + min_w);
        chart.draw_series(std::iter::once(Rectangle::new(
            [(*start, lo), (stop, hi)],
            kind_color(row).mix(0.13).filled(),
        )))?;
    }
    Ok(())
}

/// The timeline: header and key, the fault lane (when there were faults),
/// every operation's latency on a log axis with p50 and p99 per window,
/// and throughput below. Without operations in the history, the
/// scenario's own windowed latency and throughput are drawn instead.
pub fn timeline(s: &Series) -> String {
    let kinds = kinds(s).len();
    let lane = if kinds == 0 {
        0
    } else {
        14 + 18 * kinds as u32
    };
    let (head, lat_h, rate_h) = (28u32, 300u32, 150u32);
    svg(head + lane + lat_h + rate_h, |root| {
        let (top, rest) = root.split_vertically(head);
        let (lane_area, rest) = rest.split_vertically(lane);
        let (lat_area, rate_area) = rest.split_vertically(lat_h);
        let end = x_end(s);
        let by_ops = !s.ops.is_empty();
        let mut keys: Vec<(String, RGBColor)> = Vec::new();
        if by_ops {
            let [ok, failed, unknown] = s.op_counts;
            let over = crate::threshold::num(s.tail_from_ms);
            let drawn = match (s.ok_stride, s.tail_stride, s.tail_from_ms > 0.0) {
                (1, 1, _) => String::new(),
                (k, _, false) => format!("; 1 in {k} drawn"),
                (k, 1, true) => format!("; 1 in {k} drawn, all over {over} ms"),
                (k, t, true) => format!("; 1 in {k} drawn, 1 in {t} over {over} ms"),
            };
            let bad = if s.bad_stride > 1 {
                format!("; 1 in {} drawn", s.bad_stride)
            } else {
                String::new()
            };
            keys.push((format!("ok ({ok}{drawn})"), OK));
            keys.push((format!("failed ({failed}{bad})"), FAILED));
            keys.push((format!("unknown ({unknown}{bad})"), UNKNOWN));
            keys.push((format!("p50 per {:.1} s", s.window_s), P50));
            keys.push((format!("p99 per {:.1} s", s.window_s), P99));
            if !s.latency.is_empty() {
                keys.push(("the scenario's own p99".into(), OWN));
            }
        } else {
            keys.push(("p50".into(), P50));
            keys.push(("p99".into(), P99));
        }
        let caption = if by_ops {
            "operations: latency and throughput"
        } else if s.latency.is_empty() && s.throughput.is_empty() {
            "latency and throughput (no samples)"
        } else {
            "latency and throughput (windows of the scenario)"
        };
        header(&top, caption, &keys)?;
        if kinds > 0 {
            fault_lane(&lane_area, s, end)?;
        }
        latency_panel(&lat_area, s, end)?;
        rate_panel(&rate_area, s, end)
    })
}

fn latency_panel(area: &Area<'_>, s: &Series, end: f64) -> Result<(), Failed> {
    // Every line drawn on it, not only the points: the scenario's own p99
    // (deliveries) may be slower than any sampled operation.
    let values: Vec<f64> = s
        .latency
        .iter()
        .flat_map(|x| [x.1, x.2])
        .chain(s.ops.iter().map(|x| x.1))
        .chain(s.op_latency.iter().flat_map(|x| [x.1, x.2]))
        .collect();
    let positive = values.iter().copied().filter(|v| *v > 0.0);
    let lo = positive.clone().fold(f64::MAX, f64::min).clamp(0.01, 1.0) * 0.8;
    let hi = positive.fold(1.0, f64::max) * 1.5;
    let mut chart = ChartBuilder::on(area)
        .margin_right(20)
        .x_label_area_size(24)
        .y_label_area_size(LABEL_W)
        .build_cartesian_2d(0f64..end, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .y_desc("latency ms (log)")
        .y_label_formatter(&|v| crate::threshold::num(*v))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()?;
    let mut shaded = ChartBuilder::on(area)
        .margin_right(20)
        .x_label_area_size(24)
        .y_label_area_size(LABEL_W)
        .build_cartesian_2d(0f64..end, 0f64..1f64)?;
    shade(&mut shaded, s, (0.0, 1.0), end)?;
    let clamp = |v: f64| v.max(lo);
    for (color, outcome) in [(OK, 0u8), (UNKNOWN, 2), (FAILED, 1)] {
        let mix = if outcome == 0 { 0.45 } else { 0.9 };
        chart.draw_series(
            s.ops
                .iter()
                .filter(|x| x.2 == outcome)
                .map(|x| Circle::new((x.0, clamp(x.1)), 2, color.mix(mix).filled())),
        )?;
    }
    let (p50, p99): (Points, Points) = if s.ops.is_empty() {
        s.latency
            .iter()
            .map(|x| ((x.0, clamp(x.1)), (x.0, clamp(x.2))))
            .unzip()
    } else {
        s.op_latency
            .iter()
            .map(|x| ((x.0, clamp(x.1)), (x.0, clamp(x.2))))
            .unzip()
    };
    let gap = if s.ops.is_empty() {
        f64::MAX
    } else {
        1.5 * s.window_s
    };
    for (line, color) in [(&p50, P50), (&p99, P99)] {
        for run in runs(line, gap) {
            if let [lone] = run {
                // A window between two empty ones: a tick, which a line of
                // one point would not draw.
                chart.draw_series(std::iter::once(Cross::new(*lone, 3, color)))?;
            } else {
                chart.draw_series(LineSeries::new(run.iter().copied(), color.stroke_width(1)))?;
            }
        }
    }
    if !s.ops.is_empty() && !s.latency.is_empty() {
        // The scenario's own latency (deliveries, say), in its windows.
        let own: Vec<(f64, f64)> = s.latency.iter().map(|x| (x.0, clamp(x.2))).collect();
        chart.draw_series(LineSeries::new(own, OWN.stroke_width(2)))?;
    }
    if s.ops.is_empty() {
        // A run of one window is one point, which a line hides.
        chart.draw_series(p99.iter().map(|p| Circle::new(*p, 2, P99.filled())))?;
    }
    Ok(())
}

/// `points` cut where consecutive x differ by more than `gap`: a window
/// with no operation is a gap in the line, not a slope across it.
fn runs(points: &[(f64, f64)], gap: f64) -> Vec<&[(f64, f64)]> {
    let mut out = Vec::new();
    let mut from = 0;
    for i in 1..=points.len() {
        if i == points.len() || points[i].0 - points[i - 1].0 > gap {
            out.push(&points[from..i]);
            from = i;
        }
    }
    out
}

fn rate_panel(area: &Area<'_>, s: &Series, end: f64) -> Result<(), Failed> {
    let (ok, bad): (Points, Points) = if s.rate.is_empty() {
        (s.throughput.clone(), Vec::new())
    } else {
        s.rate.iter().map(|x| ((x.0, x.1), (x.0, x.2))).unzip()
    };
    let hi = ok.iter().chain(&bad).map(|x| x.1).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .margin_right(20)
        .margin_bottom(4)
        .x_label_area_size(34)
        .y_label_area_size(LABEL_W)
        .build_cartesian_2d(0f64..end, 0f64..hi)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the scenario started")
        .y_desc(if s.rate.is_empty() {
            "ops/s".to_owned()
        } else {
            format!("ops/s per {:.1} s", s.window_s)
        })
        .y_label_formatter(&|v| crate::threshold::num(*v))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()?;
    shade(&mut chart, s, (0.0, hi), end)?;
    chart.draw_series(LineSeries::new(ok, OK.stroke_width(1)))?;
    if bad.iter().any(|x| x.1 > 0.0) {
        chart.draw_series(LineSeries::new(bad, FAILED.stroke_width(1)))?;
    }
    Ok(())
}

/// The relay's resources: RSS, CPU and open files, each in its own panel
/// on the same time axis, faults shaded.
pub fn resources(s: &Series) -> String {
    let (head, panel) = (28u32, 120u32);
    svg(head + 3 * panel + 14, |root| {
        let (top, rest) = root.split_vertically(head);
        let caption = if s.resources.is_empty() {
            "relay resources (no relay process sampled)"
        } else {
            "relay resources"
        };
        let keys = kinds(s)
            .iter()
            .enumerate()
            .map(|(i, k)| ((*k).to_owned(), kind_color(i)))
            .collect::<Vec<_>>();
        header(&top, caption, &keys)?;
        let end = x_end(s);
        let panels = rest.split_evenly((3, 1));
        let series: [(&str, RGBColor, Points); 3] = [
            (
                "RSS MiB",
                RGBColor(170, 40, 170),
                s.resources.iter().map(|r| (r.0, r.1)).collect(),
            ),
            (
                "CPU % of a core",
                RGBColor(40, 120, 40),
                s.resources.iter().map(|r| (r.0, r.3)).collect(),
            ),
            (
                "open fds",
                RGBColor(20, 140, 170),
                s.resources.iter().map(|r| (r.0, r.2)).collect(),
            ),
        ];
        for (i, (area, (desc, color, points))) in panels.iter().zip(series).enumerate() {
            let hi = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
            let last = i == 2;
            let mut chart = ChartBuilder::on(area)
                .margin_right(20)
                .x_label_area_size(if last { 34 } else { 6 })
                .y_label_area_size(LABEL_W)
                .build_cartesian_2d(0f64..end, 0f64..hi)?;
            let mut mesh = chart.configure_mesh();
            mesh.y_desc(desc)
                .y_labels(4)
                .y_label_formatter(&|v| crate::threshold::num(*v))
                .light_line_style(RGBColor(240, 240, 240));
            if last {
                mesh.x_desc("seconds since the scenario started");
            } else {
                mesh.disable_x_axis();
            }
            mesh.draw()?;
            shade(&mut chart, s, (0.0, hi), end)?;
            chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
        }
        Ok(())
    })
}

/// How many operation points a timeline drew (for tests and the HTML's
/// `data-points`).
pub fn points(s: &Series) -> usize {
    s.ops.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{ChannelId, Digest, Fault, MsgId, Publish};

    fn publish(invoke_ms: u64, done_ms: u64, outcome: Outcome) -> Publish {
        Publish {
            client: 0,
            conn: 0,
            channel: ChannelId(0),
            id: MsgId(0),
            invoke: invoke_ms * 1000,
            done: done_ms * 1000,
            outcome,
            digest: Digest::of("{}"),
        }
    }

    /// A 5-second outage in a 30-second run: windows of 100 ms show it
    /// (no acknowledgements inside it), the failures are all drawn, and
    /// recovery is the first acknowledged publish invoked after the heal.
    #[test]
    fn a_five_second_fault_shows_and_its_recovery_is_marked() {
        let mut h = History::default();
        for ms in (0..30_000u64).step_by(10) {
            let down = (10_000..15_000).contains(&ms);
            let outcome = if down {
                Outcome::Fail {
                    code: "unavailable".into(),
                }
            } else {
                Outcome::Ok { offset: 1 }
            };
            // After the heal, the first publishes wait 400 ms for the relay.
            let took = if (15_000..15_400).contains(&ms) {
                15_400 - ms + 2
            } else {
                2
            };
            h.publishes.push(publish(ms, ms + took, outcome));
        }
        h.faults.push(Fault {
            kind: "kill9".into(),
            target: "relay".into(),
            start: 10_000_000,
            end: 15_000_000,
        });
        let mut s = Series {
            faults: vec![(10.0, 15.0, "kill9".into())],
            ..Default::default()
        };
        fill(&mut s, &h);
        assert_eq!(s.op_counts, [2_500, 500, 0]);
        assert!((s.window_s - MIN_WINDOW_S).abs() < 1e-9, "{}", s.window_s);
        let inside: Vec<_> = s
            .rate
            .iter()
            .filter(|r| r.0 >= 10.5 && r.0 < 14.5)
            .collect();
        assert!(!inside.is_empty());
        assert!(inside.iter().all(|r| r.1 == 0.0 && r.2 > 0.0), "{inside:?}");
        assert_eq!(s.ops.iter().filter(|o| o.2 == 1).count(), 500);
        let recovered = s.recovered[0].expect("recovered");
        assert!((recovered - 15.402).abs() < 1e-6, "{recovered}");
        // Windows are by completion: the ones who waited complete at
        // 15.402 s, in the window 15.4-15.5.
        let p99_during_wait = s
            .op_latency
            .iter()
            .find(|w| w.0 > 15.4 && w.0 < 15.5)
            .expect("a window after the heal");
        assert!(p99_during_wait.2 > 300.0, "{p99_during_wait:?}");
        let svg = timeline(&s);
        assert_eq!(svg.matches("<circle").count(), points(&s));
        assert!(svg.contains("kill9 (1)"), "the lane names the kind");
        assert!(svg.contains("ok (2500)"), "nothing sampled, nothing said");
        assert!(svg.contains("failed (500)"));
    }

    /// Millions of operations draw a bounded number of points.
    #[test]
    fn points_are_bounded() {
        let mut h = History::default();
        for ms in 0..200_000u64 {
            h.publishes
                .push(publish(ms, ms + 1, Outcome::Ok { offset: 1 }));
        }
        let mut s = Series::default();
        fill(&mut s, &h);
        assert!(points(&s) <= OK_POINTS + TAIL_POINTS, "{}", points(&s));
        assert_eq!(s.ok_stride, 80);
        // All equally fast: no tail, and the key does not claim one.
        assert_eq!(s.tail_from_ms, 0.0);
        assert!(timeline(&s).contains("ok (200000; 1 in 80 drawn)"));
        assert!(s.rate.len() <= MAX_WINDOWS as usize + 1, "{}", s.rate.len());
    }

    /// A history without operations leaves the series to the scenario's
    /// own windows, and both charts still draw.
    #[test]
    fn no_operations_draws_the_scenario_series() {
        let mut s = Series {
            latency: vec![(0.0, 1.0, 5.0), (1.0, 2.0, 9.0)],
            throughput: vec![(0.0, 100.0), (1.0, 120.0)],
            resources: vec![(0.0, 50.0, 10.0, 3.0), (1.0, 52.0, 11.0, 4.0)],
            ..Default::default()
        };
        fill(&mut s, &History::default());
        assert!(s.ops.is_empty() && s.rate.is_empty());
        let t = timeline(&s);
        assert!(t.contains("<polyline") || t.contains("<path"), "{t}");
        let r = resources(&s);
        assert!(r.contains("RSS MiB"));
    }
}
