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
    close_listener: 1,
    connect: 3,
    connect: 4,
    close_connection: 1,
    async_shutdown_connection: 3,
    peername: 1,
    sockname: 1,
    getstat: 2,
    open_stream: 1,
    open_stream: 2,
    async_accept_stream: 1,
    async_accept_stream: 2,
    accept_stream: 1,
    accept_stream: 2,
    accept_stream: 3,
    send: 2,
    send: 3,
    async_send: 2,
    recv: 2,
    recv: 3,
    setopt: 3,
    getopt: 2,
    close_stream: 1,
    async_shutdown_stream: 3,
    handoff_stream: 2,
    handoff_stream: 3,
    controlling_process: 2,
    close: 1,
    native_counts: 0,
    stream_shutdown_graceful: 0,
    stream_shutdown_abort_send: 0,
    stream_shutdown_abort_receive: 0,
    stream_shutdown_abort: 0,
    stream_shutdown_immediate: 0,
    connection_shutdown_none: 0,
    connection_shutdown_silent: 0,
    recv_flag_fin: 0
  ]

  for {name, arity} <- @api do
    args = Macro.generate_arguments(arity, __MODULE__)
    @doc "See `MaculaQuic.#{name}/#{arity}`."
    defdelegate unquote(name)(unquote_splicing(args)), to: MaculaQuic
  end
end
