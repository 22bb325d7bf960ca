//! Thresholds in k6's manner: a bound on a named metric, judged in three
//! bands. Green: keel's own target is met. Yellow: the seed's threshold (the
//! floor) is met but keel's target is not. Red: below the floor (or, where
//! the seed names no threshold, the target missed). A threshold on a metric
//! the scenario did not produce is a harness error, never a pass (k6 #1526).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Error;

/// A bound on a metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "op", content = "value", rename_all = "snake_case")]
pub enum Bound {
    /// At most.
    Le(f64),
    /// At least.
    Ge(f64),
    /// Within `1` of `0`.
    Within(f64, f64),
}

impl Bound {
    /// Whether `v` is within the bound.
    pub fn holds(self, v: f64) -> bool {
        match self {
            Bound::Le(b) => v <= b,
            Bound::Ge(b) => v >= b,
            Bound::Within(target, tol) => (v - target).abs() <= tol,
        }
    }

    /// As text (`<= 2`, `>= 0.99`, `= 5 ± 0.005`).
    pub fn text(self) -> String {
        match self {
            Bound::Le(b) => format!("<= {}", num(b)),
            Bound::Ge(b) => format!(">= {}", num(b)),
            Bound::Within(t, 0.0) => format!("= {}", num(t)),
            Bound::Within(t, tol) => format!("= {} ± {}", num(t), num(tol)),
        }
    }
}

/// A number without trailing zeros.
pub fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// One threshold of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Threshold {
    /// The metric it bounds.
    pub metric: &'static str,
    /// Its unit, for display.
    pub unit: &'static str,
    /// The seed's threshold (the floor), if the seed names one.
    pub seed: Option<Bound>,
    /// keel's own target.
    pub target: Bound,
}

impl Threshold {
    /// A threshold on `metric` (in `unit`): the seed's floor, if it names
    /// one, and keel's target.
    pub const fn new(
        metric: &'static str,
        unit: &'static str,
        seed: Option<Bound>,
        target: Bound,
    ) -> Threshold {
        Threshold {
            metric,
            unit,
            seed,
            target,
        }
    }
}

impl Threshold {
    /// `metric` must be 0, by the seed and by keel (errors, losses, ...).
    pub const fn zero(metric: &'static str) -> Threshold {
        Threshold::new(metric, "", Some(Bound::Le(0.0)), Bound::Le(0.0))
    }

    /// `metric`, a ratio, must be 1, by the seed and by keel (everything
    /// delivered, every session opened, ...).
    pub const fn all(metric: &'static str) -> Threshold {
        Threshold::new(metric, "", Some(Bound::Ge(1.0)), Bound::Ge(1.0))
    }

    /// `metric` must be exactly `v`, by the seed and by keel.
    pub const fn exact(metric: &'static str, v: f64) -> Threshold {
        Threshold::new(
            metric,
            "",
            Some(Bound::Within(v, 0.0)),
            Bound::Within(v, 0.0),
        )
    }
}

/// A judgement band.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Band {
    /// keel's target met.
    Green,
    /// The seed's floor met, keel's target not.
    Yellow,
    /// Below the floor.
    Red,
}

impl Band {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Band::Green => "green",
            Band::Yellow => "yellow",
            Band::Red => "red",
        }
    }
}

/// A threshold judged against what was observed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judged {
    /// The metric.
    pub metric: String,
    /// Its unit.
    pub unit: String,
    /// What was observed.
    pub observed: f64,
    /// The seed's threshold, as text (`—` when the seed names none).
    pub seed: String,
    /// keel's target, as text.
    pub target: String,
    /// The band.
    pub band: Band,
}

/// Judges every threshold; a metric that was not measured is an error.
pub fn judge(
    thresholds: &[Threshold],
    metrics: &BTreeMap<String, f64>,
) -> Result<Vec<Judged>, Error> {
    thresholds
        .iter()
        .map(|t| {
            let observed = *metrics.get(t.metric).ok_or_else(|| {
                Error::UnknownMetric(format!(
                    "threshold on {:?}, which the scenario did not measure (it measured: {})",
                    t.metric,
                    metrics.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
            let band = if t.target.holds(observed) {
                Band::Green
            } else if t.seed.is_some_and(|s| s.holds(observed)) {
                Band::Yellow
            } else {
                Band::Red
            };
            Ok(Judged {
                metric: t.metric.to_owned(),
                unit: t.unit.to_owned(),
                observed,
                seed: t.seed.map_or_else(|| "—".to_owned(), Bound::text),
                target: t.target.text(),
                band,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Threshold = Threshold {
        metric: "connect_s",
        unit: "s",
        seed: Some(Bound::Le(30.0)),
        target: Bound::Le(2.0),
    };

    #[test]
    fn bands() {
        let m = |v: f64| BTreeMap::from([("connect_s".to_owned(), v)]);
        assert_eq!(judge(&[T], &m(1.5)).unwrap()[0].band, Band::Green);
        assert_eq!(judge(&[T], &m(10.0)).unwrap()[0].band, Band::Yellow);
        assert_eq!(judge(&[T], &m(31.0)).unwrap()[0].band, Band::Red);
        let no_floor = Threshold { seed: None, ..T };
        assert_eq!(judge(&[no_floor], &m(3.0)).unwrap()[0].band, Band::Red);
    }

    #[test]
    fn an_unknown_metric_is_an_error_not_a_pass() {
        let e = judge(&[T], &BTreeMap::new()).unwrap_err();
        assert!(matches!(e, Error::UnknownMetric(_)), "{e}");
    }

    #[test]
    fn bounds_as_text() {
        assert_eq!(Bound::Le(2.0).text(), "<= 2");
        assert_eq!(Bound::Ge(0.99).text(), ">= 0.99");
        assert_eq!(Bound::Within(2000.0, 5.0).text(), "= 2000 ± 5");
    }
}
