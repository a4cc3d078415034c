defmodule MaculaQuic.TlsResumptionTest do
  # `tls_tickets` and `tls_resumptions` count for the whole VM, so this module is not async:
  # no other test's connects run while it counts. Each test uses an ALPN of its own: connects
  # with the same options share a client configuration and its session cache, and tickets are
  # kept by server name (here always 127.0.0.1), so a ticket left by another test's server would
  # be offered too.
  use ExUnit.Case, async: false
  import MaculaQuic.Test.Quic

  @moduletag :tls

  # Whatever a test leaves open is its owner's, the test process: once that has exited, nothing
  # may be left on the native side.
  setup do
    on_exit(fn -> MaculaQuic.Test.Settle.await_clean!(MaculaQuic.Test.Settle.zero(), 30_000) end)
  end

  test "a reconnect offers the session ticket the server sent" do
    alpn = own_alpn()
    before = MaculaQuic.native_counts()
    {c, sc, l, port} = pair!(listen: [alpn: alpn], connect: [alpn: alpn])
    round_trip!(c, sc)
    # The server sends its tickets once the handshake is done, ahead of the echo; they reach
    # the session cache on a runtime worker, so the count is polled (bounded).
    poll_counts!(
      &(&1.tls_tickets > before.tls_tickets),
      &"tls_tickets stayed at #{&1.tls_tickets}, expected more than #{before.tls_tickets}"
    )

    :ok = MaculaQuic.close_connection(c)

    :ok = MaculaQuic.async_accept(l)
    {:ok, c2} = MaculaQuic.connect("127.0.0.1", port, [alpn: alpn, verify: :none], 5_000)
    assert MaculaQuic.native_counts().tls_resumptions == before.tls_resumptions + 1
    sc2 = receive_msg!({:quic, :new_conn, _, _}) |> elem(2)
    round_trip!(c2, sc2)
    :ok = MaculaQuic.close_connection(c2)
    :ok = MaculaQuic.close_listener(l)
  end

  test "session_resumption: false keeps no tickets: every handshake is a full one" do
    alpn = own_alpn()
    opts = [alpn: alpn, verify: :none, session_resumption: false]
    before = MaculaQuic.native_counts()
    {c, sc, l, port} = pair!(listen: [alpn: alpn], connect: opts)
    round_trip!(c, sc)
    :ok = MaculaQuic.close_connection(c)

    # Tickets reach a session cache on a runtime worker, a moment after they arrive (see
    # above). So that the check below cannot pass merely because `c`'s tickets were late: a
    # connection with resumption on (its own client configuration, its own cache), made after
    # `c`, until its tickets are counted; `c`'s, sent earlier, would have been by then.
    :ok = MaculaQuic.async_accept(l)
    {:ok, control} = MaculaQuic.connect("127.0.0.1", port, [alpn: alpn, verify: :none], 5_000)
    round_trip!(control, receive_msg!({:quic, :new_conn, _, _}) |> elem(2))

    poll_counts!(
      &(&1.tls_tickets > before.tls_tickets),
      &"the control connection's tickets were never counted: #{&1.tls_tickets}"
    )

    :ok = MaculaQuic.close_connection(control)

    # A reconnect with resumption off (the same options as `c`): a full handshake.
    :ok = MaculaQuic.async_accept(l)
    {:ok, c2} = MaculaQuic.connect("127.0.0.1", port, opts, 5_000)
    sc2 = receive_msg!({:quic, :new_conn, _, _}) |> elem(2)
    round_trip!(c2, sc2)
    assert MaculaQuic.native_counts().tls_resumptions == before.tls_resumptions
    :ok = MaculaQuic.close_connection(c2)
    :ok = MaculaQuic.close_listener(l)
  end

  test "session_resumption takes a boolean, on connect only" do
    {l, port} = listen!()

    assert {:error, {:bad_option, :session_resumption}} =
             MaculaQuic.connect("127.0.0.1", port, [alpn: alpn(), session_resumption: :no], 5_000)

    assert {:error, {:bad_option, :session_resumption}} =
             MaculaQuic.listen("127.0.0.1", 0, alpn: alpn(), session_resumption: false)

    :ok = MaculaQuic.close_listener(l)
  end

  defp own_alpn, do: ["resumption-#{System.unique_integer([:positive])}"]

  # One message each way on a new stream.
  defp round_trip!(c, sc) do
    {s, ss} = stream_pair!(c, sc, first: "ping")
    receive_msg!({:quic, "ping", ^ss, _})
    :ok = MaculaQuic.send(ss, "pong")
    receive_msg!({:quic, "pong", ^s, _})
    :ok
  end
end
