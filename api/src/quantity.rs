//! Kubernetes resource quantities: parsed exactly by `resource.Quantity`'s grammar, read as
//! bytes, millicores or milli-units.

/// The pattern kube-apiserver names when a quantity does not parse.
pub const PATTERN: &str = "^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$";

/// A parsed quantity: `digits × 10^exp10 × 2^exp2`, exactly (no floating point, so `0.1`
/// is a tenth and `179000001n` rounds up as Kubernetes rounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    digits: i128,
    exp10: i32,
    exp2: u32,
}

impl Quantity {
    /// `<sign><number><suffix>`: a decimal number (`1`, `1.5`, `.5`, `5.`), then a binary
    /// suffix (`Ki` … `Ei`), a decimal one (`n u m k M G T P E`) or an exponent (`e3`,
    /// `E-2`).
    pub fn parse(q: &str) -> Option<Quantity> {
        let (neg, rest) = match q.as_bytes().first()? {
            b'+' => (false, &q[1..]),
            b'-' => (true, &q[1..]),
            _ => (false, q),
        };
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, suffix) = rest.split_at(end);
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
            return None;
        }
        // Leading zeros and trailing fraction zeros carry nothing. Past 36 digits the rest
        // is dropped, rounding up: such a quantity is beyond anything a node holds.
        let int = int.trim_start_matches('0');
        let frac = frac.trim_end_matches('0');
        let all = || int.bytes().chain(frac.bytes());
        let kept = all().count().min(36);
        let mut digits: i128 = 0;
        for b in all().take(kept) {
            digits = digits * 10 + i128::from(b - b'0');
        }
        digits += i128::from(all().skip(kept).any(|b| b != b'0'));
        let mut exp10 = (all().count() - kept) as i32 - frac.len() as i32;
        let mut exp2 = 0;
        match suffix {
            "" => {}
            "n" => exp10 -= 9,
            "u" => exp10 -= 6,
            "m" => exp10 -= 3,
            "k" => exp10 += 3,
            "M" => exp10 += 6,
            "G" => exp10 += 9,
            "T" => exp10 += 12,
            "P" => exp10 += 15,
            "E" => exp10 += 18,
            "Ki" => exp2 = 10,
            "Mi" => exp2 = 20,
            "Gi" => exp2 = 30,
            "Ti" => exp2 = 40,
            "Pi" => exp2 = 50,
            "Ei" => exp2 = 60,
            s => {
                let e = s.strip_prefix(['e', 'E'])?;
                let body = e.strip_prefix(['+', '-']).unwrap_or(e);
                if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) || body.len() > 3 {
                    return None;
                }
                exp10 += e.parse::<i32>().ok()?;
            }
        }
        Some(Quantity {
            digits: if neg { -digits } else { digits },
            exp10,
            exp2,
        })
    }

    /// The value times `10^by`, rounded up (toward positive infinity); None past i128.
    pub fn scaled(&self, by: i32) -> Option<i128> {
        let e = self.exp10 + by;
        let v = self.digits.checked_mul(1i128.checked_shl(self.exp2)?)?;
        if e >= 0 {
            v.checked_mul(10i128.checked_pow(e as u32)?)
        } else {
            match 10i128.checked_pow(e.unsigned_abs()) {
                Some(d) => Some(v.div_euclid(d) + i128::from(v.rem_euclid(d) != 0)),
                // Smaller than any unit asked for: rounds up to 1 if positive.
                None => Some(i128::from(v > 0)),
            }
        }
    }

    /// In thousandths (`MilliValue`): how quantities of one resource are compared.
    pub fn milli(&self) -> Option<i128> {
        self.scaled(3)
    }

    pub fn is_negative(&self) -> bool {
        self.digits < 0
    }

    /// A whole number, as extended resources must be.
    pub fn is_integer(&self) -> bool {
        self.milli().is_some_and(|m| m % 1000 == 0)
    }
}

/// A quantity in bytes (`64Mi`, `1G`, `512k`, `1e6`), rounded up; None if it does not parse
/// or is negative.
pub fn bytes(q: &str) -> Option<u64> {
    let q = Quantity::parse(q.trim())?;
    u64::try_from(q.scaled(0)?).ok()
}

/// A CPU quantity in millicores (`500m`, `1`, `0.25`, and the metrics API's `179000000n`
/// and `250000u`, rounded up as Kubernetes' `MilliValue` rounds).
pub fn millicores(q: &str) -> Option<u64> {
    let q = Quantity::parse(q.trim())?;
    u64::try_from(q.milli()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(bytes("64Mi"), Some(64 << 20));
        assert_eq!(bytes("1G"), Some(1_000_000_000));
        assert_eq!(bytes("1e3"), Some(1000));
        assert_eq!(bytes("1E3"), Some(1000));
        assert_eq!(bytes("2Pi"), Some(2 << 50));
        assert_eq!(bytes("1E"), Some(1_000_000_000_000_000_000));
        assert_eq!(bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(bytes("0.5"), Some(1), "rounded up");
        assert_eq!(bytes("12x"), None);
        assert_eq!(bytes("512mb"), None);
        assert_eq!(bytes("1Gb"), None);
        assert_eq!(bytes("-1Mi"), None);
        assert_eq!(millicores("250m"), Some(250));
        assert_eq!(millicores("1.5"), Some(1500));
        assert_eq!(millicores("0.1"), Some(100));
        assert_eq!(millicores("1.1"), Some(1100));
        assert_eq!(millicores(".5"), Some(500));
        assert_eq!(millicores("5."), Some(5000));
        assert_eq!(millicores("2k"), Some(2_000_000));
        assert_eq!(millicores("-1"), None);
        assert_eq!(millicores("179000000n"), Some(179));
        assert_eq!(millicores("179000001n"), Some(180));
        assert_eq!(millicores("250000u"), Some(250));
        assert_eq!(millicores("1e-3"), Some(1));
        for bad in [
            "", ".", "1..2", "1.2.3", "m", "1mm", "1e", "1e+", "abc", "1 Gi", "--1",
        ] {
            assert_eq!(Quantity::parse(bad), None, "{bad:?}");
        }
        let q = |s| Quantity::parse(s).unwrap();
        assert!(q("-2").is_negative());
        assert_eq!(q("-1.5").milli(), Some(-1500));
        assert!(q("2").is_integer() && q("1k").is_integer());
        assert!(!q("500m").is_integer() && !q("1.0001").is_integer());
        assert_eq!(q("1Gi").milli(), q("1073741824").milli());
    }
}
