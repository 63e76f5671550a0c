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

/// Waits until a server accepts connections on `port`, until `deadline`.
fn accepting(port: u16, deadline: Instant) -> anyhow::Result<()> {
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "nats-server did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
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
        accepting(self.port, Instant::now() + Duration::from_secs(10))
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

/// One node of a [`NatsCluster`].
struct Node {
    name: String,
    port: u16,
    child: Option<Child>,
    store: PathBuf,
}

/// nats-servers in one cluster, JetStream on each (their own stores),
/// every node routed to every other on loopback; stopped when dropped. A
/// node can be killed for good ([`NatsCluster::kill`]), as a lost machine.
pub struct NatsCluster {
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Starts `n` nodes named `n0`, `n1`, … and waits until each accepts
    /// connections (JetStream may still be electing its meta leader).
    pub fn start(n: usize) -> anyhow::Result<Self> {
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((crate::free_port()?, crate::free_port()?)))
            .collect::<std::io::Result<_>>()?;
        let bin = binary();
        let mut cluster = Self { nodes: Vec::new() };
        for (i, (port, route_port)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let store = std::env::temp_dir()
                .join(format!("tether-nats-cluster-{}-{port}", std::process::id()));
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, r))| format!("nats://127.0.0.1:{r}"))
                .collect();
            let child = Command::new(&bin)
                .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
                .arg(&store)
                .args(["--server_name", &name, "--cluster_name", "tether"])
                .args(["--cluster", &format!("nats://127.0.0.1:{route_port}")])
                .args(["--routes", &routes.join(",")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            cluster.nodes.push(Node {
                name,
                port: *port,
                child: Some(child),
                store,
            });
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for node in &cluster.nodes {
            accepting(node.port, deadline)?;
        }
        Ok(cluster)
    }

    /// Every node's URL, comma-separated (what `--nats-url` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills the node of that server name (SIGKILL), for good; false when
    /// no running node has it.
    pub fn kill(&mut self, name: &str) -> bool {
        let Some(node) = self.nodes.iter_mut().find(|n| n.name == name) else {
            return false;
        };
        match node.child.take() {
            Some(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
                true
            }
            None => false,
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = std::fs::remove_dir_all(&node.store);
        }
    }
}
