defmodule :macula_quic do
  @moduledoc """
  The Erlang face of `MaculaQuic`: the same functions, arguments, return values and messages,
  for Erlang callers.

  ```erlang
  {ok, L} = macula_quic:listen({"127.0.0.1", 0}, [{alpn, ["echo"]}]),
  {ok, {_, Port}} = macula_quic:sockname(L),
  ok = macula_quic:async_accept(L),
  {ok, C} = macula_quic:connect("127.0.0.1", Port, [{alpn, ["echo"]}, {verify, none}], 5000),
  {ok, S} = macula_quic:open_stream(C),
  ok = macula_quic:send(S, <<"ping">>).
  ```

  Flags are functions here (`macula_quic:stream_shutdown_abort()`), and macros in
  `include/macula_quic.hrl` (`?QUIC_STREAM_SHUTDOWN_FLAG_ABORT`, named as in quicer).

  Bad arguments raise what they raise in Elixir: an `ArgumentError` exception, which Erlang
  sees as `error:\#{'__struct__' := 'Elixir.ArgumentError', message := Message}` (a binary
  saying what was expected and what was given, in Elixir's notation), not `error:badarg`;
  `catch error:_` or a match on that map catches it. Function names in the messages are the
  Elixir module's (`recv/3` for `macula_quic:recv/3`).

  See `MaculaQuic` for every function's documentation and the messages owners receive.
  """

  # Each entry is {name, arity}; every one delegates to MaculaQuic with the same arguments.
  @api [
    listen: 2,
    listen: 3,
    async_accept: 1,
    async_accept: 2,
    accept: 1,
    accept: 2,
    accept: 3,
    handshake: 1,
    handshake: 2,
    handshake: 3,
    async_handshake: 1,
    async_handshake: 2,
    close_listener: 1,
    close_listener: 2,
    connect: 3,
    connect: 4,
    async_connect: 3,
    close_connection: 1,
    close_connection: 3,
    close_connection: 4,
    async_close_connection: 1,
    async_close_connection: 3,
    async_shutdown_connection: 3,
    shutdown_connection: 1,
    shutdown_connection: 2,
    shutdown_connection: 3,
    shutdown_connection: 4,
    peername: 1,
    negotiated_protocol: 1,
    peercert: 1,
    sockname: 1,
    getstat: 2,
    send_dgram: 2,
    async_send_dgram: 2,
    open_stream: 1,
    open_stream: 2,
    start_stream: 2,
    get_stream_id: 1,
    async_accept_stream: 1,
    async_accept_stream: 2,
    accept_stream: 1,
    accept_stream: 2,
    accept_stream: 3,
    send: 2,
    send: 3,
    async_send: 2,
    async_send: 3,
    async_csend: 4,
    recv: 2,
    recv: 3,
    setopt: 3,
    setopt: 4,
    getopt: 2,
    getopt: 3,
    close_stream: 1,
    close_stream: 2,
    close_stream: 4,
    async_shutdown_stream: 1,
    async_close_stream: 1,
    async_shutdown_stream: 3,
    shutdown_stream: 1,
    shutdown_stream: 2,
    shutdown_stream: 4,
    handoff_stream: 2,
    handoff_stream: 3,
    wait_for_handoff: 2,
    controlling_process: 2,
    get_conn_owner: 1,
    get_stream_owner: 1,
    get_listener_owner: 1,
    close: 1,
    native_counts: 0,
    stream_shutdown_graceful: 0,
    stream_shutdown_abort_send: 0,
    stream_shutdown_abort_receive: 0,
    stream_shutdown_abort: 0,
    stream_shutdown_immediate: 0,
    connection_shutdown_none: 0,
    connection_shutdown_silent: 0,
    recv_flag_fin: 0,
    send_flag_fin: 0,
    send_flag_sync: 0,
    is_unidirectional: 1
  ]

  # The same types as MaculaQuic's specs, arity by arity (an arity that MaculaQuic gets from
  # default arguments takes the leading arguments of the full one), so that Erlang callers and
  # Dialyzer see them; test/erlang_face_test.exs checks every export has one.
  @spec listen(
          :inet.port_number()
          | {MaculaQuic.address(), :inet.port_number()}
          | String.t()
          | charlist(),
          MaculaQuic.options()
        ) :: {:ok, MaculaQuic.listener()} | {:error, MaculaQuic.reason()}
  @spec listen(MaculaQuic.address(), :inet.port_number(), MaculaQuic.options()) ::
          {:ok, MaculaQuic.listener()} | {:error, MaculaQuic.reason()}
  @spec async_accept(MaculaQuic.listener()) :: :ok | {:error, MaculaQuic.reason()}
  @spec async_accept(MaculaQuic.listener(), MaculaQuic.options()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec accept(MaculaQuic.listener()) ::
          {:ok, MaculaQuic.connection()} | {:error, MaculaQuic.reason()}
  @spec accept(MaculaQuic.listener(), MaculaQuic.options()) ::
          {:ok, MaculaQuic.connection()} | {:error, MaculaQuic.reason()}
  @spec accept(MaculaQuic.listener(), MaculaQuic.options(), timeout()) ::
          {:ok, MaculaQuic.connection()} | {:error, MaculaQuic.reason()}
  @spec handshake(MaculaQuic.connection()) :: :ok | {:error, MaculaQuic.reason()}
  @spec handshake(MaculaQuic.connection(), timeout()) :: :ok | {:error, MaculaQuic.reason()}
  @spec handshake(MaculaQuic.connection(), MaculaQuic.options(), timeout()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec async_handshake(MaculaQuic.connection()) :: :ok | {:error, MaculaQuic.reason()}
  @spec async_handshake(MaculaQuic.connection(), MaculaQuic.options()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec close_listener(MaculaQuic.listener()) :: :ok
  @spec close_listener(MaculaQuic.listener(), timeout()) :: :ok | {:error, :badarg}
  @spec connect(MaculaQuic.host(), :inet.port_number(), MaculaQuic.options()) ::
          {:ok, MaculaQuic.connection()} | {:error, MaculaQuic.reason()}
  @spec connect(MaculaQuic.host(), :inet.port_number(), MaculaQuic.options(), timeout()) ::
          {:ok, MaculaQuic.connection()} | {:error, MaculaQuic.reason()}
  @spec async_connect(MaculaQuic.host(), :inet.port_number(), MaculaQuic.options()) ::
          {:ok, MaculaQuic.connection()} | {:error, MaculaQuic.reason()}
  @spec close_connection(MaculaQuic.connection()) :: :ok
  @spec close_connection(MaculaQuic.connection(), 0 | 1, non_neg_integer()) ::
          :ok | {:error, :badarg}
  @spec close_connection(MaculaQuic.connection(), 0 | 1, non_neg_integer(), timeout()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec async_close_connection(MaculaQuic.connection()) :: :ok | {:error, MaculaQuic.reason()}
  @spec async_close_connection(MaculaQuic.connection(), 0 | 1, non_neg_integer()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec async_shutdown_connection(MaculaQuic.connection(), 0 | 1, non_neg_integer()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec shutdown_connection(MaculaQuic.connection()) :: :ok | {:error, MaculaQuic.reason()}
  @spec shutdown_connection(MaculaQuic.connection(), timeout()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec shutdown_connection(MaculaQuic.connection(), 0 | 1, non_neg_integer()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec shutdown_connection(MaculaQuic.connection(), 0 | 1, non_neg_integer(), timeout()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec peername(MaculaQuic.connection() | MaculaQuic.stream()) ::
          {:ok, MaculaQuic.sockaddr()} | {:error, MaculaQuic.reason()}
  @spec negotiated_protocol(MaculaQuic.connection() | MaculaQuic.stream()) ::
          {:ok, binary()} | {:error, MaculaQuic.reason()}
  @spec peercert(MaculaQuic.connection() | MaculaQuic.stream()) ::
          {:ok, binary()} | {:error, :no_peercert | MaculaQuic.reason()}
  @spec sockname(MaculaQuic.handle()) ::
          {:ok, MaculaQuic.sockaddr()} | {:error, MaculaQuic.reason()}
  @spec getstat(MaculaQuic.connection() | MaculaQuic.stream(), [atom()]) ::
          {:ok, [{atom(), non_neg_integer()}]} | {:error, MaculaQuic.reason()}
  @spec send_dgram(MaculaQuic.connection(), iodata()) :: :ok | {:error, MaculaQuic.reason()}
  @spec async_send_dgram(MaculaQuic.connection(), iodata()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec open_stream(MaculaQuic.connection()) ::
          {:ok, MaculaQuic.stream()} | {:error, MaculaQuic.reason()}
  @spec open_stream(MaculaQuic.connection(), MaculaQuic.options()) ::
          {:ok, MaculaQuic.stream()} | {:error, MaculaQuic.reason()}
  @spec start_stream(MaculaQuic.connection(), MaculaQuic.options()) ::
          {:ok, MaculaQuic.stream()} | {:error, MaculaQuic.reason()}
  @spec get_stream_id(MaculaQuic.stream()) :: {:ok, non_neg_integer()}
  @spec async_accept_stream(MaculaQuic.connection()) :: :ok | {:error, MaculaQuic.reason()}
  @spec async_accept_stream(MaculaQuic.connection(), MaculaQuic.options()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec accept_stream(MaculaQuic.connection()) ::
          {:ok, MaculaQuic.stream()} | {:error, MaculaQuic.reason()}
  @spec accept_stream(MaculaQuic.connection(), MaculaQuic.options()) ::
          {:ok, MaculaQuic.stream()} | {:error, MaculaQuic.reason()}
  @spec accept_stream(MaculaQuic.connection(), MaculaQuic.options(), timeout()) ::
          {:ok, MaculaQuic.stream()} | {:error, MaculaQuic.reason()}
  @spec send(MaculaQuic.stream(), iodata()) :: :ok | {:error, MaculaQuic.reason()}
  @spec send(MaculaQuic.stream(), iodata(), non_neg_integer()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec async_send(MaculaQuic.stream(), iodata()) :: :ok | {:error, MaculaQuic.reason()}
  @spec async_send(MaculaQuic.stream(), iodata(), non_neg_integer()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec async_csend(MaculaQuic.connection(), iodata(), MaculaQuic.options(), non_neg_integer()) ::
          {:ok, MaculaQuic.stream()} | {:error, MaculaQuic.reason()}
  @spec recv(MaculaQuic.stream(), non_neg_integer()) ::
          {:ok, binary()} | {:error, MaculaQuic.reason()}
  @spec recv(MaculaQuic.stream(), non_neg_integer(), timeout()) ::
          {:ok, binary()} | {:error, MaculaQuic.reason()}
  @spec setopt(MaculaQuic.stream(), :active, MaculaQuic.active()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec setopt(MaculaQuic.stream(), :read_ahead, pos_integer()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec getopt(MaculaQuic.stream(), :active) ::
          {:ok, MaculaQuic.active()} | {:error, MaculaQuic.reason()}
  @spec getopt(MaculaQuic.stream(), :read_ahead) ::
          {:ok, pos_integer()} | {:error, MaculaQuic.reason()}
  @spec setopt(MaculaQuic.connection(), :datagram_active, MaculaQuic.active()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec getopt(MaculaQuic.connection(), :datagram_active) ::
          {:ok, MaculaQuic.active()} | {:error, MaculaQuic.reason()}
  @spec getopt(MaculaQuic.connection(), :datagram_receive_enabled) :: {:ok, boolean()}
  @spec getopt(MaculaQuic.connection(), :datagram_send_enabled) ::
          {:ok, boolean()} | {:error, MaculaQuic.reason()}
  @spec getopt(MaculaQuic.connection(), :datagram_max_len) ::
          {:ok, non_neg_integer()} | {:error, MaculaQuic.reason()}
  @spec getopt(MaculaQuic.stream() | MaculaQuic.connection(), atom(), false | atom()) ::
          {:ok, term()} | {:error, MaculaQuic.reason()}
  @spec setopt(MaculaQuic.stream() | MaculaQuic.connection(), atom(), term(), false | atom()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec close_stream(MaculaQuic.stream()) :: :ok
  @spec close_stream(MaculaQuic.stream(), timeout()) :: :ok | {:error, MaculaQuic.reason()}
  @spec close_stream(MaculaQuic.stream(), non_neg_integer(), non_neg_integer(), timeout()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec async_shutdown_stream(MaculaQuic.stream()) :: :ok | {:error, MaculaQuic.reason()}
  @spec async_close_stream(MaculaQuic.stream()) :: :ok | {:error, MaculaQuic.reason()}
  @spec async_shutdown_stream(MaculaQuic.stream(), non_neg_integer(), non_neg_integer()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec shutdown_stream(MaculaQuic.stream()) :: :ok | {:error, MaculaQuic.reason()}
  @spec shutdown_stream(MaculaQuic.stream(), timeout()) :: :ok | {:error, MaculaQuic.reason()}
  @spec shutdown_stream(MaculaQuic.stream(), non_neg_integer(), non_neg_integer(), timeout()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec handoff_stream(MaculaQuic.stream(), pid()) :: :ok | {:error, MaculaQuic.reason()}
  @spec handoff_stream(MaculaQuic.stream(), pid(), MaculaQuic.options()) ::
          :ok | {:error, MaculaQuic.reason()}
  @spec wait_for_handoff(pid(), MaculaQuic.stream()) :: {:ok, term()} | {:error, :owner_down}
  @spec controlling_process(MaculaQuic.handle(), pid()) :: :ok | {:error, MaculaQuic.reason()}
  @spec get_conn_owner(MaculaQuic.connection()) :: {:ok, pid()}
  @spec get_stream_owner(MaculaQuic.stream()) :: {:ok, pid()}
  @spec get_listener_owner(MaculaQuic.listener()) :: {:ok, pid()}
  @spec close(MaculaQuic.handle()) :: :ok
  @spec native_counts() :: %{required(atom()) => non_neg_integer()}
  @spec stream_shutdown_graceful() :: 1
  @spec stream_shutdown_abort_send() :: 2
  @spec stream_shutdown_abort_receive() :: 4
  @spec stream_shutdown_abort() :: 6
  @spec stream_shutdown_immediate() :: 8
  @spec connection_shutdown_none() :: 0
  @spec connection_shutdown_silent() :: 1
  @spec recv_flag_fin() :: 2
  @spec send_flag_fin() :: 4
  @spec send_flag_sync() :: 4096
  @spec is_unidirectional(non_neg_integer()) :: boolean()

  for {name, arity} <- @api do
    args = Macro.generate_arguments(arity, __MODULE__)
    @doc "See `MaculaQuic.#{name}/#{arity}`."
    defdelegate unquote(name)(unquote_splicing(args)), to: MaculaQuic
  end
end
