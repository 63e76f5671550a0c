//! Request-reply endpoints of one shard: snapshot pages and session queries.

use futures::StreamExt;
use tether_bus::Bus;
use tether_protocol::{SessionQuery, SnapshotRequest};
use tether_telemetry::Shutdown;
use tokio::sync::oneshot;

use crate::actor::{Mailbox, ShardMsg};

pub async fn spawn_responders(
    bus: &Bus,
    shard: u16,
    mailbox: Mailbox,
    shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, tether_bus::BusError> {
    let mut snapshots = bus.subscribe(bus.subjects.snapshot(shard)).await?;
    let mut queries = bus.subscribe(bus.subjects.session(shard)).await?;
    let bus = bus.clone();
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                msg = snapshots.next() => {
                    let Some(msg) = msg else { break };
                    let Some(req) = bus.decode::<SnapshotRequest>(&msg, "snapshot") else { continue };
                    let (tx, rx) = oneshot::channel();
                    if mailbox.send(ShardMsg::Snapshot(req, tx)).await.is_err() { break }
                    if let Ok(page) = rx.await
                        && let Err(err) = bus.respond(&msg, &page).await {
                            tracing::warn!(%err, shard, "snapshot reply failed");
                        }
                }
                msg = queries.next() => {
                    let Some(msg) = msg else { break };
                    let Some(q) = bus.decode::<SessionQuery>(&msg, "session") else { continue };
                    let span = tracing::info_span!("session_state.query", shard);
                    tether_bus::follow(&span, &msg);
                    let (tx, rx) = oneshot::channel();
                    if mailbox.send(ShardMsg::Query(q, tx)).await.is_err() { break }
                    if let Ok(view) = rx.await {
                        let _g = span.enter();
                        if let Err(err) = bus.respond(&msg, &view).await {
                            tracing::warn!(%err, shard, "session reply failed");
                        }
                    }
                }
            }
        }
        let _ = snapshots.unsubscribe().await;
        let _ = queries.unsubscribe().await;
    }))
}
