//! Atoms used in messages and results.
rustler::atoms! {
    ok, error, undefined, nil, true_ = "true", false_ = "false",
    quic,
    // message tags
    new_conn, new_stream, peer_send_shutdown, peer_send_aborted, peer_receive_aborted,
    stream_closed, shutdown, transport_shutdown, closed, passive, listener_stopped,
    send_shutdown_complete, send_complete,
    // result reasons
    timeout, not_owner, badarg, eaddrinuse, eaddrnotavail, eacces, einval, enomem,
    bad_option, missing_option, bad_address, nxdomain, send_queue_full, stream_limit_reached,
    tls_alert, transport_error, version_mismatch, reset, cids_exhausted, connection_refused,
    connection_idle, not_found, cancelled, delivered, tls_error, bad_certificate, unreachable,
    invalid_config, io_error, accept_queue_full, internal_error, not_connected, connected, connection_timeout,
    is_resumed,
    // active modes
    once,
    // map keys
    conn, flags, is_orphan, remote_addr, local_addr, server_name, alpns, version, status,
    is_handshake_completed, is_peer_acked, is_app_closing, is_conn_shutdown,
    is_shutdown_by_app, is_closed_remotely, stream_id, is_peer_accepted,
    listeners, connections, streams, tasks, client_endpoints, bound_addresses, runtime_workers,
    shards, shard_runners, received_buffers, inline_runs, runtime_runs, direct_writes, runtime_spin_us, watched_sockets, owners, inline_watch_us,
    inline_receives, inline_deferrals, inline_watches, inline_watch_skips, inline_watch_unanswered, inline_watch_far, runtime_watch_hits, runtime_watch_extensions, runtime_spin_max_us, runtime_watches_grown, accept_waiters, driver_panics, socket_panics,
    tls_tickets,
    tls_resumptions,
    connect_watch_us, connect_watches, connects, watch,
}
