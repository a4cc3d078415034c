# Where `close_connection/1`'s time goes in sequential handshakes (connect, close, connect
# again, as the handshake benchmark does): how often its NIF closes the connection in the call
# (answering `:ok` or `:closed`) and how often the connection's shard was running on a runtime
# worker at that moment, so that the close went to a task there (`:wait`) and the caller waited
# for that task's answer; and how long each takes. Right after a handshake the client's
# connection still has the server's last packets to take (HANDSHAKE_DONE, session tickets),
# often on a runtime worker. (bench/README.md, "Handshakes: the last phase once more".)
#
#   MIX_ENV=bench MACULA_QUIC_BUILD=1 mix compile
#   elixir -pa _build/bench/lib/macula_quic/ebin bench/close_waits.exs [HANDSHAKES]
#
# HANDSHAKES defaults to 3000 (after 100 not counted). Uses the close NIF
# (MaculaQuic.Native.conn_close/3) the way close_connection/1 does, timing its parts.
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)

defmodule Bench.CloseWaits do
  import Bench.Util, only: [now_us: 0, progress: 1]

  def main(args) do
    n =
      case args do
        [] -> 3000
        [count] -> String.to_integer(count)
        _ -> raise ArgumentError, "usage: bench/close_waits.exs [HANDSHAKES]"
      end

    Bench.Util.configure_runtime()
    cert = Bench.Util.make_cert(Path.join(System.tmp_dir!(), "macula_quic_close_waits"))
    {l, port} = Bench.Macula.listen(cert)
    acceptor = spawn_link(fn -> Bench.Macula.accept_loop(l) end)
    progress("#{n} sequential handshakes, each closed as close_connection/1 does")
    for _ <- 1..100, do: close(Bench.Macula.connect(port, session_resumption: false))
    closes = for _ <- 1..n, do: close(Bench.Macula.connect(port, session_resumption: false))
    send(acceptor, :stop)
    MaculaQuic.close_listener(l)
    IO.puts(report(closes, n))
  end

  # One close, as close_connection/1 does it: {how the NIF answered, µs in the NIF, µs waiting
  # for the answer after `:wait`, µs until the owner's `closed` message was there}.
  defp close(c) do
    ref = make_ref()
    t0 = now_us()
    answer = MaculaQuic.Native.conn_close(c, 0, ref)
    t1 = now_us()

    result =
      case answer do
        :wait -> receive(do: ({^ref, result} -> result))
        other -> other
      end

    t2 = now_us()

    # As close_connection/1: `closed` comes only when this call closed it (`:ok`).
    if result == :ok do
      receive do
        {:quic, :closed, ^c, _} -> :ok
      after
        5_000 -> raise "no closed message for #{inspect(c)}"
      end
    end

    {answer, t1 - t0, t2 - t1, now_us() - t2}
  end

  defp report(closes, n) do
    by = Enum.group_by(closes, &elem(&1, 0))
    median = fn list, i -> list |> Enum.map(&elem(&1, i)) |> Bench.Util.median() |> round() end

    lines =
      for {answer, list} <- Enum.sort(by) do
        share = round(100 * length(list) / n)

        "- the NIF answered `#{inspect(answer)}` in #{length(list)} of #{n} closes (#{share}%): " <>
          "median #{median.(list, 1)} µs in the NIF" <>
          if(answer == :wait, do: ", then #{median.(list, 2)} µs for the answer", else: "") <>
          ", then #{median.(list, 3)} µs for the `closed` message"
      end

    total = closes |> Enum.map(fn {_, a, b, c} -> a + b + c end) |> Bench.Util.median() |> round()

    Enum.join(
      ["#{Bench.Util.machine_line()} close_connection/1 in sequential handshakes:" | lines] ++
        ["- median of the whole close: #{total} µs"],
      "\n"
    )
  end
end

Bench.CloseWaits.main(System.argv())
