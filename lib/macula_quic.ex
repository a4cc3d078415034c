defmodule MaculaQuic do
  @moduledoc """
  QUIC for Elixir and Erlang, powered by [Quinn](https://github.com/quinn-rs/quinn).

  Listeners bind exactly the address you give them, connections and streams are owned by
  processes, and stream data arrives as messages (or through `recv/3`) with back-pressure that
  reaches the peer through QUIC flow control. The same API is available to Erlang as
  `:macula_quic`. Its owner messages follow quicer's shapes; the functions are this module's,
  many with quicer's names, and porting quicer code takes the changes README's
  Compatibility section lists.

  ## A round trip

      {:ok, listener} = MaculaQuic.listen({"127.0.0.1", 0}, alpn: ["echo"])
      {:ok, {_ip, port}} = MaculaQuic.sockname(listener)
      :ok = MaculaQuic.async_accept(listener)

      {:ok, conn} = MaculaQuic.connect("127.0.0.1", port, [alpn: ["echo"], verify: :none], 5_000)
      {:ok, stream} = MaculaQuic.open_stream(conn)
      :ok = MaculaQuic.send(stream, "ping")

      # on the listener's side (here, the same process):
      receive do
        {:quic, :new_conn, server_conn, _info} -> MaculaQuic.async_accept_stream(server_conn)
      end
      receive do
        {:quic, :new_stream, server_stream, _props} -> server_stream
      end

  A peer only learns of a new stream when the opener sends its first bytes (QUIC and Quinn
  work that way), so `new_stream` arrives after the client's first `send/2`.

  ## Handles and owners

  Listeners, connections and streams are handles (references). Each has one **owner**: the
  process that created or accepted it. Messages about a handle go to its owner, and when the
  owner exits the handle is shut down (a connection is closed with application error code 0, a
  stream is reset and stopped with code 0, a listener stops accepting). Change the owner with
  `controlling_process/2`, or `handoff_stream/3` for a stream with messages already queued.
  An owning process is monitored once, however many handles it owns, until it exits.

  Like a `:gen_tcp` socket, an open handle belongs to its owner: it is not closed just because
  every reference to it was dropped. Once it is closed (by `close/1`, the peer, a timeout or its
  owner exiting), nothing native refers to it and garbage collection frees all of its memory.

  ## Messages to the owner

  Stream owner:

    * `{:quic, data, stream, flags}` — received bytes (a binary). `flags` is an integer; bit
      `2` (FIN) is set on the chunk that ends the stream when the FIN had arrived with it (a
      FIN can also arrive in a later packet, even after `send(stream, data, 4)`: then the last
      chunk has `flags` 0). Chunks are coalesced up to 64 KiB, they do not follow the peer's
      write boundaries. (quicer sends a map here; this library keeps the original
      macula_quic's integer.)
    * `{:quic, :peer_send_shutdown, stream, :undefined}` — the peer finished its side (after
      the last data message, whatever its flags): the reliable end-of-stream signal in active
      mode. (A passive stream's `recv/3` returns `{:error, :peer_send_shutdown}` instead, once
      everything before the end has been read.)
    * `{:quic, :peer_send_aborted, stream, error_code}` — the peer reset its sending side.
    * `{:quic, :peer_receive_aborted, stream, error_code}` — the peer stopped reading
      (STOP_SENDING); further sends fail.
    * `{:quic, :passive, stream, :undefined}` — an `{active, N}` budget ran out; the stream is
      now passive.
    * `{:quic, :send_shutdown_complete, stream, is_graceful}` — our sending side is over, on
      any stream that has one: `true` once the peer has acknowledged all of the data and the
      FIN (after `send/3` with FIN or a graceful shutdown), `false` at once after an abortive
      shutdown (which still resets a stream whose FIN is not yet acknowledged), after the
      peer's STOP_SENDING (following `peer_receive_aborted`) or when the connection ends
      first. It comes before `stream_closed`, and not after `close_stream/1` (which silences
      the stream). An owner that exits right after a blocking `send/3` with FIN returned does
      not have the stream reset meanwhile (unless its exit closes the connection too: it owns
      that as well). As quicer's.
    * `{:quic, :stream_closed, stream, props}` — both directions are done (the sending side
      as `send_shutdown_complete` reports, so a FIN must have been acknowledged first, and the
      receiving side at the peer's FIN or reset, or when reading stopped). `props` is a map
      with `:is_conn_shutdown`, `:is_app_closing`, `:is_shutdown_by_app`,
      `:is_closed_remotely`, `:error` and `:status`. `shutdown_stream/4` consumes it when the
      owner shuts the stream down.

  Answers to particular calls:

    * `{:quic, :send_complete, stream, is_cancelled}` — to the caller of `async_send/3` (or
      `async_csend/4`) with `send_flag_sync/0`: `false` once Quinn has taken the data, `true`
      if it never will.
    * `{:handoff_done, stream, data}` — to the new owner, from `handoff_stream/3`, after the
      messages it forwarded (see `wait_for_handoff/2`).
    * `{:quic, :closed, :undefined, :undefined}` — to the caller of `async_accept_stream/2`
      whose accept still waited when the connection ended (no stream will come).

  Connection owner:

    * `{:quic, :new_stream, stream, %{conn: conn, flags: flags, is_orphan: boolean}}` — sent to
      the process that called `async_accept_stream/2`. `flags` is `1` for a unidirectional
      stream, else `0`. `is_orphan: true`: the process whose accept the stream came for has
      exited, or withdrew the accept just as the stream arrived (an `accept_stream/3` timing
      out), so it went to the connection's owner instead, passive, rather than being lost;
      the owner should read or close it. (A stream the peer opens while nobody
      accepts waits for the next accept; quicer hands it to the owner as an orphan.)
    * `{:quic, :connected, conn, %{is_resumed: false, alpns: alpn}}` — the handshake of a
      connection from `async_connect/3` completed; otherwise only when `async_handshake/1`
      asks for it (`connect/4` and `async_accept/2` deliver connections with the handshake
      complete).
    * `{:quic, :shutdown, conn, error_code}` — the peer closed the connection with an
      application error code.
    * `{:quic, :transport_shutdown, conn, %{status: atom, error: code}}` — the connection ended
      for a transport reason: `:connection_idle` (idle timeout), `:transport_error`,
      `:tls_error`, `:reset`, ...; or an `async_connect/3` handshake failed
      (`:connection_timeout`, `:tls_error`, `:nxdomain`, ...).
    * `{:quic, :closed, conn, %{is_handshake_completed: boolean, is_peer_acked: boolean,
      is_app_closing: boolean}}` — always the last message about a connection (but for
      `{:quic, :closed, :undefined, :undefined}` to an `async_accept_stream/2` still waiting,
      which may come after it when the owner is that caller).
      `is_handshake_completed` is `false` only for an `async_connect/3` handshake that failed
      or was abandoned.
      `close_connection/1` and `shutdown_connection/1` consume it when the owner closes.

  Connection owner, when the connection was made with `datagram_receive_enabled: true`:

    * `{:quic, :dgram_state_changed, conn, %{dgram_send_enabled: boolean, dgram_max_len:
      bytes}}` — first, once the connection is delivered: whether the peer accepts datagrams
      (it turned reception on too), and the largest this end may send it now (0 if it does
      not; the limit may grow as larger packets are found to pass).
    * `{:quic, data, conn, 0}` — a datagram the peer sent with `send_dgram/2` (a binary; the
      handle is the connection, which tells it from stream data), delivered by the
      connection's `:datagram_active` mode (`true` unless set; see `setopt/3`). Datagrams have
      no flow control, so a slow owner cannot slow its peer: in `true` mode its mailbox grows,
      while with `:once` or `N` what waits is bounded (one held datagram, and Quinn's
      `:datagram_receive_buffer`, which drops the oldest). None comes after `closed`.
    * `{:quic, :passive, conn, :undefined}` — a `:datagram_active` budget ran out.

  Listener owner and acceptors:

    * `{:quic, :new_conn, conn, info}` — sent to the process that called `async_accept/2`,
      which becomes the connection's owner. The handshake has already completed. `info` has
      `:remote_addr` and `:local_addr` (`"ip:port"` binaries; quicer's are charlists), `:server_name` (the
      SNI the client sent, or `:undefined`), `:alpns` (the negotiated protocol) and `:version`.
    * `{:quic, :listener_stopped, listener}` — a 3-tuple, as quicer sends it: to the owner
      when the listener was closed by another process, and to every other process still
      waiting in `async_accept/2` when it closes (by `close_listener/1`, or as its owner
      exits; not to the process that closed it), since no connection will come.

  ## Options

  `listen/2,3` and `connect/4` take a keyword list (or proplist, or map):

    * `:alpn` — list of protocol names (strings). **Required.**
    * `:certfile` and `:keyfile` (PEM files), or `:cert` and `:key` (DER binaries). A listener
      given neither uses a freshly generated self-signed certificate — for development only.
      On a client they are the certificate presented for mutual TLS.
    * `:verify` — `:none` or `:verify_peer` (also `:verify_none`, `:peer`). A client with
      `:verify_peer` checks the server against `:cacertfile`; a listener with `:verify_peer`
      requires client certificates signed by `:cacertfile`. A client that gives neither option
      does not verify (quicer's default); a client that gives only `:cacertfile` verifies.
    * `:cacertfile` — PEM file of trusted CA certificates.
    * `:server_name` — (connect) the SNI and the name the certificate must match; defaults to
      the host.
    * `:local_address` — (connect) the source address, an IP or `{ip, port}`. Connects from
      one address share one UDP socket; one on a port you chose is closed once its last
      connection has ended.
    * `:session_resumption` — (connect) `true` (the default) or `false`. Connects with the same
      options share a TLS session cache: a server that sent this client a session ticket is
      reconnected with a resumed handshake, which sends, signs and verifies no certificate.
      A ticket arrives after the handshake, so a connection closed at once may not get one.
      `false` keeps no tickets: every handshake is a full one.
    * `:handshake_idle_timeout_ms` — (connect) how long a client's handshake may take in all,
      from the first packet (not an idle timer): 10 s by default for `async_connect/3`, as
      MsQuic's; `connect/4` stops at its own `timeout` or at this, whichever is sooner.
    * `:idle_timeout_ms` (0 disables), `:keep_alive_interval_ms`,
      `:peer_bidi_stream_count`, `:peer_unidi_stream_count` (at most 65,535, as in MsQuic:
      Quinn sets up every stream the peer may open when a connection starts),
      `:stream_recv_window` (bytes per stream the peer may send ahead of what the stream's
      reader has taken; default 2.5 MiB, twice Quinn's own default, so that a passive
      receiver's peer goes on sending while the receiving process waits for a scheduler),
      `:conn_recv_window` (bytes per connection the peer may send ahead of what all its
      streams have taken together, streams not yet accepted included; default 64 MiB, or the
      stream window if that is larger; Quinn's own default is unbounded), `:send_window`.
    * `:datagram_receive_enabled` — `true` (or quicer's `1`) to accept QUIC datagrams from the
      peer and deliver them to the connection's owner, and to send them with `send_dgram/2`
      (see "Messages to the owner"). Default `false`, as in quicer: the peer is told
      datagrams are not accepted (its `send_dgram/2` returns `{:error,
      :unsupported_by_peer}`), and this end's `send_dgram/2` returns `{:error,
      :datagrams_disabled}` (unlike quicer's: Quinn sends datagrams only on a connection that
      accepts them). On a listener it applies to every connection it accepts.
    * `:datagram_active` — with `:datagram_receive_enabled`, how datagrams are delivered to
      the owner at first: `true` (the default), `false`, `:once` or `N`, as with `setopt/3`.
      Without it, `{:error, {:bad_option, :datagram_active}}`.
    * `:datagram_receive_buffer` — with `:datagram_receive_enabled`, the bytes of received
      datagrams Quinn keeps while the owner takes none (2,048 to 64 MiB; default 1.25 MB,
      Quinn's), the oldest dropped first. Quinn counts a datagram as its length plus 32 bytes,
      and a kept datagram keeps the whole packet it came in alive, so a peer sending empty
      datagrams in full-size packets can make that cost up to about 45 times the figure (some
      57 MB at the default): a node with many passive owners should set it lower.
    * `:backlog` — (listen) connections that may wait for an acceptor, handshakes in progress
      included (default 1024). Beyond it a new connection is refused: its `connect/4` returns
      `{:error, :connection_refused}`.

  Unknown names and ill-typed values give `{:error, {:bad_option, name}}`; a missing `:alpn`
  gives `{:error, {:missing_option, :alpn}}`. quicer's spellings are accepted too:
  `stream_recv_window_default`, `conn_flow_control_window`, `cert_file`, `key_file` and (connect)
  `sni` for `server_name`.

  Stream options (`open_stream/2`, `async_accept_stream/2`, `accept_stream/3`): `:active`
  (`true | false | :once | integer`, default `true`), `:read_ahead` (bytes, default 512 KiB;
  see `setopt/3`) and `:unidirectional` (or quicer's `open_flag: 1`; it means nothing to the
  accepts, which take whatever stream comes). quicer's `:start_flag` and `:quic_event_mask` are
  accepted (integers) and ignored: a stream starts with its first write.

  `active: true` delivers data as it arrives, with no back-pressure, as with `:gen_tcp`: a
  process that cannot keep up with its peer should use `:once` or a count, or read passively.

  ## Bad input

  Nothing a caller passes crashes the VM, blocks a scheduler or leaves native state behind.

    * A handle argument that is not a handle of the kind the function takes (or no handle at
      all) raises `ArgumentError` naming what was expected and what was given.
    * So do arguments of the wrong type where the function's doc says so: data that is not
      iodata, a `recv/3` length or `send/3` flags that are not non-negative integers, a new
      owner that is not a local pid.
    * Everything else is `{:error, reason}`: `:bad_address`, `{:bad_option, name}`,
      `{:missing_option, :alpn}`, `{:certfile | :keyfile | :cacertfile, why}`, `{:key, why}`,
      `{:bad_stat, name}`, and `:badarg` for a timeout or an integer out of range (such as a
      `recv/3` length over 64 MiB).
    * A closed handle is not bad input: calls that need a live one (sends, receives, opening
      or accepting) return `{:error, :closed}` (or why it ended), closing it again is `:ok`,
      and queries still answer (`sockname/1`, `peername/1`, `getstat/2` with the last
      addresses and counters; `negotiated_protocol/1`, `peercert/1`, `get_stream_id/1`,
      `getopt/2` and `setopt/3`).
    * Input is bounded before it is read: strings (addresses, names, paths) up to 4096
      bytes, DER certificates and keys up to 1 MiB, PEM files up to 1 MiB (and only regular
      files: a FIFO or a device gives `{:certfile, :einval}`), ALPN lists up to 256 names.
      PEM files are read by the calling process, through the VM's file I/O, never by the
      native code on a scheduler.
  """

  alias MaculaQuic.Native
  alias MaculaQuic.Options

  @typedoc "A listener handle."
  @type listener :: reference()
  @typedoc "A connection handle."
  @type connection :: reference()
  @typedoc "A stream handle."
  @type stream :: reference()
  @typedoc "Any handle."
  @type handle :: listener() | connection() | stream()
  @typedoc "An IP address: a tuple, or a string (binary or charlist) such as `\"::1\"`."
  @type address :: :inet.ip_address() | String.t() | charlist()
  @typedoc "A host to connect to: an address or a DNS name."
  @type host :: address() | String.t()
  @typedoc "Options, as a keyword list, proplist or map."
  @type options :: keyword() | [atom() | {atom(), term()}] | map()
  @typedoc "An `:inet`-style receive mode."
  @type active :: boolean() | :once | integer()
  @typedoc "An address as this library reports it: the IP as a string, and the port."
  @type sockaddr :: {String.t(), :inet.port_number()}
  @typedoc "Why a call failed."
  @type reason :: atom() | {atom(), term()}

  # Largest piece `send/3` hands to the NIF in one call. It used to bound the copy each call
  # made; data of 16 KiB or more is no longer copied, so now it only sets how often a long send
  # looks at the stream again (a send whose stream fails stops at the piece it was on).
  @piece 1_048_576
  # Application error codes are QUIC variable-length integers.
  @max_varint 4_611_686_018_427_387_903
  # How long close_connection/1 waits for the `closed` message it consumes.
  @close_wait 5_000

  ## Flags

  @doc """
  Stream shutdown flag: finish the sending side gracefully (FIN after queued data). Value `1`.

      iex> MaculaQuic.stream_shutdown_graceful()
      1
  """
  @spec stream_shutdown_graceful() :: 1
  def stream_shutdown_graceful, do: 1

  @doc """
  Stream shutdown flag: reset the sending side (RESET_STREAM with the error code). Value `2`.

      iex> MaculaQuic.stream_shutdown_abort_send()
      2
  """
  @spec stream_shutdown_abort_send() :: 2
  def stream_shutdown_abort_send, do: 2

  @doc """
  Stream shutdown flag: stop the receiving side (STOP_SENDING with the error code). Value `4`.

      iex> MaculaQuic.stream_shutdown_abort_receive()
      4
  """
  @spec stream_shutdown_abort_receive() :: 4
  def stream_shutdown_abort_receive, do: 4

  @doc """
  Stream shutdown flag: abort both directions. Value `6`.

      iex> MaculaQuic.stream_shutdown_abort()
      6
  """
  @spec stream_shutdown_abort() :: 6
  def stream_shutdown_abort, do: 6

  @doc """
  Stream shutdown flag, combined with an abort flag: abort immediately. Value `8`. Quinn always
  aborts immediately, so this adds nothing but is accepted for quicer compatibility.

      iex> MaculaQuic.stream_shutdown_immediate()
      8
  """
  @spec stream_shutdown_immediate() :: 8
  def stream_shutdown_immediate, do: 8

  @doc """
  Connection shutdown flag: close normally, telling the peer. Value `0`.

      iex> MaculaQuic.connection_shutdown_none()
      0
  """
  @spec connection_shutdown_none() :: 0
  def connection_shutdown_none, do: 0

  @doc """
  Connection shutdown flag: quicer's silent close. Value `1`. Quinn always tells the peer, so
  this behaves as `connection_shutdown_none/0`.

      iex> MaculaQuic.connection_shutdown_silent()
      1
  """
  @spec connection_shutdown_silent() :: 1
  def connection_shutdown_silent, do: 1

  @doc """
  The FIN bit in the `flags` of a data message: set on the chunk that ends the stream.

      iex> MaculaQuic.recv_flag_fin()
      2
  """
  @spec recv_flag_fin() :: 2
  def recv_flag_fin, do: 2

  @doc """
  Send flag (`send/3`, `async_send/3`, `async_csend/4`): finish the stream after this data.
  Value `4`, quicer's `QUIC_SEND_FLAG_FIN`.

      iex> MaculaQuic.send_flag_fin()
      4
  """
  @spec send_flag_fin() :: 4
  def send_flag_fin, do: 4

  @doc """
  Send flag (`async_send/3`, `async_csend/4`): the caller receives `{:quic, :send_complete,
  stream, is_cancelled}` once the data is sent. Value `0x1000`, quicer's
  `QUICER_SEND_FLAG_SYNC`.

      iex> MaculaQuic.send_flag_sync()
      4096
  """
  @spec send_flag_sync() :: 4096
  def send_flag_sync, do: 0x1000

  @doc """
  Whether stream open flags (the `flags` of `new_stream`, or quicer's `open_flag` option)
  say unidirectional: bit `1`. As quicer's `is_unidirectional/1`.

      iex> MaculaQuic.is_unidirectional(1)
      true
      iex> MaculaQuic.is_unidirectional(0)
      false
  """
  @spec is_unidirectional(non_neg_integer()) :: boolean()
  def is_unidirectional(flags) when is_integer(flags) and flags >= 0,
    do: Bitwise.band(flags, 1) == 1

  def is_unidirectional(flags),
    do:
      raise(
        ArgumentError,
        "is_unidirectional/1 expects non-negative integer flags, got: #{inspect(flags, limit: 10)}"
      )

  ## Listeners

  @doc """
  Starts a listener on `port` (all addresses) or on `{address, port}` (exactly that address).

  `port_or_address` may also be an `"ip:port"` string or charlist (`"127.0.0.1:4433"`,
  `"[::1]:4433"`, `'127.0.0.1:4433'`).
  A bare port binds the dual-stack wildcard `::` (or `0.0.0.0` where IPv6 is unavailable).
  Port `0` picks a free port; `sockname/1` tells which. See the moduledoc for options.

      iex> {:ok, listener} = MaculaQuic.listen({"127.0.0.1", 0}, alpn: ["demo"])
      iex> {:ok, {"127.0.0.1", port}} = MaculaQuic.sockname(listener)
      iex> port > 0
      true
      iex> MaculaQuic.close_listener(listener)
      :ok
  """
  @spec listen(
          :inet.port_number() | {address(), :inet.port_number()} | String.t() | charlist(),
          options()
        ) ::
          {:ok, listener()} | {:error, reason()}
  def listen(port_or_address, opts)

  def listen(port, opts) when is_integer(port) do
    case listen({0, 0, 0, 0, 0, 0, 0, 0}, port, opts) do
      {:error, :eaddrnotavail} -> listen({0, 0, 0, 0}, port, opts)
      other -> other
    end
  end

  def listen({address, port}, opts), do: listen(address, port, opts)

  def listen(address, opts) when is_binary(address) or is_list(address) do
    case split_host_port(charlist_to_binary(address)) do
      {:ok, host, port} -> listen(host, port, opts)
      :error -> {:error, :bad_address}
    end
  end

  def listen(_other, _opts), do: {:error, :bad_address}

  @doc """
  Starts a listener bound to exactly `address` and `port`.

  Two listeners on the same port but different addresses coexist, and each only sees
  connections sent to its own address — also next to a wildcard listener on that port. A
  second listener on an address and port already in use fails with `{:error, :eaddrinuse}`.
  A specific IPv6 address is v6-only; `"::"` is dual-stack.

      iex> {:ok, a} = MaculaQuic.listen("127.0.0.1", 0, alpn: ["demo"])
      iex> {:ok, {_, port}} = MaculaQuic.sockname(a)
      iex> {:ok, b} = MaculaQuic.listen("127.0.0.2", port, alpn: ["demo"])
      iex> MaculaQuic.listen("127.0.0.1", port, alpn: ["demo"])
      {:error, :eaddrinuse}
      iex> Enum.each([a, b], &MaculaQuic.close_listener/1)
      :ok
  """
  @spec listen(address(), :inet.port_number(), options()) ::
          {:ok, listener()} | {:error, reason()}
  def listen(address, port, opts) do
    with {:ok, map} <- Options.to_map(opts) do
      Native.listen(charlist_to_binary(address), port, Options.read_pem_files(map))
    end
  end

  @doc """
  Asks for the next incoming connection. Returns `:ok` at once; the caller later receives
  `{:quic, :new_conn, conn, info}` and becomes the connection's owner.

  One call delivers one connection, as in quicer: call it again for the next. Connections that
  arrive while nobody is waiting are queued (up to the listener's `:backlog`), not lost. If
  the listener closes first, a caller that neither owns nor closed it receives
  `{:quic, :listener_stopped, listener}` instead. `opts` is accepted for quicer compatibility
  and must be a list or map of options; their values are ignored.

      {:ok, listener} = MaculaQuic.listen({"127.0.0.1", 4433}, alpn: ["demo"])
      :ok = MaculaQuic.async_accept(listener)
      receive do
        {:quic, :new_conn, conn, %{remote_addr: peer}} -> {conn, peer}
      end
  """
  @spec async_accept(listener(), options()) :: :ok | {:error, reason()}
  def async_accept(listener, opts \\ []) do
    result =
      with {:ok, _} <- Options.to_map(opts) do
        native(:listener, listener, fn -> Native.listener_accept(listener, nil) end)
      end

    checked(result, :listener, listener)
  end

  @doc """
  Waits up to `timeout` (`:infinity` by default) for the next incoming connection and returns
  it, owned by the caller.

  `{:error, :timeout}` if none arrives in time; `{:error, :closed}` if the listener is (or
  gets) closed meanwhile. A `timeout` that is neither `:infinity` nor a non-negative integer
  gives `{:error, :badarg}` (larger than `receive` allows is treated as about 49 days).

      {:ok, conn} = MaculaQuic.accept(listener, [], 5_000)
  """
  @spec accept(listener(), options(), timeout()) :: {:ok, connection()} | {:error, reason()}
  def accept(listener, opts \\ [], timeout \\ :infinity) do
    ref = make_ref()

    result =
      with {:ok, timeout} <- timeout_value(timeout),
           {:ok, _} <- Options.to_map(opts),
           # A queued connection comes back at once; otherwise the reply comes as {ref, result}.
           :ok <- native(:listener, listener, fn -> Native.listener_accept(listener, ref) end) do
        await_reply(ref, timeout, fn -> Native.listener_cancel_accept(listener) end)
      end

    checked(result, :listener, listener)
  end

  @doc """
  Completes the server side of a handshake. Connections are delivered by `async_accept/2`
  with their handshake already complete, so this returns `:ok` at once; it exists for code
  written as quicer's is (`accept`, then `handshake`), where quicer's returns `{:ok, conn}`.

  It does not wait: on a handle from `async_connect/3` whose handshake is still running it
  returns `{:error, :not_connected}` (wait for `{:quic, :connected, conn, _}` instead), and
  after a failed one, why it failed. A `timeout` (default 5000) that is neither `:infinity`
  nor a non-negative integer gives `{:error, :badarg}`.

      {:quic, :new_conn, conn, _info} = receive(do: (msg -> msg))
      :ok = MaculaQuic.handshake(conn)
  """
  @spec handshake(connection(), timeout()) :: :ok | {:error, reason()}
  def handshake(conn, timeout \\ 5_000) do
    result =
      with {:ok, _} <- timeout_value(timeout) do
        native(:connection, conn, fn -> Native.conn_handshake_done(conn) end)
      end

    checked(result, :connection, conn)
  end

  @doc """
  quicer's `handshake/3`, with connection options for the handshake. The handshake is done
  before a connection is delivered, so there is nothing left for options to change: `opts`
  must be empty (`[]` or `%{}`), and any option gives `{:error, {:bad_option, name}}`.
  Otherwise as `handshake/2`. A `timeout` that is neither `:infinity` nor a non-negative
  integer gives `{:error, :badarg}`.

      :ok = MaculaQuic.handshake(conn, [], 5_000)
  """
  @spec handshake(connection(), options(), timeout()) :: :ok | {:error, reason()}
  def handshake(conn, opts, timeout) do
    result =
      with {:ok, _} <- timeout_value(timeout),
           :ok <- no_handshake_options(opts),
           do: handshake(conn, timeout)

    checked(result, :connection, conn)
  end

  # The options quicer's handshake/3 and async_handshake/2 take would set up the handshake
  # (such as a server certificate), which is already over here.
  defp no_handshake_options(opts) do
    case Options.to_map(opts) do
      {:ok, map} when map_size(map) == 0 -> :ok
      {:ok, map} -> {:error, {:bad_option, map |> Map.keys() |> Enum.min()}}
      error -> error
    end
  end

  @doc """
  Tells the connection's owner that its handshake is complete, as quicer's `async_handshake/1`
  does: the owner receives `{:quic, :connected, conn, %{is_resumed: false, alpns: alpn}}`, with
  the negotiated ALPN as a binary. Connections are delivered with their handshake already
  complete, so the message is sent at once; this exists for code written as quicer's is, which
  calls `async_handshake/1` on `new_conn` and goes on when `connected` arrives.

  Returns `:ok`, or, once the owner has received `{:quic, :closed, conn, _}` (the message never
  follows it), why the connection ended, such as `{:error, :closed}` or
  `{:error, {:shutdown, code}}`. On a handle from `async_connect/3` whose handshake still
  runs it returns `{:error, :not_connected}` (that handle's owner gets `connected` anyway,
  once the handshake completes). `is_resumed` is always `false`: Quinn does not report
  whether TLS resumed a session. Works on either end's connections; a handle that is not a
  connection raises `ArgumentError`.

      {:quic, :new_conn, conn, _info} = receive(do: (msg -> msg))
      :ok = MaculaQuic.async_handshake(conn)
      {:quic, :connected, ^conn, %{alpns: "demo"}} = receive(do: (msg -> msg))
  """
  @spec async_handshake(connection()) :: :ok | {:error, reason()}
  def async_handshake(conn) do
    check_handle!(:connection, conn)

    alpn =
      case conn_query(conn, :negotiated_protocol) do
        {:ok, alpn} -> alpn
        {:error, _} -> :undefined
      end

    Native.conn_connected(conn, alpn)
  end

  @doc """
  quicer's `async_handshake/2`: as `async_handshake/1`, with connection options that must be
  empty, as for `handshake/3` (`{:error, {:bad_option, name}}` otherwise, and no `connected`
  is sent).

      :ok = MaculaQuic.async_handshake(conn, [])
  """
  @spec async_handshake(connection(), options()) :: :ok | {:error, reason()}
  def async_handshake(conn, opts) do
    check_handle!(:connection, conn)

    with :ok <- no_handshake_options(opts), do: async_handshake(conn)
  end

  @doc """
  Closes a listener: it stops accepting, handshakes in progress are aborted, and connections
  it had queued but not delivered are closed. Connections already delivered keep running, like
  accepted TCP sockets when their listen socket closes; the UDP port stays bound for them, so
  a new listener on the same address gets `{:error, :eaddrinuse}` (and new connections to the
  address go unanswered) until they have all closed — handles to closed connections may live
  on, they do not hold the port. With no such connections the address is free again when this
  returns (it waits, up to a second, for closing connections to send their close frames).

      :ok = MaculaQuic.close_listener(listener)
  """
  @spec close_listener(listener()) :: :ok
  def close_listener(listener) do
    owner? = owner?(listener)
    ref = make_ref()

    case native(:listener, listener, fn -> Native.listener_close(listener, ref) end) do
      :wait -> receive(do: ({^ref, :ok} -> :ok))
      :ok -> :ok
    end

    # The owner closing its own listener does not need to hear about it.
    if owner? do
      receive do
        {:quic, :listener_stopped, ^listener} -> :ok
      after
        0 -> :ok
      end
    end

    :ok
  end

  @doc """
  quicer's `close_listener/2`: closes the listener as `close_listener/1` does, which returns
  once it is closed (within about a second), so the `timeout` is never reached here. A
  `timeout` that is neither `:infinity` nor a non-negative integer gives `{:error, :badarg}`.

      :ok = MaculaQuic.close_listener(listener, 5_000)
  """
  @spec close_listener(listener(), timeout()) :: :ok | {:error, :badarg}
  def close_listener(listener, timeout) do
    case checked(timeout_value(timeout), :listener, listener) do
      {:ok, _} -> close_listener(listener)
      error -> error
    end
  end

  ## Connections

  @doc """
  Connects to `host:port` and returns the connection once the handshake has completed, owned
  by the caller.

  `host` is an IP tuple, an IPv4/IPv6 literal or a DNS name (string or charlist). `timeout`
  (milliseconds, 5000 by default) covers name resolution and the handshake, as does
  `:handshake_idle_timeout_ms` when it is shorter: past it, `{:error, :timeout}`.
  Other errors: `{:error, {:tls_alert, alert}}` (e.g. `:unknown_ca`,
  `:no_application_protocol` for an ALPN mismatch, `:certificate_required`),
  `{:error, {:shutdown, code}}`, `{:error, :bad_address}` (also for port 0), `{:error, :nxdomain}`,
  `{:error, {:bad_option, name}}`, and `{:error, :badarg}` for a `timeout` that is neither
  `:infinity` nor a non-negative integer.

      {:ok, conn} = MaculaQuic.connect("127.0.0.1", 4433, [alpn: ["demo"], verify: :none], 5_000)
      {:ok, conn} = MaculaQuic.connect({0, 0, 0, 0, 0, 0, 0, 1}, 4433,
                      [alpn: ["demo"], cacertfile: "ca.pem", server_name: "localhost"], 5_000)
  """
  @spec connect(host(), :inet.port_number(), options(), timeout()) ::
          {:ok, connection()} | {:error, reason()}
  def connect(host, port, opts, timeout \\ 5_000) do
    ref = make_ref()

    with {:ok, map} <- Options.to_map(opts),
         {:ok, timeout_ms} <- timeout_value(timeout),
         map = Options.read_pem_files(map),
         {:ok, watch_us} <-
           connect_started(
             Native.connect(charlist_to_binary(host), port, map, ref, native_ms(timeout_ms))
           ) do
      # The native side enforces the timeout and always answers.
      await_connect(ref, watch_us)
    end
  end

  @doc """
  Starts a connection to `host:port` and returns its handle at once, owned by the caller,
  while the handshake runs: quicer's `async_connect/3`. The owner then receives
  `{:quic, :connected, conn, %{is_resumed: false, alpns: alpn}}` when the handshake completes,
  or, if it fails, `{:quic, :transport_shutdown, conn, %{status: status, error: code}}` and
  `{:quic, :closed, conn, %{is_handshake_completed: false, is_peer_acked: boolean,
  is_app_closing: false}}` (`is_peer_acked`: the server closed it, refusing the handshake).
  If the library's own handshake task fails (a bug), the status is `:internal_error`.

  `host`, `port` and `opts` are as for `connect/4`; name resolution and the handshake together
  may take `:handshake_idle_timeout_ms` (10 s by default, as MsQuic's), after which `status`
  is `:connection_timeout`. Other statuses: `:tls_error` with the TLS alert's code (`0x100` +
  the alert) when a certificate or ALPN is refused, `:nxdomain` for a name that does not
  resolve, the reason a `:local_address` could not be bound (`:eaddrinuse`, ...), and Quinn's
  transport statuses. Arguments that are wrong are answered at once, as by `connect/4`
  (`{:error, :bad_address}`, `{:error, {:bad_option, name}}`, ...).

  Until `connected`, `open_stream/2` waits for the handshake (as MsQuic queues a stream
  started early) and returns the stream once it completes, or why it failed. Accepts are
  taken too: `async_accept_stream/2` returns `:ok` and its stream comes once the peer opens
  one, and `accept_stream/3` waits (within its `timeout`) as on any connection; a failed
  handshake fails a waiting `accept_stream/3` with its reason, and sends a waiting
  `async_accept_stream/2`'s caller `{:quic, :closed, :undefined, :undefined}`. Other calls that need the
  connection (`send_dgram/2`, `getstat/2`, `peername/1`, ...) return
  `{:error, :not_connected}`. After a failure they return why it ended.
  `controlling_process/2` and `setopt/3` work throughout. Closing the
  handle (`close_connection/1`, `async_shutdown_connection/3`) abandons the handshake; the owner
  gets `closed`. If the owner exits, the handshake is abandoned too.

      {:ok, conn} = MaculaQuic.async_connect("127.0.0.1", 4433, alpn: ["demo"], verify: :none)
      receive do
        {:quic, :connected, ^conn, _props} -> :ready
        {:quic, :transport_shutdown, ^conn, %{status: status}} -> {:failed, status}
      end
  """
  @spec async_connect(host(), :inet.port_number(), options()) ::
          {:ok, connection()} | {:error, reason()}
  def async_connect(host, port, opts) do
    with {:ok, map} <- Options.to_map(opts) do
      Native.async_connect(charlist_to_binary(host), port, Options.read_pem_files(map))
    end
  end

  defp connect_started(:ok), do: {:ok, 0}
  defp connect_started({:watch, us}), do: {:ok, us}
  defp connect_started(error), do: error

  # With `watch_us` > 0 (the only connect in flight, after quick handshakes: see
  # `connect_watch_us` under "How the work is scheduled" in README), the caller looks at its
  # mailbox for the answer, letting the other processes run in between, for up to that long,
  # so that its scheduler does not go to sleep just before the answer comes; then it waits.
  defp await_connect(ref, 0), do: receive(do: ({^ref, result} -> result))

  defp await_connect(ref, watch_us),
    do: watch_connect(ref, System.monotonic_time(:microsecond) + watch_us)

  defp watch_connect(ref, until) do
    receive do
      {^ref, result} -> result
    after
      0 ->
        if System.monotonic_time(:microsecond) < until do
          :erlang.yield()
          watch_connect(ref, until)
        else
          await_connect(ref, 0)
        end
    end
  end

  @doc """
  Closes a connection (application error code 0) and, when the caller is its owner, waits for
  and consumes the `{:quic, :closed, conn, _}` message. Streams on it end too.

      :ok = MaculaQuic.close_connection(conn)
  """
  @spec close_connection(connection()) :: :ok
  def close_connection(conn), do: close_and_wait(conn, 0)

  @doc """
  Closes a connection as `close_connection/1` does, with quicer's `flags`
  (`connection_shutdown_none/0`, or `connection_shutdown_silent/0`, which Quinn cannot honour:
  the peer is always told) and an application `error_code` the peer receives as
  `{:quic, :shutdown, conn, error_code}`. When the caller is the owner it waits for and
  consumes `{:quic, :closed, conn, _}`. Flags other than 0 or 1, and an `error_code` that is
  not an integer in `0..2^62-1` (a QUIC varint), give `{:error, :badarg}`; closing a closed
  connection is `:ok`.

      :ok = MaculaQuic.close_connection(conn, MaculaQuic.connection_shutdown_none(), 42)
  """
  @spec close_connection(connection(), 0 | 1, non_neg_integer()) :: :ok | {:error, :badarg}
  def close_connection(conn, flags, error_code)
      when flags in [0, 1] and is_integer(error_code) and error_code in 0..@max_varint,
      do: close_and_wait(conn, error_code)

  def close_connection(conn, _flags, _error_code) do
    check_handle!(:connection, conn)
    {:error, :badarg}
  end

  @doc """
  quicer's other name for `shutdown_connection/4`: closes with `flags` and an application
  `error_code` and, when the caller is the owner, waits up to `timeout` for `closed` (returning
  `{:error, :timeout}` if it does not come). `close_connection/1,3` differ: they return `:ok`
  after a wait of their own.

      :ok = MaculaQuic.close_connection(conn, MaculaQuic.connection_shutdown_none(), 42, 1_000)
  """
  @spec close_connection(connection(), 0 | 1, non_neg_integer(), timeout()) ::
          :ok | {:error, reason()}
  def close_connection(conn, flags, error_code, timeout),
    do: shutdown_connection(conn, flags, error_code, timeout)

  @doc """
  Shuts a connection down with application error code 0 and returns at once: quicer's
  `async_close_connection/1`, as `async_shutdown_connection/3` with
  `connection_shutdown_none/0`. The owner later gets `{:quic, :closed, conn, _}`.

      :ok = MaculaQuic.async_close_connection(conn)
  """
  @spec async_close_connection(connection()) :: :ok | {:error, reason()}
  def async_close_connection(conn),
    do: async_shutdown_connection(conn, connection_shutdown_none(), 0)

  @doc """
  quicer's other name for `async_shutdown_connection/3`.

      :ok = MaculaQuic.async_close_connection(conn, MaculaQuic.connection_shutdown_none(), 42)
  """
  @spec async_close_connection(connection(), 0 | 1, non_neg_integer()) ::
          :ok | {:error, reason()}
  def async_close_connection(conn, flags, error_code),
    do: async_shutdown_connection(conn, flags, error_code)

  # `close_connection/1,3`: `:ok` also when `closed` has not come after `@close_wait`.
  defp close_and_wait(conn, error_code) do
    _ = close_with(conn, error_code, @close_wait)
    :ok
  end

  # Closes with an application error code (a valid varint) and, for the owner, consumes the
  # `closed` message, waiting up to `timeout` for it.
  defp close_with(conn, error_code, timeout) do
    owner? = owner?(conn)
    ref = make_ref()

    closed =
      case native(:connection, conn, fn -> Native.conn_close(conn, error_code, ref) end) do
        # Closing waits for the connection's work running on another thread: the answer comes.
        :wait -> receive(do: ({^ref, result} -> result))
        other -> other
      end

    case closed do
      :ok when owner? ->
        receive do
          {:quic, :closed, ^conn, _} -> :ok
        after
          timeout -> {:error, :timeout}
        end

      _ ->
        :ok
    end
  end

  @doc """
  Shuts a connection down with `flags` (`connection_shutdown_none/0` or
  `connection_shutdown_silent/0`) and an application `error_code` the peer receives as
  `{:quic, :shutdown, conn, error_code}`. Returns at once; the owner later gets
  `{:quic, :closed, conn, _}`. Flags other than 0 or 1, and an `error_code` that is not an
  integer in `0..2^62-1` (a QUIC varint), give `{:error, :badarg}`.

      :ok = MaculaQuic.async_shutdown_connection(conn, MaculaQuic.connection_shutdown_none(), 42)
  """
  @spec async_shutdown_connection(connection(), 0 | 1, non_neg_integer()) ::
          :ok | {:error, reason()}
  def async_shutdown_connection(conn, flags, error_code)
      when flags in [0, 1] and is_integer(error_code) and error_code in 0..@max_varint do
    native(:connection, conn, fn -> Native.conn_shutdown(conn, flags, error_code) end)
  end

  def async_shutdown_connection(conn, _flags, _error_code) do
    check_handle!(:connection, conn)
    {:error, :badarg}
  end

  @doc """
  Closes a connection with application error code 0 and waits up to `timeout` (5 s by
  default) for it to close: as `shutdown_connection/4` with `connection_shutdown_none/0`.
  quicer's `shutdown_connection/1,2`.

      :ok = MaculaQuic.shutdown_connection(conn)
  """
  @spec shutdown_connection(connection(), timeout()) :: :ok | {:error, reason()}
  def shutdown_connection(conn, timeout \\ 5_000),
    do: shutdown_connection(conn, connection_shutdown_none(), 0, timeout)

  @doc """
  Closes a connection as `close_connection/3` does, with quicer's `flags` and an application
  `error_code` the peer receives as `{:quic, :shutdown, conn, error_code}`, and, when the
  caller is the owner, waits up to `timeout` (5 s by default) for the owner's
  `{:quic, :closed, conn, _}` and consumes it. As quicer's `shutdown_connection/3,4` (and
  `close_connection/4`).

  Returns `:ok`, or `{:error, :timeout}` if `closed` did not come in time (the connection is
  closing all the same). Unlike `close_connection/3`, which returns `:ok` after its own 5 s
  wait, the timeout is reported. Closing a closed connection, and a caller that is not the
  owner, return `:ok` without waiting. Flags other than 0 or 1, an `error_code` that is not an
  integer in `0..2^62-1` (a QUIC varint), and a `timeout` that is neither `:infinity` nor a
  non-negative integer give `{:error, :badarg}`.

      :ok = MaculaQuic.shutdown_connection(conn, MaculaQuic.connection_shutdown_none(), 42, 1_000)
  """
  @spec shutdown_connection(connection(), 0 | 1, non_neg_integer(), timeout()) ::
          :ok | {:error, reason()}
  def shutdown_connection(conn, flags, error_code, timeout \\ 5_000)

  def shutdown_connection(conn, flags, error_code, timeout)
      when flags in [0, 1] and is_integer(error_code) and error_code in 0..@max_varint do
    with {:ok, timeout} <- checked(timeout_value(timeout), :connection, conn),
         do: close_with(conn, error_code, timeout)
  end

  def shutdown_connection(conn, _flags, _error_code, _timeout) do
    check_handle!(:connection, conn)
    {:error, :badarg}
  end

  @doc """
  The remote address of a connection (or of a stream's connection), as `{"ip", port}`, also
  once the connection has closed. Like `getstat/2`, it is read in turn with Quinn's driver:
  within this call when the connection is idle, else while the calling process waits.

      {:ok, {"127.0.0.1", port}} = MaculaQuic.peername(conn)
  """
  @spec peername(connection() | stream()) :: {:ok, sockaddr()} | {:error, reason()}
  def peername(handle), do: conn_query(conn_of!(handle, "a connection or stream"), :peername)

  @doc """
  The application protocol the two ends agreed on in the handshake (ALPN), as a binary: the
  one name of this end's `:alpn` list that the server chose (a server picks the first of its
  own list that the client offers). A client that offers several protocols learns here which
  one it got; an acceptor also finds it in `new_conn`'s `:alpns`. Also answers once the
  connection has closed. As quicer's `negotiated_protocol/1`.

      {:ok, "echo"} = MaculaQuic.negotiated_protocol(conn)
  """
  @spec negotiated_protocol(connection() | stream()) :: {:ok, binary()} | {:error, reason()}
  def negotiated_protocol(handle),
    do: conn_query(conn_of!(handle, "a connection or stream"), :negotiated_protocol)

  @doc """
  The peer's certificate, DER-encoded (its end-entity certificate, without the chain). A
  client always has the server's, also with `verify: :none`, where nobody checked it; an
  accepted connection has the client's only when its listener asked for one (`verify:
  :verify_peer`, mutual TLS), else `{:error, :no_peercert}`. Also answers once the connection
  has closed. As quicer's `peercert/1`; `:public_key.pkix_decode_cert(der, :otp)` decodes it,
  to read the subject a mutual-TLS listener's client was identified by, say.

      {:ok, der} = MaculaQuic.peercert(conn)
      {:error, :no_peercert} = MaculaQuic.peercert(accepted_conn_without_client_cert)
  """
  @spec peercert(connection() | stream()) :: {:ok, binary()} | {:error, :no_peercert | reason()}
  def peercert(handle), do: conn_query(conn_of!(handle, "a connection or stream"), :peercert)

  @doc """
  The local address of a listener, connection or stream, as `{"ip", port}`.

      iex> {:ok, l} = MaculaQuic.listen("::1", 0, alpn: ["demo"])
      iex> {:ok, {"::1", _port}} = MaculaQuic.sockname(l)
      iex> MaculaQuic.close_listener(l)
      :ok
  """
  @spec sockname(handle()) :: {:ok, sockaddr()} | {:error, reason()}
  def sockname(handle) do
    case Native.handle_kind(handle) do
      :listener -> Native.listener_sockname(handle)
      _ -> conn_query(conn_of!(handle, "a listener, connection or stream"), :sockname)
    end
  end

  @stat_names ~w(recv_cnt recv_oct send_cnt send_oct send_pend udp_tx_ios udp_rx_ios rtt_us
                 min_rtt_us cwnd congestion_events lost_packets lost_bytes sent_packets mtu
                 stream_frames_tx stream_frames_rx data_blocked_tx data_blocked_rx
                 stream_data_blocked_tx stream_data_blocked_rx datagram_frames_tx
                 datagram_frames_rx)a

  @doc """
  Connection counters from Quinn, by name, in the order asked.

  Names: `:recv_cnt`/`:send_cnt` (UDP datagrams), `:recv_oct`/`:send_oct` (UDP bytes),
  `:send_pend` (bytes given to `send/2`/`async_send/2` on the connection's streams that
  still wait for the peer's flow-control or congestion credit; Quinn does not expose its own
  unacknowledged bytes), `:udp_tx_ios`,
  `:udp_rx_ios` (system calls; fewer than datagrams means segmentation offload),
  `:rtt_us`, `:min_rtt_us`, `:cwnd`, `:congestion_events`, `:lost_packets`, `:lost_bytes`,
  `:sent_packets`, `:mtu`, `:stream_frames_tx`, `:stream_frames_rx`, `:datagram_frames_tx`
  and `:datagram_frames_rx` (QUIC datagrams sent and received, see `send_dgram/2`), and the
  flow-control stalls: `:data_blocked_tx`/`:stream_data_blocked_tx` count the times this
  end's sending was held back by the peer's connection window or a stream's window (QUIC's
  DATA_BLOCKED and STREAM_DATA_BLOCKED frames, one per limit reached), `:data_blocked_rx` and
  `:stream_data_blocked_rx` the times the peer said so of its own sending (a receiver here
  that reads too slowly, or a window set too small). A stream handle reports its connection's
  counters. An unknown name (or `names` not a proper list) gives `{:error, {:bad_stat, name}}`;
  a handle that is not a connection or stream raises `ArgumentError` (whatever the names).
  Quinn keeps the counters under a lock its driver holds while it works, so they are read in
  turn with the driver: within this call when the connection is idle, else by a runtime worker
  while only the calling process waits, never by a scheduler waiting for the lock. A closed
  connection still answers, with its last counters.

      {:ok, [send_oct: sent, recv_oct: received]} = MaculaQuic.getstat(conn, [:send_oct, :recv_oct])
  """
  @spec getstat(connection() | stream(), [atom()]) ::
          {:ok, [{atom(), non_neg_integer()}]} | {:error, reason()}
  def getstat(handle, names) do
    # The handle first: a wrong kind of handle raises whatever the names.
    conn = conn_of!(handle, "a connection or stream")

    with :ok <- check_stat_names(names),
         %{} = stats <- conn_query(conn, :stats) do
      {:ok, Enum.map(names, &{&1, Map.fetch!(stats, &1)})}
    end
  end

  # No QUIC packet carries more than this (the NIF refuses it too).
  @max_datagram 65_535

  @doc """
  Sends `data` as one QUIC datagram (RFC 9221) on `conn`.

  A datagram is unreliable and unordered: it travels in a single packet, is never
  retransmitted, and may be lost or overtake others; use a stream for anything that must
  arrive. Both ends of the connection must have been made with `datagram_receive_enabled:
  true` (on `listen/2,3` or `connect/4`): the peer then gets `{:quic, data, conn, 0}` (see
  "Messages to the owner"). Any process may send on a connection, not only its owner.

  Returns `:ok` once Quinn has queued the datagram; it leaves with the connection's next
  packet. Quinn's send buffer for datagrams is bounded (1 MiB): when the congestion window
  holds queued datagrams back and the buffer is full, the call waits (the calling process, not
  a scheduler) until there is room, rather than dropping older datagrams, so a sender that
  outruns the path is slowed down. Waiting calls are served in the order they came, and a
  call that finds others waiting waits behind them even if its own datagram would fit: small
  datagrams cannot starve a large one.

  Errors: `{:error, :datagrams_disabled}` when this end was made without the option (Quinn
  sends datagrams only on a connection that accepts them; MsQuic, and so quicer, does not ask
  that), `{:error, :unsupported_by_peer}` when the peer does not accept datagrams,
  `{:error, :too_large}` when `data` does not fit in one packet (the peer's limit and the
  path's packet size decide; `dgram_max_len` in `dgram_state_changed` tells the limit when the
  connection was delivered, `getopt(conn, :datagram_max_len)` at any time; it moves with the
  path: up as larger packets are found to pass, down if they stop passing; about 1,160 bytes
  fit on any path that carries QUIC at all), or why the connection ended (`{:error,
  :closed}`, ...). `data` that is not iodata raises `ArgumentError`, as does a handle that is
  not a connection; iodata of over 64 KiB is refused with `{:error, :too_large}` before it is
  copied.

      :ok = MaculaQuic.send_dgram(conn, "position 12,7")
  """
  @spec send_dgram(connection(), iodata()) :: :ok | {:error, reason()}
  def send_dgram(conn, data) do
    # No packet carries more: a large iolist is measured, not flattened, before it is refused.
    if is_list(data) and iodata_size!(data) > @max_datagram do
      checked({:error, :too_large}, :connection, conn)
    else
      bin = iodata!(data)
      ref = make_ref()

      case native(:connection, conn, fn -> Native.conn_send_dgram(conn, bin, ref) end) do
        :wait -> receive(do: ({^ref, result} -> result))
        other -> other
      end
    end
  end

  @doc """
  quicer's `async_send_dgram/2`: the same as `send_dgram/2`, which already returns as soon as
  the datagram is queued, without waiting for it to be sent or acknowledged (it waits only
  while Quinn's send buffer for datagrams is full; see `send_dgram/2`).

      :ok = MaculaQuic.async_send_dgram(conn, "position 12,7")
  """
  @spec async_send_dgram(connection(), iodata()) :: :ok | {:error, reason()}
  def async_send_dgram(conn, data), do: send_dgram(conn, data)

  defp iodata_size!(data) do
    :erlang.iolist_size(data)
  rescue
    ArgumentError -> raise ArgumentError, "expected iodata, got: #{inspect(data, limit: 10)}"
  end

  # `{:error, {:bad_stat, x}}` for the first name that is not a statistic (an improper tail, or
  # `names` not a list, counts as one).
  defp check_stat_names([]), do: :ok
  defp check_stat_names([name | rest]) when name in @stat_names, do: check_stat_names(rest)
  defp check_stat_names([name | _]), do: {:error, {:bad_stat, name}}
  defp check_stat_names(tail), do: {:error, {:bad_stat, tail}}

  ## Streams

  @doc """
  Opens a stream on `conn`, owned by the caller. Bidirectional unless `unidirectional: true`;
  `active` sets the receive mode (default `true`). Waits while the peer's stream limit is
  reached, and, on a connection from `async_connect/3`, until its handshake completes (or
  fails: then why). The peer sees the stream when the first bytes arrive.

      {:ok, stream} = MaculaQuic.open_stream(conn)
      {:ok, stream} = MaculaQuic.open_stream(conn, active: :once)
      {:ok, uni} = MaculaQuic.open_stream(conn, unidirectional: true)
  """
  @spec open_stream(connection(), options()) :: {:ok, stream()} | {:error, reason()}
  def open_stream(conn, opts \\ []) do
    ref = make_ref()

    result =
      with {:ok, map} <- Options.to_map(opts) do
        case native(:connection, conn, fn -> Native.open_stream(conn, map, ref) end) do
          :wait -> receive(do: ({^ref, result} -> result))
          {:error, :not_connected} -> after_handshake(conn, fn -> open_stream(conn, opts) end)
          other -> other
        end
      end

    checked(result, :connection, conn)
  end

  @doc """
  quicer's name for `open_stream/2`, which it is. quicer's stream options that this library
  has are accepted (`active`, `open_flag`, ...); see the moduledoc.

      {:ok, stream} = MaculaQuic.start_stream(conn, %{active: true})
  """
  @spec start_stream(connection(), options()) :: {:ok, stream()} | {:error, reason()}
  def start_stream(conn, opts), do: open_stream(conn, opts)

  @doc """
  The stream's QUIC stream ID (RFC 9000, section 2.1), the same number at both ends: its
  lowest bit says which side opened it (0 the client, 1 the server), the next whether it is
  bidirectional (0) or unidirectional (2), and the rest counts the streams of that kind (a
  client's first bidirectional stream is 0, its second 4, its first unidirectional one 2).
  Also answers once the stream has closed. As quicer's `get_stream_id/1`.

      {:ok, 0} = MaculaQuic.get_stream_id(first_client_stream)
  """
  @spec get_stream_id(stream()) :: {:ok, non_neg_integer()}
  def get_stream_id(stream) do
    {:ok, native(:stream, stream, fn -> Native.stream_info(stream) end).stream_id}
  end

  @doc """
  Asks for the next stream the peer opens. Returns `:ok` at once; the caller later receives
  `{:quic, :new_stream, stream, %{conn: conn, flags: flags, is_orphan: false}}` and owns the
  stream. One call, one stream. `opts` may set `:active` and `:read_ahead` for the new stream.

  If the connection ends first, the caller receives `{:quic, :closed, :undefined, :undefined}`
  instead, as quicer sends it every waiting stream acceptor: a process that does not own the
  connection, and so gets no `closed` about it, does not wait forever. (The owner gets both,
  in no set order.)

  Streams the peer opens while nobody is accepting wait inside Quinn and count against the
  peer's stream limit (`:peer_bidi_stream_count`), so a process that stops accepting makes
  the peer stop opening. On a connection from `async_connect/3` an accept may be made before
  `connected`: it is taken when the handshake completes (a failed handshake ends it with the
  message above).

      :ok = MaculaQuic.async_accept_stream(conn, active: :once)
  """
  @spec async_accept_stream(connection(), options()) :: :ok | {:error, reason()}
  def async_accept_stream(conn, opts \\ []) do
    result =
      with {:ok, map} <- Options.to_map(opts),
           {:ok, _id} <-
             native(:connection, conn, fn -> Native.conn_accept_stream(conn, map, nil) end) do
        :ok
      end

    checked(result, :connection, conn)
  end

  @doc """
  Waits up to `timeout` (`:infinity` by default) for the next stream the peer opens, and
  returns it owned by the caller. `{:error, :timeout}` if none arrives in time (the request is withdrawn: a later stream is not
  lost, it waits for the next accept); `{:error, :closed}` (or why the connection ended) if
  the connection ends. A `timeout` that is neither `:infinity` nor a non-negative integer
  gives `{:error, :badarg}`.

      {:ok, stream} = MaculaQuic.accept_stream(conn, [active: false], 5_000)
  """
  @spec accept_stream(connection(), options(), timeout()) :: {:ok, stream()} | {:error, reason()}
  def accept_stream(conn, opts \\ [], timeout \\ :infinity) do
    ref = make_ref()

    result =
      with {:ok, timeout} <- timeout_value(timeout),
           {:ok, map} <- Options.to_map(opts),
           {:ok, id} <-
             native(:connection, conn, fn -> Native.conn_accept_stream(conn, map, ref) end) do
        await_reply(ref, timeout, fn -> Native.conn_cancel_accept(conn, id) end)
      end

    checked(result, :connection, conn)
  end

  @doc """
  Sends `data` on a stream. Returns `:ok` once the data is queued and no more than 2 MiB of
  the stream's data, this call's included, still waits for Quinn to take it into its send
  buffer; when more does (the peer is slow, and flow-control credit is short), the call waits
  until enough was taken. So a slow peer slows the sender, and a sender of large pieces always
  has the next one queued while Quinn sends the last. Only the calling process waits: no
  scheduler is blocked. Errors: `{:error, :closed}`, `{:error, {:peer_receive_aborted,
  code}}`, `{:error, :einval}` on the receiving end of a unidirectional stream, or why the
  connection ended. Like `:gen_tcp`'s, an `:ok` means queued, not delivered (a process that
  exits right after has its streams reset; `send/3` with FIN waits for Quinn): if the stream
  fails while the data still waits, the next call on the stream reports why, and the owner
  hears of it as usual (`peer_receive_aborted`, `shutdown`, ...). `data` that is not iodata
  raises `ArgumentError`.

      :ok = MaculaQuic.send(stream, ["hello", ?\\s, "world"])
  """
  @spec send(stream(), iodata()) :: :ok | {:error, reason()}
  def send(stream, data), do: send_pieces(stream, iodata!(data), false)

  @doc """
  Like `send/2`, with quicer's send flags: `4` (FIN) finishes the stream after this data, and
  then the call returns only once Quinn has all of it and the FIN, so the caller may exit right
  after without its stream being reset under the data. Other bits are accepted and ignored.
  Flags that are not a non-negative integer raise `ArgumentError`, as does `data` that is not
  iodata.

      :ok = MaculaQuic.send(stream, "last words", 4)
  """
  @spec send(stream(), iodata(), non_neg_integer()) :: :ok | {:error, reason()}
  def send(stream, data, flags) do
    check_send_flags!(flags, "send/3")
    send_pieces(stream, iodata!(data), Bitwise.band(flags, 4) != 0)
  end

  defp send_pieces(stream, bin, fin) when byte_size(bin) <= @piece,
    do: send_piece(stream, bin, fin)

  defp send_pieces(stream, <<piece::binary-size(@piece), rest::binary>>, fin) do
    with :ok <- send_piece(stream, piece, false), do: send_pieces(stream, rest, fin)
  end

  defp send_piece(stream, bin, fin) do
    ref = make_ref()

    # `:wait`: more than 2 MiB waits for Quinn (or the send finishes the stream); the writer
    # task hands it over as flow control allows and answers `{ref, result}` once that is no
    # longer so (once Quinn has the FIN). Anything else (`:ok`, an error) is the answer itself.
    case native(:stream, stream, fn -> Native.stream_send(stream, bin, ref, fin) end) do
      :wait -> receive(do: ({^ref, result} -> result))
      other -> other
    end
  end

  @doc """
  Queues `data` for sending and returns at once, having queued all of it or none. Data queued
  this way is bounded: while some of it still waits for Quinn, a send that would take the
  waiting total past 16 MiB is refused whole with `{:error, :send_queue_full}` (one send of any
  size is taken when none waits) — use `send/2` to wait for the peer instead. Order with other
  sends on the stream is kept. Data of 16 KiB or more is not copied: the binary itself is
  queued.

      :ok = MaculaQuic.async_send(stream, "fire and forget")
  """
  @spec async_send(stream(), iodata()) :: :ok | {:error, reason()}
  def async_send(stream, data) do
    # One call, whatever the size: the native side keeps a large binary without copying it, so
    # the call stays short, and the bound is checked once, for all of the data.
    bin = iodata!(data)
    native(:stream, stream, fn -> Native.stream_send(stream, bin, nil, false) end)
  end

  @doc """
  Like `async_send/2`, with quicer's send flags:

    * `send_flag_fin/0` (`4`) finishes the stream after this data;
    * `send_flag_sync/0` (`0x1000`) has the caller receive `{:quic, :send_complete, stream,
      is_cancelled}` once Quinn has taken all of this data into its send buffer (and the FIN,
      with `send_flag_fin/0`), so the data no longer waits in this library's queue, or, with
      `is_cancelled` `true`, once it never will be (the stream was reset, stopped by the peer,
      or its connection ended). As quicer's, for a send made with that flag only. Taken is
      not acknowledged: Quinn still retransmits what is lost.

  Other bits are accepted and ignored. Returns as `async_send/2` does (when it returns an
  error, no `send_complete` follows). Flags that are not a non-negative integer raise
  `ArgumentError`, as does `data` that is not iodata.

      :ok = MaculaQuic.async_send(stream, "tell me", MaculaQuic.send_flag_sync())
      receive do
        {:quic, :send_complete, ^stream, false} -> :taken
      end
      # The last data: nothing may be sent after the FIN ({:error, :closed}).
      :ok = MaculaQuic.async_send(stream, "last words", MaculaQuic.send_flag_fin())
  """
  @spec async_send(stream(), iodata(), non_neg_integer()) :: :ok | {:error, reason()}
  def async_send(stream, data, flags) do
    check_send_flags!(flags, "async_send/3")
    bin = iodata!(data)
    fin = Bitwise.band(flags, 4) != 0
    tag = if Bitwise.band(flags, 0x1000) != 0, do: :complete, else: nil
    native(:stream, stream, fn -> Native.stream_send(stream, bin, tag, fin) end)
  end

  defp check_send_flags!(flags, _fun) when is_integer(flags) and flags >= 0, do: :ok

  defp check_send_flags!(flags, fun),
    do:
      raise(
        ArgumentError,
        "#{fun} expects non-negative integer flags, got: #{inspect(flags, limit: 10)}"
      )

  @doc """
  Opens a stream on `conn` with `opts` and sends `data` on it with `flags`, as
  `open_stream/2` and then `async_send/3`; returns the stream, owned by the caller. quicer's
  `async_csend/4`. If the send fails, the stream is closed and the send's error returned.
  `data` that is not iodata, or flags that are not a non-negative integer, raise
  `ArgumentError` before any stream is opened.

      {:ok, stream} = MaculaQuic.async_csend(conn, "hello", [active: true], 0)
  """
  @spec async_csend(connection(), iodata(), options(), non_neg_integer()) ::
          {:ok, stream()} | {:error, reason()}
  def async_csend(conn, data, opts, flags) do
    check_send_flags!(flags, "async_csend/4")
    bin = iodata!(data)

    with {:ok, stream} <- open_stream(conn, opts) do
      case async_send(stream, bin, flags) do
        :ok ->
          {:ok, stream}

        error ->
          close_stream(stream)
          error
      end
    end
  end

  @doc """
  Receives from a passive stream (`active: false`), waiting up to `timeout` (`:infinity` by
  default).

  `length` 0 returns whatever is buffered (up to the stream's `read_ahead`, 512 KiB unless
  set), or the next chunk to arrive. A passive stream's native side reads up to `read_ahead`
  ahead of `recv`, so that `recv` usually answers at once; beyond that the peer waits for
  flow-control credit. `length` > 0 returns
  exactly that many bytes, or fewer if the stream ends first. Errors: `{:error, :einval}` on
  an active stream, `{:error, :peer_send_shutdown}` once the stream has ended and everything
  was read, `{:error, {:peer_send_aborted, code}}`, `{:error, :closed}` (or, when the
  connection ended, why, as `send/2` reports it: `{:error, {:shutdown, code}}`, ...),
  `{:error, :timeout}`, `{:error, :ealready}` when another `recv` on the stream is waiting,
  `{:error, :badarg}` for a `length` over 64 MiB (`:gen_tcp`'s limit too) or a `timeout` that is neither `:infinity`
  nor a non-negative integer. A `length` that is not a non-negative integer raises
  `ArgumentError`. Only the calling process waits. An answer of up to 1 MiB is copied into
  its binary within the call; a larger one is built on a native runtime thread while the
  caller waits (copying 64 MiB took 8–40 ms here, far too long for a scheduler), and once its
  data is there it is returned whatever the `timeout`.

      {:ok, stream} = MaculaQuic.accept_stream(conn, [active: false], 5_000)
      {:ok, <<len::32>>} = MaculaQuic.recv(stream, 4, 5_000)
      {:ok, body} = MaculaQuic.recv(stream, len, 5_000)
  """
  @spec recv(stream(), non_neg_integer(), timeout()) :: {:ok, binary()} | {:error, reason()}
  def recv(stream, length, timeout \\ :infinity)

  def recv(stream, length, timeout) when is_integer(length) and length >= 0 do
    ref = make_ref()

    result =
      with {:ok, timeout} <- timeout_value(timeout),
           :ok <- check_recv_length(length) do
        recv_native(stream, length, timeout, ref)
      end

    checked(result, :stream, stream)
  end

  def recv(_stream, length, _timeout),
    do:
      raise(
        ArgumentError,
        "recv/3 expects a non-negative integer length, got: #{inspect(length, limit: 10)}"
      )

  # One recv returns at most 64 MiB, as with :gen_tcp: the bytes are buffered until there are
  # that many and then copied into one binary, wherever the stream's work runs (possibly a
  # scheduler), so the copy must stay short.
  defp check_recv_length(length) when length <= 67_108_864, do: :ok
  defp check_recv_length(_), do: {:error, :badarg}

  defp recv_native(stream, length, timeout, ref) do
    case native(:stream, stream, fn -> Native.stream_recv(stream, length, ref) end) do
      :wait ->
        await_reply(ref, timeout, fn -> Native.stream_cancel_recv(stream) end)

      # The answer is there, over 1 MiB, and being copied on a runtime thread: it is certain
      # to come (or the reason the stream failed meanwhile), whatever the timeout.
      :building ->
        receive(do: ({^ref, result} -> result))

      other ->
        other
    end
  end

  @doc """
  Sets a stream option, or a connection's `:datagram_active`.

    * `:active` — `true`, `false`, `:once` or an integer `N`, with `:inet` semantics: `:once`
      delivers one data message then turns passive; `N` adds to the message budget (negative
      values subtract) and when it reaches zero the owner gets
      `{:quic, :passive, stream, :undefined}`; `false` is passive (use `recv/3`). Data read but
      not yet delivered is delivered first when the stream turns active, in order.
    * `:read_ahead` — bytes, 1024 to 4 MiB (default 512 KiB): how far a passive stream reads
      ahead of `recv/3`, and the most `recv(stream, 0, timeout)` returns at once. It bounds
      what a passive stream whose owner does not read holds (on top of the connection's
      `:stream_recv_window`, 2.5 MiB unless set): a node with many such streams can set it
      lower. The default goes with that window: in 1 GiB transfers, 512 KiB and 2.5 MiB ran
      at 0.78–0.80× raw Quinn against 0.66–0.69× with 256 KiB and Quinn's 1.25 MB, and
      either alone did not help (see `bench/README.md`). An active stream is unaffected: it
      holds one message's worth (up to 64 KiB). A smaller value takes effect as the owner
      reads what is already buffered.

  On a connection made with `datagram_receive_enabled: true`:

    * `:datagram_active` — `true`, `false`, `:once` or an integer `N`, as `:active` is for a
      stream, for the connection's datagrams (`{:quic, data, conn, 0}`): `:once` delivers one
      then stops, `N` adds to a budget and `{:quic, :passive, conn, :undefined}` says it ran
      out, `false` delivers none. While delivery is stopped, one datagram is held for the owner
      and Quinn keeps at most `:datagram_receive_buffer` more (1.25 MB unless set; see that
      option for what it costs), dropping the oldest: so `:once` or `N` bound what a slow
      owner's datagrams cost, where `true` (the default) lets its mailbox grow. On a
      connection without datagrams it gives `{:error, :datagrams_disabled}`.

  Anything else gives `{:error, {:bad_option, name}}`, as does a value out of range.

      :ok = MaculaQuic.setopt(stream, :active, 10)
      :ok = MaculaQuic.setopt(stream, :read_ahead, 1_048_576)
      :ok = MaculaQuic.setopt(conn, :datagram_active, :once)
  """
  @spec setopt(stream(), :active, active()) :: :ok | {:error, reason()}
  @spec setopt(stream(), :read_ahead, pos_integer()) :: :ok | {:error, reason()}
  @spec setopt(connection(), :datagram_active, active()) :: :ok | {:error, reason()}
  def setopt(handle, name, value) do
    case {Native.handle_kind(handle), name} do
      {:stream, :active} -> Native.stream_set_active(handle, value)
      {:stream, :read_ahead} -> Native.stream_set_read_ahead(handle, value)
      {:connection, :datagram_active} -> Native.conn_set_dgram_active(handle, value)
      {kind, _} when kind in [:stream, :connection] -> {:error, {:bad_option, name}}
      _ -> bad_handle!("a stream or connection", handle)
    end
  end

  @doc """
  Reads an option. A stream's `:active` gives the current mode (`true | false | :once | N`),
  its `:read_ahead` the read-ahead in bytes. A connection's `:datagram_active` gives its
  datagram mode (see `setopt/3`), and three more (quicer has the first two) tell whether it
  takes datagrams, and whether and how large it may send them now, as `dgram_state_changed`
  did when the connection was delivered:

    * `:datagram_receive_enabled` — `true` when it was made with
      `datagram_receive_enabled: true`;
    * `:datagram_send_enabled` — `true` when `send_dgram/2` may send: both ends were made
      with `datagram_receive_enabled: true`;
    * `:datagram_max_len` — the largest datagram `send_dgram/2` accepts now, `0` when it
      accepts none. It moves with the path's packet size, so it can be larger than
      `dgram_state_changed` said (and smaller again if large packets stop passing).

  The last two answer for whichever process asks: a process given the connection after its
  `dgram_state_changed` went to an earlier owner learns the same from them.

      {:ok, :once} = MaculaQuic.getopt(stream, :active)
      {:ok, 524_288} = MaculaQuic.getopt(stream, :read_ahead)
      {:ok, true} = MaculaQuic.getopt(conn, :datagram_active)
      {:ok, 1_155} = MaculaQuic.getopt(conn, :datagram_max_len)

  An ended connection answers `false` and `0`; an `async_connect/3` handle still in its
  handshake `{:error, :not_connected}`, one whose handshake failed why it failed, and a
  connection whose Quinn driver panicked `{:error, :closed}`.
  """
  @spec getopt(stream(), :active) :: {:ok, active()} | {:error, reason()}
  @spec getopt(stream(), :read_ahead) :: {:ok, pos_integer()} | {:error, reason()}
  @spec getopt(connection(), :datagram_active) :: {:ok, active()} | {:error, reason()}
  @spec getopt(connection(), :datagram_receive_enabled) :: {:ok, boolean()}
  @spec getopt(connection(), :datagram_send_enabled) :: {:ok, boolean()} | {:error, reason()}
  @spec getopt(connection(), :datagram_max_len) :: {:ok, non_neg_integer()} | {:error, reason()}
  def getopt(handle, name) do
    case {Native.handle_kind(handle), name} do
      {:stream, :active} ->
        {:ok, Native.stream_get_active(handle)}

      {:stream, :read_ahead} ->
        {:ok, Native.stream_get_read_ahead(handle)}

      {:connection, :datagram_active} ->
        Native.conn_get_dgram_active(handle)

      {:connection, query} when query in [:datagram_send_enabled, :datagram_max_len] ->
        conn_query(handle, query)

      {:connection, :datagram_receive_enabled} ->
        {:ok, match?({:ok, _}, Native.conn_get_dgram_active(handle))}

      {kind, _} when kind in [:stream, :connection] ->
        {:error, {:bad_option, name}}

      _ ->
        bad_handle!("a stream or connection", handle)
    end
  end

  @doc """
  quicer's `getopt/3`, with an option level. The options here are the handle's own, quicer's
  level `false`: that level reads as `getopt/2`; quicer's other levels (`:quic_global`,
  `:quic_registration`, `:quic_configuration`, `:quic_tls`) name MsQuic objects this library
  does not have, and give `{:error, {:bad_level, level}}`.

      {:ok, :once} = MaculaQuic.getopt(stream, :active, false)
  """
  @spec getopt(stream() | connection(), atom(), false | atom()) ::
          {:ok, term()} | {:error, reason()}
  def getopt(handle, name, false), do: getopt(handle, name)
  def getopt(handle, _name, level), do: bad_level(handle, level)

  @doc """
  quicer's `setopt/4`, with an option level: level `false` sets as `setopt/3`; any other
  level gives `{:error, {:bad_level, level}}` (see `getopt/3`).

      :ok = MaculaQuic.setopt(stream, :active, 10, false)
  """
  @spec setopt(stream() | connection(), atom(), term(), false | atom()) ::
          :ok | {:error, reason()}
  def setopt(handle, name, value, false), do: setopt(handle, name, value)
  def setopt(handle, _name, _value, level), do: bad_level(handle, level)

  defp bad_level(handle, level) do
    case Native.handle_kind(handle) do
      kind when kind in [:stream, :connection] -> {:error, {:bad_level, level}}
      _ -> bad_handle!("a stream or connection", handle)
    end
  end

  @doc """
  Closes a stream: the sending side finishes after queued data, the receiving side stops
  (the peer's further data is refused), and the owner receives nothing more about it.

      :ok = MaculaQuic.close_stream(stream)
  """
  @spec close_stream(stream()) :: :ok
  def close_stream(stream), do: native(:stream, stream, fn -> Native.stream_close(stream) end)

  @doc """
  quicer's `close_stream/2`: a graceful shutdown that waits up to `timeout`, the same as
  `shutdown_stream/2`. Unlike `close_stream/1`, the owner goes on receiving the stream's
  messages, and the caller waits for both directions to end.

      :ok = MaculaQuic.close_stream(stream, 5_000)
  """
  @spec close_stream(stream(), timeout()) :: :ok | {:error, reason()}
  def close_stream(stream, timeout), do: shutdown_stream(stream, timeout)

  @doc """
  quicer's `close_stream/4`, another name for `shutdown_stream/4`.

      :ok = MaculaQuic.close_stream(stream, MaculaQuic.stream_shutdown_abort(), 7, 5_000)
  """
  @spec close_stream(stream(), non_neg_integer(), non_neg_integer(), timeout()) ::
          :ok | {:error, reason()}
  def close_stream(stream, flags, error_code, timeout),
    do: shutdown_stream(stream, flags, error_code, timeout)

  @doc """
  Shuts a stream down gracefully (FIN after queued data) and returns at once: quicer's
  `async_shutdown_stream/1`, as `async_shutdown_stream/3` with `stream_shutdown_graceful/0`
  and error code 0. The owner later gets `{:quic, :stream_closed, stream, _}` once the peer has
  finished its side too.

      :ok = MaculaQuic.async_shutdown_stream(stream)
  """
  @spec async_shutdown_stream(stream()) :: :ok | {:error, reason()}
  def async_shutdown_stream(stream),
    do: async_shutdown_stream(stream, stream_shutdown_graceful(), 0)

  @doc """
  quicer's `async_close_stream/1`, another name for `async_shutdown_stream/1`: a graceful
  shutdown that returns at once.

      :ok = MaculaQuic.async_close_stream(stream)
  """
  @spec async_close_stream(stream()) :: :ok | {:error, reason()}
  def async_close_stream(stream), do: async_shutdown_stream(stream)

  @doc """
  Shuts down one or both directions of a stream with quicer's `flags`:
  `stream_shutdown_graceful/0` (FIN after queued data; `error_code` unused),
  `stream_shutdown_abort_send/0`, `stream_shutdown_abort_receive/0`,
  `stream_shutdown_abort/0`, optionally with `stream_shutdown_immediate/0`. The peer sees
  `error_code` as `{:quic, :peer_send_aborted, s, code}` or `{:quic, :peer_receive_aborted, s,
  code}`. Returns at once. Invalid flag combinations, and an `error_code` that is not an
  integer in `0..2^62-1` (a QUIC varint), give `{:error, :badarg}`; a handle that is not a
  stream raises `ArgumentError`. A graceful shutdown gives `{:error, :einval}` on the
  receiving end of a unidirectional stream (it has no sending side) and `{:error, :closed}`
  once Quinn has the stream's FIN or the sending side has ended otherwise; aborting a direction
  that has already ended is `:ok` (an abort while a FIN waits to be acknowledged still resets
  the stream).

      :ok = MaculaQuic.async_shutdown_stream(stream, MaculaQuic.stream_shutdown_abort(), 7)
  """
  @spec async_shutdown_stream(stream(), non_neg_integer(), non_neg_integer()) ::
          :ok | {:error, reason()}
  def async_shutdown_stream(stream, flags, error_code)
      when flags in 0..15 and is_integer(error_code) and error_code in 0..@max_varint do
    native(:stream, stream, fn -> Native.stream_shutdown(stream, flags, error_code) end)
  end

  def async_shutdown_stream(stream, _flags, _error_code) do
    check_handle!(:stream, stream)
    {:error, :badarg}
  end

  @doc """
  Shuts a stream down gracefully (FIN after queued data, error code 0) and waits up to
  `timeout` for it to end in both directions: as `shutdown_stream/4` with
  `stream_shutdown_graceful/0`. quicer's `shutdown_stream/1,2` (and `close_stream/1,2`, which
  quicer defines the same way); the default `timeout` is quicer's, `:infinity`.

      :ok = MaculaQuic.shutdown_stream(stream, 5_000)
  """
  @spec shutdown_stream(stream(), timeout()) :: :ok | {:error, reason()}
  def shutdown_stream(stream, timeout \\ :infinity),
    do: shutdown_stream(stream, stream_shutdown_graceful(), 0, timeout)

  @doc """
  Shuts a stream down as `async_shutdown_stream/3` does, then, when the caller is the stream's
  owner, waits up to `timeout` for the stream to end in both directions and consumes the
  owner's `{:quic, :stream_closed, stream, props}` (a `send_shutdown_complete` before it stays
  in the mailbox). As quicer's `shutdown_stream/4` (and `close_stream/4`).

  Both directions must end: after a graceful shutdown the peer must acknowledge the FIN and
  finish (or reset) its own side too, and on a passive stream the owner must have read to its end; `stream_closed` comes
  only then. Returns `:ok` once it came (at once if it already had), `{:error, :timeout}` if
  it did not come in time (the shutdown stands), or what `async_shutdown_stream/3` returns
  when that fails, such as `{:error, :closed}` for a graceful shutdown of a sending side that
  has already ended. A caller that is not the owner, and any caller after `close_stream/1`
  (the owner hears nothing more), gets `:ok` once the shutdown has started, without waiting.
  Bad flags or `error_code` give `{:error, :badarg}`, as does a `timeout` that is neither
  `:infinity` nor a non-negative integer; a handle that is not a stream raises
  `ArgumentError`.

      :ok = MaculaQuic.shutdown_stream(stream, MaculaQuic.stream_shutdown_abort(), 7, 5_000)
  """
  @spec shutdown_stream(stream(), non_neg_integer(), non_neg_integer(), timeout()) ::
          :ok | {:error, reason()}
  def shutdown_stream(stream, flags, error_code, timeout) do
    with {:ok, timeout} <- checked(timeout_value(timeout), :stream, stream) do
      # Read before the shutdown, so that a `stream_closed` it causes is known to be ours.
      info = native(:stream, stream, fn -> Native.stream_info(stream) end)

      case async_shutdown_stream(stream, flags, error_code) do
        :ok when info.owner == self() and not info.silenced ->
          await_stream_closed(stream, if(info.closed, do: 0, else: timeout), info.closed)

        other ->
          other
      end
    end
  end

  # The owner's `stream_closed` for `stream`; when it was sent before the shutdown, it is taken
  # if it is still in the mailbox, and either way that is `:ok`.
  defp await_stream_closed(stream, timeout, already_sent?) do
    receive do
      {:quic, :stream_closed, ^stream, _props} -> :ok
    after
      timeout -> if already_sent?, do: :ok, else: {:error, :timeout}
    end
  end

  @doc """
  Gives a stream to `new_owner`, forwarding the stream's messages already queued in the
  caller's mailbox to it, in order, before any new one — nothing is lost or reordered — and
  then sending it `{:handoff_done, stream, handoff_data}`, as quicer does. Only the owner may
  call it (`{:error, :not_owner}`). Options:

    * `:active` — the stream's mode for the new owner (default: the mode it had);
    * `:handoff_data` — any term, for `handoff_done` (default `:undefined`). (quicer takes
      this term as the third argument itself.)

  Any other option, or an invalid mode, gives `{:error, {:bad_option, name}}` and changes
  nothing. A `new_owner` that has already exited gives `{:error, :closed}`; one that is not a
  local pid raises `ArgumentError`.

  Delivery pauses while the queued messages are forwarded, and the mode is set once they are.
  If the new owner uses the stream before that (`setopt/3` with `:active`, or `recv/3`), its
  choice stands and the mode from `opts` is not applied. For messages to stay in order, the new
  owner should wait for `handoff_done` (`wait_for_handoff/2`) before it reads. The pause holds
  back every message about the stream, `stream_closed`, `send_shutdown_complete` and
  `peer_receive_aborted` included
  (as quicer buffers them during a handoff): they reach the new owner after `handoff_done`,
  so `stream_closed` stays the last.

  Handing the stream to its owner itself only applies `:active` and sends `handoff_done` to
  the caller, as quicer does: its messages are in its mailbox already.

      :ok = MaculaQuic.handoff_stream(stream, worker_pid, active: :once, handoff_data: :job_1)
  """
  @spec handoff_stream(stream(), pid(), options()) :: :ok | {:error, reason()}
  def handoff_stream(stream, new_owner, opts \\ []) do
    local_pid!(new_owner)

    result =
      with {:ok, map} <- Options.to_map(opts), :ok <- check_handoff_opts(map) do
        if new_owner == self(),
          do: handoff_to_self(stream, map),
          else: hand_over_stream(stream, new_owner, map)
      end

    checked(result, :stream, stream)
  end

  defp hand_over_stream(stream, new_owner, map) do
    with {:ok, previous} <-
           native(:stream, stream, fn -> Native.stream_handoff(stream, new_owner) end) do
      forward_queued(stream, new_owner)
      # Before delivery resumes, as quicer's: the forwarded messages, `handoff_done`, then
      # the stream's new messages (those held during the pause first).
      send_handoff_done(new_owner, stream, map)
      Native.stream_handoff_resume(stream, Map.get(map, :active, previous))
    end
  end

  # To the owner itself (as quicer's): its mailbox holds the stream's messages in order
  # already, so there is nothing to forward, and forwarding them to itself would never end.
  defp handoff_to_self(stream, map) do
    check_handle!(:stream, stream)

    with :ok <- if(owner?(stream), do: :ok, else: {:error, :not_owner}),
         :ok <- if(Map.has_key?(map, :active), do: setopt(stream, :active, map.active), else: :ok) do
      send_handoff_done(self(), stream, map)
    end
  end

  defp send_handoff_done(pid, stream, map) do
    Kernel.send(pid, {:handoff_done, stream, Map.get(map, :handoff_data, :undefined)})
    :ok
  end

  @doc """
  Waits, in the new owner, for `{:handoff_done, stream, data}` from `handoff_stream/3` called
  by `from` (the old owner), and returns `{:ok, data}`; stream messages forwarded before it
  are then in the caller's mailbox, in order. Returns `{:error, :owner_down}` if `from` exits
  without handing the stream over; if it exited in the middle of `handoff_stream/3`, the
  stream's delivery, paused by the handoff, is restored to the mode it had before. As
  quicer's, it has no timeout. `from` that is not a local pid, or a handle that is not a
  stream, raises `ArgumentError`.

      {:ok, :job_1} = MaculaQuic.wait_for_handoff(old_owner, stream)
  """
  @spec wait_for_handoff(pid(), stream()) :: {:ok, term()} | {:error, :owner_down}
  def wait_for_handoff(from, stream) do
    local_pid!(from)
    check_handle!(:stream, stream)
    monitor = Process.monitor(from)

    # A `handoff_done` that `from` sent before exiting is in the mailbox before its `:DOWN`.
    receive do
      {:handoff_done, ^stream, data} ->
        Process.demonitor(monitor, [:flush])
        {:ok, data}

      {:DOWN, ^monitor, :process, _, _} ->
        # It may have died between pausing delivery and restoring it: restore it here (a no-op
        # if the pause has ended, or the stream never came to the caller).
        if owner?(stream), do: Native.stream_handoff_abandoned(stream)
        {:error, :owner_down}
    end
  end

  # Checked before ownership moves, so a bad option changes nothing.
  defp check_handoff_opts(map) do
    case Enum.find(Map.keys(map), &(&1 not in [:active, :handoff_data])) do
      nil ->
        case map do
          %{active: a} when is_boolean(a) or a == :once -> :ok
          %{active: n} when is_integer(n) and n in -32_767..32_767 -> :ok
          %{active: _} -> {:error, {:bad_option, :active}}
          _ -> :ok
        end

      name ->
        {:error, {:bad_option, name}}
    end
  end

  defp forward_queued(stream, pid) do
    receive do
      {:quic, _, ^stream, _} = msg ->
        Kernel.send(pid, msg)
        forward_queued(stream, pid)
    after
      0 -> :ok
    end
  end

  ## Any handle

  @doc """
  Makes `pid` the owner of `handle` (listener, connection or stream): it receives the
  handle's messages from now on, and the handle is shut down when it exits. Only the current
  owner may call it (`{:error, :not_owner}`); messages already queued stay with the caller
  (see `handoff_stream/3`). A `pid` that has already exited gives `{:error, :closed}`; one
  that is not a local pid, or a `handle` that is not one, raises `ArgumentError`.

      :ok = MaculaQuic.controlling_process(conn, worker_pid)
  """
  @spec controlling_process(handle(), pid()) :: :ok | {:error, reason()}
  def controlling_process(handle, pid) do
    local_pid!(pid)
    native(nil, handle, fn -> Native.controlling_process(handle, pid) end)
  end

  @doc """
  The connection's owner, as quicer's `get_conn_owner/1`: `{:ok, pid}`, also once the
  connection has closed (its last owner). A handle that is not a connection raises
  `ArgumentError`.

      {:ok, pid} = MaculaQuic.get_conn_owner(conn)
  """
  @spec get_conn_owner(connection()) :: {:ok, pid()}
  def get_conn_owner(conn), do: owner_of(:connection, conn)

  @doc """
  The stream's owner, as quicer's `get_stream_owner/1` (see `get_conn_owner/1`).

      {:ok, pid} = MaculaQuic.get_stream_owner(stream)
  """
  @spec get_stream_owner(stream()) :: {:ok, pid()}
  def get_stream_owner(stream), do: owner_of(:stream, stream)

  @doc """
  The listener's owner, as quicer's `get_listener_owner/1` (see `get_conn_owner/1`).

      {:ok, pid} = MaculaQuic.get_listener_owner(listener)
  """
  @spec get_listener_owner(listener()) :: {:ok, pid()}
  def get_listener_owner(listener), do: owner_of(:listener, listener)

  defp owner_of(kind, handle) do
    check_handle!(kind, handle)
    {:ok, Native.handle_owner(handle)}
  end

  @doc """
  Closes any handle: `close_stream/1`, `close_connection/1` or `close_listener/1`.

      :ok = MaculaQuic.close(conn)
  """
  @spec close(handle()) :: :ok
  def close(handle) do
    case Native.handle_kind(handle) do
      :stream -> close_stream(handle)
      :connection -> close_connection(handle)
      :listener -> close_listener(handle)
      _ -> bad_handle!("a listener, connection or stream", handle)
    end
  end

  @doc """
  Live native objects: listeners, connections and streams not yet freed, runtime tasks, shared
  client endpoints (one per source address; those on an ephemeral port stay), registered
  listener addresses, runtime worker threads, `shards` (one per endpoint and one per
  connection: see "How the work is scheduled" in the README) and `shard_runners` (the runtime
  tasks that run shards on runtime workers: at most one per shard, ended when it goes), `owners`
  (processes that own handles: each is monitored once, while it lives) and `accept_waiters`
  (`async_accept/1` and `accept/3` calls waiting on open listeners; those of processes that
  have exited are dropped as more arrive, and all when the listener closes), and
  `received_buffers`, the library's buffers that received binaries of 16 to 64 KiB point into
  (see "Receive modes and back-pressure" in the README; each is freed, or kept for reuse, when
  the BEAM frees the last binary that refers to it). Three counts are cumulative since the VM
  started: `inline_runs`, the times a call ran a connection's work on the caller's own thread,
  `runtime_runs`, the times a runtime worker did, and `direct_writes`, the sends of up to 16 KiB
  (not finishing the stream) whose data Quinn took within the `send` call itself, when nothing
  of the stream's was queued before them and no other thread was running the connection's work
  (the others are handed to Quinn by the stream's writer task). Six describe
  the runtime's socket watch (see "How the work is scheduled" in the README):
  `runtime_spin_us`, how long a worker watches the sockets before it sleeps (20 µs by default;
  0: never), `runtime_spin_max_us`, the longest a worker's watch grows to while its watches
  catch work (500 µs by default; never below `runtime_spin_us`), `watched_sockets`, the sockets
  it watches (with the watch on, one per client endpoint and per open listener), and, since the
  VM started, `runtime_watch_hits`, the watches that ended at a datagram (a datagram a call sent
  to a peer in the same VM, and reads itself, does not end one), `runtime_watch_extensions`, the
  watches that went on past `runtime_spin_us` because calls in the VM were exchanging datagrams
  (at most 1 ms each), and `runtime_watches_grown`, the watches longer than `runtime_spin_us`
  because the worker's watches before had caught work.
  `inline_receives` counts, since the VM started, the datagrams calls read themselves (a call
  that sends to a peer in the same VM receives the datagram there), and `inline_deferrals` the
  times a stream's reader, run inside a call, left a `recv/3` answer over 1 MiB to a runtime
  thread to build. `inline_watch_us` is how long a call that sent a datagram to a peer outside
  this VM also watches its socket for the answer (0, the default: never); `inline_watches` and
  `inline_watch_skips` count the watches made and those skipped by a thread backing off after
  watches that brought no answer, `inline_watch_far` the calls not watched for because their
  connection's smallest round trip is over twice `inline_watch_us`, and
  `inline_watch_unanswered` the watches that found only datagrams that sent no process a
  message (acknowledgements, say).
  `connects` counts the `connect/4` calls waiting for their answer now, `connect_watch_us` is
  how long a connecting caller watches its mailbox for the answer before it waits (1000 µs by
  default; 0: never), and `connect_watches` counts the connects, since the VM started, whose
  caller watched: those that were the only connect in flight when they started, after a last
  successful handshake that took no longer than `connect_watch_us` (see "How the work is
  scheduled" in the README).
  `tls_tickets` counts the TLS session tickets clients have received and kept, and
  `tls_resumptions` the connects that offered one to resume a session (see `:session_resumption`
  under Options), both since the VM started, `driver_panics` the connections whose Quinn
  driver panicked (a bug in Quinn: the connection then ends, see "Errors, bad input and faults"
  in the README), and `socket_panics` the panics stopped in the library's own socket code (a
  bug in it: that datagram is lost or read another way, and the connection carries on). For
  monitoring and leak tests.

      iex> %{listeners: n} = MaculaQuic.native_counts()
      iex> is_integer(n)
      true
  """
  @spec native_counts() :: %{atom() => non_neg_integer()}
  def native_counts, do: Native.counters()

  ## Helpers

  defp iodata!(data) when is_binary(data), do: data

  defp iodata!(data) when is_list(data) do
    IO.iodata_to_binary(data)
  rescue
    ArgumentError -> raise ArgumentError, "expected iodata, got: #{inspect(data, limit: 10)}"
  end

  defp iodata!(data),
    do: raise(ArgumentError, "expected iodata, got: #{inspect(data, limit: 10)}")

  defp charlist_to_binary(value) when is_list(value) do
    List.to_string(value)
  rescue
    _ -> value
  end

  defp charlist_to_binary(value), do: value

  # The largest timeout `receive ... after` takes (about 49 days); longer ones are clamped to it.
  @max_timeout 4_294_967_295

  defp timeout_value(:infinity), do: {:ok, :infinity}
  defp timeout_value(ms) when is_integer(ms) and ms >= 0, do: {:ok, min(ms, @max_timeout)}
  defp timeout_value(_), do: {:error, :badarg}

  defp native_ms(:infinity), do: @max_timeout
  defp native_ms(ms), do: ms

  # At most 100 bytes: no address with a port is longer, and a huge string is not scanned.
  defp split_host_port(string) when is_binary(string) and byte_size(string) <= 100 do
    case Regex.run(~r/^\[?(.+?)\]?:(\d{1,5})$/, string) do
      [_, host, port] -> {:ok, host, String.to_integer(port)}
      _ -> :error
    end
  end

  defp split_host_port(_), do: :error

  defp owner?(handle) do
    Native.handle_owner(handle) == self()
  rescue
    ArgumentError -> false
  end

  # Waits for the native side's `{ref, result}`. After `timeout` the request is withdrawn with
  # `cancel`, which answers `:cancelled` (nothing will come: a timeout) or `:delivered` (the
  # answer was sent before the withdrawal and is taken instead).
  defp await_reply(ref, timeout, cancel) do
    receive do
      {^ref, result} -> result
    after
      timeout ->
        case cancel.() do
          :cancelled -> {:error, :timeout}
          :delivered -> receive(do: ({^ref, result} -> result))
        end
    end
  end

  # The connection a connection or stream handle belongs to; anything else raises
  # ArgumentError, saying that `expected` was.
  defp conn_of!(handle, expected) do
    case Native.handle_kind(handle) do
      :connection -> handle
      :stream -> Native.stream_conn(handle)
      _ -> bad_handle!(expected, handle)
    end
  end

  # Connection queries read Quinn's state under a lock its driver holds while it works through
  # packet batches, so the native side answers in turn with the driver (within the call when
  # the connection is idle, else from the runtime) by a message: only this process waits.
  defp conn_query(conn, what) do
    ref = make_ref()
    :ok = Native.conn_query(conn, what, ref)

    receive do
      {^ref, result} -> result
    end
  end

  # A stream opened on an `async_connect/3` handle before its handshake completed waits for it
  # (bounded by the handshake's deadline), as MsQuic queues a stream started early; then `fun`
  # runs, or the handshake's failure is the answer.
  defp after_handshake(conn, fun) do
    ref = make_ref()

    case Native.conn_await_connected(conn, ref) do
      :ok ->
        fun.()

      :wait ->
        receive do
          {^ref, :ok} -> fun.()
          {^ref, error} -> error
        end

      error ->
        error
    end
  end

  # Runs a NIF call; a wrong kind of handle becomes an ArgumentError that says what was
  # expected and what was given.
  defp native(kind, handle, fun) do
    fun.()
  rescue
    e in ArgumentError ->
      case Native.handle_kind(handle) do
        nil ->
          bad_handle!(if(kind, do: "a #{kind}", else: "a listener, connection or stream"), handle)

        actual when kind != nil and actual != kind ->
          bad_handle!("a #{kind}", handle)

        _ ->
          reraise e, __STACKTRACE__
      end
  end

  # Every function taking a handle checks it before anything else it reports: an error result
  # (bad options, a bad timeout) for a call whose handle is not one of `kind` becomes the
  # ArgumentError for the handle. Costs nothing on success.
  defp checked({:error, _} = error, kind, handle) do
    check_handle!(kind, handle)
    error
  end

  defp checked(other, _kind, _handle), do: other

  defp local_pid!(pid) when is_pid(pid) and node(pid) == node(), do: :ok

  defp local_pid!(other),
    do: raise(ArgumentError, "expected a local pid, got: #{inspect(other, limit: 10)}")

  # For calls that answer {:error, :badarg} for bad numbers: the handle is still checked first,
  # so a wrong handle is always an ArgumentError, whatever else is wrong.
  defp check_handle!(kind, handle) do
    if Native.handle_kind(handle) != kind, do: bad_handle!("a #{kind}", handle)
    :ok
  end

  defp bad_handle!(expected, handle) do
    actual =
      case Native.handle_kind(handle) do
        nil -> "not a macula_quic handle"
        kind -> "a #{kind}"
      end

    raise ArgumentError,
          "expected #{expected} handle, got: #{inspect(handle, limit: 10)} (#{actual})"
  end
end
