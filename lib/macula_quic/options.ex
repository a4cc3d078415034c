defmodule MaculaQuic.Options do
  @moduledoc false
  # Turns the options callers pass (a keyword/proplist or a map) into the map the NIF decodes.
  # The NIF checks every name and value; here we only reject shapes that are not options at all.

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
end
