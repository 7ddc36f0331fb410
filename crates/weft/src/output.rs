//! Printing results: aligned tables for people, JSON or YAML for scripts.

/// `println!` for CLI output, quiet on a closed pipe.
#[macro_export]
macro_rules! say {
    () => { $crate::output::write_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::output::write_line(format_args!($($arg)*)) };
}

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// Prints `value` as JSON or YAML; returns false when the format is `table` (caller prints).
pub fn structured(format: Format, value: &Value) -> anyhow::Result<bool> {
    match format {
        Format::Table => Ok(false),
        Format::Json => {
            say!("{}", serde_json::to_string_pretty(value)?);
            Ok(true)
        }
        Format::Yaml => {
            say!("{}", serde_saphyr::to_string(value)?.trim_end());
            Ok(true)
        }
    }
}

/// Prints rows under a header with columns aligned.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        say!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// A JSON field as display text.
pub fn cell(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// The cost columns of a proxy or a service's sidecars (`CPU`, `MEM-MIB`, `SELF-IN-MS`,
/// `SELF-OUT-MS`): CPU as a percentage of a core, resident/private MiB, and the time inside
/// the proxy per request as p50/p99 in milliseconds; `-` where nothing was reported.
pub const COST_HEADER: [&str; 4] = ["CPU", "MEM-MIB", "SELF-IN-MS", "SELF-OUT-MS"];

pub fn cost_cells(cost: &Value) -> [String; 4] {
    if cost.is_null() {
        return ["-".into(), "-".into(), "-".into(), "-".into()];
    }
    let mib = |key: &str| {
        cost[key]
            .as_f64()
            .map(|b| format!("{:.1}", b / 1048576.0))
            .unwrap_or_else(|| "-".into())
    };
    [
        format!("{}%", cell(cost, "cpuPercent")),
        format!("{}/{}", mib("residentBytes"), mib("privateBytes")),
        format!("{}/{}", cell(cost, "inboundP50Ms"), cell(cost, "inboundP99Ms")),
        format!("{}/{}", cell(cost, "outboundP50Ms"), cell(cost, "outboundP99Ms")),
    ]
}

/// Writes one line to stdout. When the reader has gone away (`weft ... | head`), the CLI has
/// nothing left to do: it exits quietly instead of panicking on the broken pipe.
pub fn write_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{args}")
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// Unix time in milliseconds as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn time_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01, counting in 400-year eras from 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(super::time_ms(0), "1970-01-01 00:00:00");
        assert_eq!(super::time_ms(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(super::time_ms(1_796_036_461_000), "2026-11-30 11:01:01");
    }
}
