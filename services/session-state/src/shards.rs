//! Shard ownership: `all`, or a comma-separated list of numbers and ranges.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShardSpecError {
    #[error("bad shard list {0:?}: expected `all` or numbers and ranges like `0-7,12`")]
    Syntax(String),
    #[error("shard {shard} is out of range: there are {shards} shards")]
    OutOfRange { shard: u16, shards: u16 },
    #[error("the shard list is empty")]
    Empty,
}

/// Parses a shard list against the total shard count. Sorted, deduplicated.
pub fn parse(spec: &str, shards: u16) -> Result<Vec<u16>, ShardSpecError> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("all") {
        return if shards == 0 {
            Err(ShardSpecError::Empty)
        } else {
            Ok((0..shards).collect())
        };
    }
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || ShardSpecError::Syntax(spec.to_owned());
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (
                a.trim().parse::<u16>().map_err(|_| bad())?,
                b.trim().parse::<u16>().map_err(|_| bad())?,
            ),
            None => {
                let n = part.parse::<u16>().map_err(|_| bad())?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(bad());
        }
        for s in lo..=hi {
            if s >= shards {
                return Err(ShardSpecError::OutOfRange { shard: s, shards });
            }
            out.push(s);
        }
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        Err(ShardSpecError::Empty)
    } else {
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists() {
        assert_eq!(parse("all", 4), Ok(vec![0, 1, 2, 3]));
        assert_eq!(parse("0-2, 5,1", 8), Ok(vec![0, 1, 2, 5]));
        assert_eq!(
            parse("9", 8),
            Err(ShardSpecError::OutOfRange {
                shard: 9,
                shards: 8
            })
        );
        assert!(matches!(parse("x", 8), Err(ShardSpecError::Syntax(_))));
        assert!(matches!(parse("3-1", 8), Err(ShardSpecError::Syntax(_))));
        assert_eq!(parse("", 8), Err(ShardSpecError::Empty));
    }
}
