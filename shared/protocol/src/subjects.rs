//! Every subject Tether uses, under one prefix (default `tether`).
//! `docs/protocol.md` documents each: payload, publisher, subscribers.

/// The default subject prefix.
pub const DEFAULT_PREFIX: &str = "tether";

/// The queue group the scheduler replicas share for route requests.
pub const SCHEDULER_QUEUE_GROUP: &str = "tether-scheduler";

/// Builds subject names under a prefix.
#[derive(Clone, Debug)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Subjects {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('.').to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<p>.events.<shard>` — [`crate::RequestEvent`]s of the sessions in `shard`.
    pub fn events(&self, shard: u16) -> String {
        format!("{}.events.{shard}", self.prefix)
    }

    /// `<p>.events.*` — every shard's events.
    pub fn events_all(&self) -> String {
        format!("{}.events.*", self.prefix)
    }

    /// `<p>.state.<shard>` — [`crate::StateDelta`]s of `shard`.
    pub fn state(&self, shard: u16) -> String {
        format!("{}.state.{shard}", self.prefix)
    }

    /// `<p>.state.*` — every shard's deltas.
    pub fn state_all(&self) -> String {
        format!("{}.state.*", self.prefix)
    }

    /// `<p>.snapshot.<shard>` — request-reply, [`crate::SnapshotRequest`] → [`crate::SnapshotPage`].
    pub fn snapshot(&self, shard: u16) -> String {
        format!("{}.snapshot.{shard}", self.prefix)
    }

    /// `<p>.session.<shard>` — request-reply, [`crate::SessionQuery`] → [`crate::SessionView`].
    pub fn session(&self, shard: u16) -> String {
        format!("{}.session.{shard}", self.prefix)
    }

    /// `<p>.route` — request-reply, [`crate::RouteRequest`] → [`crate::RouteDecision`].
    pub fn route(&self) -> String {
        format!("{}.route", self.prefix)
    }

    /// `<p>.kv.<engine>` — [`crate::KvEventBatch`]es of one engine. Characters
    /// a NATS subject token cannot hold (`.`, `*`, `>`, whitespace) become `_`.
    pub fn kv(&self, engine: &str) -> String {
        let token: String = engine
            .chars()
            .map(|c| {
                if matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        format!("{}.kv.{token}", self.prefix)
    }

    /// `<p>.kv-snapshot` — request-reply, [`crate::KvSnapshotRequest`] →
    /// [`crate::KvSnapshotPage`], answered by the KV events relay.
    pub fn kv_snapshot(&self) -> String {
        format!("{}.kv-snapshot", self.prefix)
    }

    /// `<p>.kv.*` — every engine's KV cache events.
    pub fn kv_all(&self) -> String {
        format!("{}.kv.*", self.prefix)
    }

    /// The shard number at the end of a per-shard subject, if it has one.
    pub fn shard_suffix(subject: &str) -> Option<u16> {
        subject.rsplit('.').next()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_live_under_the_prefix() {
        let s = Subjects::new("acme.");
        assert_eq!(s.events(3), "acme.events.3");
        assert_eq!(s.state_all(), "acme.state.*");
        assert_eq!(s.route(), "acme.route");
        assert_eq!(Subjects::shard_suffix("acme.events.12"), Some(12));
        assert_eq!(Subjects::shard_suffix("acme.route"), None);
        assert_eq!(s.kv("sim-1"), "acme.kv.sim-1");
        assert_eq!(s.kv("a.b *>"), "acme.kv.a_b___");
        assert_eq!(s.kv_all(), "acme.kv.*");
    }
}
