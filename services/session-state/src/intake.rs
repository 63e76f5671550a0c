//! The event intake: one core-NATS subscription per owned shard, decoded and
//! fed to that shard's actor. The mailbox send waits when the actor is
//! behind, so pressure builds in the subscription's buffer; if that
//! overflows the client reports a slow consumer, which is counted.
//!
//! To source events from JetStream (durable, replayable after a restart),
//! replace [`spawn_intake`] with a consumer that acknowledges after the
//! mailbox accepts; nothing else in the service changes.

use futures::StreamExt;
use tether_bus::Bus;
use tether_protocol::RequestEvent;
use tether_telemetry::Shutdown;

use crate::actor::{Mailbox, ShardMsg};

pub async fn spawn_intake(
    bus: &Bus,
    shard: u16,
    mailbox: Mailbox,
    shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, tether_bus::BusError> {
    let mut sub = bus.subscribe(bus.subjects.events(shard)).await?;
    let bus = bus.clone();
    Ok(tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break,
                msg = sub.next() => match msg { Some(m) => m, None => break },
            };
            let Some(event) = bus.decode::<RequestEvent>(&msg, "events") else {
                continue;
            };
            let span = tracing::info_span!("session_state.apply", shard, call_id = event.call_id);
            tether_bus::follow(&span, &msg);
            if mailbox.send(ShardMsg::Event(event, span)).await.is_err() {
                break;
            }
        }
        let _ = sub.unsubscribe().await;
    }))
}
