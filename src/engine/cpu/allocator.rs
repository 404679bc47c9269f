//! How freed tensor memory is handed back to the operating system.
//!
//! candle allocates a fresh buffer for the result of every op. With mimalloc's default of giving
//! freed memory back after 10 ms, nearly every large buffer of a UNet call is a fresh mapping
//! that the kernel zeroes page by page: a third of a guidance step went to `clear_page_erms`.
//! [`keep_freed_memory`] makes mimalloc keep what it has for reuse while work runs, and
//! [`release_freed_memory`] gives it all back once the work is done (the editor's worker calls it
//! after a while without commands), so an idle editor does not sit on its peak.
//!
//! Both act on mimalloc, which the `p2pz` binary installs as its global allocator; in a program
//! that doesn't, they only tune mimalloc's own (unused) heaps.

use libmimalloc_sys as mi;

/// `mi_option_purge_delay` in mimalloc's `mi_option_t` (the same in its v2 and v3, and named
/// `reset_delay` before that); `libmimalloc-sys` doesn't export it under this name.
const PURGE_DELAY: mi::mi_option_t = 15;

/// Freed memory stays with the allocator for reuse instead of going back to the system.
pub fn keep_freed_memory() {
    // SAFETY: setting an option is thread-safe and takes effect on the next purge decision.
    unsafe { mi::mi_option_set(PURGE_DELAY, -1) }
}

/// Gives the memory that is free now back to the system, then keeps freed memory again.
pub fn release_freed_memory() {
    // SAFETY: as above; `mi_collect` may run on any thread at any time.
    unsafe {
        mi::mi_option_set(PURGE_DELAY, 0);
        mi::mi_collect(true);
        mi::mi_option_set(PURGE_DELAY, -1);
    }
}
