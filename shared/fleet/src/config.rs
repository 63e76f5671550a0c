//! The fleet file. `deploy/local/fleet.toml` is the local example:
//!
//! ```toml
//! [[engines]]
//! name = "sim-1"                     # shown in x-tether-engine; unique
//! url = "http://127.0.0.1:8101"      # base URL; /v1/... is appended
//! models = ["llama-3-8b"]            # models it serves
//! kind = "vllm"                      # vllm | sglang | openai (metric names)
//! priority = false                   # accepts a request `priority` field
//! max_concurrency = 64               # calls at once before the ingress queues
//! cache_tokens = 450000              # KV cache capacity, tokens
//! kv_events = "tcp://127.0.0.1:5557" # KV cache events (ZMQ PUB); optional
//! kv_replay = "tcp://127.0.0.1:5558" # their replay socket; optional
//! ```

use serde::Deserialize;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot read fleet file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("fleet file {path} is not valid: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("fleet is invalid: {0}")]
    Invalid(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    #[default]
    Vllm,
    Sglang,
    /// Any OpenAI-compatible server without known metrics.
    Openai,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub kind: EngineKind,
    /// Whether the engine schedules by a request `priority` field (vLLM
    /// `--scheduling-policy priority`).
    #[serde(default)]
    pub priority: bool,
    /// Calls the engine takes at once before the ingress holds further calls.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
    /// The engine's KV cache capacity in tokens, for the affinity-freshness
    /// estimate (Llama-3-8B on an 80 GB GPU holds about 450,000).
    #[serde(default = "default_cache_tokens")]
    pub cache_tokens: u64,
    /// The engine's KV cache events publisher (vLLM `--kv-events-config`
    /// `endpoint`, ZMQ PUB), e.g. `tcp://10.0.0.5:5557`; `tether-kv-events`
    /// subscribes to it. None: the engine's cache is only estimated.
    #[serde(default)]
    pub kv_events: Option<String>,
    /// Its replay socket (vLLM `replay_endpoint`, ZMQ ROUTER), for batches
    /// missed in a gap. None: a gap resets what is known of the engine.
    #[serde(default)]
    pub kv_replay: Option<String>,
}

fn default_max_concurrency() -> u32 {
    256
}

fn default_cache_tokens() -> u64 {
    450_000
}

impl EngineConfig {
    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    /// The engine's URL for an API path (`/v1/chat/completions`).
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{}", self.url.trim_end_matches('/'), path)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    #[serde(default)]
    pub engines: Vec<EngineConfig>,
}

impl FleetConfig {
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, FleetError> {
        let fleet: Self = toml::from_str(text).map_err(|source| FleetError::Parse {
            path: origin.to_owned(),
            source,
        })?;
        fleet.validate()?;
        Ok(fleet)
    }

    pub fn load(path: &Path) -> Result<Self, FleetError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| FleetError::Read {
            path: origin.clone(),
            source,
        })?;
        Self::from_toml(&text, &origin)
    }

    pub fn validate(&self) -> Result<(), FleetError> {
        let mut names = std::collections::HashSet::new();
        for e in &self.engines {
            if e.name.is_empty() || e.name.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(FleetError::Invalid(format!("bad engine name {:?}", e.name)));
            }
            if !names.insert(e.name.as_str()) {
                return Err(FleetError::Invalid(format!(
                    "engine {:?} is listed twice",
                    e.name
                )));
            }
            if !(e.url.starts_with("http://") || e.url.starts_with("https://")) {
                return Err(FleetError::Invalid(format!(
                    "engine {:?}: url must start with http://",
                    e.name
                )));
            }
            if e.max_concurrency == 0 {
                return Err(FleetError::Invalid(format!(
                    "engine {:?}: max_concurrency must be > 0",
                    e.name
                )));
            }
        }
        Ok(())
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.engines.iter().position(|e| e.name == name)
    }

    /// Every model the fleet serves, sorted, without duplicates.
    pub fn models(&self) -> Vec<String> {
        let mut m: Vec<String> = self
            .engines
            .iter()
            .flat_map(|e| e.models.iter().cloned())
            .collect();
        m.sort();
        m.dedup();
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_example() {
        let f = FleetConfig::from_toml(
            r#"
            [[engines]]
            name = "a"
            url = "http://127.0.0.1:1/"
            models = ["m"]
            [[engines]]
            name = "b"
            url = "http://127.0.0.1:2"
            priority = true
            kind = "sglang"
            "#,
            "test",
        );
        let f = match f {
            Ok(f) => f,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(f.engines.len(), 2);
        assert_eq!(
            f.engines[0].endpoint("/v1/models"),
            "http://127.0.0.1:1/v1/models"
        );
        assert!(f.engines[1].serves("anything"));
        assert!(!f.engines[0].serves("other"));
        assert_eq!(f.engines[1].kind, EngineKind::Sglang);
        assert_eq!(f.models(), vec!["m".to_string()]);
    }

    #[test]
    fn rejects_duplicates_and_bad_urls() {
        let dup = "[[engines]]\nname='a'\nurl='http://x'\n[[engines]]\nname='a'\nurl='http://y'\n";
        assert!(matches!(
            FleetConfig::from_toml(dup, "t"),
            Err(FleetError::Invalid(_))
        ));
        let bad = "[[engines]]\nname='a'\nurl='ftp://x'\n";
        assert!(matches!(
            FleetConfig::from_toml(bad, "t"),
            Err(FleetError::Invalid(_))
        ));
        assert!(matches!(
            FleetConfig::from_toml("engines = 3", "t"),
            Err(FleetError::Parse { .. })
        ));
    }
}
