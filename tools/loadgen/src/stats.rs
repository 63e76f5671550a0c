//! Distributions: mean and percentiles of a sample.
//!
//! Percentiles interpolate linearly between the two nearest ranks of the
//! sorted sample (position (n − 1)·q, as numpy's default): p50 of 1…100 is
//! 50.5, p90 90.1, p99 99.01. Non-finite values are dropped; an empty
//! sample gives all zeros and `count` 0.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Dist {
    /// Values in the sample.
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// The `q`-quantile (0 ≤ q ≤ 1) of a sorted, non-empty sample.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    let pos = last as f64 * q.clamp(0.0, 1.0);
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

impl Dist {
    pub fn of(mut v: Vec<f64>) -> Self {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        Self {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: quantile(&v, 0.5),
            p90: quantile(&v, 0.9),
            p99: quantile(&v, 0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn percentiles_of_one_to_a_hundred() {
        // Shuffled input: the order must not matter.
        let v: Vec<f64> = (1..=100).map(|i| f64::from((i * 37) % 100 + 1)).collect();
        let d = Dist::of(v);
        assert_eq!(d.count, 100);
        assert!(close(d.mean, 50.5));
        assert!(close(d.p50, 50.5), "{}", d.p50);
        assert!(close(d.p90, 90.1), "{}", d.p90);
        assert!(close(d.p99, 99.01), "{}", d.p99);
    }

    #[test]
    fn small_and_odd_samples() {
        assert_eq!(Dist::of(vec![]), Dist::default());
        let one = Dist::of(vec![3.0]);
        assert_eq!((one.count, one.mean, one.p50, one.p99), (1, 3.0, 3.0, 3.0));
        let two = Dist::of(vec![4.0, 2.0]);
        assert!(close(two.p50, 3.0) && close(two.p90, 3.8) && close(two.p99, 3.98));
        let nan = Dist::of(vec![f64::NAN, 1.0, f64::INFINITY]);
        assert_eq!((nan.count, nan.p50), (1, 1.0));
        assert_eq!(quantile(&[1.0, 2.0, 3.0], 0.0), 1.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0], 1.0), 3.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0], 0.5), 2.0);
    }
}
