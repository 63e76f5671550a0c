//! The one Prometheus text-format parser that Tether's code and tests share:
//! the classic exposition format (version 0.0.4) and the OpenMetrics text
//! that `prometheus-client` writes (`# UNIT`, `# EOF`).
//!
//! A sample line is `name{label="value",…} value [timestamp]`: label values
//! may hold escaped quotes, backslashes and newlines, and even `}` or spaces;
//! the value may be `NaN`, `+Inf` or `-Inf`; a timestamp may follow. Reading
//! the value as "the text after the last space" — what the earlier parsers
//! did — returns the timestamp instead whenever one is present.
//!
//! [`parse`] is strict (the first malformed line is an error, for tests and
//! checks); [`samples`] skips malformed lines (for scraping engines, whose
//! exposition Tether does not control).

use std::fmt;

/// One sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    /// Label pairs in the order written, values unescaped.
    pub labels: Vec<(String, String)>,
    pub value: f64,
    /// Milliseconds since the epoch (seconds with a fraction in OpenMetrics).
    pub timestamp: Option<f64>,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A line that is not valid Prometheus text.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("line {line}: {reason}: {text:?}")]
pub struct PromError {
    pub line: usize,
    pub reason: &'static str,
    pub text: String,
}

/// Every sample of `text`, or the first malformed line.
pub fn parse(text: &str) -> Result<Vec<Sample>, PromError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |reason| PromError {
            line: i + 1,
            reason,
            text: line.to_owned(),
        };
        match classify(line) {
            Line::Blank => {}
            Line::Comment(c) => check_comment(c).map_err(err)?,
            Line::Sample(s) => out.push(sample(s).map_err(err)?),
        }
    }
    Ok(out)
}

/// The samples of `text` that parse; malformed lines are skipped.
pub fn samples(text: &str) -> impl Iterator<Item = Sample> + '_ {
    text.lines().filter_map(|line| match classify(line) {
        Line::Sample(s) => sample(s).ok(),
        _ => None,
    })
}

/// The sum of the finite samples named `name` (or, for counters,
/// `name_total`) whose labels include every pair of `labels`.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text)
        .filter(|s| is_named(&s.name, name))
        .filter(|s| labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .filter(|v| v.is_finite())
        .sum()
}

/// `series` is `name` or `name_total` (a counter as OpenMetrics names it).
pub fn is_named(series: &str, name: &str) -> bool {
    series == name || series.strip_suffix("_total") == Some(name)
}

enum Line<'a> {
    Blank,
    Comment(&'a str),
    Sample(&'a str),
}

fn classify(line: &str) -> Line<'_> {
    let t = line.trim();
    if t.is_empty() {
        Line::Blank
    } else if let Some(c) = t.strip_prefix('#') {
        Line::Comment(c)
    } else {
        Line::Sample(t)
    }
}

/// `# HELP name text`, `# TYPE name kind`, `# UNIT name unit`, `# EOF`; any
/// other comment is free text.
fn check_comment(c: &str) -> Result<(), &'static str> {
    let mut words = c.trim_start().splitn(3, ' ');
    match words.next() {
        Some("HELP") | Some("UNIT") => match words.next() {
            Some(n) if valid_name(n) => Ok(()),
            _ => Err("bad metric name in a HELP or UNIT line"),
        },
        Some("TYPE") => {
            let name = words.next().ok_or("TYPE without a name")?;
            if !valid_name(name) {
                return Err("bad metric name in a TYPE line");
            }
            match words.next().map(str::trim) {
                Some(
                    "counter" | "gauge" | "histogram" | "summary" | "untyped" | "unknown" | "info"
                    | "stateset" | "gaugehistogram",
                ) => Ok(()),
                _ => Err("unknown metric type"),
            }
        }
        _ => Ok(()),
    }
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn sample(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("a sample without a value")?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err("bad metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let (parsed, after) = label_set(body)?;
        labels = parsed;
        rest = after;
    }
    if !rest.starts_with(|c: char| c.is_whitespace()) {
        return Err("no space before the value");
    }
    let mut fields = rest.split_whitespace();
    let value = number(fields.next().ok_or("a sample without a value")?)?;
    let timestamp = match fields.next() {
        Some(t) => Some(
            t.parse::<f64>()
                .ok()
                .filter(|t| t.is_finite())
                .ok_or("bad timestamp")?,
        ),
        None => None,
    };
    // OpenMetrics exemplars follow a `#`; nothing else may.
    match fields.next() {
        None | Some("#") => {}
        Some(_) => return Err("text after the timestamp"),
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
        timestamp,
    })
}

