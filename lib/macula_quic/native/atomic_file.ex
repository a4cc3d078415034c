defmodule MaculaQuic.Native.AtomicFile do
  @moduledoc false
  # Writes a file whole or not at all: the content goes to a temporary file beside the
  # destination, which is then renamed over it. A VM that has the old library mapped keeps
  # its copy, and a reader never sees half a file.
  #
  # Why the temporary name is the OS process's pid plus random bytes, opened exclusively:
  # two compiles of the same project may run at once (an editor's language server and a
  # terminal), in separate VMs, and `System.unique_integer/1` starts over in each VM, so its
  # names collided: one VM renamed the shared temporary file away under the other, whose own
  # rename then failed with `:enoent` (4 installs in 60 with two VMs at once). An exclusive
  # open also refuses a file or link someone planted at that name in a shared cache
  # directory.

  @typedoc "Why a write failed: the path that could not be written, and the OS's reason."
  @type error :: {:write_failed, Path.t(), term()}

  @doc """
  Makes `path` hold exactly `content` (creating its directory), or leaves it as it was.
  """
  @spec write(Path.t(), iodata()) :: :ok | {:error, error()}
  def write(path, content) do
    tmp = temporary_name(path)

    with :ok <- wrap(File.mkdir_p(Path.dirname(path)), Path.dirname(path)),
         :ok <- wrap(write_new(tmp, content), tmp),
         :ok <- wrap(File.rename(tmp, path), path) do
      :ok
    else
      error ->
        # Best effort: the step's own error is the one to report.
        _ = File.rm(tmp)
        error
    end
  end

  @doc "A temporary name beside `path` that no other process, in this VM or another, uses."
  @spec temporary_name(Path.t()) :: Path.t()
  def temporary_name(path) do
    random = Base.url_encode64(:crypto.strong_rand_bytes(9), padding: false)
    "#{path}.#{System.pid()}.#{random}.tmp"
  end

  defp write_new(path, content) do
    case File.open(path, [:write, :exclusive, :binary]) do
      {:ok, device} ->
        result = IO.binwrite(device, content)
        closed = File.close(device)
        if result == :ok, do: closed, else: result

      error ->
        error
    end
  end

  defp wrap(:ok, _path), do: :ok
  defp wrap({:error, reason}, path), do: {:error, {:write_failed, path, reason}}
end
