//! How much data may wait on its way: the default flow-control windows and socket buffers.
//!
//! Why a file of its own: the raw-Quinn baseline (`examples/quinn_baseline.rs`) includes this
//! very file (`#[path]`), so the benchmark compares the two with the same windows and buffers
//! and cannot drift from the library's. It must therefore name nothing else of the crate.

/// How much of a stream's data the peer may send ahead of what the stream's reader has taken
/// (`stream_recv_window`'s default): 2.5 MiB, twice Quinn's 1.25 MB. A process receiving in
/// passive mode is not always running (on a busy node its scheduler gets the CPU in spells a
/// few milliseconds apart), and with Quinn's window the sender stalled meanwhile; see
/// `stream::PASSIVE_READ_AHEAD` for the measurements. Active streams are read as data arrives
/// and are not held up by it.
pub const STREAM_RECV_WINDOW: u64 = 2560 * 1024;

/// How much the peer may send ahead of what all of a connection's streams have taken
/// together (`conn_recv_window`'s default), unless the stream window is larger (see
/// `conn_recv_window`): 64 MiB. Quinn's own default is unbounded, which leaves the data a peer
/// can park in streams the application does not read (or has not accepted) bounded only by the
/// stream count times the stream window: 100 + 100 streams at 2.5 MiB, 500 MiB per connection.
/// Why not MsQuic's 16 MiB: it cost 100 streams moving data at once a tenth of their
/// throughput, 32 MiB a little, 64 MiB nothing measurable (eight fresh-VM rounds, bench/README),
/// while raw Quinn was not held back at 16 MiB: here more data waits unread in Quinn's buffers
/// (at 16 MiB the sender reached the window 1-5 times per transfer, raw Quinn's never), left
/// there while the connection's stream readers take their turns on its shard (with readers
/// off the shard, in a trial, it reached it 0-1 times; bench/README).
pub const CONN_RECV_WINDOW: u64 = 64 * 1024 * 1024;

/// The connection window that goes with a stream window when none is given: a single stream
/// given a larger window than `CONN_RECV_WINDOW` may use all of it.
pub fn conn_recv_window(stream_window: u64) -> u64 {
    CONN_RECV_WINDOW.max(stream_window)
}

/// Socket buffer sizes asked of the kernel (which caps them at net.core.rmem_max/wmem_max).
/// The defaults (~208 KiB) overflow when a shared socket takes a burst of handshakes or a
/// fast stream: every datagram lost there costs a retransmission timeout.
pub const SOCKET_BUFFER: usize = 2 * 1024 * 1024;
