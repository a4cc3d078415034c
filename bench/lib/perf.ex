defmodule Bench.Perf do
  @moduledoc false
  # perf attached to this VM so that it sees only the measured region: started with its events
  # disabled, then enabled and disabled through its control FIFO (each command acknowledged, so
  # nothing between the marks is missed). Used by bench/profile.exs (perf record) and
  # bench/calls.exs (perf stat).

  @doc """
  Starts `perf ARGS -D -1 --control … -p <this VM>` and returns a marker for
  `Bench.Util.set_marker/1`: `:start` enables the events, `:stop` disables them and stops perf
  (which then writes its output). `dir` holds the FIFOs.
  """
  def attach(args, dir) do
    ctl = Path.join(dir, "perf.ctl")
    ack = Path.join(dir, "perf.ack")

    for f <- [ctl, ack] do
      File.rm(f)
      {_, 0} = System.cmd("mkfifo", [f])
    end

    perf = System.find_executable("perf") || raise "perf not found"
    control = ~w(-D -1 --control fifo:#{ctl},#{ack} -p #{System.pid()})

    port =
      Port.open({:spawn_executable, perf}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        args: args ++ control
      ])

    {:os_pid, perf_pid} = Port.info(port, :os_pid)

    fn
      :start ->
        command(ctl, ack, "enable")

      :stop ->
        command(ctl, ack, "disable")
        {_, 0} = System.cmd("kill", ["-INT", "#{perf_pid}"])

        receive do
          {^port, {:exit_status, _}} -> :ok
        after
          60_000 -> raise "perf did not exit"
        end
    end
  end

  # Sends a command to perf and waits for its "ack" (perf creates nothing until attached, so the
  # first command also waits for it to be ready).
  defp command(ctl, ack, cmd) do
    {out, 0} =
      System.cmd("sh", [
        "-c",
        ~s(echo #{cmd} > "$1" && read -r a < "$2" && echo "$a"),
        "sh",
        ctl,
        ack
      ])

    unless String.starts_with?(out, "ack"), do: raise("perf did not acknowledge #{cmd}: #{out}")
  end
end
