//! Lease-based shard ownership (`--lease-ttl-ms` > 0): replicas compete for
//! each shard's lease in the KV bucket `<prefix>-leases` and run the shards
//! whose lease they hold, so that a dead replica's shards move to a live one.
//!
//! - **Acquire**: `create` of the key `shard-<n>` (succeeds only when no live
//!   lease exists). The winner restores the shard from its snapshot and
//!   replays the stream after it, as after a restart.
//! - **Renew**: every TTL/3, `update` with the revision last written
//!   (compare-and-set). A revision mismatch means the lease was lost.
//! - **Expire**: the bucket drops an entry not renewed within the TTL; then
//!   another replica's `create` succeeds.
//! - **Fence**: an owner applies events only while its [`Fence`] holds:
//!   until 2/3 TTL after it *sent* its last successful renewal. The bucket
//!   measures the TTL from when it *received* that write, which is later, so
//!   the old owner has stopped applying before the entry can expire and a
//!   new owner can win it. A lost compare-and-set (the lease revision moved)
//!   revokes the fence at once; a fenced shard applies, acknowledges and
//!   publishes nothing, and is stopped.
//! - **Release**: on shutdown, after the shard's final snapshot, the key is
//!   deleted if it still holds our revision, so a successor need not wait
//!   for the TTL.
//!
//! Takeover after a replica dies takes at most TTL (expiry) + TTL/3 (the
//! next acquire attempt) + the bucket's expiry check, then the replay of the
//! events since the shard's last snapshot.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tether_bus::jetstream::{LeaseStore, LeaseUpdateErrorKind, lease_key};
use tether_telemetry::Shutdown;

use crate::metrics::Metrics;

/// Whether this process may still apply a shard's events.
#[derive(Clone, Debug)]
pub struct Fence {
    base: Instant,
    /// Nanoseconds after `base` until which the lease holds; `u64::MAX`: always.
    until_ns: Arc<AtomicU64>,
}

impl Fence {
    /// A fence that always holds (static ownership).
    pub fn always() -> Self {
        Self {
            base: Instant::now(),
            until_ns: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    /// A fence that holds until `until`.
    pub fn until(until: Instant) -> Self {
        let f = Self {
            base: Instant::now(),
            until_ns: Arc::new(AtomicU64::new(0)),
        };
        f.extend(until);
        f
    }

    pub fn holds(&self) -> bool {
        let now = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        now < self.until_ns.load(Ordering::Acquire)
    }

    fn extend(&self, until: Instant) {
        let ns = u64::try_from(until.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX - 1);
        self.until_ns.fetch_max(ns, Ordering::AcqRel);
    }

    pub fn revoke(&self) {
        self.until_ns.store(0, Ordering::Release);
    }
}

/// Starts a shard once its lease is won; returns the shard's tasks.
pub type StartShard = Arc<
    dyn Fn(
            u16,
            Fence,
            u64,
            Shutdown,
        )
            -> futures::future::BoxFuture<'static, anyhow::Result<Vec<tokio::task::JoinHandle<()>>>>
        + Send
        + Sync,
>;

/// Competes for one shard's lease until shutdown; runs the shard while held.
pub fn spawn_lease(
    store: LeaseStore,
    shard: u16,
    owner: String,
    ttl: Duration,
    start: StartShard,
    metrics: Metrics,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let key = lease_key(shard);
        let hold = ttl * 2 / 3;
        let period = (ttl / 3).max(Duration::from_millis(10));
        while !shutdown.is_cancelled() {
            let sent = Instant::now();
            let revision = match store.create(&key, owner.clone().into()).await {
                Ok(r) => r,
                Err(_) => {
                    // Held by another replica (or NATS unreachable): try again.
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(period) => continue,
                    }
                }
            };
            let fence = Fence::until(sent + hold);
            let token = shutdown.child_token();
            let tasks = match start(shard, fence.clone(), revision, token.clone()).await {
                Ok(t) => t,
                Err(err) => {
                    tracing::warn!(shard, %err, "could not start a leased shard; releasing it");
                    token.cancel();
                    let _ = store.delete_expect_revision(&key, Some(revision)).await;
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(period) => continue,
                    }
                }
            };
            metrics.leases.inc();
            tracing::info!(shard, revision, "shard lease acquired");
            let mut revision = revision;
            let released = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break true,
                    _ = tokio::time::sleep(period) => {}
                }
                let sent = Instant::now();
                match store.update(&key, owner.clone().into(), revision).await {
                    Ok(r) => {
                        revision = r;
                        fence.extend(sent + hold);
                    }
                    Err(err) if err.kind() == LeaseUpdateErrorKind::WrongLastRevision => {
                        tracing::warn!(shard, "shard lease lost to another owner");
                        break false;
                    }
                    Err(err) => {
                        if !fence.holds() {
                            tracing::warn!(shard, %err, "shard lease not renewed in time");
                            break false;
                        }
                    }
                }
            };
            if !released {
                // Stop applying at once; the final snapshot is skipped too.
                fence.revoke();
                metrics.lease_losses.inc();
            }
            token.cancel();
            for t in tasks {
                let _ = t.await;
            }
            metrics.leases.dec();
            if released {
                let _ = store.delete_expect_revision(&key, Some(revision)).await;
                break;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_hold_until_their_time_or_revocation() {
        assert!(Fence::always().holds());
        let f = Fence::until(Instant::now() + Duration::from_secs(3600));
        assert!(f.holds());
        f.revoke();
        assert!(!f.holds());
        let past = Fence::until(Instant::now());
        assert!(!past.holds());
    }
}
