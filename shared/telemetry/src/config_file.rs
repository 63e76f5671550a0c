//! The optional TOML config file. Every knob is a CLI flag with an environment
//! fallback (`TETHER_<KNOB>`); a file named by `--config <path>` (or
//! `TETHER_CONFIG`) supplies values for knobs given neither on the command
//! line nor in the environment. Precedence: flag > environment > file > default.
//!
//! Keys are the flags' long names with `_` or `-` (`nats_url = "nats://..."`);
//! arrays become comma-separated values.

use std::ffi::OsString;

/// The process arguments with the config file's values put in front, so that
/// clap (with `args_override_self`) lets the real flags win.
pub fn args_with_config_file() -> anyhow::Result<Vec<OsString>> {
    args_with_config_file_for("TETHER_")
}

/// The same for a binary whose environment variables carry another prefix
/// (engine-sim's `TETHER_SIM_`): the file is named by `--config` or
/// `<prefix>CONFIG`, and a key is skipped when `<prefix><KEY>` is set.
pub fn args_with_config_file_for(env_prefix: &str) -> anyhow::Result<Vec<OsString>> {
    let args: Vec<OsString> = std::env::args_os().collect();
    merge(
        args,
        env_prefix,
        |k| std::env::var_os(k).is_some(),
        |p| std::fs::read_to_string(p),
    )
}

fn merge(
    args: Vec<OsString>,
    env_prefix: &str,
    env_has: impl Fn(&str) -> bool,
    read: impl Fn(&str) -> std::io::Result<String>,
) -> anyhow::Result<Vec<OsString>> {
    let path = config_path(&args).or_else(|| std::env::var(format!("{env_prefix}CONFIG")).ok());
    let Some(path) = path else { return Ok(args) };
    let text = read(&path).map_err(|e| anyhow::anyhow!("cannot read config file {path}: {e}"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| anyhow::anyhow!("config file {path}: {e}"))?;
    let mut out: Vec<OsString> = args.iter().take(1).cloned().collect();
    for (key, value) in table {
        let key = key.replace('_', "-");
        let env = format!("{env_prefix}{}", key.replace('-', "_").to_uppercase());
        if key == "config" || env_has(&env) {
            continue;
        }
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        out.push(format!("--{key}").into());
        out.push(value.into());
    }
    out.extend(args.into_iter().skip(1));
    Ok(out)
}

fn config_path(args: &[OsString]) -> Option<String> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            return it.next().map(|p| p.to_string_lossy().into_owned());
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_go_first_and_env_wins() {
        let args = vec![
            "bin".into(),
            "--config".into(),
            "f.toml".into(),
            "--listen".into(),
            "x".into(),
        ];
        let file =
            "nats_url = \"nats://a:1\"\nshards = 8\nheaders = [\"a\", \"b\"]\nprefix = \"p\"\n";
        let merged = merge(
            args,
            "TETHER_",
            |k| k == "TETHER_PREFIX",
            |_| Ok(file.to_owned()),
        )
        .unwrap_or_default();
        let merged: Vec<String> = merged
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(merged[0], "bin");
        assert!(merged.windows(2).any(|w| w == ["--nats-url", "nats://a:1"]));
        assert!(merged.windows(2).any(|w| w == ["--shards", "8"]));
        assert!(merged.windows(2).any(|w| w == ["--headers", "a,b"]));
        assert!(!merged.iter().any(|a| a == "--prefix"));
        assert_eq!(
            merged[merged.len() - 2..],
            ["--listen".to_string(), "x".to_string()]
        );
    }

    #[test]
    fn no_file_no_change() {
        let args: Vec<OsString> = vec!["bin".into(), "--x".into()];
        assert_eq!(
            merge(args.clone(), "TETHER_", |_| false, |_| Ok(String::new())).unwrap_or_default(),
            args
        );
    }

    #[test]
    fn another_prefix_names_the_environment() {
        let args = vec!["bin".into(), "--config".into(), "f.toml".into()];
        let file = "listen = \"0.0.0.0:1\"\nname = \"a\"\nconfig = \"ignored\"\n";
        let merged = merge(
            args,
            "TETHER_SIM_",
            |k| k == "TETHER_SIM_NAME",
            |_| Ok(file.to_owned()),
        )
        .unwrap_or_default();
        let merged: Vec<String> = merged
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert!(merged.windows(2).any(|w| w == ["--listen", "0.0.0.0:1"]));
        assert!(!merged.iter().any(|a| a == "--name"));
        assert_eq!(merged.iter().filter(|a| *a == "--config").count(), 1);
    }
}
