defmodule Bench.Util do
  @moduledoc false
  # Shared helpers for the benchmark suite: sizes, timing, statistics, RSS, JSON, certificates,
  # machine description, progress lines.

  @mib 1_048_576

  def mib, do: @mib

  @doc """
  Applies BENCH_RUNTIME_WORKERS, BENCH_RUNTIME_SPIN_US, BENCH_RUNTIME_SPIN_MAX_US and
  BENCH_INLINE_WATCH_US to macula_quic's configuration (`runtime_workers`, `runtime_spin_us`,
  `runtime_spin_max_us`, `inline_watch_us`). Call it before the first MaculaQuic call: the NIF
  reads them when it loads.
  """
  def configure_runtime do
    for {_var, key, n} <- runtime_vars(), do: Application.put_env(:macula_quic, key, n)
    :ok
  end

  @doc """
  The settings a run departs from the defaults with, as the variables that set them: the
  runtime settings `configure_runtime/0` applies and the VM's flags from the environment
  (`BENCH_INLINE_WATCH_US=20 ERL_AFLAGS="+S 1"`), or "defaults". For reports, which must say
  when a run did not use the defaults.
  """
  def settings do
    runtime = for {var, _key, n} <- runtime_vars(), do: "#{var}=#{n}"

    vm =
      for var <- ~w(ERL_AFLAGS ERL_FLAGS ERL_ZFLAGS),
          v = System.get_env(var),
          v not in [nil, ""],
          do: "#{var}=#{inspect(v)}"

    case runtime ++ vm do
      [] -> "defaults"
      set -> Enum.join(set, " ")
    end
  end

  defp runtime_vars do
    for {var, key} <- [
          {"BENCH_RUNTIME_WORKERS", :runtime_workers},
          {"BENCH_RUNTIME_SPIN_US", :runtime_spin_us},
          {"BENCH_RUNTIME_SPIN_MAX_US", :runtime_spin_max_us},
          {"BENCH_INLINE_WATCH_US", :inline_watch_us}
        ],
        v = System.get_env(var),
        v != nil,
        {n, ""} <- [Integer.parse(v)],
        do: {var, key, n}
  end

  @doc """
  The kind of a thread of this process, by its name: the runtime's workers ("macula_quic", as
  runtime.rs names them, or tokio's default name in raw Quinn's baseline) or one of the BEAM's
  ("1_scheduler", "2_dirty_cpu_sch", "1_aux", "0_poller", ...). Used by bin/profile and
  bench/threads.exs; `thread_kinds/0` lists them in report order.
  """
  def thread_kind(comm) when comm in ["macula_quic", "tokio-rt-worker"], do: "runtime workers"

  def thread_kind(comm) do
    cond do
      comm =~ ~r/^\d+_scheduler$/ -> "BEAM schedulers"
      comm =~ ~r/^\d+_dirty/ -> "BEAM dirty schedulers"
      comm =~ ~r/^\d+_aux$/ -> "BEAM aux thread"
      comm =~ ~r/^\d+_poller$/ -> "BEAM poll thread"
      true -> "other threads"
    end
  end

  def thread_kinds,
    do: [
      "runtime workers",
      "BEAM schedulers",
      "BEAM dirty schedulers",
      "BEAM aux thread",
      "BEAM poll thread",
      "other threads"
    ]

  @doc """
  A script's SECONDS argument: a positive number ("3", "0.2"), or `nil` for anything else.
  """
  def seconds_arg(s) do
    case Float.parse(s) do
      {x, ""} when x > 0 -> x
      _ -> nil
    end
  end

  @doc "BENCH_SCALE (default 1.0): multiplies sizes and counts; durations shrink below 1.0."
  def scale do
    case System.get_env("BENCH_SCALE") do
      nil -> 1.0
      s -> elem(Float.parse(s), 0)
    end
  end

  def repeat do
    case System.get_env("BENCH_REPEAT") do
      nil -> if scale() < 1.0, do: 1, else: 5
      s -> max(1, String.to_integer(s))
    end
  end

  @doc "A byte count scaled by BENCH_SCALE, rounded to whole `unit`s, at least one unit."
  def scaled_bytes(full, unit), do: max(unit, round(full * scale() / unit) * unit)

  def scaled_count(full, min), do: max(min, round(full * scale()))

  @doc "A duration in seconds: `full` at scale >= 1, shorter (not below 0.3 s) for quick runs."
  def seconds(full), do: max(0.3, full * min(1.0, scale()))

  def now_us, do: System.monotonic_time(:microsecond)

  @doc """
  Marks the start (`:start`) and end (`:stop`) of a workload's measured region. A no-op unless a
  marker is installed (`bench/profile.exs` installs one that starts and stops the profiler).
  """
  def mark(phase) do
    case :persistent_term.get({__MODULE__, :marker}, nil) do
      nil -> :ok
      fun -> fun.(phase)
    end
  end

  def set_marker(fun) when is_function(fun, 1),
    do: :persistent_term.put({__MODULE__, :marker}, fun)

  def mib_s(bytes, us), do: bytes / @mib / (us / 1.0e6)

  def percentile([], _p), do: 0

  def percentile(sorted_tuple, p) when is_tuple(sorted_tuple) do
    n = tuple_size(sorted_tuple)
    i = min(n - 1, round(p / 100 * (n - 1)))
    elem(sorted_tuple, i)
  end

  @doc """
  Calls `round_trip` (a zero-arity function doing one round trip) again and again for
  `seconds`, timing each call: `latency_stats/2` of the run. The echo workloads of every
  implementation measure with it, so they time the same way.
  """
  def time_round_trips(seconds, round_trip) do
    t0 = now_us()
    lat = round_trip_loop(round_trip, t0 + round(seconds * 1.0e6), [])
    latency_stats(lat, now_us() - t0)
  end

  defp round_trip_loop(round_trip, deadline, acc) do
    t = System.monotonic_time(:nanosecond)

    if div(t, 1000) >= deadline do
      acc
    else
      round_trip.()
      round_trip_loop(round_trip, deadline, [System.monotonic_time(:nanosecond) - t | acc])
    end
  end

  def latency_stats(lat_ns_list, us) do
    sorted = lat_ns_list |> Enum.sort() |> List.to_tuple()
    n = tuple_size(sorted)

    %{
      round_trips: n,
      seconds: us / 1.0e6,
      rt_s: n / (us / 1.0e6),
      p50_us: percentile(sorted, 50) / 1000,
      p99_us: percentile(sorted, 99) / 1000
    }
  end

  def median(values) do
    sorted = Enum.sort(values)
    n = length(sorted)

    if rem(n, 2) == 1,
      do: Enum.at(sorted, div(n, 2)),
      else: (Enum.at(sorted, div(n, 2) - 1) + Enum.at(sorted, div(n, 2))) / 2
  end

  @doc """
  CPU clock ticks (10 ms on Linux) a process or thread has used, user and system, from its
  `stat` file (`/proc/self/stat`, or `/proc/self/task/TID/stat` for one thread): fields 14 and
  15, counted after the parenthesised name (which may hold spaces).
  """
  def cpu_ticks(stat_path \\ "/proc/self/stat") do
    [_, after_name] = stat_path |> File.read!() |> String.split(") ", parts: 2)
    [utime, stime] = after_name |> String.split() |> Enum.slice(11, 2)
    String.to_integer(utime) + String.to_integer(stime)
  end

  @doc """
  `{executable, args}` that runs the Elixir `script` with `args` in a second VM with this VM's
  build of macula_quic on its code path (its runtime settings come with the environment).
  """
  def elixir_vm(script, args) do
    ebin = :code.lib_dir(:macula_quic, :ebin) |> to_string()
    {System.find_executable("elixir"), ["-pa", ebin, script | args]}
  end

  @doc """
  The echoing ends of the 64-byte echo with the peer in another OS process, for
  `with_server/2`: bench/echo_server.exs in a second VM (`elixir_vm/2`), and raw Quinn's
  baseline `bin` with `role=server`.
  """
  def macula_echo_server(cert),
    do: elixir_vm(Path.expand("../echo_server.exs", __DIR__), [cert.certfile, cert.keyfile])

  def quinn_echo_server(bin, cert),
    do: {bin, ["echo", "role=server", "cert=#{cert.certfile}", "key=#{cert.keyfile}"]}

  @doc """
  Runs `fun.(listen_port, os_pid)` against a server started from `{executable, args}` that
  prints `{"port":N}` once it listens (bench/echo_server.exs, `quinn_baseline echo
  role=server`), and stops the server afterwards by closing its standard input. `os_pid` is the
  server's OS process (its CPU is in `/proc/OS_PID/stat`).
  """
  def with_server({exe, args}, fun) do
    port = Port.open({:spawn_executable, exe}, [:binary, :exit_status, {:line, 4096}, args: args])

    try do
      listen_port = await_listening(port)
      {:os_pid, os_pid} = Port.info(port, :os_pid)
      fun.(listen_port, os_pid)
    after
      Port.close(port)
    end
  end

  defp await_listening(port) do
    receive do
      {^port, {:data, {:eol, line}}} ->
        case Regex.run(~r/"port":(\d+)/, line) do
          [_, n] -> String.to_integer(n)
          nil -> await_listening(port)
        end

      {^port, {:data, {:noeol, _}}} ->
        await_listening(port)

      {^port, {:exit_status, status}} ->
        raise "echo server exited (#{status}) before it listened"
    after
      30_000 -> raise "echo server did not listen within 30 s"
    end
  end

  @doc """
  `list` rotated left by `n`: the order in which the n-th (from 0) repeat or round measures
  its variants, so that none always runs first or right after the same one (the host drifts
  within a round too, and a fixed order would lean the same way every round).

      iex> Bench.Util.rotate([:a, :b, :c], 1)
      [:b, :c, :a]
  """
  def rotate(list, n) do
    {head, tail} = Enum.split(list, rem(n, length(list)))
    tail ++ head
  end

  @doc "Resident set size of this OS process (VM + native), bytes, from /proc/self/status."
  def rss_bytes do
    case File.read("/proc/self/status") do
      {:ok, s} ->
        case Regex.run(~r/VmRSS:\s+(\d+)\s+kB/, s) do
          [_, kb] -> String.to_integer(kb) * 1024
          _ -> 0
        end

      _ ->
        0
    end
  end

  def progress(msg) do
    t = :io_lib.format("~8.1f", [(System.monotonic_time(:millisecond) - start_ms()) / 1000])
    IO.puts(:stderr, "[bench #{t}s] #{msg}")
  end

  defp start_ms do
    case :persistent_term.get({__MODULE__, :start}, nil) do
      nil ->
        t = System.monotonic_time(:millisecond)
        :persistent_term.put({__MODULE__, :start}, t)
        t

      t ->
        t
    end
  end

  def fmt(x) when is_float(x) and x >= 100, do: :erlang.float_to_binary(x, decimals: 0)
  def fmt(x) when is_float(x) and x >= 10, do: :erlang.float_to_binary(x, decimals: 1)
  def fmt(x) when is_float(x), do: :erlang.float_to_binary(x, decimals: 2)
  def fmt(x) when is_integer(x), do: Integer.to_string(x)
  def fmt(nil), do: "–"
  def fmt(x), do: to_string(x)

  ## Functions counted by call

  @entry_points [
    {"cdrv", "Quinn connection-driver polls", ~r/ConnectionDriver.*Future.*4poll/,
     ~r/ConnectionDriver as core::future::future::Future>::poll$/},
    {"edrv", "Quinn endpoint-driver polls", ~r/EndpointDriver.*Future.*4poll/,
     ~r/EndpointDriver as core::future::future::Future>::poll$/},
    {"ptx", "`Connection::poll_transmit`", ~r/10Connection13poll_transmit/,
     ~r/^quinn_proto::connection::Connection::poll_transmit$/},
    {"hev", "`Connection::handle_event`", ~r/10Connection12handle_event/,
     ~r/^quinn_proto::connection::Connection::handle_event$/},
    # The server signs its handshake only in a full TLS handshake, not in a resumed one.
    {"sign", "server signatures (full TLS handshakes)", ~r/EcdsaSigner.*Signer.*4sign/,
     ~r/EcdsaSigner as rustls::crypto::signer::Signer>::sign$/}
  ]

  @doc """
  The functions bin/calls (uprobes) and bin/instructions (callgrind's call counts) count per
  unit of work, in both macula_quic and raw Quinn: `{short name, label, regex on the mangled
  symbol (nm), regex on the demangled one (callgrind)}`.
  """
  def entry_points, do: @entry_points

  ## Sorting costs by component

  @components [
    "macula_quic (our crate)",
    "rustler",
    "Quinn",
    "TLS/crypto (rustls, ring)",
    "tokio",
    "other Rust (std, bytes, tracing)",
    "BEAM (VM, JIT code, scheduler busy-wait)",
    "kernel",
    "memcpy/memmove",
    "malloc/free",
    "other"
  ]

  @doc "The components `component/2` sorts code into, in report order."
  def components, do: @components

  # ring's assembly and its curve25519 C code carry no `ring` prefix.
  @crypto_asm ~r/^_*(ecp_nistz256|aesni|_?aes_|gcm_|sha(256|512)_block|x25519|fe_|ge_|table_select|chacha|poly1305)/

  @doc """
  Which component a function belongs to, from its (demangled) symbol and the object it is in:
  one of `components/0`. bin/profile (perf samples) and bin/instructions (callgrind's
  instruction counts) sort their costs with it.
  """
  def component(sym, dso) do
    s = String.trim_leading(sym, "<")

    cond do
      dso =~ "kernel" ->
        "kernel"

      String.starts_with?(s, "macula_quic::") ->
        "macula_quic (our crate)"

      String.starts_with?(s, "rustler::") ->
        "rustler"

      String.starts_with?(s, ["quinn::", "quinn_proto::", "quinn_udp::"]) ->
        "Quinn"

      String.starts_with?(s, ["ring", "rustls::"]) or s =~ @crypto_asm ->
        "TLS/crypto (rustls, ring)"

      String.starts_with?(s, "tokio::") ->
        "tokio"

      sym =~ ~r/mem(move|cpy|set)/ ->
        "memcpy/memmove"

      # glibc's malloc, and mimalloc's (the NIF's allocator on Linux: `mi_*`, `_mi_*`).
      sym =~ ~r/malloc|free|_int_|realloc|unlink_chunk|tcache/ or sym =~ ~r/^_*mi_/ ->
        "malloc/free"

      sym =~ ~r/quinn/ ->
        "Quinn"

      sym =~ ~r/macula_quic::/ ->
        "macula_quic (our crate)"

      dso =~ ~r/beam\.(smp|emu)|memfd:vmem|erts-/ ->
        "BEAM (VM, JIT code, scheduler busy-wait)"

      dso =~ ~r/libmacula_quic|quinn_baseline/ ->
        "other Rust (std, bytes, tracing)"

      true ->
        "other"
    end
  end

  ## Certificates

  @doc """
  A self-signed ECDSA P-256 certificate for "localhost"/127.0.0.1 (PEM files in `dir`), used by
  every implementation: macula_quic (certfile/keyfile), the Quinn baseline and OTP :ssl.
  """
  def make_cert(dir) do
    File.mkdir_p!(dir)
    cert = Path.join(dir, "cert.pem")
    key = Path.join(dir, "key.pem")

    openssl? =
      System.find_executable("openssl") != nil and
        match?(
          {_, 0},
          System.cmd(
            "openssl",
            ~w(req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30
               -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1
               -keyout #{key} -out #{cert}),
            stderr_to_stdout: true
          )
        )

    unless openssl? do
      # :public_key fallback: a self-signed P-256 root certificate.
      %{cert: der, key: ec_key} =
        :public_key.pkix_test_root_cert(~c"localhost", [{:key, {:namedCurve, :secp256r1}}])

      File.write!(cert, :public_key.pem_encode([{:Certificate, der, :not_encrypted}]))
      key_der = :public_key.der_encode(:ECPrivateKey, ec_key)
      File.write!(key, :public_key.pem_encode([{:ECPrivateKey, key_der, :not_encrypted}]))
    end

    %{certfile: cert, keyfile: key, via: if(openssl?, do: "openssl", else: "public_key")}
  end

  ## Machine

  @doc "`machine/0` in one line, for the reports of bin/profile and bin/phases."
  def machine_line do
    m = machine()

    "Machine: #{m.nproc} CPUs (#{m.cpu_model}), Linux #{m.kernel}, cpuidle #{m.cpuidle}; " <>
      "OTP #{m.otp}, Elixir #{m.elixir}, #{m.rustc}."
  end

  def machine do
    cpu =
      case File.read("/proc/cpuinfo") do
        {:ok, s} ->
          case Regex.run(~r/model name\s*:\s*(.+)/, s) do
            [_, m] -> String.trim(m)
            _ -> "unknown"
          end

        _ ->
          "unknown"
      end

    rustc =
      case System.find_executable("rustc") && System.cmd("rustc", ["--version"]) do
        {v, 0} -> String.trim(v)
        _ -> "unknown"
      end

    kernel =
      case File.read("/proc/sys/kernel/osrelease") do
        {:ok, s} -> String.trim(s)
        _ -> "unknown"
      end

    quinn =
      case File.read(Path.expand("../../native/macula_quic/Cargo.lock", __DIR__)) do
        {:ok, s} ->
          case Regex.run(~r/name = "quinn"\nversion = "([^"]+)"/, s) do
            [_, v] -> v
            _ -> "unknown"
          end

        _ ->
          "unknown"
      end

    mem_kb =
      case File.read("/proc/meminfo") do
        {:ok, s} -> with [_, kb] <- Regex.run(~r/MemTotal:\s+(\d+)/, s), do: String.to_integer(kb)
        _ -> 0
      end

    {cpuidle_line, halt_poll_ns} = cpuidle()

    %{
      nproc: cpus(),
      cpu_model: cpu,
      mem_total_gib: Float.round(mem_kb / 1_048_576, 1),
      kernel: kernel,
      otp: to_string(:erlang.system_info(:otp_release)),
      erts: to_string(:erlang.system_info(:version)),
      elixir: System.version(),
      rustc: rustc,
      quinn: quinn,
      cpuidle: cpuidle_line,
      halt_poll_ns: halt_poll_ns,
      schedulers: :erlang.system_info(:schedulers_online)
    }
  end

  @doc """
  The file that holds how long an idle vCPU of a KVM guest polls before it halts (the
  `haltpoll` cpuidle driver's `guest_halt_poll_ns`); `bin/rounds` writes it for its
  `halt_poll_ns` variants.
  """
  def halt_poll_file, do: "/sys/module/haltpoll/parameters/guest_halt_poll_ns"

  # How an idle CPU waits: the cpuidle driver and, for a KVM guest's `haltpoll` driver, how long
  # an idle vCPU polls before it halts (nil elsewhere). It moves the figures more than anything
  # of ours: with guest_halt_poll_ns=0 every wake-up of an idle vCPU goes through the host
  # (bench/README.md, "The second host").
  defp cpuidle do
    read = fn path ->
      case File.read(path) do
        {:ok, s} -> String.trim(s)
        _ -> nil
      end
    end

    case read.("/sys/devices/system/cpu/cpuidle/current_driver") do
      nil ->
        {"unknown", nil}

      "haltpoll" ->
        case Integer.parse(read.(halt_poll_file()) || "") do
          {ns, ""} -> {"haltpoll (guest_halt_poll_ns=#{ns})", ns}
          _ -> {"haltpoll (guest_halt_poll_ns=?)", nil}
        end

      driver ->
        {driver, nil}
    end
  end

  @doc "The CPUs this VM may use (all the host's when the OS does not say)."
  def cpus do
    case :erlang.system_info(:logical_processors_available) do
      :unknown -> :erlang.system_info(:logical_processors)
      n -> n
    end
  end

  ## JSON (OTP 25 has no :json; this encodes maps, lists, strings, numbers, atoms)

  def json(term), do: IO.iodata_to_binary(enc(term, 0))

  defp enc(nil, _), do: "null"
  defp enc(true, _), do: "true"
  defp enc(false, _), do: "false"
  defp enc(a, i) when is_atom(a), do: enc(Atom.to_string(a), i)
  defp enc(n, _) when is_integer(n), do: Integer.to_string(n)
  defp enc(f, _) when is_float(f), do: :erlang.float_to_binary(f, [:short])

  defp enc(s, _) when is_binary(s) do
    escaped =
      s
      |> String.replace("\\", "\\\\")
      |> String.replace("\"", "\\\"")
      |> String.replace("\n", "\\n")

    [?", escaped, ?"]
  end

  defp enc(m, i) when is_map(m) do
    pad = String.duplicate("  ", i + 1)

    items =
      m
      |> Enum.sort_by(fn {k, _} -> to_string(k) end)
      |> Enum.map(fn {k, v} -> [pad, enc(to_string(k), i), ": ", enc(v, i + 1)] end)
      |> Enum.intersperse(",\n")

    if items == [],
      do: "{}",
      else: ["{\n", items, "\n", String.duplicate("  ", i), "}"]
  end

  defp enc(l, i) when is_list(l) do
    if Enum.all?(l, &(not is_map(&1) and not is_list(&1))) do
      ["[", Enum.intersperse(Enum.map(l, &enc(&1, i)), ", "), "]"]
    else
      pad = String.duplicate("  ", i + 1)

      [
        "[\n",
        Enum.intersperse(Enum.map(l, &[pad, enc(&1, i + 1)]), ",\n"),
        "\n",
        String.duplicate("  ", i),
        "]"
      ]
    end
  end

  @doc """
  The raw-Quinn baseline binary: `BENCH_QUINN` (bin/bench and bin/rounds set it to their
  private copy), else cargo's release build of `examples/quinn_baseline.rs`.
  """
  def quinn_path do
    System.get_env("BENCH_QUINN") ||
      Path.expand("../../native/macula_quic/target/release/examples/quinn_baseline", __DIR__)
  end

  @doc """
  Runs one workload of the raw-Quinn baseline (`quinn_baseline WORKLOAD cert=… key=…
  KEY=VALUE…`) and returns the figures it prints last (`parse_last_json/1`); raises when it
  fails.
  """
  def run_quinn(bin, workload, cert, params) do
    argv =
      [workload, "cert=#{cert.certfile}", "key=#{cert.keyfile}"] ++
        Enum.map(params, fn {k, v} -> "#{k}=#{v}" end)

    case System.cmd(bin, argv, stderr_to_stdout: true) do
      {out, 0} -> parse_last_json(out)
      {out, status} -> raise "quinn_baseline #{Enum.join(argv, " ")} failed (#{status}): #{out}"
    end
  end

  @doc """
  Decodes the last JSON object line in a program's output (the baseline and the memory script
  print other lines before it).
  """
  def parse_last_json(output) do
    output
    |> String.split("\n")
    |> Enum.filter(&String.starts_with?(&1, "{"))
    |> List.last()
    |> parse_flat_json()
  end

  @doc """
  Minor page faults of this OS process so far (`minflt`, field 10 of `/proc/self/stat`; 0 where
  there is no such file). Bulk transfers report them per MiB, as raw Quinn's baseline does: an
  allocator that keeps touching fresh memory shows there.
  """
  def minor_faults do
    # The command name (field 2) may hold spaces; the fields after its last ")" don't.
    with {:ok, stat} <- File.read("/proc/self/stat"),
         rest = stat |> String.split(")") |> List.last(),
         {n, _} <- Integer.parse(Enum.at(String.split(rest), 7, "")) do
      n
    else
      _ -> 0
    end
  end

  @doc "Decodes one flat JSON object line (numbers and strings only), as the baseline prints."
  def parse_flat_json(line) do
    Regex.scan(~r/"(\w+)":\s*("([^"]*)"|-?[0-9.eE+-]+)/, line)
    |> Map.new(fn
      [_, k, _, s] when s != "" -> {String.to_atom(k), s}
      [_, k, v | _] -> {String.to_atom(k), num(v)}
    end)
  end

  defp num(v) do
    case Integer.parse(v) do
      {i, ""} -> i
      _ -> elem(Float.parse(v), 0)
    end
  end

  @doc "Drops every message in the mailbox (between runs)."
  def flush do
    receive do
      _ -> flush()
    after
      0 -> :ok
    end
  end
end
