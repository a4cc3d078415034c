defmodule MaculaQuic.RuntimeConfigTest do
  # The tokio runtime's size comes from the application env when the NIF loads. The NIF loads
  # once per VM, so each case runs in a fresh VM started with only our compiled app on its path.
  use ExUnit.Case, async: true

  @ebin Path.join(Mix.Project.build_path(), "lib/macula_quic/ebin")

  # The line of a script that sets `key` in the application env (none for nil).
  defp put_env(_key, nil), do: ""

  defp put_env(key, value),
    do: "Application.put_env(:macula_quic, #{inspect(key)}, #{inspect(value)})"

  # Starts a VM, sets the env (unless nil), makes one connection so the runtime exists, and
  # returns the runtime's worker count and anything logged.
  defp workers_with(setting) do
    script = """
    #{put_env(:runtime_workers, setting)}
    {:ok, l} = MaculaQuic.listen("127.0.0.1", 0, alpn: ["t"])
    {:ok, {_, port}} = MaculaQuic.sockname(l)
    {:ok, _c} = MaculaQuic.connect("127.0.0.1", port, [alpn: ["t"], verify: :none], 5_000)
    IO.puts("workers=" <> Integer.to_string(MaculaQuic.native_counts().runtime_workers))
    """

    {out, 0} = System.cmd("elixir", ["-pa", @ebin, "-e", script], stderr_to_stdout: true)
    [_, n] = Regex.run(~r/workers=(\d+)/, out)
    {String.to_integer(n), out}
  end

  test "config :macula_quic, runtime_workers: n sizes the runtime" do
    assert {3, _} = workers_with(3)
    assert {1, _} = workers_with(1)
  end

  test "without the setting the runtime is sized for the host (one per core, at most 4)" do
    expected = System.schedulers_online() |> min(4) |> max(1)
    assert {^expected, _} = workers_with(nil)
  end

  test "a bad setting is ignored with a warning" do
    expected = System.schedulers_online() |> min(4) |> max(1)
    assert {^expected, out} = workers_with(:lots)
    assert out =~ "ignoring runtime_workers :lots"
  end

  # Starts a VM with `runtime_spin_us` set (unless nil), opens a listener and connects to it,
  # then closes the listener. Returns the configured watch time, the watched sockets with the
  # listener open and after it has gone, and anything logged.
  defp watch_with(setting) do
    script = """
    #{put_env(:runtime_spin_us, setting)}
    {:ok, l} = MaculaQuic.listen("127.0.0.1", 0, alpn: ["t"])
    {:ok, {_, port}} = MaculaQuic.sockname(l)
    :ok = MaculaQuic.async_accept(l)
    {:ok, c} = MaculaQuic.connect("127.0.0.1", port, [alpn: ["t"], verify: :none], 5_000)
    sc = receive do {:quic, :new_conn, sc, _} -> sc end
    %{runtime_spin_us: us, watched_sockets: open} = MaculaQuic.native_counts()
    # Native state has no message to wait for: poll `check` (bounded) until it gives {:ok, v};
    # returns v, or the last other result.
    until = fn until, check, n ->
      case check.() do
        {:ok, v} -> v
        _ when n > 0 -> Process.sleep(10); until.(until, check, n - 1)
        other -> other
      end
    end
    {:ok, s} = MaculaQuic.open_stream(c)
    for _ <- 1..200, do: :ok = MaculaQuic.send(s, :binary.copy("x", 1000))
    # Every datagram the server sent reaches the client's endpoint: the watch only peeks.
    same_count = fn ->
      {:ok, [send_cnt: sent]} = MaculaQuic.getstat(sc, [:send_cnt])
      {:ok, [recv_cnt: got]} = MaculaQuic.getstat(c, [:recv_cnt])
      if sent == got, do: {:ok, :equal}, else: {sent, got}
    end
    IO.puts("datagrams=\#{inspect(until.(until, same_count, 300))}")
    :ok = MaculaQuic.close_connection(c)
    :ok = MaculaQuic.close_listener(l)
    # The listener's socket (and its watch) goes once its last connection has ended.
    released = fn ->
      case MaculaQuic.native_counts() do
        %{watched_sockets: w, bound_addresses: 0} -> {:ok, w}
        _ -> :timeout
      end
    end
    closed = until.(until, released, 500)
    # Bound without SO_REUSEADDR, this fails while any descriptor of the listener's socket
    # (the watch holds a duplicate) is still open.
    {rebind, _} = :gen_udp.open(port, ip: {127, 0, 0, 1})
    IO.puts("spin=\#{us} open=\#{open} closed=\#{closed} rebind=\#{rebind}")
    """

    {out, 0} = System.cmd("elixir", ["-pa", @ebin, "-e", script], stderr_to_stdout: true)

    [_, us, open, closed, rebind] =
      Regex.run(~r/spin=(\d+) open=(\d+) closed=(\S+) rebind=(\S+)/, out)

    assert rebind == "ok", "the closed listener's port could not be bound again: #{out}"
    assert out =~ "datagrams=:equal", "datagrams went missing: #{out}"
    {String.to_integer(us), String.to_integer(open), closed, out}
  end

  test "config :macula_quic, runtime_spin_us: n sets how long workers watch the sockets" do
    # One watched socket for the shared client endpoint, one for the listener until it closes.
    assert {40, 2, "1", _} = watch_with(40)
    # 0 turns the watch off: nothing is watched.
    assert {0, 0, "0", _} = watch_with(0)
  end

  test "without the setting nothing is watched; a bad setting is ignored" do
    assert {0, 0, "0", _} = watch_with(nil)
    assert {0, 0, "0", out} = watch_with(:fast)
    assert out =~ "ignoring runtime_spin_us :fast"
  end
end
