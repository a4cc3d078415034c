defmodule MaculaQuic.ReceiveModesTest do
  use ExUnit.Case, async: true
  import MaculaQuic.Test.Quic

  @moduletag :receive_modes

  defp streams!(server_opts, client_opts \\ []) do
    {c, sc, _l, _} = pair!()
    {s, ss} = stream_pair!(c, sc, server: server_opts, client: client_opts, first: "a")
    {c, sc, s, ss}
  end

  describe "active modes" do
    test ":once delivers one message, then the stream is passive without a passive message" do
      {_c, _sc, s, ss} = streams!(active: :once)
      assert_receive {:quic, "a", ^ss, 0}, 5_000
      assert {:ok, false} = MaculaQuic.getopt(ss, :active)
      :ok = MaculaQuic.send(s, "b")
      refute_receive {:quic, _, ^ss, _}, 100
      :ok = MaculaQuic.setopt(ss, :active, :once)
      assert_receive {:quic, "b", ^ss, 0}, 5_000
      refute_received {:quic, :passive, ^ss, _}
    end

    test "{active, N} counts down, says passive at zero, re-arms and accepts negative adjustments" do
      {_c, _sc, s, ss} = streams!(active: 2)
      assert_receive {:quic, "a", ^ss, 0}, 5_000
      assert {:ok, 1} = MaculaQuic.getopt(ss, :active)
      :ok = MaculaQuic.send(s, "b")
      assert_receive {:quic, "b", ^ss, 0}, 5_000
      assert_receive {:quic, :passive, ^ss, :undefined}, 5_000
      assert {:ok, false} = MaculaQuic.getopt(ss, :active)

      # Adjust with nothing pending, so no delivery races the counter.
      :ok = MaculaQuic.setopt(ss, :active, 5)
      :ok = MaculaQuic.setopt(ss, :active, 3)
      assert {:ok, 8} = MaculaQuic.getopt(ss, :active)
      :ok = MaculaQuic.setopt(ss, :active, -3)
      assert {:ok, 5} = MaculaQuic.getopt(ss, :active)
      :ok = MaculaQuic.send(s, "c")
      assert_receive {:quic, "c", ^ss, 0}, 5_000
      assert {:ok, 4} = MaculaQuic.getopt(ss, :active)
      # Subtracting past zero turns the stream passive and says so.
      :ok = MaculaQuic.setopt(ss, :active, -10)
      assert {:ok, false} = MaculaQuic.getopt(ss, :active)
      assert_receive {:quic, :passive, ^ss, :undefined}, 5_000
      assert {:error, {:bad_option, :active}} = MaculaQuic.setopt(ss, :active, 40_000)
      assert {:error, {:bad_option, :active}} = MaculaQuic.setopt(ss, :active, :sometimes)

      assert {:error, {:bad_option, :active}} =
               MaculaQuic.open_stream(elem(streams!([]), 0), active: :maybe)
    end

    test "the passive message goes to the owner, whichever process brings the count to zero" do
      {_c, _sc, _s, ss} = streams!(active: false)
      :ok = MaculaQuic.setopt(ss, :active, 5)
      assert :ok = Task.await(Task.async(fn -> MaculaQuic.setopt(ss, :active, -10) end))
      assert {:ok, false} = MaculaQuic.getopt(ss, :active)
      assert_receive {:quic, :passive, ^ss, :undefined}, 5_000
    end

    test "true delivers everything; false holds it for recv" do
      {_c, _sc, s, ss} = streams!(active: false)
      :ok = MaculaQuic.send(s, "bc")
      refute_receive {:quic, _, ^ss, _}, 100
      assert {:ok, "abc"} = MaculaQuic.recv(ss, 3, 5_000)
      :ok = MaculaQuic.setopt(ss, :active, true)
      :ok = MaculaQuic.send(s, "d")
      assert_receive {:quic, "d", ^ss, 0}, 5_000
      assert {:error, :einval} = MaculaQuic.recv(ss, 0, 100)
    end
  end

  describe "recv/3" do
    test "length 0, 1, exact, and larger than one chunk" do
      {_c, _sc, s, ss} = streams!(active: false)
      assert {:ok, "a"} = MaculaQuic.recv(ss, 0, 5_000)
      :ok = MaculaQuic.send(s, "0123456789")
      assert {:ok, "0"} = MaculaQuic.recv(ss, 1, 5_000)
      assert {:ok, "1234"} = MaculaQuic.recv(ss, 4, 5_000)
      assert {:ok, "56789"} = MaculaQuic.recv(ss, 0, 5_000)

      big = :crypto.strong_rand_bytes(300_000)
      :ok = MaculaQuic.send(s, big)
      assert {:ok, ^big} = MaculaQuic.recv(ss, 300_000, 5_000)
    end

    test "the largest length, 64 MiB, is returned whole; one byte more is refused" do
      {_c, _sc, s, ss} = streams!(active: false)
      assert {:ok, "a"} = MaculaQuic.recv(ss, 1, 5_000)
      max = 64 * 1024 * 1024
      big = :binary.copy(:crypto.strong_rand_bytes(1024), 64 * 1024)
      sender = Task.async(fn -> MaculaQuic.send(s, [big, "z"]) end)
      assert {:error, :badarg} = MaculaQuic.recv(ss, max + 1, 5_000)
      # The native check too, for callers of the NIF itself.
      assert {:error, :badarg} = MaculaQuic.Native.stream_recv(ss, max + 1, make_ref())
      assert {:ok, got} = MaculaQuic.recv(ss, max, 30_000)
      assert byte_size(got) == max and got == big
      assert {:ok, "z"} = MaculaQuic.recv(ss, 1, 5_000)
      assert :ok = Task.await(sender, 30_000)
    end

    test "timeouts, then the data is still there" do
      {_c, _sc, s, ss} = streams!(active: false)
      assert {:ok, "a"} = MaculaQuic.recv(ss, 1, 5_000)
      assert {:error, :timeout} = MaculaQuic.recv(ss, 0, 50)
      assert {:error, :timeout} = MaculaQuic.recv(ss, 5, 50)
      :ok = MaculaQuic.send(s, "xyz")
      assert {:error, :timeout} = MaculaQuic.recv(ss, 5, 100)
      :ok = MaculaQuic.send(s, "uv")
      assert {:ok, "xyzuv"} = MaculaQuic.recv(ss, 5, 5_000)
    end

    test "end of stream: short read, then peer_send_shutdown" do
      {_c, _sc, s, ss} = streams!(active: false)
      :ok = MaculaQuic.send(s, "bc", 4)
      assert {:ok, "abc"} = MaculaQuic.recv(ss, 10, 5_000)
      assert {:error, :peer_send_shutdown} = MaculaQuic.recv(ss, 0, 5_000)
      assert {:error, :peer_send_shutdown} = MaculaQuic.recv(ss, 1, 5_000)
    end

    test "a reset stream" do
      {_c, _sc, s, ss} = streams!(active: false)
      assert {:ok, "a"} = MaculaQuic.recv(ss, 1, 5_000)
      :ok = MaculaQuic.async_shutdown_stream(s, MaculaQuic.stream_shutdown_abort_send(), 9)
      assert {:error, {:peer_send_aborted, 9}} = MaculaQuic.recv(ss, 0, 5_000)
    end

    test "a blocked recv answers when the connection closes" do
      {c, _sc, _s, ss} = streams!(active: false)
      assert {:ok, "a"} = MaculaQuic.recv(ss, 1, 5_000)
      parent = self()
      reader = spawn_link(fn -> send(parent, {:recv, MaculaQuic.recv(ss, 1, 10_000)}) end)
      wait_until_waiting!(reader)
      :ok = MaculaQuic.close_connection(c)
      # Why it ended: the peer closed the connection with code 0.
      assert_receive {:recv, {:error, {:shutdown, 0}}}, 5_000
    end
  end

  describe "read_ahead" do
    # The listener grants 64 KiB of flow-control window per stream, so what the client's Quinn
    # has taken (sent, or in flight) is at most what the server's reader has read plus 64 KiB:
    # the sender's queue shows how far the passive reader reads ahead. (At most: the peer may
    # grant exactly the window beyond what was read, so a read can fall short by that much.)
    @window 65_536

    defp taken(c, total) do
      {:ok, [send_pend: pend]} = MaculaQuic.getstat(c, [:send_pend])
      total - pend
    end

    test "a passive stream reads as far ahead as its read_ahead, and recv(stream, 0) returns up to that" do
      {c, sc, _l, _} = pair!(listen: [stream_recv_window: @window])

      {s, ss} = stream_pair!(c, sc, server: [active: false, read_ahead: 1_048_576], first: "a")

      assert {:ok, 1_048_576} = MaculaQuic.getopt(ss, :read_ahead)
      assert {:ok, "a"} = MaculaQuic.recv(ss, 1, 5_000)
      total = 4 * 1_048_576
      data = :crypto.strong_rand_bytes(total)
      :ok = MaculaQuic.async_send(s, data)

      # With the default (512 KiB) the sender would stall near 576 KiB.
      assert wait_until(fn -> taken(c, total) >= 1_048_576 end),
             "the reader did not read 1 MiB ahead: #{taken(c, total)} bytes taken"

      assert taken(c, total) <= 1_048_576 + @window
      assert {:ok, first} = MaculaQuic.recv(ss, 0, 5_000)
      assert byte_size(first) >= 1_048_576 - @window and byte_size(first) <= 1_048_576

      # Growing it lets the reader, full again, go further at once; shrinking it bounds the
      # next reads.
      assert wait_until(fn -> taken(c, total) >= byte_size(first) + 1_048_576 end)
      :ok = MaculaQuic.setopt(ss, :read_ahead, 2_097_152)
      assert wait_until(fn -> taken(c, total) >= byte_size(first) + 2_097_152 end)
      assert {:ok, second} = MaculaQuic.recv(ss, 0, 5_000)

      assert byte_size(second) >= 2_097_152 - @window and byte_size(second) <= 2_097_152,
             "second read: #{byte_size(second)} bytes"

      :ok = MaculaQuic.setopt(ss, :read_ahead, 65_536)
      assert {:ok, 65_536} = MaculaQuic.getopt(ss, :read_ahead)
      :ok = MaculaQuic.async_shutdown_stream(s, MaculaQuic.stream_shutdown_graceful(), 0)
      rest = read_all(ss, [])
      assert Enum.all?(rest, &(byte_size(&1) <= 65_536))
      assert IO.iodata_to_binary([first, second | rest]) == data
    end

    test "an unread passive stream lets the peer send its read_ahead and the 2.5 MiB stream window ahead" do
      # No window given: the library's default, twice Quinn's 1.25 MB. The sender's Quinn may
      # take what the reader has read (512 KiB ahead, plus the first byte) and the window on
      # top; with Quinn's window it would stop by 1.25 MB + 512 KiB.
      {c, sc, _l, _} = pair!()
      {s, ss} = stream_pair!(c, sc, server: [active: false], first: "a")
      assert {:ok, "a"} = MaculaQuic.recv(ss, 1, 5_000)
      total = 8 * 1_048_576
      :ok = MaculaQuic.async_send(s, :binary.copy(<<1>>, total))
      bound = 1 + 524_288 + 2_621_440

      assert wait_until(fn -> taken(c, total) >= 2_400_000 end),
             "the sender stopped at #{taken(c, total)} bytes"

      assert taken(c, total) <= bound
    end

    test "defaults to 512 KiB; out of range or ill-typed values are refused" do
      {c, sc, _l, _} = pair!()
      {_s, ss} = stream_pair!(c, sc, server: [active: false])
      assert {:ok, 524_288} = MaculaQuic.getopt(ss, :read_ahead)

      for bad <- [0, 1023, 4_194_305, -1, 1.0e6, :big, "1024"] do
        assert {:error, {:bad_option, :read_ahead}} = MaculaQuic.setopt(ss, :read_ahead, bad)
        assert {:error, {:bad_option, :read_ahead}} = MaculaQuic.open_stream(c, read_ahead: bad)
      end

      assert {:ok, 524_288} = MaculaQuic.getopt(ss, :read_ahead)
      :ok = MaculaQuic.setopt(ss, :read_ahead, 4_194_304)
      assert {:ok, 4_194_304} = MaculaQuic.getopt(ss, :read_ahead)
      assert {:ok, s2} = MaculaQuic.open_stream(c, read_ahead: 1024)
      assert {:ok, 1024} = MaculaQuic.getopt(s2, :read_ahead)
      assert {:ok, 1024} = :macula_quic.getopt(s2, :read_ahead)
    end
  end

  defp read_all(stream, acc) do
    case MaculaQuic.recv(stream, 0, 5_000) do
      {:ok, bin} -> read_all(stream, [bin | acc])
      {:error, :peer_send_shutdown} -> Enum.reverse(acc)
    end
  end

  describe "the connection window" do
    # What a peer may send ahead of what a connection's streams have taken, across all of them.
    # The server here accepts none of the client's streams, so all that is sent waits unread
    # in the server's Quinn, and the client's Quinn takes no more than the window allows.

    defp open_and_send!(c, streams, each) do
      for _ <- 1..streams do
        {:ok, s} = MaculaQuic.open_stream(c)
        :ok = MaculaQuic.async_send(s, :binary.copy(<<2>>, each))
        s
      end
    end

    # What the client's Quinn has taken once it has taken at least `low` bytes and then stalled:
    # the same figure on two looks 100 ms apart (no message says that flow control closed).
    # Waiting for `low` first keeps a slow start on a busy host from passing for a stall.
    defp settled_taken!(c, total, low) do
      assert wait_until(fn -> taken(c, total) >= low end, 1_000),
             "the senders stopped at #{taken(c, total)} bytes, short of #{low}"

      await_settled!(
        fn -> taken(c, total) end,
        100,
        100,
        &"the senders never stalled (#{&1} bytes taken)"
      )
    end

    test "defaults to 64 MiB: unread streams together hold no more" do
      # With Quinn's default (unbounded) 30 streams would take 30 × 2.5 MiB = 75 MiB.
      {c, _sc, _l, _} = pair!()
      each = 3 * 1_048_576
      _streams = open_and_send!(c, 30, each)
      taken = settled_taken!(c, 30 * each, 63 * 1_048_576)
      assert taken <= 64 * 1_048_576, "#{taken} bytes taken"
    end

    test "conn_recv_window sets it; a stream window larger than the default widens it" do
      {c, _sc, _l, _} = pair!(listen: [conn_recv_window: 4 * 1_048_576])
      _streams = open_and_send!(c, 4, 2 * 1_048_576)
      taken = settled_taken!(c, 8 * 1_048_576, 3 * 1_048_576)
      assert taken <= 4 * 1_048_576, "#{taken} bytes taken"

      # One stream with a 72 MiB window may use all of it: the connection's window follows.
      {c, _sc, _l, _} = pair!(listen: [stream_recv_window: 72 * 1_048_576])
      total = 80 * 1_048_576
      {:ok, s} = MaculaQuic.open_stream(c)
      piece = :binary.copy(<<3>>, 8 * 1_048_576)

      # In 8 MiB async_sends, each once no more than 8 MiB waits (async_send takes 16 MiB at
      # most), so that what waits is what the client's Quinn has not taken.
      for n <- 1..10 do
        # total - taken: the bytes waiting (send_pend).
        assert wait_until(fn -> n <= 2 or total - taken(c, total) <= 8 * 1_048_576 end, 1_000),
               "piece #{n}: #{total - taken(c, total)} bytes waiting"

        :ok = MaculaQuic.async_send(s, piece)
      end

      taken = settled_taken!(c, total, 70 * 1_048_576)
      assert taken <= 72 * 1_048_576, "#{taken} bytes taken"
    end

    test "getstat counts the stalls: a stream's window, then the connection's, at both ends" do
      {c, sc, _l, _} = pair!(listen: [conn_recv_window: 4 * 1_048_576])

      stalls = fn conn ->
        names = [
          :stream_data_blocked_tx,
          :stream_data_blocked_rx,
          :data_blocked_tx,
          :data_blocked_rx
        ]

        {:ok, kv} = MaculaQuic.getstat(conn, names)
        Map.new(kv)
      end

      # One unread 3 MiB stream: its 2.5 MiB window stops it, within the connection's 4 MiB.
      _ = open_and_send!(c, 1, 3 * 1_048_576)
      settled_taken!(c, 3 * 1_048_576, 2 * 1_048_576)

      assert wait_until(fn -> stalls.(sc).stream_data_blocked_rx >= 1 end),
             "the server heard of no stream stall: #{inspect(stalls.(sc))}"

      assert %{stream_data_blocked_tx: st, data_blocked_tx: 0} = stalls.(c)
      assert st >= 1

      # Two more: 2.5 + 2 + 2 MiB is past the connection's 4 MiB, which stops them.
      _ = open_and_send!(c, 2, 2 * 1_048_576)
      settled_taken!(c, 7 * 1_048_576, 3 * 1_048_576)

      assert wait_until(fn -> stalls.(sc).data_blocked_rx >= 1 end),
             "the server heard of no connection stall: #{inspect(stalls.(sc))}"

      assert stalls.(c).data_blocked_tx >= 1
      # The server sent nothing, so it was never held back.
      assert %{stream_data_blocked_tx: 0, data_blocked_tx: 0} = stalls.(sc)
    end
  end

  describe "switching modes" do
    test "passive -> active after a partial recv delivers the rest, in order" do
      {_c, _sc, s, ss} = streams!(active: false)
      :ok = MaculaQuic.send(s, "bcdefghij")
      assert {:ok, "a"} = MaculaQuic.recv(ss, 1, 5_000)
      :ok = MaculaQuic.setopt(ss, :active, 3)
      assert collect!(ss, 9) == "bcdefghij"
    end

    @tag timeout: 120_000
    test "switching repeatedly mid-transfer loses and duplicates nothing" do
      {_c, _sc, s, ss} = streams!(active: false)
      payload = :crypto.strong_rand_bytes(8 * 1_048_576)
      sender = Task.async(fn -> MaculaQuic.send(s, payload, 4) end)
      got = switch_read(ss, [], 0, 0)
      assert Task.await(sender, 60_000) == :ok
      assert got == "a" <> payload
    end
  end

  ## helpers

  defp switch_read(ss, acc, got, round) do
    mode = rem(round, 4)

    result =
      case mode do
        0 -> MaculaQuic.recv(ss, 0, 5_000)
        1 -> MaculaQuic.recv(ss, 1000, 5_000)
        2 -> active_once(ss)
        3 -> active_n(ss, 3)
      end

    case result do
      {:ok, data} -> switch_read(ss, [data | acc], got + byte_size(data), round + 1)
      {:fin, data} -> IO.iodata_to_binary(Enum.reverse([data | acc]))
      {:error, :peer_send_shutdown} -> IO.iodata_to_binary(Enum.reverse(acc))
    end
  end

  defp active_once(ss) do
    :ok = MaculaQuic.setopt(ss, :active, :once)

    receive do
      {:quic, data, ^ss, 2} when is_binary(data) -> {:fin, data}
      {:quic, data, ^ss, _} when is_binary(data) -> {:ok, data}
      {:quic, :peer_send_shutdown, ^ss, _} -> {:error, :peer_send_shutdown}
    after
      5_000 -> flunk("no data in :once mode")
    end
  end

  defp active_n(ss, n) do
    :ok = MaculaQuic.setopt(ss, :active, n)
    take_n(ss, n, [])
  end

  defp take_n(ss, 0, acc) do
    assert_receive {:quic, :passive, ^ss, :undefined}, 5_000
    {:ok, IO.iodata_to_binary(Enum.reverse(acc))}
  end

  defp take_n(ss, n, acc) do
    receive do
      {:quic, data, ^ss, 2} when is_binary(data) ->
        # The stream ended inside our budget; switch back to passive for the caller.
        :ok = MaculaQuic.setopt(ss, :active, false)
        {:fin, IO.iodata_to_binary(Enum.reverse([data | acc]))}

      {:quic, data, ^ss, _} when is_binary(data) ->
        take_n(ss, n - 1, [data | acc])

      # The FIN came after the last data (it may, see the moduledoc).
      {:quic, :peer_send_shutdown, ^ss, _} ->
        :ok = MaculaQuic.setopt(ss, :active, false)
        {:fin, IO.iodata_to_binary(Enum.reverse(acc))}
    after
      5_000 -> flunk("no data in {active, N} mode")
    end
  end
