//! The HTML report in a real browser: headless Chromium loads a report made
//! by a real (small) run; every section and every chart must be there, with
//! its SVG drawn. Needs Debian's `chromium`: ignored unless asked for
//! (`cargo test -- --include-ignored`; `.ci/run` installs chromium and runs
//! it); asked for, a missing browser fails it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{ONE_AT_A_TIME, options, report_dir};

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join(name))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .find(|p| p.is_file())
}

fn headless(browser: &Path, profile: &Path) -> Command {
    let mut c = Command::new(browser);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

fn run_with_timeout(mut cmd: Command, limit: Duration) -> std::process::Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start chromium");
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(limit);
        // Still running after the limit: end it (the test then fails on
        // its missing output).
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
    });
    let out = child.wait_with_output().expect("chromium output");
    drop(killer);
    out
}

/// The value of the first `name="…"` in `html`.
fn attr<'a>(html: &'a str, name: &str) -> &'a str {
    let key = format!("{name}=\"");
    let at = html.find(&key).unwrap_or_else(|| panic!("no {name}")) + key.len();
    &html[at..at + html[at..].find('"').unwrap()]
}

#[test]
#[ignore = "needs chromium (apt-get install -y chromium): cargo test -- --include-ignored"]
fn report_renders_in_a_real_browser() {
    let Some(browser) = chromium() else {
        panic!("no chromium on PATH: apt-get install -y chromium");
    };
    let scenarios = ["queue_overflow", "concurrent_sessions", "burn_in"];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = rt.block_on(async {
        let _one = ONE_AT_A_TIME.lock().await;
        let root = report_dir();
        let summary = keel_harness::run(options(&scenarios, &root, 7))
            .await
            .unwrap();
        summary.dir
    });
    let html = dir.join("report.html");
    let text = std::fs::read_to_string(&html).unwrap();
    assert!(
        !text.contains("<script"),
        "the report must work without scripts"
    );
    // Self-contained: nothing is fetched (SVG's xmlns is a name, not a fetch).
    for fetch in ["src=", "<link", "url(", "@import", "<iframe"] {
        assert!(
            !text.contains(fetch),
            "the report must be self-contained; it has {fetch}"
        );
    }

    let profile = tempfile::tempdir().unwrap();
    let mut dump = headless(&browser, profile.path());
    dump.arg("--dump-dom")
        .arg(format!("file://{}", html.display()));
    let out = run_with_timeout(dump, Duration::from_secs(90));
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("id=\"verdicts\""),
        "no verdict table in the rendered DOM; chromium said: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for s in scenarios {
        assert!(
            dom.contains(&format!("id=\"scenario-{s}\"")),
            "section {s} missing"
        );
        for chart in ["latency", "resources"] {
            let id = format!("id=\"chart-{chart}-{s}\"");
            let at = dom
                .find(&id)
                .unwrap_or_else(|| panic!("chart {chart} of {s} missing"));
            let figure = &dom[at..at + dom[at..].find("</figure>").expect("figure closes")];
            assert!(figure.contains("<svg"), "chart {chart} of {s} has no SVG");
            assert!(
                figure.contains("<text"),
                "chart {chart} of {s} has no axis labels"
            );
            assert!(
                !figure.contains("chart failed"),
                "chart {chart} of {s} failed to draw"
            );
            // Data, not only axes: the timeline draws each sampled operation
            // as a circle (as many as its data-points says, and some), the
            // resources chart a line per sampled resource. queue_overflow
            // runs in-process (no relay, no operation in its history): its
            // charts must say so rather than show empty axes.
            if s == "queue_overflow" {
                let count = if chart == "latency" {
                    "data-points"
                } else {
                    "data-samples"
                };
                assert_eq!(attr(figure, count), "0");
                assert!(
                    figure.contains("no samples") || figure.contains("no relay process"),
                    "the empty chart {chart} of {s} does not say it is empty"
                );
            } else if chart == "latency" {
                let points: usize = attr(figure, "data-points").parse().unwrap();
                assert!(points > 0, "the timeline of {s} drew no operation");
                assert_eq!(
                    figure.matches("<circle").count(),
                    points,
                    "the timeline of {s} lost points"
                );
            } else {
                let samples: usize = attr(figure, "data-samples").parse().unwrap();
                assert!(samples > 1, "no resource samples for {s}");
                // Axes are polylines too: count the three series' own
                // strokes (RSS, CPU, open fds in chart.rs's colours).
                for (what, color) in [("RSS", "#AA28AA"), ("CPU", "#287828"), ("fds", "#148CAA")] {
                    assert!(
                        figure.contains(&format!("stroke=\"{color}\"")),
                        "the resources chart of {s} drew no {what} line"
                    );
                }
            }
        }
    }
    assert!(dom.matches("<svg").count() >= 2 * scenarios.len());
    // burn_in's upstream outage has its row in the fault lane, named.
    let burn = &dom[dom.find("id=\"scenario-burn_in\"").unwrap()..];
    assert_ne!(attr(burn, "data-faults"), "0", "burn_in's outage recorded");
    assert!(
        burn.contains("upstream_down ("),
        "the fault lane names the kind"
    );

    // A screenshot to look at.
    let png = dir.join("report.png");
    let mut shot = headless(&browser, profile.path());
    shot.arg(format!("--screenshot={}", png.display()))
        .arg("--window-size=1400,3000")
        .arg(format!("file://{}", html.display()));
    run_with_timeout(shot, Duration::from_secs(90));
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 20_000,
        "screenshot {} is {size} bytes",
        png.display()
    );
    println!("screenshot: {}", png.display());
}
