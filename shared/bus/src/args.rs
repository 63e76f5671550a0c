//! The bus flags every service shares.

use tether_protocol::Subjects;

use crate::{Bus, BusConfig, BusError};

#[derive(Clone, Debug, clap::Args)]
pub struct BusArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "TETHER_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Prefix of every subject.
    #[arg(long, env = "TETHER_PREFIX", default_value = "tether")]
    pub prefix: String,
    /// Number of shards in the whole system (must match every service).
    #[arg(long, env = "TETHER_SHARDS", default_value_t = 16)]
    pub shards: u16,
}

impl BusArgs {
    /// Connects as `name` (retrying in the background, see [`crate::connect()`]).
    pub async fn connect(&self, name: &str) -> Result<Bus, BusError> {
        Bus::connect(
            &BusConfig {
                url: self.nats_url.clone(),
                name: name.to_owned(),
            },
            Subjects::new(&self.prefix),
        )
        .await
    }
}