end

defmodule MaculaQuic.TimerFairnessTest do
  # Not async: the test measures how long a process waits for its scheduler while our NIFs
  # move data, so it runs on its own. Beside the other modules' async tests (a 1 GiB
  # transfer, VMs starting) the timer waited for them too: in full-suite runs its max
  # lateness reached 122-286 ms and once its p95 35 ms, over the bounds below. Alone (four
  # runs each): p95 3.5-4.7 ms, max 4.5-42 ms; with runtime_spin_us 15, 3.3-4.6 and 5.6-8.2.
  use ExUnit.Case, async: false
  import MaculaQuic.Test.Quic

  @moduletag :receive_modes

  # What an earlier module left (connections closing with their owner) finishes first.
  setup do
    MaculaQuic.Test.Settle.await_clean!(MaculaQuic.Test.Settle.zero(), 30_000)
    :ok
  end

  @tag timeout: 240_000
  test "8 streams pushing data do not starve a timer process" do
    # A stall of the host itself (this VM's vCPUs not running: "steal" time) makes a timer late
    # too, and once made the p95 87 ms (three stalls of ~90 ms in one run, not seen in dozens of
    # others). So a measurement over the bounds is reported with the host's steal time over it
    # and taken once more; a scheduler that our NIFs hold would fail both.
    first = measure()
    report(first)

    if within_bounds?(first) do
      assert_bounds(first)
    else
      IO.puts("  over the bounds once: measuring again")
      MaculaQuic.Test.Settle.await_clean!(MaculaQuic.Test.Settle.zero(), 30_000)
      second = measure()
      report(second)
      assert_bounds(second)
    end
  end

  # 8 streams move 512 MiB while a process ticks every 10 ms: how late each tick came (µs),
  # and the host's steal time meanwhile (ms, summed over its CPUs; nil where /proc/stat is not).
  defp measure do
    {c, sc, l, _} = pair!()
    parent = self()

    {pairs, drains} =
      Enum.unzip(
        for i <- 1..8 do
          {s, ss} = stream_pair!(c, sc, first: "#{i}")
          drain = spawn(fn -> drain_loop(ss) end)
          on_exit(fn -> Process.exit(drain, :kill) end)
          :ok = MaculaQuic.handoff_stream(ss, drain)
          {s, drain}
        end
      )

    # Made before the ticker starts: the first call loads the crypto NIF, and loading a
    # module with `on_load` holds the schedulers for tens of milliseconds (measured with
    # `:erlang.system_monitor/2`), which is not what this test is about.
    chunk = :crypto.strong_rand_bytes(256 * 1024)
    steal0 = steal_ms()
    ticker = spawn_link(fn -> tick_loop(parent, [], System.monotonic_time(:microsecond)) end)

    senders =
      for s <- pairs do
        Task.async(fn -> for(_ <- 1..256, do: :ok = MaculaQuic.send(s, chunk)) end)
      end

    Enum.each(senders, &Task.await(&1, 120_000))
    send(ticker, :stop)
    assert_receive {:ticks, lateness}, 5_000
    steal = steal_ms()
    :ok = MaculaQuic.close_connection(c)
    :ok = MaculaQuic.close_listener(l)
    Enum.each(drains, &Process.exit(&1, :kill))
    sorted = Enum.sort(lateness)

    %{
      ticks: length(sorted),
      p50: Enum.at(sorted, div(length(sorted), 2)),
      p95: Enum.at(sorted, div(length(sorted) * 95, 100)),
      max: List.last(sorted),
      steal_ms: steal && steal0 && steal - steal0
    }
  end

  defp report(r) do
    IO.puts(
      "\n  timer lateness over #{r.ticks} ticks while 8 streams moved 512 MiB: p50 #{r.p50} us, " <>
        "p95 #{r.p95} us, max #{r.max} us (host steal meanwhile: #{inspect(r.steal_ms)} ms)"
    )
  end

  # The bounds are `assert_bounds/1`'s, so that the check and the assertions cannot drift apart.
  defp within_bounds?(r) do
    assert_bounds(r)
    true
  rescue
    ExUnit.AssertionError -> false
  end

  # A blocked scheduler would show as lateness of the whole transfer (seconds); single
  # outliers come from the OS sharing 2 cores with tokio's threads.
  defp assert_bounds(r) do
    assert r.ticks > 10
    assert r.p50 < 5_000
    assert r.p95 < 30_000
    assert r.max < 250_000
  end

  # The host's steal time so far (ms, all CPUs): /proc/stat's eighth field, in clock ticks
  # (USER_HZ, 100 per second on Linux).
  defp steal_ms do
    with {:ok, stat} <- File.read("/proc/stat"),
         ["cpu" | fields] <- stat |> String.split("\n") |> hd() |> String.split(),
         [_, _, _, _, _, _, _, steal | _] <- fields,
         {ticks, ""} <- Integer.parse(steal) do
      ticks * 10
    else
      _ -> nil
    end
  end

  defp drain_loop(ss) do
    receive do
      {:quic, _, ^ss, _} -> drain_loop(ss)
    end
  end

  defp tick_loop(parent, acc, expected) do
    receive do
      :stop -> send(parent, {:ticks, acc})
    after
      10 ->
        now = System.monotonic_time(:microsecond)
        lateness = max(now - (expected + 10_000), 0)
        tick_loop(parent, [lateness | acc], now)
    end
  end
