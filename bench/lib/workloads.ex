defmodule Bench.Workloads do
  @moduledoc """
  The workloads of `bin/rounds` (bench/rounds.exs), defined once for both sides: how
  macula_quic runs each (in bench/one.exs, a fresh VM per measurement) and how raw Quinn's
  baseline does, with the same sizes and durations.
  """

  @gib 1024 * 1024 * 1024

  @workloads %{
    "echo" => %{kind: :echo, size: 64, seconds: 2.0, how: :async_send},
    "echo_send" => %{kind: :echo, size: 64, seconds: 2.0, how: :send},
    "echo4096" => %{kind: :echo, size: 4096, seconds: 2.0, how: :async_send},
    # The echoing end in a second OS process (a second VM; raw Quinn: its role=server).
    "echo2p" => %{kind: :echo_remote, size: 64, seconds: 2.0},
    "bulk" => %{kind: :bulk, bytes: @gib, mode: :active},
    "passive" => %{kind: :bulk, bytes: @gib, mode: :passive},
    "hs" => %{kind: :handshake, concurrency: 1, seconds: 2.0},
    "hs16" => %{kind: :handshake, concurrency: 16, seconds: 2.0},
    "fanout" => %{kind: :fanout, streams: 100, bytes: 10 * 1024 * 1024}
  }

  @doc "The workloads' names."
  def names, do: Map.keys(@workloads)

  @doc "The unit of a workload's figure."
  def unit(name), do: unit_of(@workloads[name].kind)

  @doc "One macula_quic measurement of the workload in this VM: its figure."
  def macula(name, cert) do
    case @workloads[name] do
      %{kind: :echo} = w -> Bench.Macula.echo(cert, w.size, w.seconds, w.how).rt_s
      %{kind: :echo_remote} = w -> macula_remote(cert, w.size, w.seconds)
      %{kind: :bulk} = w -> Bench.Macula.bulk(cert, w.bytes, w.mode).mib_s
      %{kind: :handshake} = w -> Bench.Macula.handshake(cert, w.concurrency, w.seconds).hs_s
      %{kind: :fanout} = w -> Bench.Macula.fanout(cert, w.streams, w.bytes).mib_s
    end
  end

  @doc """
  One raw-Quinn measurement of the workload with the baseline `bin`: its figure. The
  baseline runs with the same sizes and durations; for `echo2p` a second baseline process is
  the echoing end.
  """
  def quinn(name, bin, cert) do
    {workload, params, key} = quinn_args(name)

    out =
      case @workloads[name] do
        %{kind: :echo_remote} ->
          Bench.Util.with_server(Bench.Util.quinn_echo_server(bin, cert), fn port, _os_pid ->
            Bench.Util.run_quinn(bin, workload, cert, params ++ [peer_port: port])
          end)

        _ ->
          Bench.Util.run_quinn(bin, workload, cert, params)
      end

    case out do
      %{^key => x} when is_number(x) -> x
      other -> raise "quinn_baseline printed no #{key}: #{inspect(other)}"
    end
  end

  # How the baseline runs the workload: `{workload, params, key}` for `Bench.Util.run_quinn/4`,
  # `key` naming the figure in what it prints.
  defp quinn_args(name) do
    case @workloads[name] do
      %{kind: kind} = w when kind in [:echo, :echo_remote] ->
        {"echo", [size: w.size, seconds: w.seconds], :rt_s}

      %{kind: :bulk} = w ->
        {"bulk", [bytes: w.bytes], :mib_s}

      %{kind: :handshake} = w ->
        {"handshake", [concurrency: w.concurrency, seconds: w.seconds], :hs_s}

      %{kind: :fanout} = w ->
        {"fanout", [streams: w.streams, bytes: w.bytes], :mib_s}
    end
  end

  # macula_quic's `echo2p`: the echoing end is bench/echo_server.exs in a second VM, with this
  # VM's build of the library and, by inheritance, its runtime settings (BENCH_*, ERL_AFLAGS).
  defp macula_remote(cert, size, seconds) do
    Bench.Util.with_server(Bench.Util.macula_echo_server(cert), fn port, _os_pid ->
      Bench.Macula.echo_remote(port, size, seconds).rt_s
    end)
  end

  defp unit_of(:echo), do: "round trips/s"
  defp unit_of(:echo_remote), do: "round trips/s"
  defp unit_of(:bulk), do: "MiB/s"
  defp unit_of(:handshake), do: "handshakes/s"
  defp unit_of(:fanout), do: "MiB/s"
end
