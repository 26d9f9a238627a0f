//! libuprobe's own memory allocator (the crate's `#[global_allocator]`): size classes carved from
//! anonymous mappings, large blocks mapped directly. The runtime never calls the program's
//! `malloc`, so that a probe on `malloc` (or on everything in libc) neither fires for libuprobe's
//! own work nor makes that work slow, and libuprobe's allocations never change the program's heap.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::null_mut;

use super::lock::Mutex;
use crate::sigsafe::sys;

const CLASSES: [usize; N_CLASSES] = [
    16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192, 16384,
    32768, 65536,
];
/// Size classes; blocks up to 64 KiB come from them: a larger one is a mapping of its own, and
/// mapping, populating and unmapping each short-lived buffer of a few pages (a file read, a
/// growing vector) was a third of a process's setup.
const N_CLASSES: usize = 20;
/// Bytes mapped at once to refill a class.
const REFILL: usize = 256 * 1024;
const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
/// A large block is written right away: mapped with its pages (one system call, where touching
/// them would take a page fault each).
const POPULATE: i32 = libc::MAP_POPULATE;

struct Heap {
    /// Free blocks of each class, linked through their first word.
    free: [usize; N_CLASSES],
    /// The unused tail of the last refill of each class.
    bump: [(usize, usize); N_CLASSES],
}

pub struct Allocator {
    heap: Mutex<Heap>,
}

impl Default for Allocator {
    fn default() -> Self {
        Self::new()
    }
}

impl Allocator {
    pub const fn new() -> Allocator {
        Allocator { heap: Mutex::new(Heap { free: [0; N_CLASSES], bump: [(0, 0); N_CLASSES] }) }
    }

    /// Held across fork, last (see `runtime::fork`).
    pub fn lock_for_fork(&self) {
        self.heap.lock_raw();
    }

    /// # Safety
    /// Taken with [`Allocator::lock_for_fork`] by this thread.
    pub unsafe fn unlock_after_fork(&self) {
        // SAFETY: the caller's contract.
        unsafe { self.heap.unlock_raw() };
    }
}

/// The smallest class that holds `layout` (every class is a multiple of 16, so any alignment up
/// to 16 is met). Computed, not searched: a process's setup allocates tens of thousands of times
/// (iced's decoder tables alone, twenty thousand boxes).
fn class_of(layout: &Layout) -> Option<usize> {
    let size = layout.size();
    if layout.align() > 16 || size > CLASSES[N_CLASSES - 1] {
        return None;
    }
    if size <= 64 {
        // 16, 32, 48, 64
        return Some(size.max(1).div_ceil(16) - 1);
    }
    // Above 64: two classes an octave (2^k * 1.0 is the previous octave's top, 1.5 * 2^k, 2^(k+1))
    // up to 4096, then powers of two.
    let k = usize::BITS - 1 - (size - 1).leading_zeros(); // 2^k < size <= 2^(k+1)
    let k = k as usize;
    if size > 4096 {
        return Some(15 + (k + 1 - 12));
    }
    let half = (1usize << k) + (1usize << (k - 1)); // 1.5 * 2^k
                                                    // k = 6: 96 (4), 128 (5); k = 7: 192 (6), 256 (7); ... k = 11: 3072 (14), 4096 (15)
    let base = 4 + 2 * (k - 6);
    Some(if size <= half { base } else { base + 1 })
}

fn pages(size: usize) -> usize {
    (size.max(1) + sys::PAGE - 1) & !(sys::PAGE - 1)
}

/// A block larger than every class: a mapping of its own (see [`POPULATE`]).
fn large(layout: &Layout) -> *mut u8 {
    if layout.align() > sys::PAGE {
        return null_mut();
    }
    sys::mmap_anon(0, pages(layout.size()), RW, POPULATE).map_or(null_mut(), |p| p as *mut u8)
}

