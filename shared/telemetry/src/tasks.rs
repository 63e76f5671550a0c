//! The tasks a started service runs, and its admin endpoint: what every
//! service's `start` builds the same way around its own work.

use std::net::SocketAddr;
use tokio::task::JoinHandle;

use crate::{AdminState, Shutdown, admin_router, spawn_server};

/// The tasks of a started service. They stop when its shutdown token fires;
/// [`Tasks::join`] waits for that.
#[derive(Default)]
pub struct Tasks(Vec<JoinHandle<()>>);

impl Tasks {
    pub fn push(&mut self, task: JoinHandle<()>) {
        self.0.push(task);
    }

    /// Waits until every task has stopped.
    pub async fn join(self) {
        for t in self.0 {
            let _ = t.await;
        }
    }

    /// Stops every task at once, without any shutdown path: what a crash
    /// leaves behind, for tests.
    pub fn abort(&self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl Extend<JoinHandle<()>> for Tasks {
    fn extend<I: IntoIterator<Item = JoinHandle<()>>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

/// Binds the admin endpoint (`/metrics`, `/health`, `/ready`) on `listen`,
/// adds its server to `tasks` and returns the bound address.
pub async fn serve_admin(
    listen: SocketAddr,
    admin: &AdminState,
    shutdown: &Shutdown,
    tasks: &mut Tasks,
) -> anyhow::Result<SocketAddr> {
    let (addr, server) = spawn_server(listen, admin_router(admin.clone()), shutdown.clone())
        .await
        .map_err(|err| anyhow::anyhow!("binding the admin endpoint on {listen}: {err}"))?;
    tasks.push(server);
    Ok(addr)
}
