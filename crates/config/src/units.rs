//! Human-friendly durations ("1.5s", "500ms") and sizes ("128M", "1GiB").

/// Parses a duration into milliseconds: `ms`, `s`, `m` or `h`; a bare number
/// means seconds. Whether it is in range is the caller's to say.
///
/// # Errors
/// A message naming the input when it is not a non-negative number with one
/// of those units, or exceeds `u64` milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = t.strip_suffix('h') {
        // Parsed, so that a limit too long is named as such by whoever
        // checks the range, not called "invalid".
        (n, 3_600_000.0)
    } else {
        (t, 1000.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("invalid duration {s:?} (examples: 2s, 500ms, 1.5s, 2m)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("invalid duration {s:?}: must be a positive number"));
    }
    if v * mult >= u64::MAX as f64 {
        return Err(format!("duration {s:?} is too long"));
    }
    Ok((v * mult).round() as u64)
}

/// Parses a size into bytes. Units are binary: K/KiB, M/MiB, G/GiB; a bare number is bytes.
pub fn parse_size_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("invalid size {s:?} (examples: 512K, 128M, 1G)")),
    };
    let v: f64 = num.parse().map_err(|_| format!("invalid size {s:?} (examples: 512K, 128M, 1G)"))?;
    Ok((v * mult as f64).round() as u64)
}

/// Formats bytes for people ("12.3 MiB").
pub fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("1s"), Ok(1000));
        assert_eq!(parse_duration_ms("1.5s"), Ok(1500));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("2"), Ok(2000));
        assert_eq!(parse_duration_ms("1m"), Ok(60_000));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert!(parse_duration_ms("1e300h").unwrap_err().contains("too long"));
        assert!(parse_duration_ms("soon").is_err());
        assert!(parse_duration_ms("-1s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_bytes("128M"), Ok(128 << 20));
        assert_eq!(parse_size_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size_bytes("64 KiB"), Ok(64 << 10));
        assert_eq!(parse_size_bytes("100"), Ok(100));
        assert!(parse_size_bytes("12 parsecs").is_err());
        assert_eq!(format_bytes(3 << 20), "3.0 MiB");
    }
}
