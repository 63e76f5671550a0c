//! A real nats-server for tests.
//!
//! The binary is found in this order: `$TETHER_NATS_SERVER`, the project's
//! tools folder (`.tools/venv/bin/nats-server`, where `just` installs it), then
//! `nats-server` on `PATH`.

use anyhow::Context;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    pub port: u16,
    child: Option<Child>,
    store: PathBuf,
}

fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TETHER_NATS_SERVER") {
        return PathBuf::from(p);
    }
    let local = crate::workspace_root().join(".tools/venv/bin/nats-server");
    if local.exists() {
        return local;
    }
    PathBuf::from("nats-server")
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts connections.
    pub fn start() -> anyhow::Result<Self> {
        let port = crate::free_port()?;
        let store = std::env::temp_dir().join(format!("tether-nats-{}-{port}", std::process::id()));
        let mut s = Self {
            port,
            child: None,
            store,
        };
        s.spawn()?;
        Ok(s)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = binary();
        let child = Command::new(&bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (run `just tools` to install nats-server)",
                    bin.display()
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::bail!("nats-server did not start on port {}", self.port)
    }

    /// Stops the server (clients see a disconnection).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}
