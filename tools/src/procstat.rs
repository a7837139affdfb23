//! What the benchmarks read from Linux's `/proc`: peak resident memory and
//! CPU time, of this process and of the services beside it. Everything
//! reads as 0 where `/proc` is absent.

/// Resets the kernel's peak-RSS mark of this process (Linux 4.0+).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// This process's peak resident set (`VmHWM`), in KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// [`peak_rss_kib`] in MiB.
pub fn peak_rss_mib() -> f64 {
    peak_rss_kib() as f64 / 1024.0
}

/// This process's CPU time so far (user + system), in seconds.
pub fn own_cpu() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .map_or(0.0, |stat| stat_cpu(&stat, false))
}

/// CPU seconds used so far by the services on this machine.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ServiceCpu {
    /// Every PostgreSQL process, with its reaped backends.
    pub postgres: f64,
    /// RabbitMQ's Erlang VM.
    pub rabbitmq: f64,
}

impl std::ops::Sub for ServiceCpu {
    type Output = ServiceCpu;

    fn sub(self, earlier: ServiceCpu) -> ServiceCpu {
        ServiceCpu {
            postgres: self.postgres - earlier.postgres,
            rabbitmq: self.rabbitmq - earlier.rabbitmq,
        }
    }
}

/// CPU seconds used so far by PostgreSQL and RabbitMQ on this machine.
pub fn service_cpu() -> ServiceCpu {
    let mut used = ServiceCpu::default();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return used;
    };
    for entry in dir.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if stat.contains("(postgres)") {
            used.postgres += stat_cpu(&stat, true);
        } else if stat.contains("(beam.smp)") {
            used.rabbitmq += stat_cpu(&stat, false);
        }
    }
    used
}

/// CPU seconds from a `/proc/PID/stat` line: utime + stime, and with
/// `children` the reaped children's too (PostgreSQL's backends exit when
/// their connection closes and their time moves to the postmaster).
fn stat_cpu(stat: &str, children: bool) -> f64 {
    // Fields after the command name, which is in parentheses.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime, cstime are fields 14-17; `rest` starts at 3.
    let take = if children { 4 } else { 2 };
    let ticks: f64 = fields
        .iter()
        .skip(11)
        .take(take)
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_peak_resident_set() {
        assert!(peak_rss_kib() > 0);
    }

    #[test]
    fn reads_cpu_ticks_from_a_stat_line() {
        let stat = "42 (post gres) S 1 2 3 4 5 6 7 8 9 10 150 50 300 100 20 0";
        assert_eq!(stat_cpu(stat, false), 2.0);
        assert_eq!(stat_cpu(stat, true), 6.0);
    }

    #[test]
    fn this_process_uses_cpu() {
        let before = own_cpu();
        let mut x = 0u64;
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_millis(500) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        // Half a second of spinning shows, even on a busy machine, at the
        // kernel's 10 ms resolution.
        let used = own_cpu() - before;
        assert!(used >= 0.05, "{used} s");
    }
}
