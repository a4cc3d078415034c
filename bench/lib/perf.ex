defmodule Bench.Perf do
  @moduledoc false
  # perf attached to this VM so that it sees only the measured region: started with its events
  # disabled, then enabled and disabled through its control FIFO (each command acknowledged, so
  # nothing between the marks is missed). Used by bench/profile.exs (perf record),
  # bench/calls.exs (perf stat) and bench/handshake_phases.exs (perf record of uprobes); and
  # the uprobes those two place on functions of the NIF and of the raw-Quinn baseline.

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

  ## Uprobes

  @doc """
  Places a uprobe `group:name` for each `{name, re}` in `probes`, on the first code symbol of
  `binary` whose mangled name (as `nm` prints it) matches `re`, with `perf probe`. Raises when
  none matches or perf refuses.
  """
  def add_probes(group, binary, probes) do
    symbols = text_symbols(binary)
    shift = text_shift(binary)

    for {name, re} <- probes do
      addr =
        Enum.find_value(symbols, fn {a, sym} -> if Regex.match?(re, sym), do: a end) ||
          raise "#{binary}: no symbol matches #{inspect(re)}"

      # uprobes take an offset in the file; nm gives the address the code is loaded at.
      spec = "#{group}:#{name}=0x#{Integer.to_string(addr - shift, 16)}"

      # (Not quiet: when perf refuses, its message says why, e.g. a probe another tool left on
      # the same build.)
      {out, status} =
        System.cmd("perf", ["probe", "-x", binary, "-a", spec], stderr_to_stdout: true)

      if status != 0, do: raise("perf probe #{spec} failed: #{out}")
    end

    :ok
  end

  @doc """
  Runs `fun` (which places uprobes of `group` with `add_probes/3` and measures with them) and
  removes every uprobe of `group` after it, also when it fails: a probe left behind would make
  the next tool's `perf probe` on the same build refuse.
  """
  def with_probes(group, fun) do
    fun.()
  after
    remove_probes(group)
  end

  @doc "Removes every uprobe of `group` (none placed is fine)."
  def remove_probes(group) do
    System.cmd("perf", ["probe", "-q", "-d", "#{group}:*"], stderr_to_stdout: true)
    :ok
  end

  # The code symbols of `binary`: [{address, mangled name}].
  defp text_symbols(binary) do
    {out, 0} = System.cmd("nm", [binary])

    for line <- String.split(out, "\n"),
        [a, t, sym] <- [String.split(line, " ", parts: 3)],
        t in ["t", "T"],
        do: {String.to_integer(a, 16), sym}
  end

  # Load address minus file offset of the executable segment.
  defp text_shift(binary) do
    {out, 0} = System.cmd("readelf", ["-lW", binary])

    out
    |> String.split("\n")
    |> Enum.find_value(fn line ->
      case String.split(line) do
        ["LOAD", off, vaddr | rest] -> if "E" in rest, do: hex(vaddr) - hex(off)
        _ -> nil
      end
    end)
  end

  defp hex("0x" <> h), do: String.to_integer(h, 16)
end
