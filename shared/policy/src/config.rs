//! Every knob of the policy in one place, with the defaults the services
//! start from (each is also a flag of the service that applies it; see the
//! README's configuration tables and `docs/policy.md`).

use crate::{CacheAwareConfig, CapacityConfig, CostModel, GateConfig, PlacementConfig};
use crate::{PriorityConfig, Strategy};

/// The whole policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyConfig {
    /// Where a call runs (scheduler `--strategy`).
    pub strategy: Strategy,
    /// Levels, ordering scope and the session's anti-starvation (scheduler).
    pub priority: PriorityConfig,
    /// Bounded load and affinity's allowance (scheduler).
    pub placement: PlacementConfig,
    /// Prefix-match and imbalance thresholds (scheduler).
    pub cache: CacheAwareConfig,
    /// Service and cache-saving cost model (ingress measures, scheduler
    /// prices the bind delay).
    pub cost: CostModel,
    /// The gateway queue (ingress).
    pub gate: GateConfig,
    /// Engine limits learned from engine signals (ingress).
    pub capacity: CapacityConfig,
}
