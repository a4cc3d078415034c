defmodule MaculaQuic.Options do
  @moduledoc false
  # Turns the options callers pass (a keyword/proplist or a map) into the map the NIF decodes.
  # The NIF checks every name and value; here we only reject shapes that are not options at all,
  # and read the PEM files they name (see `read_pem_files/1`).

  @doc false
  @spec to_map(term()) :: {:ok, map()} | {:error, {:bad_option, term()}}
  def to_map(opts) when is_map(opts) do
    case Enum.find(Map.keys(opts), &(not is_atom(&1))) do
      nil -> {:ok, opts}
      key -> {:error, {:bad_option, key}}
    end
  end

  def to_map(opts) when is_list(opts), do: from_list(opts, %{})
  def to_map(other), do: {:error, {:bad_option, other}}

  defp from_list([], acc), do: {:ok, acc}
  # The first value for a key wins, as with :proplists.get_value/2.
  defp from_list([{key, value} | rest], acc) when is_atom(key),
    do: from_list(rest, Map.put_new(acc, key, value))

  defp from_list([key | rest], acc) when is_atom(key),
    do: from_list(rest, Map.put_new(acc, key, true))

  defp from_list([other | _], _acc), do: {:error, {:bad_option, other}}
  defp from_list(improper, _acc), do: {:error, {:bad_option, improper}}

  # PEM files are read here, by the calling process (the VM's file NIFs run on its dirty I/O
  # schedulers), not by the NIF on a normal scheduler, where a slow or hung file system would
  # hold up every process queued behind the call. The NIF gets each file's contents, or why it
  # could not be read, and reports that where it needs the file, as before: which error a call
  # with several faults reports is unchanged. A value that is not a path is left for the NIF to
  # refuse (`{:bad_option, name}`).
  @pem_keys [:certfile, :cert_file, :keyfile, :key_file, :cacertfile]
  # Real certificate chains and keys are a few KiB; a wrong path (a log file) is not read whole.
  @max_pem 1024 * 1024
  # As the NIF's strings: at most 4096 bytes (a binary) or code points (a charlist).
  @max_path 4096

  @doc false
  @spec read_pem_files(map()) :: map()
  def read_pem_files(map) do
    Enum.reduce(@pem_keys, map, fn key, acc ->
      with %{^key => value} <- acc, {:ok, path} <- path(value) do
        Map.put(acc, key, pem_file(path))
      else
        _ -> acc
      end
    end)
  end

  # The form the NIF takes: `{:"$macula_quic_pem", :ok, contents}` or
  # `{:"$macula_quic_pem", :error, why}`.
  defp pem_file(path) do
    case read_pem(path) do
      {:ok, pem} -> {:"$macula_quic_pem", :ok, pem}
      {:error, why} -> {:"$macula_quic_pem", :error, why}
    end
  end

  # The file is looked at before it is opened: opening a FIFO would wait for a writer, and a
  # device such as /dev/zero would never end. Reasons: :enoent, :eacces, :eisdir, :einval (not
  # a regular file), :too_large (over 1 MiB), :malformed (unreadable otherwise). `:raw`: the
  # calling process does the I/O itself (the VM's file NIFs run on its dirty I/O schedulers),
  # not the file server.
  defp read_pem(path) do
    if String.contains?(path, <<0>>) do
      {:error, :enoent}
    else
      case :file.read_file_info(path, [:raw]) do
        {:ok, info} -> read_checked(path, File.Stat.from_record(info))
        {:error, why} -> {:error, io_reason(why)}
      end
    end
  end

  defp read_checked(_path, %File.Stat{type: :directory}), do: {:error, :eisdir}
  defp read_checked(_path, %File.Stat{type: type}) when type != :regular, do: {:error, :einval}
  defp read_checked(_path, %File.Stat{size: size}) when size > @max_pem, do: {:error, :too_large}
  defp read_checked(path, _stat), do: read_at_most(path)

  # Bounded again while reading: the file may have grown since it was looked at.
  defp read_at_most(path) do
    case :file.open(path, [:read, :binary, :raw]) do
      {:ok, fd} ->
        try do
          read_chunks(fd, [], 0)
        after
          :file.close(fd)
        end

      {:error, why} ->
        {:error, io_reason(why)}
    end
  end

  defp read_chunks(fd, acc, size) do
    case :file.read(fd, @max_pem + 1 - size) do
      :eof -> {:ok, IO.iodata_to_binary(Enum.reverse(acc))}
      {:ok, data} when size + byte_size(data) > @max_pem -> {:error, :too_large}
      {:ok, data} -> read_chunks(fd, [data | acc], size + byte_size(data))
      {:error, why} -> {:error, io_reason(why)}
    end
  end

  # As the native code did: permission errors of both kinds are :eacces.
  defp io_reason(:enoent), do: :enoent
  defp io_reason(why) when why in [:eacces, :eperm], do: :eacces
  defp io_reason(_), do: :malformed

  defp path(bin) when is_binary(bin) do
    if byte_size(bin) <= @max_path and String.valid?(bin), do: {:ok, bin}, else: :error
  end

  defp path(list) when is_list(list) do
    if code_points?(list, 0), do: {:ok, List.to_string(list)}, else: :error
  end

  defp path(_), do: :error

  defp code_points?([], _n), do: true

  defp code_points?([c | rest], n)
       when n < @max_path and is_integer(c) and c in 0..0x10FFFF and c not in 0xD800..0xDFFF,
       do: code_points?(rest, n + 1)

  defp code_points?(_, _), do: false
end
