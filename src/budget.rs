//! The stall budget: a global cap on stalling requests in flight.
//!
//! A handler that blocks its worker on purpose takes a [`StallPermit`] first.
//! When `limits.max_stalling_in_flight` permits are out, the request is
//! refused at once with 503 and `Retry-After`, instead of queueing: a queue of
//! blocking handlers would hold every worker for as long as the queue is deep.

use tokio::sync::OwnedSemaphorePermit;

use crate::error::AppError;
use crate::state::AppState;

/// Held for the whole life of a stalling handler; dropping it returns the
/// permit to the budget.
#[derive(Debug)]
#[must_use = "the permit returns to the budget when dropped"]
pub(crate) struct StallPermit {
    _permit: OwnedSemaphorePermit,
}

impl StallPermit {
    /// Takes a permit, or refuses at once. `try_acquire`, not
    /// `acquire().await`: waiting here would turn the budget into a queue
    /// (see the module docs).
    pub(crate) fn acquire(state: &AppState) -> Result<Self, AppError> {
        state
            .stall_budget
            .clone()
            .try_acquire_owned()
            .map(|permit| StallPermit { _permit: permit })
            .map_err(|_| AppError::StallBudget {
                limit: state.limits.max_stalling_in_flight,
            })
    }
}