end

defmodule MaculaQuic.BackPressureTest do
  # Not async: the test bounds the VM's memory while 1 GiB moves, which other modules' async
  # tests (100 MiB echoes, 64 MiB receives) would move by hundreds of MiB meanwhile.
  use ExUnit.Case, async: false
  import MaculaQuic.Test.Quic

  @moduletag :receive_modes

  describe "back-pressure" do
    @tag timeout: 300_000
    test "a slow :once receiver slows the sender; mailbox, memory and in-flight bytes stay bounded while 1 GiB moves" do
      total = 1024 * 1_048_576
      piece = :binary.copy(:crypto.strong_rand_bytes(1024), 1024)
      {c, sc, l, s, ss} = streams!(active: :once)
      parent = self()
      sent = :atomics.new(1, [])
      received = :atomics.new(1, [])

      receiver =
        spawn_link(fn ->
          receive do: (:go -> :ok)
          send(parent, {:received, slow_receive(ss, received, :crypto.hash_init(:sha256), 0)})
        end)

      # The first byte ("a") is part of the stream; hand the stream (and that message) over.
      :ok = MaculaQuic.handoff_stream(ss, receiver)
      send(receiver, :go)

      writer =
        Task.async(fn ->
          hash = :crypto.hash_update(:crypto.hash_init(:sha256), "a")

          hash =
            Enum.reduce(1..div(total, byte_size(piece)), hash, fn _, h ->
              :ok = MaculaQuic.send(s, piece)
              :atomics.add(sent, 1, byte_size(piece))
              :crypto.hash_update(h, piece)
            end)

          :ok = MaculaQuic.send(s, "", 4)
          :crypto.hash_final(hash)
        end)

      base_mem = :erlang.memory(:total)
      samples = sample_until_done(receiver, sent, received, [])
      expected = Task.await(writer, 300_000)
      assert_receive {:received, {n, hash}}, 60_000
      assert n == total + 1
      assert hash == expected

      max_queue = samples |> Enum.map(& &1.queue) |> Enum.max()
      max_in_flight = samples |> Enum.map(& &1.in_flight) |> Enum.max()
      max_mem = samples |> Enum.map(& &1.mem) |> Enum.max()

      IO.puts(
        "\n  1 GiB at :once: #{length(samples)} samples, max mailbox #{max_queue}, max in flight #{div(max_in_flight, 1024)} KiB, max VM memory +#{div(max_mem - base_mem, 1_048_576)} MiB"
      )

      # One message at a time (plus, at most, the passive/closing notices).
      assert max_queue <= 3
      # Bounded by Quinn's send buffer + stream window + one coalesced read + one 1 MiB piece:
      # nowhere near the 1 GiB moved.
      assert max_in_flight <= 32 * 1_048_576
      assert max_mem - base_mem <= 256 * 1_048_576
      Enum.each([s, ss], &MaculaQuic.close_stream/1)
      Enum.each([c, sc], &MaculaQuic.close_connection/1)
      :ok = MaculaQuic.close_listener(l)
      MaculaQuic.Test.Settle.await_clean!(MaculaQuic.Test.Settle.zero(), 30_000)
    end
  end

  # A deliberately slow consumer: re-arms :once after each message and sleeps now and then, so
  # the sender must wait for it.
  defp slow_receive(ss, counter, hash, n) do
    receive do
      {:quic, data, ^ss, flags} when is_binary(data) ->
        :atomics.add(counter, 1, byte_size(data))
        hash = :crypto.hash_update(hash, data)
        if rem(n, 64) == 0 and n < 64 * 64, do: Process.sleep(5)

        if Bitwise.band(flags, 2) != 0 do
          {n_bytes(counter), :crypto.hash_final(hash)}
        else
          :ok = MaculaQuic.setopt(ss, :active, :once)
          slow_receive(ss, counter, hash, n + 1)
        end

      {:quic, :peer_send_shutdown, ^ss, _} ->
        {n_bytes(counter), :crypto.hash_final(hash)}
    after
      30_000 -> exit(:stalled)
    end
  end

  defp n_bytes(counter), do: :atomics.get(counter, 1)

  defp sample_until_done(receiver, sent, received, acc) do
    case Process.info(receiver, :message_queue_len) do
      nil ->
        acc

      {:message_queue_len, q} ->
        sample = %{
          queue: q,
          in_flight: :atomics.get(sent, 1) - :atomics.get(received, 1),
          mem: :erlang.memory(:total)
        }

        receive do
        after
          50 -> sample_until_done(receiver, sent, received, [sample | acc])
        end
    end
  end

  defp streams!(server_opts) do
    {c, sc, l, _} = pair!()
    {s, ss} = stream_pair!(c, sc, server: server_opts, first: "a")
    {c, sc, l, s, ss}
  end
end
