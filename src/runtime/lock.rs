//! A mutex on a raw futex: the runtime's locks never call libc (whose `syscall`, `pthread_mutex_*`
//! may be probed), and can be held across fork and let go in the child without a guard object.

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicU32, Ordering};

use crate::sigsafe::sys;

const UNLOCKED: u32 = 0;
const LOCKED: u32 = 1;
const CONTENDED: u32 = 2;

pub struct Mutex<T> {
    state: AtomicU32,
    value: UnsafeCell<T>,
}

// SAFETY: access to `value` is serialized by `state`.
unsafe impl<T: Send> Sync for Mutex<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Mutex<T> {}

pub struct Guard<'a, T> {
    m: &'a Mutex<T>,
}

impl<T> Mutex<T> {
    pub const fn new(value: T) -> Mutex<T> {
        Mutex { state: AtomicU32::new(UNLOCKED), value: UnsafeCell::new(value) }
    }

    pub fn lock(&self) -> Guard<'_, T> {
        self.lock_raw();
        Guard { m: self }
    }

    pub fn try_lock(&self) -> Option<Guard<'_, T>> {
        self.state
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| Guard { m: self })
    }

    /// Take the lock without a guard (held across fork: see `runtime::fork`).
    pub fn lock_raw(&self) {
        if self
            .state
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
        let mut spins = 0;
        loop {
            let s = self.state.load(Ordering::Relaxed);
            if s == UNLOCKED
                && self
                    .state
                    .compare_exchange(UNLOCKED, CONTENDED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return;
            }
            if spins < 100 {
                spins += 1;
                core::hint::spin_loop();
                continue;
            }
            if self.state.swap(CONTENDED, Ordering::Acquire) == UNLOCKED {
                return;
            }
            sys::futex_wait(&self.state, CONTENDED, 0);
        }
    }

    /// Let go of a lock taken with [`Mutex::lock_raw`].
    ///
    /// # Safety
    /// The lock is held by this thread (or, in a child after fork, was held by the forking
    /// thread, which is this one).
    pub unsafe fn unlock_raw(&self) {
        if self.state.swap(UNLOCKED, Ordering::Release) == CONTENDED {
            sys::futex_wake(&self.state, 1);
        }
    }

    /// The value, with the lock held by the caller through [`Mutex::lock_raw`].
    ///
    /// # Safety
    /// The caller holds the lock and no guard is alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get_locked(&self) -> &mut T {
        // SAFETY: the caller's contract.
        unsafe { &mut *self.value.get() }
    }
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.m.value.get() }
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock.
        unsafe { &mut *self.m.value.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: the guard holds the lock.
        unsafe { self.m.unlock_raw() };
    }
}