type Labels = Vec<(String, String)>;

/// Parses `key="value",…}` and returns the pairs and what follows the `}`.
fn label_set(mut s: &str) -> Result<(Labels, &str), &'static str> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Ok((out, after));
        }
        let eq = s.find('=').ok_or("a label without '='")?;
        let key = s[..eq].trim();
        if !valid_label(key) {
            return Err("bad label name");
        }
        let quoted = s[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or("a label value without quotes")?;
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("an unterminated label value"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => return Err("a bad escape in a label value"),
                },
                Some((_, c)) => value.push(c),
            }
        };
        out.push((key.to_owned(), value));
        s = quoted[end + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return Err("labels not separated by ','");
        }
    }
}

fn number(s: &str) -> Result<f64, &'static str> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().map_err(|_| "bad value"),
    }
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        if !self.labels.is_empty() {
            let pairs: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect();
            write!(f, "{{{}}}", pairs.join(","))?;
        }
        write!(f, " {}", self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timestamp_is_not_the_value() {
        let s = parse("vllm:num_requests_running{model_name=\"m\"} 3 1712345678901\n").unwrap();
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[0].timestamp, Some(1_712_345_678_901.0));
        assert_eq!(sum("x 1 17\nx{a=\"b\"} 2\n", "x", &[]), 3.0);
    }

    #[test]
    fn label_values_may_hold_quotes_braces_and_spaces() {
        let s = parse(r#"m{path="/a b}",q="say \"hi\"\\",n="x\ny"} +Inf"#).unwrap();
        assert_eq!(s[0].label("path"), Some("/a b}"));
        assert_eq!(s[0].label("q"), Some("say \"hi\"\\"));
        assert_eq!(s[0].label("n"), Some("x\ny"));
        assert_eq!(s[0].value, f64::INFINITY);
    }

    #[test]
    fn openmetrics_from_prometheus_client_parses() {
        let text = "# HELP tether_x_calls Calls.\n# TYPE tether_x_calls counter\n\
                    tether_x_calls_total{outcome=\"ok\"} 2\n\
                    # TYPE tether_x_seconds histogram\n# UNIT tether_x_seconds seconds\n\
                    tether_x_seconds_bucket{le=\"0.1\"} 1\ntether_x_seconds_bucket{le=\"+Inf\"} 2\n\
                    tether_x_seconds_sum 0.3\ntether_x_seconds_count 2\n# EOF\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(sum(text, "tether_x_calls", &[("outcome", "ok")]), 2.0);
        assert_eq!(sum(text, "tether_x_calls", &[("outcome", "error")]), 0.0);
    }

    #[test]
    fn malformed_lines_are_errors_or_skipped() {
        for bad in [
            "1metric 2",
            "m{a=b} 1",
            "m{a=\"b} 1",
            "m{a=\"b\"}1",
            "m one",
            "m 1 2 3",
            "m",
            "# TYPE m flavour",
            "m{a=\"\\q\"} 1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
            assert_eq!(samples(bad).count(), 0, "{bad}");
        }
        assert_eq!(samples("junk here\nm 1\n").count(), 1);
    }

    #[test]
    fn special_values() {
        let s = parse("a NaN\nb -Inf\nc 1e-3\n").unwrap();
        assert!(s[0].value.is_nan());
        assert_eq!(s[1].value, f64::NEG_INFINITY);
        assert_eq!(s[2].value, 0.001);
    }
}
