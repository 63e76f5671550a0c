//! Resynchronising one shard: page through its snapshot and hand each page to
//! the scheduler actor. Runs as its own task so that route requests keep
//! being answered meanwhile.

use std::time::Duration;
use tether_bus::Bus;
use tether_protocol::{SnapshotPage, SnapshotRequest};
use tokio::sync::mpsc;

pub enum ResyncMsg {
    Page(SnapshotPage),
    /// The last page arrived; `seq` is the highest sequence number the pages carried.
    Done {
        shard: u16,
        epoch: u64,
        seq: u64,
    },
    Failed {
        shard: u16,
        error: String,
    },
}

pub fn spawn_resync(bus: Bus, shard: u16, page_size: u32, tx: mpsc::Sender<ResyncMsg>) {
    tokio::spawn(async move {
        let msg = match fetch(&bus, shard, page_size, &tx).await {
            Ok((epoch, seq)) => ResyncMsg::Done { shard, epoch, seq },
            Err(error) => ResyncMsg::Failed { shard, error },
        };
        let _ = tx.send(msg).await;
    });
}

async fn fetch(
    bus: &Bus,
    shard: u16,
    page_size: u32,
    tx: &mpsc::Sender<ResyncMsg>,
) -> Result<(u64, u64), String> {
    let mut after = None;
    let mut epoch = None;
    let mut seq = 0;
    loop {
        let req = SnapshotRequest {
            shard,
            after,
            limit: page_size,
        };
        let page: SnapshotPage = bus
            .request(bus.subjects.snapshot(shard), &req, Duration::from_secs(2))
            .await
            .map_err(|e| e.to_string())?;
        if *epoch.get_or_insert(page.epoch) != page.epoch {
            return Err("shard restarted during the snapshot".into());
        }
        seq = seq.max(page.seq);
        after = page.next;
        let last = after.is_none();
        let epoch_now = page.epoch;
        tx.send(ResyncMsg::Page(page))
            .await
            .map_err(|_| "scheduler stopped".to_owned())?;
        if last {
            return Ok((epoch_now, seq));
        }
    }
}
