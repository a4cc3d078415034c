defmodule MaculaQuic.LoaderFixtures do
  @moduledoc false
  # Real release artifacts for the loader tests: gzip'd tarballs holding one library file
  # under its final name, made the way philss/rustler-precompiled-action makes them
  # (`tar -czf <name>.tar.gz <name>` with the system tar; :erl_tar when there is none).

  @doc "Bytes of the NIF library this test run built from source (priv/native)."
  @spec built_library!() :: binary()
  def built_library! do
    :macula_quic
    |> :code.priv_dir()
    |> List.to_string()
    |> Path.join(MaculaQuic.Native.__lib_path__() <> ".so")
    |> File.read!()
  end

  @doc "Writes `dir/<file_name>.tar.gz` holding `content` as `file_name`; returns its bytes."
  @spec tarball!(Path.t(), String.t(), binary()) :: binary()
  def tarball!(dir, file_name, content) do
    staging = Path.join(dir, ".staging-#{System.unique_integer([:positive])}")
    File.mkdir_p!(staging)
    File.write!(Path.join(staging, file_name), content)
    tarball = Path.join(dir, file_name <> ".tar.gz")

    try do
      create_tarball!(staging, file_name, tarball)
      File.read!(tarball)
    after
      File.rm_rf!(staging)
    end
  end

  defp create_tarball!(staging, file_name, tarball) do
    case System.find_executable("tar") do
      nil ->
        path = String.to_charlist(Path.join(staging, file_name))

        :ok =
          :erl_tar.create(String.to_charlist(tarball), [{String.to_charlist(file_name), path}], [
            :compressed
          ])

      tar ->
        {_, 0} =
          System.cmd(tar, ["-czf", tarball, file_name], cd: staging, stderr_to_stdout: true)
    end
  end

  @doc "Files (recursively) under `dir`; [] when it does not exist."
  @spec files_under(Path.t()) :: [Path.t()]
  def files_under(dir),
    do: Path.wildcard(Path.join(dir, "**/*"), match_dot: true) |> Enum.filter(&File.regular?/1)
end
