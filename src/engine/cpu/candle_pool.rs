//! How long candle's own worker threads wait for work before they sleep.
//!
//! candle 0.11 runs its parallel elementwise ops on a pool of its own, beside rayon's threads that
//! run these kernels. After each op its workers spin 25 000 times (about half a millisecond)
//! before they park, and candle still runs a few hundred small ops per UNet call (residual adds,
//! the guidance's loss), so on a machine with few cores those spins take turns from the
//! kernels' threads: about 6 % of a guidance gradient's samples were that loop. candle reads
//! the limit from `CANDLE_BARRIER_POOL_SPIN_LIMIT` once, when it makes the pool.

/// The spins a candle worker waits before it parks, when the user has not chosen: long enough
/// to catch an op that follows at once, short enough to leave the core to the kernels.
const SPIN_LIMIT: &str = "2000";

/// Shortens candle's wait unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is already set.
///
/// Call it first thing in `main`, before any thread starts: it sets an environment variable.
pub fn spin_briefly() {
    const VARIABLE: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VARIABLE).is_none() {
        std::env::set_var(VARIABLE, SPIN_LIMIT);
    }
}
