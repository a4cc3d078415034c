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
      %{kind: :bulk} = w -> Bench.Macula.bulk(cert, w.bytes, w.mode).mib_s
      %{kind: :handshake} = w -> Bench.Macula.handshake(cert, w.concurrency, w.seconds).hs_s
      %{kind: :fanout} = w -> Bench.Macula.fanout(cert, w.streams, w.bytes).mib_s
    end
  end

  @doc """
  How raw Quinn's baseline runs the workload: `{workload, params, key}` for
  `Bench.Util.run_quinn/4`, `key` naming the figure in what it prints.
  """
  def quinn(name) do
    case @workloads[name] do
      %{kind: :echo} = w ->
        {"echo", [size: w.size, seconds: w.seconds], :rt_s}

      %{kind: :bulk} = w ->
        {"bulk", [bytes: w.bytes], :mib_s}

      %{kind: :handshake} = w ->
        {"handshake", [concurrency: w.concurrency, seconds: w.seconds], :hs_s}

      %{kind: :fanout} = w ->
        {"fanout", [streams: w.streams, bytes: w.bytes], :mib_s}
    end
  end

  defp unit_of(:echo), do: "round trips/s"
  defp unit_of(:bulk), do: "MiB/s"
  defp unit_of(:handshake), do: "handshakes/s"
  defp unit_of(:fanout), do: "MiB/s"
end
