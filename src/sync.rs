//! The one lock policy of the crate: a poisoned lock is recovered, not propagated.
//!
//! A lock is poisoned only when a thread panicked while holding it. DMR keeps no invariant
//! that spans a panic inside a critical section (every guarded value is a map, a counter or
//! an option replaced whole), so the sound reaction is to keep relaying with the data as it
//! is rather than turn one panic into a panic on every later request.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, recovering the guard if a panic poisoned it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read-locks `l`, recovering the guard if a panic poisoned it.
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Write-locks `l`, recovering the guard if a panic poisoned it.
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}
