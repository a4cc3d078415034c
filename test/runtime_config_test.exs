defmodule MaculaQuic.RuntimeConfigTest do
  # The tokio runtime's size comes from the application env when the NIF loads. The NIF loads
  # once per VM, so each case runs in a fresh VM started with only our compiled app on its path.
  use ExUnit.Case, async: true

  @ebin Path.join(Mix.Project.build_path(), "lib/macula_quic/ebin")

  # Starts a VM, sets the env (unless nil), makes one connection so the runtime exists, and
  # returns the runtime's worker count and anything logged.
  defp workers_with(setting) do
    put =
      if setting == nil,
        do: "",
        else: "Application.put_env(:macula_quic, :runtime_workers, #{inspect(setting)});"

    script = """
    #{put}
    {:ok, l} = MaculaQuic.listen("127.0.0.1", 0, alpn: ["t"])
    {:ok, {_, port}} = MaculaQuic.sockname(l)
    {:ok, _c} = MaculaQuic.connect("127.0.0.1", port, [alpn: ["t"], verify: :none], 5_000)
    IO.puts("workers=" <> Integer.to_string(MaculaQuic.native_counts().runtime_workers))
    """

    {out, 0} = System.cmd("elixir", ["-pa", @ebin, "-e", script], stderr_to_stdout: true)
    [_, n] = Regex.run(~r/workers=(\d+)/, out)
    {String.to_integer(n), out}
  end

  test "config :macula_quic, runtime_workers: n sizes the runtime" do
    assert {3, _} = workers_with(3)
    assert {1, _} = workers_with(1)
  end

  test "without the setting the runtime is sized for the host (one per core, at most 4)" do
    expected = System.schedulers_online() |> min(4) |> max(1)
    assert {^expected, _} = workers_with(nil)
  end

  test "a bad setting is ignored with a warning" do
    expected = System.schedulers_online() |> min(4) |> max(1)
    assert {^expected, out} = workers_with(:lots)
    assert out =~ "ignoring runtime_workers :lots"
  end
end
