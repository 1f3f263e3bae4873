//! Kubernetes resource quantities (`500m`, `2`, `1.5Gi`, `1e3`), parsed
//! without regular expressions.
//!
//! Grammar (from `k8s.io/apimachinery/pkg/api/resource`):
//!
//! ```text
//! quantity        := signed-number suffix
//! signed-number   := [ "+" | "-" ] number
//! number          := digits | digits "." [ digits ] | "." digits
//! suffix          := binary-SI | decimal-SI | ("e" | "E") signed-integer
//! binary-SI       := "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
//! decimal-SI      := "n" | "u" | "m" | "" | "k" | "M" | "G" | "T" | "P" | "E"
//! ```

/// A parsed quantity, as an approximate value in base units (cores, bytes).
///
/// The `f64` is only used to compare a request with its limit; the string
/// travels to Kubernetes unchanged.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Quantity(pub f64);

/// Why a quantity does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QuantityError(String);

impl Quantity {
    /// Parses a Kubernetes quantity.
    pub fn parse(s: &str) -> Result<Quantity, QuantityError> {
        let bad = |why: &str| {
            Err(QuantityError(format!(
                "{s:?} is not a Kubernetes quantity: {why}"
            )))
        };
        if s.is_empty() {
            return bad("empty");
        }
        let b = s.as_bytes();
        let mut i = 0;
        let negative = match b[0] {
            b'+' => {
                i += 1;
                false
            }
            b'-' => {
                i += 1;
                true
            }
            _ => false,
        };
        let int_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let int_digits = i - int_start;
        let mut frac_digits = 0;
        if i < b.len() && b[i] == b'.' {
            i += 1;
            let frac_start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            frac_digits = i - frac_start;
        }
        if int_digits + frac_digits == 0 {
            return bad("no digits");
        }
        let number: f64 = match s[int_start..i].parse::<f64>() {
            Ok(n) => n,
            // "5." parses in Kubernetes but not always in Rust; retry without the dot.
            Err(_) => match s[int_start..i].trim_end_matches('.').parse::<f64>() {
                Ok(n) => n,
                Err(_) => return bad("bad number"),
            },
        };
        let suffix = &s[i..];
        let multiplier = match suffix {
            "" => 1.0,
            "n" => 1e-9,
            "u" => 1e-6,
            "m" => 1e-3,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "E" => 1e18,
            "Ki" => 1024f64,
            "Mi" => 1024f64.powi(2),
            "Gi" => 1024f64.powi(3),
            "Ti" => 1024f64.powi(4),
            "Pi" => 1024f64.powi(5),
            "Ei" => 1024f64.powi(6),
            _ => {
                let Some(exp) = suffix.strip_prefix(['e', 'E']) else {
                    return bad("unknown suffix (use m, k, M, G, Ki, Mi, Gi, ... or e<exponent>)");
                };
                let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
                if digits.is_empty()
                    || digits.len() > 3
                    || !digits.bytes().all(|c| c.is_ascii_digit())
                {
                    return bad("bad exponent");
                }
                match exp.parse::<i32>() {
                    Ok(e) => 10f64.powi(e),
                    Err(_) => return bad("bad exponent"),
                }
            }
        };
        let value = number * multiplier;
        Ok(Quantity(if negative { -value } else { value }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_quantities() {
        let cases = [
            ("500m", 0.5),
            ("2", 2.0),
            ("1.5", 1.5),
            (".5", 0.5),
            ("5.", 5.0),
            ("+1k", 1000.0),
            ("1Gi", 1073741824.0),
            ("512Mi", 536870912.0),
            ("1e3", 1000.0),
            ("1E-3", 0.001),
            ("100M", 1e8),
            ("-1", -1.0),
        ];
        for (s, v) in cases {
            let q = Quantity::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert!(
                (q.0 - v).abs() < 1e-9 * v.abs().max(1.0),
                "{s} = {} != {v}",
                q.0
            );
        }
    }

    #[test]
    fn rejects_non_quantities() {
        for s in [
            "", "m", "1.2.3", "1gi", "1GB", "1 Gi", "one", "1e", "1e+", "1Ki2", "0x10", "1ee3",
        ] {
            assert!(Quantity::parse(s).is_err(), "{s:?} should be rejected");
        }
    }
}
