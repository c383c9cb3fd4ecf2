//! Kubernetes resource quantities as numbers: memory in bytes, CPU in millicores.

/// A quantity in bytes (`64Mi`, `1G`, `512k`, `1e6`).
pub fn bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(q.len());
    let (num, unit) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mul: f64 = match unit {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "m" => 1e-3,
        _ => return None,
    };
    (n >= 0.0).then(|| (n * mul).ceil() as u64)
}

/// A CPU quantity in millicores (`500m`, `1`, `0.25`, and the metrics API's `179000000n`
/// and `250000u`, rounded up as Kubernetes' `MilliValue` rounds).
pub fn millicores(q: &str) -> Option<u64> {
    let q = q.trim();
    for (suffix, per_milli) in [('n', 1_000_000u64), ('u', 1_000)] {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().ok().map(|n| n.div_ceil(per_milli));
        }
    }
    match q.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => q
            .parse::<f64>()
            .ok()
            .filter(|n| *n >= 0.0)
            .map(|n| (n * 1000.0).ceil() as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(bytes("64Mi"), Some(64 << 20));
        assert_eq!(bytes("1G"), Some(1_000_000_000));
        assert_eq!(bytes("1e3"), Some(1000));
        assert_eq!(bytes("12x"), None);
        assert_eq!(millicores("250m"), Some(250));
        assert_eq!(millicores("1.5"), Some(1500));
        assert_eq!(millicores("-1"), None);
        assert_eq!(millicores("179000000n"), Some(179));
        assert_eq!(millicores("179000001n"), Some(180));
        assert_eq!(millicores("250000u"), Some(250));
    }
}
