//! The bus flags every service shares.

use std::path::PathBuf;
use tether_protocol::Subjects;

use crate::{Bus, BusAuth, BusConfig, BusError};

#[derive(Clone, clap::Args)]
pub struct BusArgs {
    /// NATS server URL(s), comma-separated. `tls://` requires TLS;
    /// `nats://user:password@host` and `nats://token@host` carry credentials.
    #[arg(long, env = "TETHER_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Prefix of every subject.
    #[arg(long, env = "TETHER_PREFIX", default_value = "tether")]
    pub prefix: String,
    /// Number of shards in the whole system (must match every service).
    #[arg(long, env = "TETHER_SHARDS", default_value_t = 16)]
    pub shards: u16,
    /// NATS user (with --nats-password).
    #[arg(long, env = "TETHER_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password (prefer the environment variable to the flag).
    #[arg(long, env = "TETHER_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS token (prefer the environment variable to the flag).
    #[arg(long, env = "TETHER_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// File holding the NATS nkey seed (`SU...`).
    #[arg(long, env = "TETHER_NATS_NKEY_FILE")]
    pub nats_nkey_file: Option<PathBuf>,
    /// NATS `.creds` file (user JWT and nkey seed).
    #[arg(long, env = "TETHER_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// PEM file of the CA that signed the NATS server's certificate (implies TLS).
    #[arg(long, env = "TETHER_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with --nats-tls-key).
    #[arg(long, env = "TETHER_NATS_TLS_CERT")]
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM key of the client certificate.
    #[arg(long, env = "TETHER_NATS_TLS_KEY")]
    pub nats_tls_key: Option<PathBuf>,
    /// Require TLS even with a `nats://` URL.
    #[arg(long, env = "TETHER_NATS_TLS", default_value_t = false, action = clap::ArgAction::Set)]
    pub nats_tls: bool,
}

impl std::fmt::Debug for BusArgs {
    // Secrets stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusArgs")
            .field("nats_url", &redact_url(&self.nats_url))
            .field("prefix", &self.prefix)
            .field("shards", &self.shards)
            .field("nats_user", &self.nats_user)
            .field(
                "nats_password",
                &self.nats_password.as_ref().map(|_| "<set>"),
            )
            .field("nats_token", &self.nats_token.as_ref().map(|_| "<set>"))
            .field("nats_nkey_file", &self.nats_nkey_file)
            .field("nats_creds", &self.nats_creds)
            .field("nats_tls_ca", &self.nats_tls_ca)
            .field("nats_tls_cert", &self.nats_tls_cert)
            .field("nats_tls_key", &self.nats_tls_key)
            .field("nats_tls", &self.nats_tls)
            .finish()
    }
}

/// The URL list with any password or token replaced.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}<redacted>{}", &u[..s + 3], &u[at..]),
            (None, Some(at)) => format!("<redacted>{}", &u[at..]),
            _ => u.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl BusArgs {
    /// The authentication and TLS options these flags give.
    pub fn auth(&self) -> Result<BusAuth, BusError> {
        let nkey_seed = match &self.nats_nkey_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                BusError::Request(format!("reading the nkey seed {}: {e}", path.display()))
            })?),
            None => None,
        };
        Ok(BusAuth {
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            token: self.nats_token.clone(),
            nkey_seed,
            creds_file: self.nats_creds.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            tls_required: self.nats_tls,
        })
    }

    /// Connects as `name` (retrying in the background, see [`crate::connect_with()`]).
    pub async fn connect(&self, name: &str) -> Result<Bus, BusError> {
        let auth = self.auth()?;
        let (client, stats) = crate::connect_with(
            &BusConfig {
                url: self.nats_url.clone(),
                name: name.to_owned(),
            },
            &auth,
        )
        .await
        .map_err(|e| BusError::Request(format!("connect: {e}")))?;
        Ok(Bus::new(client, Subjects::new(&self.prefix), stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_print_without_secrets() {
        assert_eq!(
            redact_url("nats://u:p@h1:4222,tls://h2:4222"),
            "nats://<redacted>@h1:4222,tls://h2:4222"
        );
        assert_eq!(redact_url("tok@h:1"), "<redacted>@h:1");
    }
}