impl Allocator {
    /// A block of class `c`, and whether it is fresh from the kernel (never handed out: zero).
    fn block(&self, c: usize) -> (*mut u8, bool) {
        let size = CLASSES[c];
        let mut h = self.heap.lock();
        let head = h.free[c];
        if head != 0 {
            // SAFETY: a free block's first word links to the next free block of its class.
            h.free[c] = unsafe { *(head as *const usize) };
            return (head as *mut u8, false);
        }
        let (mut at, mut end) = h.bump[c];
        if at + size > end {
            match sys::mmap_far(REFILL, RW, 0) {
                Ok(p) => (at, end) = (p, p + REFILL),
                Err(_) => return (null_mut(), false),
            }
        }
        h.bump[c] = (at + size, end);
        (at as *mut u8, true)
    }
}

// SAFETY: blocks of a class are disjoint pieces of our own mappings, handed out once until freed;
// large blocks are whole mappings of their own, page-aligned (which satisfies any alignment up to
// a page; larger alignments are refused with null).
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(&layout) {
            Some(c) => self.block(c).0,
            None => large(&layout),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let Some(c) = class_of(&layout) else {
            return large(&layout); // a fresh mapping is zero already
        };
        // A block never handed out is zero already, and left untouched: its pages are taken
        // only when written (a return probe's latency table, 4 KiB, by its first return).
        let (p, fresh) = self.block(c);
        if !p.is_null() && !fresh {
            // SAFETY: `p` is valid for `layout.size()` bytes.
            unsafe { core::ptr::write_bytes(p, 0, layout.size()) };
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match class_of(&layout) {
            Some(c) => {
                let mut h = self.heap.lock();
                // SAFETY: the block is ours and free now; its first word becomes the link.
                unsafe { *(ptr as *mut usize) = h.free[c] };
                h.free[c] = ptr as usize;
            }
            // SAFETY: a large block is a whole mapping of `pages(size)` bytes.
            None => unsafe { sys::munmap(ptr as usize, pages(layout.size())) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if class_of(&layout).is_none() && layout.align() <= 16 && new_size > CLASSES[N_CLASSES - 1]
        {
            // Large to large: let the kernel move the pages.
            // SAFETY: `ptr` is a whole mapping of pages(size) bytes; MREMAP_MAYMOVE returns a new
            // mapping with the same contents.
            let r = unsafe {
                sys::call(
                    libc::SYS_mremap,
                    [
                        ptr as usize,
                        pages(layout.size()),
                        pages(new_size),
                        libc::MREMAP_MAYMOVE as usize,
                        0,
                        0,
                    ],
                )
            };
            return r.map_or(null_mut(), |p| p as *mut u8);
        }
        // SAFETY: the GlobalAlloc contract holds for `layout`, and `new_size` with its alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if class_of(&layout).is_some() && class_of(&layout) == class_of(&new_layout) {
            return ptr;
        }
        // SAFETY: as above.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller of the two sizes, and disjoint.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

/// The allocator of everything libuprobe allocates.
#[global_allocator]
pub static ALLOCATOR: Allocator = Allocator::new();

#[cfg(test)]
mod tests {
    use super::*;

    /// A zeroed block is zero whether it is fresh (left untouched) or reused (cleared).
    #[test]
    fn zeroed_blocks_are_zero_fresh_or_reused() {
        let a = Allocator::new();
        let layout = Layout::from_size_align(4128, 8).unwrap();
        // SAFETY: blocks of `layout` from `a`, used within their size, freed once.
        unsafe {
            let fresh = a.alloc_zeroed(layout);
            assert!(core::slice::from_raw_parts(fresh, 4128).iter().all(|&b| b == 0));
            core::ptr::write_bytes(fresh, 0xa5, 4128);
            a.dealloc(fresh, layout);
            let reused = a.alloc_zeroed(layout);
            assert_eq!(reused, fresh, "the freed block is reused");
            assert!(core::slice::from_raw_parts(reused, 4128).iter().all(|&b| b == 0));
            a.dealloc(reused, layout);
        }
    }

    /// The computed class is the smallest one that holds the size, for every size and alignment.
    #[test]
    fn every_size_gets_the_smallest_class() {
        for align in [1, 2, 4, 8, 16, 32] {
            for size in 0..=CLASSES[N_CLASSES - 1] + 17 {
                let Ok(layout) = Layout::from_size_align(size, align) else { continue };
                let searched =
                    (align <= 16).then(|| CLASSES.iter().position(|&c| c >= size)).flatten();
                assert_eq!(class_of(&layout), searched, "size {size} align {align}");
            }
        }
    }
}
