//! Received stream data as binaries: the bytes a process gets in a data message or from
//! `recv`.
//!
//! Small payloads are copied into an ordinary BEAM binary. Large ones (from `RESOURCE_MIN`
//! bytes) are copied into a buffer of the library's own, which the binary then points into
//! (a resource binary): the BEAM frees the binary as usual, and the buffer goes back to a
//! small pool here. Why: during a bulk transfer a runtime thread makes a 64 KiB binary for
//! every message, and the BEAM's binary allocator, used from a thread that is not one of its
//! schedulers, kept giving its carriers back to the OS and mapping new ones: 98 minor page
//! faults per MiB received in a 1 GiB transfer, against raw Quinn's 30, and 3 with the pool
//! (`perf stat -e page-faults`; bench/README.md, "The third host"). A buffer from the pool has
//! its pages already.
//!
//! The data is still copied once (Quinn hands it over as one `Bytes` per packet, and a
//! process gets one contiguous binary); only where it is copied to changes.
use std::sync::Mutex;

use bytes::Bytes;
use rustler::{Binary, Encoder, Env, NewBinary, Resource, ResourceArc, Term};

use crate::counters::{self, Live};
use crate::util::lock;

/// Payloads below this size are copied into an ordinary BEAM binary: the resource costs more
/// than it saves there, and request/response traffic is made of such small payloads.
const RESOURCE_MIN: usize = 16 * 1024;

/// The size of a pooled buffer: a full active-mode data message (`stream::MAX_CHUNK`), the
/// payload a bulk transfer makes over and over. Larger payloads (`recv` answers above it) are
/// ordinary BEAM binaries: pooling them too (buffers up to 1 MiB, twice the size each time) was
/// no faster for passive transfers and had more page faults, not fewer.
const POOLED_SIZE: usize = crate::stream::MAX_CHUNK;

/// Buffers kept for reuse: 32 × 64 KiB = 2 MiB at most, held only after a burst of large
/// deliveries.
const POOL_MAX: usize = 32;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// The buffer a resource binary points into. Its bytes never change once it is made.
pub struct Payload {
    buf: Vec<u8>,
    _live: Live,
}

#[rustler::resource_impl]
impl Resource for Payload {}

impl Drop for Payload {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.capacity() == POOLED_SIZE {
            let mut pool = lock(&POOL);
            if pool.len() < POOL_MAX {
                pool.push(buf);
            }
        }
    }
}

/// A buffer for `len` bytes (from `RESOURCE_MIN` to `POOLED_SIZE`): a pooled one when `len`
/// is more than half of its size (so a process that keeps many such payloads holds less than
/// twice their size), or else one of its own.
fn buffer(len: usize) -> Vec<u8> {
    if len <= POOLED_SIZE / 2 {
        return Vec::with_capacity(len);
    }
    let mut buf = lock(&POOL).pop().unwrap_or_else(|| Vec::with_capacity(POOLED_SIZE));
    buf.clear();
    buf
}

/// One binary holding `chunks` in order.
pub fn binary<'a>(env: Env<'a>, chunks: &[Bytes]) -> Term<'a> {
    let len = chunks.iter().map(Bytes::len).sum();
    if !(RESOURCE_MIN..=POOLED_SIZE).contains(&len) {
        let mut bin = NewBinary::new(env, len);
        let dst = bin.as_mut_slice();
        let mut at = 0;
        for c in chunks {
            dst[at..at + c.len()].copy_from_slice(c);
            at += c.len();
        }
        return Binary::from(bin).to_term(env);
    }
    let mut buf = buffer(len);
    for c in chunks {
        buf.extend_from_slice(c);
    }
    let res = ResourceArc::new(Payload { buf, _live: Live::new(&counters::RECEIVED_BUFFERS) });
    res.make_binary(env, |p| p.buf.as_slice()).encode(env)
}
