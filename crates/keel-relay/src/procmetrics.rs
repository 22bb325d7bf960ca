//! The process's own figures on `/metrics`, under the names Prometheus'
//! client libraries use (`process_resident_memory_bytes`,
//! `process_open_fds`, `process_max_fds`, `process_cpu_seconds_total`), read
//! from /proc at each scrape, so that a harness or a dashboard outside the
//! host can follow the relay's memory, file descriptors and CPU.

use std::fmt::Write;

/// The figures as Prometheus text (HELP and TYPE lines included); empty
/// where /proc cannot be read (not Linux).
pub(crate) fn render() -> String {
    let mut out = String::new();
    for metric in crate::catalogue::PROCESS {
        let value = match metric.name {
            "process_resident_memory_bytes" => resident_bytes(),
            "process_open_fds" => open_fds(),
            "process_max_fds" => {
                nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                    .ok()
                    .map(|(soft, _)| soft as f64)
            }
            "process_cpu_seconds_total" => cpu_seconds(),
            _ => None,
        };
        if let Some(v) = value {
            let (name, kind, help) = (metric.name, metric.kind.as_str(), metric.help);
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
    }
    out
}

/// Resident pages (the second field of /proc/self/statm) times the page size.
fn resident_bytes() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
    Some(pages * page as f64)
}

fn open_fds() -> Option<f64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as f64)
}

/// utime + stime (fields 14 and 15 of /proc/self/stat, in clock ticks).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some(ticks / hz as f64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_figures_are_read() {
        let text = super::render();
        for name in [
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_cpu_seconds_total",
        ] {
            let value: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing: {text}"))
                .parse()
                .unwrap();
            assert!(value >= 0.0, "{name} {value}");
        }
        assert!(text.contains("# TYPE process_cpu_seconds_total counter"));
    }
}
