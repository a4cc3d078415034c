//! The library's global allocator on Linux with glibc (elsewhere the system's, unchanged): the
//! system's, except that over-aligned blocks are carved out of ordinary `malloc` blocks instead
//! of coming from `posix_memalign`.
//!
//! Why: tokio allocates every task 128-byte aligned (its header is cache-line padded), and
//! glibc serves `posix_memalign` from its arena under a lock, never from its per-thread cache;
//! the split and the later free of the slack make it several times the cost of a `malloc`.
//! Under callgrind, `posix_memalign` under tokio's task spawns was 5,700 instructions per 64-byte
//! echo round trip, ~1,100 per spawn (`bin/instructions echo`, bench/README); shards now keep
//! one task each (`executor::Shard::schedule`), and this covers the spawns that remain (per
//! connection, per request). A `malloc(size + align)` block small enough for glibc's cache is
//! taken and given back without the lock.
use std::alloc::{GlobalAlloc, Layout, System};

pub struct Alloc;

/// `malloc`'s alignment with glibc on 64-bit targets (8 on 32-bit ones, where blocks aligned to
/// 16 then keep `posix_memalign`, and the carving's offset is still at least a word).
const MALLOC_ALIGN: usize = 16;

/// Blocks up to this size (with the slack) go through `malloc`; larger ones, rare, keep
/// `posix_memalign` (through `System`), where the slack would waste more than it saves.
const CARVE_MAX: usize = 1024;

/// Is `layout` carved from a `malloc` block (`alloc` and `dealloc` must agree, and see the same
/// layout)?
fn carved(layout: &Layout) -> bool {
    layout.align() > MALLOC_ALIGN && layout.size() + layout.align() <= CARVE_MAX
}

unsafe impl GlobalAlloc for Alloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !carved(&layout) {
            return System.alloc(layout);
        }
        let raw = libc::malloc(layout.size() + layout.align()) as *mut u8;
        if raw.is_null() {
            return raw;
        }
        // At least malloc's own alignment (8 or 16 bytes) past `raw`, so the word before the
        // block can hold `raw` for `dealloc`.
        let offset = layout.align() - (raw as usize & (layout.align() - 1));
        let block = raw.add(offset);
        (block as *mut *mut u8).sub(1).write(raw);
        block
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !carved(&layout) {
            return System.dealloc(ptr, layout);
        }
        libc::free((ptr as *mut *mut u8).sub(1).read() as *mut libc::c_void);
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !carved(&layout) {
            return System.alloc_zeroed(layout);
        }
        let block = self.alloc(layout);
        if !block.is_null() {
            std::ptr::write_bytes(block, 0, layout.size());
        }
        block
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        if !carved(&layout) && !carved(&new_layout) {
            return System.realloc(ptr, layout, new_size);
        }
        let new = self.alloc(new_layout);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}
