defmodule MaculaQuic.Native do
  @moduledoc false
  # NIF stubs. Each function here is implemented in native/macula_quic (Rust); the stub only
  # runs when the library failed to load.

  @crate_dir Path.expand("../../native/macula_quic", __DIR__)
  for file <-
        Path.wildcard(Path.join(@crate_dir, "src/**/*.rs")) ++
          Path.wildcard(Path.join(@crate_dir, "Cargo.{toml,lock}")) do
    @external_resource file
  end

  # Builds the library from source or installs a verified precompiled one (see
  # MaculaQuic.Native.Loader); a new checksum file must recompile this module.
  @external_resource Path.expand("../../checksum-Elixir.MaculaQuic.Native.exs", __DIR__)
  @lib_path MaculaQuic.Native.Loader.prepare!(
              otp_app: :macula_quic,
              project_dir: Path.expand("../..", __DIR__),
              # The test suite's hooks (deliberate panics) exist only in test builds.
              cargo_features: if(Mix.env() == :test, do: ["test_hooks"], else: [])
            )

  @on_load :__load_nif__

  # Microseconds a runtime worker watches the sockets before it sleeps (runtime_spin_us), and
  # a call that sent a datagram to a peer outside this VM watches them for the answer
  # (inline_watch_us).
  @default_spin_us 20
  # The longest a worker's watch grows to while its watches catch work (runtime_spin_max_us).
  @default_spin_max_us 500
  @default_inline_watch_us 0
  # Microseconds a connecting caller watches its mailbox for the answer (connect_watch_us).
  @default_connect_watch_us 1000

  # Where this build's library is, relative to the priv dir and without extension (tests read
  # the built library from there).
  @doc false
  def __lib_path__, do: @lib_path

  # A failed load is logged (file and reason) and still returns :ok, on purpose: the module
  # stays loaded and every call raises :nif_not_loaded right after that log line. Returning
  # the error would unload the module, and callers would get a misleading
  # UndefinedFunctionError ("module MaculaQuic.Native is not available") instead.
  @doc false
  def __load_nif__ do
    case :code.priv_dir(:macula_quic) do
      {:error, reason} ->
        nif_load_failed(@lib_path, {:no_priv_dir, reason})

      priv ->
        path = :filename.join(priv, @lib_path)

        case :erlang.load_nif(
               path,
               {runtime_workers(), runtime_spin_us(), runtime_spin_max_us(), inline_watch_us(),
                connect_watch_us()}
             ) do
          :ok -> :ok
          {:error, reason} -> nif_load_failed(path, reason)
        end
    end
  end

  # The runtime settings, passed to the NIF as load data
  # `{workers, spin_us, spin_max_us, inline_watch_us, connect_watch_us}`,
  # from the application env (read with :application, not Application, because on_load may run
  # before Elixir's own application env helpers are usable):
  #   runtime_workers: 1..64 worker threads; default 0, "size for the host" (one per core, at
  #     most 4);
  #   runtime_spin_us: 0..1000 µs a worker watches the sockets before it sleeps (0: never);
  #     default @default_spin_us;
  #   runtime_spin_max_us: 0..1000 µs the watch grows to while a worker's watches catch work
  #     (doubling after each that does, halving after each that does not; below
  #     runtime_spin_us: no growth); default @default_spin_max_us;
  #   inline_watch_us: 0..1000 µs a call that sent a datagram to a peer outside this VM
  #     watches the sockets for the answer, to receive it in the same call (0: never; only on
  #     connections whose smallest round trip is at most twice this); default
  #     @default_inline_watch_us;
  #   connect_watch_us: 0..10_000 µs a connecting caller watches its mailbox for the answer
  #     before it waits in receive (0: never; only when it is the only connect in flight and
  #     the last handshake that succeeded took no longer); default @default_connect_watch_us.
  # See "How the work is scheduled" in README.
  defp runtime_workers, do: setting(:runtime_workers, 1..64, 0, "sizing for the host")

  defp runtime_spin_us,
    do: setting(:runtime_spin_us, 0..1000, @default_spin_us, "using #{@default_spin_us}")

  defp runtime_spin_max_us,
    do:
      setting(
        :runtime_spin_max_us,
        0..1000,
        @default_spin_max_us,
        "using #{@default_spin_max_us}"
      )

  defp inline_watch_us,
    do:
      setting(
        :inline_watch_us,
        0..1000,
        @default_inline_watch_us,
        "using #{@default_inline_watch_us}"
      )

  defp connect_watch_us,
    do:
      setting(
        :connect_watch_us,
        0..10_000,
        @default_connect_watch_us,
        "using #{@default_connect_watch_us}"
      )

  # A bad value is ignored with a warning that says what was expected and what happens instead.
  defp setting(key, first..last, default, instead) do
    case :application.get_env(:macula_quic, key) do
      {:ok, n} when is_integer(n) and n >= first and n <= last ->
        n

      {:ok, other} ->
        :logger.warning(
          ~c"macula_quic: ignoring ~ts ~tp (expected an integer ~tp..~tp); ~ts",
          [Atom.to_string(key), other, first, last, instead]
        )

        default

      :undefined ->
        default
    end
  end

  defp nif_load_failed(path, reason) do
    ext = if match?({:win32, _}, :os.type()), do: ".dll", else: ".so"

    :logger.error(
      ~c"macula_quic: could not load the NIF library ~ts~ts: ~tp. Every MaculaQuic call will " ++
        ~c"raise :nif_not_loaded. If the reason names a shared library the system lacks " ++
        ~c"(libgcc_s.so.1 on Alpine: apk add libgcc), install it; otherwise recompile " ++
        ~c"macula_quic (MACULA_QUIC_BUILD=1 builds it from source).",
      [path, ext, reason]
    )

    :ok
  end

  defp nif_error, do: :erlang.nif_error(:nif_not_loaded)

  # Handles of any kind, diagnostics
  def ping, do: nif_error()
  def controlling_process(_handle, _pid), do: nif_error()
  def handle_kind(_term), do: nif_error()
  def handle_owner(_handle), do: nif_error()
  def counters, do: nif_error()
  # Test builds only (crate feature test_hooks): deliberate panics in a NIF, a runtime task, a
  # stream's reader and writer tasks, Quinn's connection driver and the library's socket code;
  # a stalled driver.
  def debug_panic, do: nif_error()
  def debug_panic_task(_tag), do: nif_error()
  def debug_panic_reader(_stream), do: nif_error()
  def debug_panic_reader_inline(_stream), do: nif_error()
  def debug_panic_writer(_stream), do: nif_error()
  def debug_panic_driver(_conn), do: nif_error()
  def debug_panic_handshake(_conn, _at), do: nif_error()
  def debug_refuse_streams(_conn), do: nif_error()
  def debug_fail_shard_on_spawn(_conn), do: nif_error()
  def debug_panic_send_from(_local_port, _ip, _port), do: nif_error()
  def debug_panic_socket(_local_port, _count), do: nif_error()
  def debug_owners, do: nif_error()
  def debug_stall_send_from(_local_port, _ip, _port, _ms, _pid), do: nif_error()
  def debug_nudge_driver(_conn), do: nif_error()
  def debug_stall_shard(_conn, _ms, _pid), do: nif_error()

  # Listeners
  def listen(_addr, _port, _opts), do: nif_error()
  def listener_accept(_listener, _tag), do: nif_error()
  def listener_cancel_accept(_listener), do: nif_error()
  def listener_close(_listener, _tag), do: nif_error()
  def listener_sockname(_listener), do: nif_error()

  # Connections
  def connect(_host, _port, _opts, _tag, _timeout_ms), do: nif_error()
  def async_connect(_host, _port, _opts), do: nif_error()
  def conn_close(_conn, _code, _tag), do: nif_error()
  def conn_shutdown(_conn, _flags, _code), do: nif_error()
  def conn_query(_conn, _what, _tag), do: nif_error()
  def conn_connected(_conn, _alpn), do: nif_error()
  def conn_await_connected(_conn, _tag), do: nif_error()
  def conn_handshake_done(_conn), do: nif_error()
  def open_stream(_conn, _opts, _tag), do: nif_error()
  def conn_accept_stream(_conn, _opts, _tag), do: nif_error()
  def conn_cancel_accept(_conn, _id), do: nif_error()
  def conn_send_dgram(_conn, _binary, _tag), do: nif_error()
  def conn_set_dgram_active(_conn, _active), do: nif_error()
  def conn_get_dgram_active(_conn), do: nif_error()

  # Streams
  def stream_send(_stream, _binary, _tag, _fin), do: nif_error()
  def stream_shutdown(_stream, _flags, _code), do: nif_error()
  def stream_close(_stream), do: nif_error()
  def stream_set_active(_stream, _active), do: nif_error()
  def stream_get_active(_stream), do: nif_error()
  def stream_set_read_ahead(_stream, _bytes), do: nif_error()
  def stream_get_read_ahead(_stream), do: nif_error()
  def stream_recv(_stream, _length, _tag), do: nif_error()
  def stream_cancel_recv(_stream), do: nif_error()
  def stream_handoff(_stream, _pid), do: nif_error()
  def stream_handoff_resume(_stream, _active), do: nif_error()
  def stream_handoff_abandoned(_stream), do: nif_error()
  def stream_conn(_stream), do: nif_error()
  def stream_info(_stream), do: nif_error()
end
