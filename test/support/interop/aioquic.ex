defmodule MaculaQuic.Test.Aioquic do
  @moduledoc """
  Drives aioquic peers (test/support/interop/peer.py) for the interop tests.

  The Python interpreter is the one in `.venv-interop`, made by `bin/setup-interop`; `ensure!/0`
  runs that script when aioquic is missing and raises when it still cannot be imported, so the
  interop tests fail rather than skip.

  A peer is a port running peer.py: it prints JSON events line by line and takes JSON commands
  on stdin. `await/3` waits (bounded) for the first event matching a pattern, keeping the
  others for later calls, so events can be awaited in any order. A peer dies with the port:
  peer.py exits at the end of its stdin, and `start/2` also kills it from an `on_exit`
  callback.
  """

  import ExUnit.Assertions

  @root Path.expand("../../..", __DIR__)
  @venv Path.join(@root, ".venv-interop")
  @scripts Path.join(@root, "test/support/interop")
  @default_timeout 10_000

  defstruct [:port, :os_pid, :role, :listen_port]

  @doc "The venv's Python, with aioquic importable; installs it with bin/setup-interop if needed."
  def ensure! do
    case :persistent_term.get({__MODULE__, :python}, nil) do
      nil ->
        python = Path.join(@venv, "bin/python")

        unless importable?(python) do
          {out, status} =
            System.cmd(Path.join(@root, "bin/setup-interop"), [], stderr_to_stdout: true)

          IO.write(out)

          unless status == 0 and importable?(python) do
            raise """
            aioquic is not available for the interop tests: bin/setup-interop exited with \
            #{status} and #{python} cannot import aioquic. These tests need Python 3 with \
            venv and pip, and access to PyPI. Output:
            #{out}
            """
          end
        end

        {version, 0} = System.cmd(python, ["-c", "import aioquic; print(aioquic.__version__)"])
        :persistent_term.put({__MODULE__, :python}, python)
        :persistent_term.put({__MODULE__, :version}, String.trim(version))
        python

      python ->
        python
    end
  end

  @doc "The aioquic version in use."
  def version do
    ensure!()
    :persistent_term.get({__MODULE__, :version})
  end

  defp importable?(python) do
    File.exists?(python) and
      match?({_, 0}, System.cmd(python, ["-c", "import aioquic"], stderr_to_stdout: true))
  end

  @doc """
  Writes the test certificates into `dir` (see certs.py) and returns a map of their paths:
  `:ca`, `:other_ca`, `:cert`, `:key`, `:wrong_name_cert`, `:wrong_name_key`.
  """
  def certs!(dir) do
    {out, status} =
      System.cmd(ensure!(), [Path.join(@scripts, "certs.py"), dir], stderr_to_stdout: true)

    assert status == 0, "certs.py failed:\n#{out}"

    %{
      ca: Path.join(dir, "ca.pem"),
      other_ca: Path.join(dir, "other_ca.pem"),
      cert: Path.join(dir, "server.pem"),
      key: Path.join(dir, "server.key"),
      wrong_name_cert: Path.join(dir, "wrong_name.pem"),
      wrong_name_key: Path.join(dir, "wrong_name.key")
    }
  end

  @doc """
  Starts an aioquic server on `host` (port 0) and waits until it listens.

  Options: `:alpn` (list), `:cert`, `:key`, `:echo` (boolean), `:datagrams` (boolean: accept
  datagrams).
  """
  def server(host, opts) do
    args =
      ["server", "--host", host, "--alpn", Enum.join(Keyword.fetch!(opts, :alpn), ",")] ++
        ["--cert", Keyword.fetch!(opts, :cert), "--key", Keyword.fetch!(opts, :key)] ++
        flag_arg("--echo", opts[:echo]) ++ flag_arg("--datagrams", opts[:datagrams])

    peer = start(:server, args)
    %{"port" => port} = await(peer, %{"event" => "listening"})
    %{peer | listen_port: port}
  end

  @doc """
  Starts an aioquic client towards `host:port`. It does not wait for the handshake: await
  `%{"event" => "connected"}` or `%{"event" => "connect_failed"}`.

  Options: `:alpn` (list), `:cafile` (verify the server against it; without it, no
  verification), `:server_name`, `:datagrams` (boolean: accept datagrams).
  """
  def client(host, port, opts) do
    args =
      ["client", "--host", host, "--port", to_string(port)] ++
        ["--alpn", Enum.join(Keyword.fetch!(opts, :alpn), ",")] ++
        opt_arg("--cafile", opts[:cafile]) ++
        opt_arg("--server-name", opts[:server_name]) ++
        flag_arg("--datagrams", opts[:datagrams])

    start(:client, args)
  end

  defp opt_arg(_name, nil), do: []
  defp opt_arg(name, value), do: [name, value]

  defp flag_arg(name, true), do: [name]
  defp flag_arg(_name, _), do: []

  defp start(role, args) do
    port =
      Port.open({:spawn_executable, ensure!()}, [
        :binary,
        :exit_status,
        :use_stdio,
        {:line, 1_048_576},
        args: ["-u", Path.join(@scripts, "peer.py") | args]
      ])

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    ExUnit.Callbacks.on_exit(fn -> kill(os_pid) end)
    %__MODULE__{port: port, os_pid: os_pid, role: role}
  end

  @doc "Ends a peer now (closing its stdin; peer.py exits at once)."
  def stop(%__MODULE__{port: port, os_pid: os_pid}) do
    try do
      Port.close(port)
    rescue
      ArgumentError -> :ok
    end

    kill(os_pid)
  end

  defp kill(os_pid) do
    # peer.py exits when its stdin closes (with the port); this is for a peer that hangs.
    System.cmd("kill", ["-9", to_string(os_pid)], stderr_to_stdout: true)
    :ok
  end

  @doc "Sends a command (a map) to the peer."
  def cmd(%__MODULE__{port: port}, command) when is_map(command) do
    Port.command(port, [encode(command), ?\n])
    :ok
  end

  @doc """
  Sends `command` and waits for its answer: the next `opened`, `sent`, `ok` or `error` event.
  Raises on `error`.
  """
  def call(peer, command, timeout \\ @default_timeout) do
    cmd(peer, command)

    case await(peer, &(&1["event"] in ["opened", "sent", "ok", "error"]), timeout) do
      %{"event" => "error", "error" => error} -> flunk("peer.py: #{inspect(command)}: #{error}")
      answer -> answer
    end
  end

  @doc """
  Waits up to `timeout` ms for the first event that matches `pattern` — a map whose pairs the
  event must contain, or a one-argument predicate — and returns it. Events that do not match
  are kept for later calls. Fails the test on timeout or when the peer exits.
  """
  def await(%__MODULE__{port: port} = peer, pattern, timeout \\ @default_timeout) do
    match? = matcher(pattern)
    pending = Process.get({__MODULE__, port}, [])

    case Enum.split_while(pending, &(not match?.(&1))) do
      {before, [event | rest]} ->
        Process.put({__MODULE__, port}, before ++ rest)
        event

      {_, []} ->
        deadline = System.monotonic_time(:millisecond) + timeout
        wait(peer, match?, pattern, deadline, "")
    end
  end

  defp wait(%__MODULE__{port: port} = peer, match?, pattern, deadline, partial) do
    left = max(deadline - System.monotonic_time(:millisecond), 0)

    receive do
      {^port, {:data, {:noeol, chunk}}} ->
        wait(peer, match?, pattern, deadline, partial <> chunk)

      {^port, {:data, {:eol, line}}} ->
        event = decode_line(partial <> line)

        if match?.(event) do
          event
        else
          Process.put({__MODULE__, port}, Process.get({__MODULE__, port}, []) ++ [event])
          wait(peer, match?, pattern, deadline, "")
        end

      {^port, {:exit_status, status}} ->
        flunk(
          "aioquic #{peer.role} exited (status #{status}) while awaiting #{inspect(pattern)}; " <>
            "its events: #{inspect(events(peer))}"
        )
    after
      left ->
        flunk(
          "aioquic #{peer.role}: no event matching #{inspect(pattern)} within the timeout; " <>
            "its events: #{inspect(events(peer))}"
        )
    end
  end

  @doc "Events received and not yet consumed by `await/3`."
  def events(%__MODULE__{port: port}), do: Process.get({__MODULE__, port}, [])

  defp matcher(fun) when is_function(fun, 1), do: fun

  defp matcher(map) when is_map(map) do
    fn event -> Enum.all?(map, fn {k, v} -> Map.fetch(event, k) == {:ok, v} end) end
  end

  defp decode_line(line) do
    case decode(line) do
      {:ok, %{} = event} -> event
      _ -> %{"event" => "raw", "line" => line}
    end
  end

  ## A small JSON codec (no Hex dependencies in this project): enough for peer.py's lines.

  @doc false
  def encode(map) when is_map(map) do
    [
      "{",
      map
      |> Enum.map(fn {k, v} -> [encode(to_string(k)), ":", encode(v)] end)
      |> Enum.intersperse(","),
      "}"
    ]
  end

  def encode(list) when is_list(list),
    do: ["[", list |> Enum.map(&encode/1) |> Enum.intersperse(","), "]"]

  def encode(true), do: "true"
  def encode(false), do: "false"
  def encode(nil), do: "null"
  def encode(n) when is_integer(n) or is_float(n), do: to_string(n)
  def encode(atom) when is_atom(atom), do: encode(Atom.to_string(atom))

  def encode(string) when is_binary(string) do
    escaped =
      for <<c::utf8 <- string>>, into: "" do
        case c do
          ?" ->
            "\\\""

          ?\\ ->
            "\\\\"

          c when c < 0x20 or c > 0x7E ->
            "\\u" <> String.pad_leading(Integer.to_string(c, 16), 4, "0")

          c ->
            <<c>>
        end
      end

    [?", escaped, ?"]
  end

  @doc false
  def decode(text) do
    case value(skip(text)) do
      {value, rest} -> if skip(rest) == "", do: {:ok, value}, else: :error
      :error -> :error
    end
  rescue
    _ -> :error
  end

  defp skip(<<c, rest::binary>>) when c in ~c" \t\r\n", do: skip(rest)
  defp skip(rest), do: rest

  defp value("{" <> rest), do: object(skip(rest), %{})
  defp value("[" <> rest), do: array(skip(rest), [])
  defp value("\"" <> rest), do: string(rest, [])
  defp value("true" <> rest), do: {true, rest}
  defp value("false" <> rest), do: {false, rest}
  defp value("null" <> rest), do: {nil, rest}

  defp value(text) do
    case Regex.run(~r/^-?\d+(\.\d+)?([eE][-+]?\d+)?/, text) do
      [num | frac] ->
        rest = binary_part(text, byte_size(num), byte_size(text) - byte_size(num))

        if frac == [] do
          {String.to_integer(num), rest}
        else
          {elem(Float.parse(num), 0), rest}
        end

      nil ->
        :error
    end
  end

  defp object("}" <> rest, acc), do: {acc, rest}

  defp object("\"" <> rest, acc) do
    {key, rest} = string(rest, [])
    ":" <> rest = skip(rest)
    {val, rest} = value(skip(rest))
    acc = Map.put(acc, key, val)

    case skip(rest) do
      "," <> rest -> object(skip(rest), acc)
      "}" <> rest -> {acc, rest}
    end
  end

  defp array("]" <> rest, acc), do: {Enum.reverse(acc), rest}

  defp array(text, acc) do
    {val, rest} = value(text)

    case skip(rest) do
      "," <> rest -> array(skip(rest), [val | acc])
      "]" <> rest -> {Enum.reverse([val | acc]), rest}
    end
  end

  defp string("\"" <> rest, acc), do: {IO.iodata_to_binary(Enum.reverse(acc)), rest}

  defp string("\\u" <> <<hex::binary-size(4), rest::binary>>, acc),
    do: string(rest, [<<String.to_integer(hex, 16)::utf8>> | acc])

  defp string("\\" <> <<c, rest::binary>>, acc) do
    char =
      case c do
        ?n -> "\n"
        ?t -> "\t"
        ?r -> "\r"
        ?b -> "\b"
        ?f -> "\f"
        c -> <<c>>
      end

    string(rest, [char | acc])
  end

  defp string(<<c, rest::binary>>, acc), do: string(rest, [<<c>> | acc])
end
