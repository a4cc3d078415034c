defmodule MaculaQuic.Native.Download do
  @moduledoc false
  # HTTP(S) GET of release artifacts with OTP's :httpc (no Hex dependencies allowed).
  # Internal to the loader and `mix macula_quic.checksum`.
  #
  # - TLS: the peer is verified against the OS trust store (`:public_key.cacerts_get/0`,
  #   OTP 25+), or the PEM file in HEX_CACERTS_PATH when set, with an HTTPS hostname check.
  # - Proxies: HTTP_PROXY/http_proxy and HTTPS_PROXY/https_proxy (with user:password), and
  #   NO_PROXY/no_proxy. Loopback is never proxied.
  # - A dedicated :httpc profile, so proxy settings never leak into the host's default profile.
  # - Bounded retries with linear backoff on network errors and 5xx; other statuses (404)
  #   fail at once.
  # - The body is streamed, and the request gives up when nothing arrives for a while (a
  #   stall), not after a fixed time for the whole body: a slow link still finishes, a dead
  #   one does not hang the compile. The body's size is bounded.

  @profile :macula_quic_loader
  @default_max_retries 3
  @default_retry_delay_ms 1_000
  @default_stall_timeout_ms 60_000
  # A NIF artifact is a few MB; anything far larger is not one (a wrong URL, a proxy's page).
  @default_max_bytes 256 * 1024 * 1024
  @loopback ["localhost", "127.0.0.1", "::1"]

  @type error ::
          {:http_status, String.t(), non_neg_integer()}
          | {:http_failed, String.t(), term()}

  @type option ::
          {:max_retries, non_neg_integer()}
          | {:retry_delay_ms, non_neg_integer()}
          | {:env, %{optional(String.t()) => String.t()}}
          | {:cacerts, (() -> [term()])}
          | {:stall_timeout_ms, pos_integer()}
          | {:max_bytes, pos_integer()}

  @doc """
  Fetches `url` and returns its body. Options: `:max_retries` (default 3),
  `:retry_delay_ms` (backoff unit, default 1000; attempt n waits n units) and `:env`
  (where proxy variables and HEX_CACERTS_PATH are read, default `System.get_env/0`).
  `:cacerts` (for tests) replaces `:public_key.cacerts_get/0`, the OS trust store. A trust
  store that cannot be loaded, and a server the TLS check refuses, fail at once (no retry):
  `{:http_failed, url, {:no_cacerts, why}}`, `{:http_failed, url, {:failed_connect, ...}}`.

  An attempt fails with `{:http_failed, url, {:stalled, ms}}` when no part of the answer
  arrives for `:stall_timeout_ms` (default 60 s; retried like any network error), and with
  `{:http_failed, url, {:too_large, max}}` when the body passes `:max_bytes` (default
  256 MiB; not retried): at once when the server states a larger size, else once that much
  has arrived. There is no limit on the whole download's time.
  """
  @spec get(String.t(), [option()]) :: {:ok, binary()} | {:error, error()}
  def get(url, opts \\ []) do
    env = Keyword.get_lazy(opts, :env, &System.get_env/0)
    max_retries = Keyword.get(opts, :max_retries, @default_max_retries)
    delay = Keyword.get(opts, :retry_delay_ms, @default_retry_delay_ms)

    cacerts = Keyword.get(opts, :cacerts, &:public_key.cacerts_get/0)

    limits = %{
      stall_ms: Keyword.get(opts, :stall_timeout_ms, @default_stall_timeout_ms),
      max_bytes: Keyword.get(opts, :max_bytes, @default_max_bytes)
    }

    with :ok <- start_client(env) do
      attempt(fn -> request(url, env, cacerts, limits) end, 0, max_retries, delay)
    end
  end

  defp attempt(request, count, max_retries, delay) do
    case request.() do
      {:ok, body} ->
        {:ok, body}

      {:error, reason} = error ->
        if count < max_retries and retryable?(reason) do
          Process.sleep((count + 1) * delay)
          attempt(request, count + 1, max_retries, delay)
        else
          error
        end
    end
  end

  defp retryable?({:http_status, _url, status}), do: status >= 500
  defp retryable?({:http_failed, _url, {:no_cacerts, _}}), do: false
  defp retryable?({:http_failed, _url, {:too_large, _}}), do: false
  defp retryable?({:http_failed, _url, reason}), do: not tls_refused?(reason)

  # The TLS handshake was refused (an unknown CA, a wrong host name): trying again changes
  # nothing.
  defp tls_refused?({:failed_connect, parts}) when is_list(parts),
    do: Enum.any?(parts, &match?({_, _, {:tls_alert, _}}, &1))

  defp tls_refused?(_reason), do: false

  defp request(url, env, cacerts, limits) do
    with {:ok, ssl} <- ssl_options(url, env, cacerts) do
      # No :timeout for the whole request: `receive_body/4` gives up on a stall instead.
      http_options = [ssl: ssl, connect_timeout: 15_000, timeout: :infinity] ++ proxy_auth(env)

      # In a process of its own, which :httpc streams the body to: once a request is cancelled
      # (a stall, a body too large) OTP 25's :httpc may still send parts of it, which must
      # not pile up in the caller's mailbox (the compile's, or the checksum task's, which
      # makes many downloads). Sent to a process that has exited, they are dropped.
      caller = self()

      {pid, ref} =
        spawn_monitor(fn -> exit({:shutdown, fetch(url, http_options, limits, caller)}) end)

      receive do
        {:DOWN, ^ref, :process, ^pid, {:shutdown, result}} -> result
        {:DOWN, ^ref, :process, ^pid, reason} -> {:error, {:http_failed, url, {:exit, reason}}}
      end
    else
      {:error, reason} -> {:error, {:http_failed, url, reason}}
    end
  end

  # The attempt ends with its caller: nobody would take the body.
  defp fetch(url, http_options, limits, caller) do
    options = [sync: false, stream: :self, body_format: :binary]
    limits = Map.put(limits, :caller, Process.monitor(caller))

    case :httpc.request(:get, {String.to_charlist(url), []}, http_options, options, @profile) do
      {:ok, id} -> receive_body(id, url, limits, {[], 0})
      {:error, reason} -> {:error, {:http_failed, url, reason}}
    end
  end

  # :httpc streams a 200's body to this process in parts (`stream_start`, `stream`...,
  # `stream_end`); any other answer, or an error, comes whole in one message.
  defp receive_body(id, url, %{stall_ms: stall_ms, max_bytes: max} = limits, {parts, size}) do
    caller = limits.caller

    receive do
      {:DOWN, ^caller, :process, _, _} ->
        cancel(id)
        {:error, {:http_failed, url, :caller_exited}}

      {:http, {^id, :stream_start, headers}} ->
        if declared_size(headers) > max do
          cancel(id)
          {:error, {:http_failed, url, {:too_large, max}}}
        else
          receive_body(id, url, limits, {parts, size})
        end

      {:http, {^id, :stream, part}} when size + byte_size(part) > max ->
        cancel(id)
        {:error, {:http_failed, url, {:too_large, max}}}

      {:http, {^id, :stream, part}} ->
        receive_body(id, url, limits, {[part | parts], size + byte_size(part)})

      {:http, {^id, :stream_end, _headers}} ->
        {:ok, parts |> Enum.reverse() |> IO.iodata_to_binary()}

      {:http, {^id, {{_, 200, _}, _headers, body}}} when byte_size(body) > max ->
        {:error, {:http_failed, url, {:too_large, max}}}

      {:http, {^id, {{_, 200, _}, _headers, body}}} ->
        {:ok, body}

      {:http, {^id, {{_, status, _}, _headers, _body}}} ->
        {:error, {:http_status, url, status}}

      {:http, {^id, {:error, reason}}} ->
        {:error, {:http_failed, url, reason}}
    after
      stall_ms ->
        cancel(id)
        {:error, {:http_failed, url, {:stalled, stall_ms}}}
    end
  end

  # What :httpc still sends for `id` goes to this process, which is about to exit (see
  # `request/4`).
  defp cancel(id), do: :ok = :httpc.cancel_request(id, @profile)

  # The body's size as the server states it (Content-Length), 0 if it does not.
  defp declared_size(headers) do
    with {_, value} <- List.keyfind(headers, ~c"content-length", 0),
         {size, ""} <- Integer.parse(to_string(value)) do
      size
    else
      _ -> 0
    end
  end

  defp start_client(env) do
    with {:ok, _} <- Application.ensure_all_started(:inets),
         {:ok, _} <- Application.ensure_all_started(:ssl),
         :ok <- start_profile() do
      :httpc.set_options(proxy_options(env), @profile)
    else
      {:error, reason} -> {:error, {:http_failed, "(client start)", reason}}
    end
  end

  # A fresh profile for every `get/2`: proxy settings cannot be unset on a running :httpc
  # profile, and each call must see exactly the proxies of its own `env`.
  defp start_profile do
    _ = :inets.stop(:httpc, @profile)

    case :inets.start(:httpc, profile: @profile) do
      {:ok, _pid} -> :ok
      {:error, reason} -> {:error, reason}
    end
  end

  defp ssl_options(url, env, cacerts) do
    if String.starts_with?(url, "https:") do
      with {:ok, ca} <- ca_options(env, cacerts) do
        {:ok,
         [
           verify: :verify_peer,
           depth: 4,
           customize_hostname_check: [
             match_fun: :public_key.pkix_verify_hostname_match_fun(:https)
           ]
         ] ++ ca}
      end
    else
      {:ok, []}
    end
  end

  defp ca_options(env, cacerts) do
    case Map.get(env, "HEX_CACERTS_PATH") do
      path when is_binary(path) and path != "" ->
        # Checked here: httpc would report a missing file as a failed connect, retried.
        if File.regular?(path),
          do: {:ok, [cacertfile: String.to_charlist(path)]},
          else: {:error, {:no_cacerts, "HEX_CACERTS_PATH names #{path}, which is not a file"}}

      _ ->
        # OTP 25's cacerts_get/0 raises when the OS has no trust store to load (a container
        # without ca-certificates): say so rather than crash the compile. Before OTP 25 there
        # is no such call at all.
        try do
          {:ok, [cacerts: cacerts.()]}
        catch
          :error, :undef ->
            {:error, {:no_cacerts, "OTP 25 or later is needed to read the OS trust store"}}

          kind, why ->
            {:error, {:no_cacerts, Exception.format_banner(kind, why)}}
        end
    end
  end

  @doc """
  The :httpc profile options for the proxies named in `env` (HTTP_PROXY, HTTPS_PROXY,
  NO_PROXY, upper or lower case).
  """
  @spec proxy_options(%{optional(String.t()) => String.t()}) :: keyword()
  def proxy_options(env) do
    no_proxy = no_proxy_hosts(env)

    [
      proxy: proxy(first_env(env, ["HTTP_PROXY", "http_proxy"]), no_proxy),
      https_proxy: proxy(first_env(env, ["HTTPS_PROXY", "https_proxy"]), no_proxy)
    ]
    |> Enum.reject(fn {_key, value} -> is_nil(value) end)
  end

  defp proxy(nil, _no_proxy), do: nil

  defp proxy(url, no_proxy) do
    case proxy_uri(url) do
      %URI{host: host, port: port} when is_binary(host) and host != "" ->
        {{String.to_charlist(host), port || 80}, no_proxy}

      _ ->
        nil
    end
  end

  @doc """
  The per-request :httpc option with the proxy credentials from the proxy URLs in `env`
  (`http://user:password@host:port`). :httpc takes one for both proxies; the HTTPS proxy's
  wins, as downloads are HTTPS.
  """
  @spec proxy_auth(%{optional(String.t()) => String.t()}) :: keyword()
  def proxy_auth(env) do
    [["HTTP_PROXY", "http_proxy"], ["HTTPS_PROXY", "https_proxy"]]
    |> Enum.map(&first_env(env, &1))
    |> Enum.reject(&is_nil/1)
    |> Enum.map(&proxy_uri(&1).userinfo)
    |> Enum.reject(&is_nil/1)
    |> List.last()
    |> case do
      nil -> []
      userinfo -> [proxy_auth: userinfo_pair(userinfo)]
    end
  end

  # A proxy given without a scheme (`proxy.corp:3128`, as curl accepts) is an HTTP proxy:
  # parsed as it is, its host would be read as a scheme and the proxy ignored.
  defp proxy_uri(url) do
    if String.contains?(url, "://"), do: URI.parse(url), else: URI.parse("http://" <> url)
  end

  defp userinfo_pair(userinfo) do
    case String.split(userinfo, ":", parts: 2) do
      [user, password] -> {decode(user), decode(password)}
      [user] -> {decode(user), ~c""}
    end
  end

  defp decode(part), do: part |> URI.decode() |> String.to_charlist()

  defp no_proxy_hosts(env) do
    (first_env(env, ["NO_PROXY", "no_proxy"]) || "")
    |> String.split(",", trim: true)
    |> Enum.map(&String.trim/1)
    |> Enum.reject(&(&1 == ""))
    |> Enum.map(&no_proxy_pattern/1)
    |> Kernel.++(@loopback)
    |> Enum.uniq()
    |> Enum.map(&String.to_charlist/1)
  end

  # NO_PROXY's ".example.com" means the domain and its subdomains; :httpc wants "*.example.com".
  defp no_proxy_pattern("." <> domain), do: "*." <> domain
  defp no_proxy_pattern(host), do: host

  defp first_env(env, names) do
    Enum.find_value(names, fn name ->
      case Map.get(env, name) do
        value when is_binary(value) and value != "" -> value
        _ -> nil
      end
    end)
  end
end
