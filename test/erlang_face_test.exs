defmodule MaculaQuic.ErlangFaceTest do
  # The Erlang module :macula_quic is the same API as MaculaQuic: every scenario below runs
  # through both, with Erlang-style arguments (charlists, proplists, tuples) for :macula_quic.
  use ExUnit.Case, async: true

  alias MaculaQuic.Test.Certs

  @wait 5_000

  setup_all do
    dir = Certs.fresh_dir!("macula_quic_erlang_face")

    on_exit(fn -> File.rm_rf!(dir) end)
    {:ok, certs: Certs.generate!(dir)}
  end

  test ":macula_quic exports every public function of MaculaQuic, and nothing else" do
    public = fn mod ->
      mod.module_info(:exports)
      |> Enum.reject(fn {name, _} -> name in [:module_info, :__info__] end)
      |> MapSet.new()
    end

    assert public.(:macula_quic) == public.(MaculaQuic)
  end

  test "every export of both modules has a spec, and :macula_quic's match MaculaQuic's" do
    {:ok, erl} = Code.Typespec.fetch_specs(:macula_quic)
    {:ok, ex} = Code.Typespec.fetch_specs(MaculaQuic)
    erl = Map.new(erl)
    ex = Map.new(ex)

    for {name, arity} = fa <- :macula_quic.module_info(:exports),
        name not in [:module_info, :__info__] do
      assert Map.has_key?(erl, fa), ":macula_quic.#{name}/#{arity} has no spec"

      # MaculaQuic specs each function at its full arity (lower ones come from defaults): the
      # Erlang spec's arguments are the leading ones of the smallest full arity it covers.
      {_, ex_specs} =
        ex
        |> Enum.filter(fn {{n, a}, _} -> n == name and a >= arity end)
        |> Enum.min_by(fn {{_, a}, _} -> a end, fn -> flunk("MaculaQuic.#{name} has no spec") end)

      strip = fn spec, n ->
        {:"::", _, [{_, _, args}, ret]} = Code.Typespec.spec_to_quoted(name, spec)

        {Enum.take(args, n), ret}
        |> Macro.prewalk(fn
          {{:., _, [MaculaQuic, t]}, _, []} -> {t, [], []}
          {t, meta, args} when is_list(meta) -> {t, [], args}
          other -> other
        end)
      end

      assert Enum.map(erl[fa], &strip.(&1, arity)) == Enum.map(ex_specs, &strip.(&1, arity)),
             ":macula_quic.#{name}/#{arity}'s spec differs from MaculaQuic's"
    end
  end

  test "include/macula_quic.hrl's flags are the values of the flag functions" do
    pairs = [
      QUIC_STREAM_SHUTDOWN_FLAG_GRACEFUL: :stream_shutdown_graceful,
      QUIC_STREAM_SHUTDOWN_FLAG_ABORT_SEND: :stream_shutdown_abort_send,
      QUIC_STREAM_SHUTDOWN_FLAG_ABORT_RECEIVE: :stream_shutdown_abort_receive,
      QUIC_STREAM_SHUTDOWN_FLAG_ABORT: :stream_shutdown_abort,
      QUIC_STREAM_SHUTDOWN_FLAG_IMMEDIATE: :stream_shutdown_immediate,
      QUIC_CONNECTION_SHUTDOWN_FLAG_NONE: :connection_shutdown_none,
      QUIC_CONNECTION_SHUTDOWN_FLAG_SILENT: :connection_shutdown_silent,
      QUIC_SEND_FLAG_FIN: :send_flag_fin,
      QUICER_SEND_FLAG_SYNC: :send_flag_sync,
      QUIC_RECEIVE_FLAG_FIN: :recv_flag_fin
    ]

    hrl = Path.expand("../include/macula_quic.hrl", __DIR__)
    dir = Path.join(System.tmp_dir!(), "macula_quic_hrl_#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    src = Path.join(dir, "macula_quic_hrl_check.erl")
    macros = Enum.map_join(pairs, ", ", fn {macro, _} -> "?#{macro}" end)

    File.write!(src, """
    -module(macula_quic_hrl_check).
    -export([flags/0]).
    -include("#{hrl}").
    flags() -> [#{macros}].
    """)

    {:ok, mod, beam} = :compile.file(String.to_charlist(src), [:binary])
    {:module, ^mod} = :code.load_binary(mod, String.to_charlist(src), beam)
    File.rm_rf!(dir)

    assert mod.flags() == Enum.map(pairs, fn {_, fun} -> apply(:macula_quic, fun, []) end)
    :code.purge(mod)
    :code.delete(mod)
  end

  for mod <- [MaculaQuic, :macula_quic] do
    describe "#{inspect(mod)}" do
      @mod mod

      test "IPv4 and IPv6: accept, echo 1 MiB byte-exact, peername/sockname, getstat grows" do
        m = @mod

        for ip <- [~c"127.0.0.1", ~c"::1"] do
          {:ok, l} = m.listen(ip, 0, [{:alpn, [~c"t"]}])
          {:ok, {lip, port}} = m.sockname(l)
          assert lip == List.to_string(ip)
          :ok = m.async_accept(l, [])
          {:ok, c} = m.connect(ip, port, [{:alpn, [~c"t"]}, {:verify, :none}], @wait)
          assert_receive {:quic, :new_conn, sc, %{alpns: "t"}}, @wait
          :ok = m.handshake(sc)
          {:ok, {peer_ip, _}} = m.peername(sc)
          assert peer_ip == List.to_string(ip)

          {:ok, [send_oct: before]} = m.getstat(c, [:send_oct])
          :ok = m.async_accept_stream(sc, [{:active, true}])
          {:ok, s} = m.open_stream(c, [{:active, false}])
          data = :crypto.strong_rand_bytes(1_048_576)
          :ok = m.send(s, data, 4)
          assert_receive {:quic, :new_stream, ss, %{conn: ^sc, flags: 0}}, @wait
          echo_until_fin(m, ss)
          assert {:ok, ^data} = m.recv(s, byte_size(data), @wait)
          assert {:error, :peer_send_shutdown} = m.recv(s, 0, @wait)
          {:ok, [send_oct: after_echo]} = m.getstat(c, [:send_oct])
          assert after_echo - before > byte_size(data)

          :ok = m.close_connection(c)
          :ok = m.close_listener(l)
        end
      end

      test "error codes reach the peer: stream abort and connection shutdown" do
        m = @mod
        {c, sc, l} = pair(m)
        :ok = m.async_accept_stream(sc, [])
        {:ok, s} = m.open_stream(c, [])
        :ok = m.send(s, "x")
        assert_receive {:quic, :new_stream, ss, _}, @wait
        # ABORT = RESET_STREAM and STOP_SENDING, both with the code: the peer sees both.
        :ok = m.async_shutdown_stream(s, m.stream_shutdown_abort(), 77)
        assert_receive {:quic, :peer_send_aborted, ^ss, 77}, @wait
        assert_receive {:quic, :peer_receive_aborted, ^ss, 77}, @wait

        :ok = m.async_shutdown_connection(c, m.connection_shutdown_none(), 99)
        assert_receive {:quic, :shutdown, ^sc, 99}, @wait
        assert_receive {:quic, :closed, ^sc, _}, @wait
        :ok = m.close(l)
      end

      test "quicer's server flow: async_handshake sends connected to the owner, never after closed" do
        m = @mod
        {c, sc, l} = pair(m)
        test = self()

        # Called by a process that is not the owner: the owner gets the message.
        assert :ok = run_in(spawn(fn -> :ok end), fn -> m.async_handshake(sc) end)
        assert_receive {:quic, :connected, ^sc, %{is_resumed: false, alpns: "t"}}, @wait
        :ok = m.async_handshake(c)
        assert_receive {:quic, :connected, ^c, %{is_resumed: false, alpns: "t"}}, @wait

        # After a handover the new owner gets it. The heir stays until the end: its exit would
        # close `sc` (code 0), racing the client's own close below.
        heir =
          spawn(fn ->
            receive do
              :go -> send(test, {:heir_got, receive(do: (msg -> msg), after: (@wait -> :none))})
            end

            receive(do: (:stop -> :ok))
          end)

        on_exit(fn -> Process.exit(heir, :kill) end)

        :ok = m.controlling_process(sc, heir)
        :ok = m.async_handshake(sc)
        send(heir, :go)
        assert_receive {:heir_got, {:quic, :connected, ^sc, %{alpns: "t"}}}, @wait
        refute_received {:quic, :connected, ^sc, _}

        # Once the owner has heard closed: the reason, and no message.
        :ok = m.async_shutdown_connection(c, m.connection_shutdown_none(), 5)
        assert_receive {:quic, :closed, ^c, _}, @wait
        assert {:error, :closed} = m.async_handshake(c)
        refute_received {:quic, :connected, ^c, _}

        assert_raise ArgumentError, ~r/expected a connection handle/, fn ->
          m.async_handshake(l)
        end

        send(heir, :stop)
        :ok = m.close(l)
      end

      test "quicer's other names: close_stream/2,4, close_connection/4, async_close_connection/1,3" do
        m = @mod
        {c, sc, l} = pair(m)
        :ok = m.async_accept_stream(sc, [{:active, true}])

        # close_stream/2: graceful, waits for both directions (the peer finishes its side).
        {:ok, s1} = m.open_stream(c, [])
        :ok = m.send(s1, "a")
        assert_receive {:quic, :new_stream, ss1, _}, @wait
        assert_receive {:quic, "a", ^ss1, _}, @wait
        :ok = m.async_accept_stream(sc, [{:active, true}])
        closer = Task.async(fn -> m.close_stream(s1, @wait) end)
        assert_receive {:quic, :peer_send_shutdown, ^ss1, _}, @wait
        :ok = m.async_shutdown_stream(ss1)
        assert :ok = Task.await(closer, @wait)

        # close_stream/4: an abort with a code the peer sees, waiting for stream_closed.
        {:ok, s2} = m.open_stream(c, [])
        :ok = m.send(s2, "b")
        assert_receive {:quic, :new_stream, ss2, _}, @wait
        assert :ok = m.close_stream(s2, m.stream_shutdown_abort(), 31, @wait)
        assert_receive {:quic, :peer_send_aborted, ^ss2, 31}, @wait
        assert {:error, :badarg} = m.close_stream(s2, 99, 0, @wait)

        # close_connection/4 is shutdown_connection/4: the owner's closed is consumed.
        assert {:error, :badarg} = m.close_connection(c, 2, 0, @wait)
        assert :ok = m.close_connection(c, m.connection_shutdown_none(), 8, @wait)
        assert_receive {:quic, :shutdown, ^sc, 8}, @wait
        refute_received {:quic, :closed, ^c, _}

        # async_close_connection/1,3 return at once; the owner then hears closed.
        {c2, sc2, l2} = pair(m)
        :ok = m.async_close_connection(c2)
        assert_receive {:quic, :closed, ^c2, _}, @wait
        assert_receive {:quic, :shutdown, ^sc2, 0}, @wait
        {c3, sc3, l3} = pair(m)
        :ok = m.async_close_connection(c3, m.connection_shutdown_none(), 12)
        assert_receive {:quic, :closed, ^c3, _}, @wait
        assert_receive {:quic, :shutdown, ^sc3, 12}, @wait
        # close_listener/2: the address is free again once it returns (its connection closed).
        {:ok, {_, port}} = m.sockname(l)
        assert {:error, :badarg} = m.close_listener(l, -1)
        assert :ok = m.close_listener(l, @wait)
        assert {:ok, l4} = m.listen(~c"127.0.0.1", port, [{:alpn, [~c"t"]}])
        :ok = m.close_listener(l4)
        for x <- [l2, l3], do: :ok = m.close_listener(x, :infinity)
      end

      test "ownership: controlling_process (owner only) and handoff_stream without loss" do
        m = @mod
        {c, sc, l} = pair(m)
        test = self()
        other = spawn(fn -> receive(do: (:never -> :ok)) end)
        assert {:error, :not_owner} = run_in(other, fn -> m.controlling_process(c, other) end)

        :ok = m.async_accept_stream(sc, [{:active, true}])
        {:ok, s} = m.open_stream(c, [])
        for i <- 1..20, do: :ok = m.send(s, "#{i};")
        :ok = m.send(s, "", 4)
        assert_receive {:quic, :new_stream, ss, _}, @wait

        # handoff_done comes after every forwarded message (the heir looks once the handoff
        # is over), and wait_for_handoff/2 returns its data.
        heir =
          spawn(fn ->
            receive(do: (:go -> :ok))
            {:messages, msgs} = Process.info(self(), :messages)
            before = Enum.take_while(msgs, &(not match?({:handoff_done, ^ss, _}, &1)))
            forwarded = Enum.count(before, &match?({:quic, _, ^ss, _}, &1))
            {:ok, data} = m.wait_for_handoff(test, ss)
            send(test, {:heir_got, data, forwarded, collect(m, ss, [])})
          end)

        wait_until_queued(ss, 2)
        mine = queued(ss)
        :ok = m.handoff_stream(ss, heir, [{:handoff_data, {:job, 1}}])
        assert {:ok, ^heir} = m.get_stream_owner(ss)
        send(heir, :go)
        assert_receive {:heir_got, {:job, 1}, forwarded, got}, @wait
        assert forwarded >= mine
        assert got == Enum.map_join(1..20, &"#{&1};")

        # Without handoff_data, quicer's undefined; an old owner that exits instead of handing
        # over: owner_down.
        {:ok, s2} = m.open_stream(c, [])
        :ok = m.async_accept_stream(sc, [{:active, true}])
        :ok = m.send(s2, "x")
        assert_receive {:quic, :new_stream, ss2, _}, @wait

        waiter = fn from ->
          spawn(fn -> send(test, {:waited, m.wait_for_handoff(from, ss2)}) end)
        end

        w1 = waiter.(test)
        :ok = m.handoff_stream(ss2, w1)
        assert_receive {:waited, {:ok, :undefined}}, @wait
        {gone, ref} = spawn_monitor(fn -> :ok end)
        assert_receive {:DOWN, ^ref, _, _, _}, @wait
        waiter.(gone)
        assert_receive {:waited, {:error, :owner_down}}, @wait

        # To the owner itself: no forwarding (the messages stay as they are), handoff_done.
        {:ok, s3} = m.open_stream(c, [])
        :ok = m.async_accept_stream(sc, [{:active, true}])
        :ok = m.send(s3, "y")
        assert_receive {:quic, :new_stream, ss3, _}, @wait
        assert_receive {:quic, "y", ^ss3, _} = y, @wait
        send(self(), y)
        :ok = m.controlling_process(ss3, test)
        assert :ok = m.handoff_stream(ss3, test, [{:handoff_data, :mine}, {:active, :once}])
        assert {:ok, :mine} = m.wait_for_handoff(test, ss3)
        assert {:ok, :once} = m.getopt(ss3, :active)
        assert_received {:quic, "y", ^ss3, _}
        assert {:error, :not_owner} = run_in(self(), fn -> m.handoff_stream(ss, self()) end)

        # A handle given to its owner itself is still shut down when that owner exits.
        {:ok, {_, port}} = m.sockname(l)
        :ok = m.async_accept(l)

        spawn(fn ->
          {:ok, c2} = m.connect(~c"127.0.0.1", port, [{:alpn, [~c"t"]}, {:verify, :none}], @wait)
          :ok = m.controlling_process(c2, self())
        end)

        assert_receive {:quic, :new_conn, sc2, _}, @wait
        assert_receive {:quic, :shutdown, ^sc2, 0}, @wait

        assert_raise ArgumentError, ~r/expected a local pid/, fn ->
          m.wait_for_handoff(:me, ss)
        end

        assert_raise ArgumentError, ~r/expected a stream handle/, fn ->
          m.wait_for_handoff(test, c)
        end

        :ok = m.close(c)
        :ok = m.close(l)
      end

      test "quicer's names for the rest: start_stream, async_csend, async_send/3, getopt/3, owners, ..." do
        m = @mod
        {c, sc, l} = pair(m)
        test = self()

        # Owners, the handshake calls with options, levels.
        assert {:ok, ^test} = m.get_conn_owner(c)
        assert {:ok, ^test} = m.get_listener_owner(l)

        assert_raise ArgumentError, ~r/expected a connection handle/, fn ->
          m.get_conn_owner(l)
        end

        assert_raise ArgumentError, ~r/expected a listener handle/, fn ->
          m.get_listener_owner(c)
        end

        assert :ok = m.handshake(sc, [], @wait)
        assert {:error, {:bad_option, :certfile}} = m.handshake(sc, [{:certfile, ~c"x"}], @wait)
        assert {:error, :badarg} = m.handshake(sc, [], -1)
        assert {:error, {:bad_option, :alpn}} = m.async_handshake(sc, %{alpn: ["t"]})
        refute_received {:quic, :connected, ^sc, _}
        assert :ok = m.async_handshake(sc, %{})
        assert_receive {:quic, :connected, ^sc, %{alpns: "t"}}, @wait

        # start_stream/2 and async_send/3 with FIN: the peer gets the data, then the end.
        :ok = m.async_accept_stream(sc, [{:active, true}])
        {:ok, s1} = m.start_stream(c, %{active: false})
        assert {:ok, false} = m.getopt(s1, :active, false)
        assert :ok = m.setopt(s1, :active, :once, false)
        assert {:ok, :once} = m.getopt(s1, :active)
        assert {:error, {:bad_level, :quic_tls}} = m.getopt(s1, :active, :quic_tls)

        assert {:error, {:bad_level, :quic_configuration}} =
                 m.setopt(c, :x, 1, :quic_configuration)

        assert_raise ArgumentError, ~r/expected a stream or connection handle/, fn ->
          m.getopt(l, :active, :quic_tls)
        end

        :ok = m.async_send(s1, "one", m.send_flag_fin())
        assert_receive {:quic, :new_stream, ss1, %{flags: flags1}}, @wait
        refute m.is_unidirectional(flags1)
        assert {:ok, ^test} = m.get_stream_owner(ss1)
        assert_receive {:quic, "one", ^ss1, _}, @wait
        assert_receive {:quic, :peer_send_shutdown, ^ss1, _}, @wait
        refute_received {:quic, :send_complete, _, _}
        assert {:error, :closed} = m.async_send(s1, "more", 0)

        # async_csend/4: a unidirectional stream opened and written in one call.
        :ok = m.async_accept_stream(sc, [{:active, true}])
        {:ok, s2} = m.async_csend(c, ["two", ?!], [{:open_flag, 1}], m.send_flag_fin())
        assert_receive {:quic, :new_stream, ss2, %{flags: flags2}}, @wait
        assert m.is_unidirectional(flags2)
        assert collect(m, ss2, []) == "two!"
        assert {:error, :einval} = m.async_send(ss2, "x", 0)

        assert_raise ArgumentError, ~r/async_csend\/4 expects non-negative integer flags/, fn ->
          m.async_csend(c, "x", [], :fin)
        end

        # async_close_stream/1: graceful, at once.
        :ok = m.async_accept_stream(sc, [{:active, true}])
        {:ok, s3} = m.open_stream(c, [])
        :ok = m.send(s3, "three")
        assert_receive {:quic, :new_stream, ss3, _}, @wait
        assert :ok = m.async_close_stream(s3)
        assert collect(m, ss3, []) == "three"

        # async_send_dgram/2, on a connection with datagrams.
        dg = [{:alpn, [~c"t"]}, {:datagram_receive_enabled, true}]
        {:ok, l2} = m.listen({~c"127.0.0.1", 0}, dg)
        {:ok, {_, port2}} = m.sockname(l2)
        :ok = m.async_accept(l2)
        {:ok, c2} = m.connect(~c"127.0.0.1", port2, [{:verify, :none} | dg], @wait)
        assert_receive {:quic, :new_conn, sc2, _}, @wait
        assert :ok = m.async_send_dgram(c2, [~c"d", "g"])
        assert_receive {:quic, "dg", ^sc2, 0}, @wait

        for x <- [s2, c, l, c2, l2], do: :ok = m.close(x)
      end

      test "async_send/3 with the sync flag: send_complete once Quinn has the data, or never will" do
        m = @mod
        {c, sc, l} = pair(m)
        sync = m.send_flag_sync()

        # Small: Quinn takes it at once (in the call, or from the stream's writer task).
        :ok = m.async_accept_stream(sc, [{:active, false}])
        {:ok, s} = m.open_stream(c, [])
        :ok = m.async_send(s, "hi", sync)
        assert_receive {:quic, :send_complete, ^s, false}, @wait
        assert_receive {:quic, :new_stream, ss, _}, @wait

        # 8 MiB is more than the peer's windows let Quinn take while nobody reads: no
        # send_complete until the peer has read its way through, and a blocking send queued
        # behind it still returns.
        big = :binary.copy(<<7>>, 8 * 1_048_576)
        :ok = m.async_send(s, big, sync)
        refute_received {:quic, :send_complete, ^s, _}
        sender = Task.async(fn -> m.send(s, "tail", m.send_flag_fin()) end)
        # By the time 1 MiB has come through, the writer has handed Quinn all it could take.
        assert {:ok, first} = m.recv(ss, 1_048_576, @wait)
        refute_received {:quic, :send_complete, ^s, _}
        assert {:ok, rest} = m.recv(ss, 2 + byte_size(big) + 4 - byte_size(first), @wait * 2)
        assert byte_size(rest) == 2 + byte_size(big) + 4 - 1_048_576
        assert_receive {:quic, :send_complete, ^s, false}, @wait
        assert :ok = Task.await(sender, @wait)

        # Cancelled: the peer stops reading (STOP_SENDING) with most of it still waiting.
        :ok = m.async_accept_stream(sc, [{:active, false}])
        {:ok, s2} = m.open_stream(c, [])
        :ok = m.send(s2, "a")
        assert_receive {:quic, :new_stream, ss2, _}, @wait
        :ok = m.async_send(s2, big, bor_fin(m, sync))
        # Nothing may follow the FIN: refused, never queued behind it and dropped.
        assert {:error, :closed} = m.async_send(s2, "after", sync)
        assert {:error, :closed} = m.send(s2, "after")
        :ok = m.async_shutdown_stream(ss2, m.stream_shutdown_abort_receive(), 9)
        assert_receive {:quic, :send_complete, ^s2, true}, @wait
        assert_receive {:quic, :peer_receive_aborted, ^s2, 9}, @wait

        # Cancelled by the connection's end; a send refused at once gets no message.
        {:ok, s3} = m.open_stream(c, [])
        :ok = m.async_send(s3, big, sync)
        :ok = m.close_connection(sc)
        assert_receive {:quic, :send_complete, ^s3, true}, @wait
        assert {:error, _} = m.async_send(s3, "late", sync)
        refute_receive {:quic, :send_complete, ^s3, _}, 100

        assert_raise ArgumentError, ~r/async_send\/3 expects non-negative integer flags/, fn ->
          m.async_send(s3, "x", -1)
        end

        :ok = m.close(c)
        :ok = m.close(l)
      end

      test "send_shutdown_complete: true once the peer acknowledged the FIN, else false" do
        m = @mod
        {:ok, l} = m.listen({~c"127.0.0.1", 0}, [{:alpn, [~c"t"]}])
        {:ok, {_, port}} = m.sockname(l)
        :ok = m.async_accept(l)
        # Through a relay that can withhold what the server sends, acknowledgements included.
        relay = MaculaQuic.Test.Quic.relay!(port)

        {:ok, c} =
          m.connect(~c"127.0.0.1", relay.port, [{:alpn, [~c"t"]}, {:verify, :none}], @wait)

        assert_receive {:quic, :new_conn, sc, _}, @wait

        :ok = m.async_accept_stream(sc, [{:active, true}])
        {:ok, s} = m.open_stream(c, [])
        :ok = m.send(s, "hi")
        assert_receive {:quic, :new_stream, ss, _}, @wait
        assert_receive {:quic, "hi", ^ss, _}, @wait
        relay.back.(false)
        :ok = m.send(s, "end", m.send_flag_fin())
        assert_receive {:quic, "end", ^ss, _}, @wait
        assert_receive {:quic, :peer_send_shutdown, ^ss, _}, @wait
        # An abortive shutdown while the FIN waits to be acknowledged is made, and is false at
        # once.
        :ok = m.async_accept_stream(sc, [{:active, true}])
        {:ok, s7} = m.open_stream(c, [])
        :ok = m.send(s7, "x", m.send_flag_fin())
        assert_receive {:quic, :new_stream, ss7, _}, @wait
        assert_receive {:quic, :peer_send_shutdown, ^ss7, _}, @wait
        # A graceful shutdown after the FIN is refused, acknowledged or not.
        assert {:error, :closed} = m.async_shutdown_stream(s7)
        :ok = m.async_shutdown_stream(s7, m.stream_shutdown_abort_send(), 5)
        assert_receive {:quic, :send_shutdown_complete, ^s7, false}, @wait
        # The server has all of s's data, but its acknowledgement cannot have come back: Quinn
        # taking the FIN is not enough. (The late message would be here well within this wait.)
        refute_receive {:quic, :send_shutdown_complete, ^s, _}, 300
        relay.back.(true)
        assert_receive {:quic, :send_shutdown_complete, ^s, true}, @wait
        # The stream closes once the server finishes its side too.
        :ok = m.send(ss, "", m.send_flag_fin())
        assert_receive {:quic, :send_shutdown_complete, ^ss, true}, @wait
        assert_receive {:quic, :stream_closed, ^ss, _}, @wait
        assert_receive {:quic, :stream_closed, ^s, %{status: :ok}}, @wait

        # A reset: at once, and false.
        :ok = m.async_accept_stream(sc, [{:active, true}])
        {:ok, s2} = m.open_stream(c, [])
        :ok = m.send(s2, "a")
        assert_receive {:quic, :new_stream, ss2, _}, @wait
        :ok = m.async_shutdown_stream(s2, m.stream_shutdown_abort_send(), 3)
        assert_receive {:quic, :send_shutdown_complete, ^s2, false}, @wait
        assert_receive {:quic, :peer_send_aborted, ^ss2, 3}, @wait

        # STOP_SENDING from the peer: after peer_receive_aborted, and before stream_closed.
        :ok = m.async_accept_stream(sc, [])
        {:ok, s4} = m.open_stream(c, [])
        :ok = m.send(s4, "b")
        assert_receive {:quic, :new_stream, ss4, _}, @wait
        :ok = m.async_shutdown_stream(ss4, m.stream_shutdown_abort_receive(), 9)

        assert [{:peer_receive_aborted, 9}, {:send_shutdown_complete, false}] =
                 stream_messages(s4, 2)

        :ok = m.send(ss4, "", m.send_flag_fin())
        assert [{:peer_send_shutdown, _}, {:stream_closed, _}] = stream_messages(s4, 2)

        # STOP_SENDING while the FIN waits behind data the peer does not read: a later send
        # is still refused as a send after the caller's own FIN.
        :ok = m.async_accept_stream(sc, [{:active, false}])
        {:ok, s9} = m.open_stream(c, [])
        :ok = m.send(s9, "d")
        assert_receive {:quic, :new_stream, ss9, _}, @wait
        :ok = m.async_send(s9, :binary.copy(<<9>>, 8 * 1_048_576), m.send_flag_fin())
        :ok = m.async_shutdown_stream(ss9, m.stream_shutdown_abort_receive(), 4)
        assert_receive {:quic, :peer_receive_aborted, ^s9, 4}, @wait
        assert {:error, :closed} = m.send(s9, "late")
        assert {:error, :closed} = m.async_send(s9, "late")

        :ok = m.async_accept_stream(sc, [{:active, true}])
        {:ok, u} = m.open_stream(c, [{:open_flag, 1}])
        :ok = m.send(u, "u", m.send_flag_fin())
        assert_receive {:quic, :new_stream, us, %{flags: 1}}, @wait
        assert_receive {:quic, :peer_send_shutdown, ^us, _}, @wait
        assert_receive {:quic, :send_shutdown_complete, ^u, true}, @wait
        assert_receive {:quic, :stream_closed, ^us, _}, @wait

        # close_stream/1 silences the stream: no send_shutdown_complete either.
        :ok = m.async_accept_stream(sc, [{:active, true}])
        {:ok, s6} = m.open_stream(c, [])
        :ok = m.send(s6, "c")
        assert_receive {:quic, :new_stream, ss6, _}, @wait
        :ok = m.close_stream(s6)
        assert_receive {:quic, :peer_send_shutdown, ^ss6, _}, @wait
        assert MaculaQuic.Test.Quic.wait_until(fn -> MaculaQuic.Native.stream_info(s6).closed end)
        refute_received {:quic, _, ^s6, _}

        # The connection's end, while a FIN waits to be acknowledged (s8) and while one waits
        # behind data the peer does not read (s5).
        relay.back.(false)
        :ok = m.async_accept_stream(sc, [{:active, true}])
        {:ok, s8} = m.open_stream(c, [])
        :ok = m.send(s8, "y", m.send_flag_fin())
        assert_receive {:quic, :new_stream, ss8, _}, @wait
        assert_receive {:quic, :peer_send_shutdown, ^ss8, _}, @wait
        big = :binary.copy(<<7>>, 8 * 1_048_576)
        {:ok, s5} = m.open_stream(c, [])
        :ok = m.async_send(s5, big, m.send_flag_fin())
        :ok = m.async_close_connection(c)

        for x <- [s8, s5] do
          assert_receive {:quic, :send_shutdown_complete, ^x, false}, @wait
          assert_receive {:quic, :stream_closed, ^x, %{is_conn_shutdown: true}}, @wait
        end

        :ok = m.close(c)
        :ok = m.close(l)
        relay.stop.()
      end

      test "a waiting stream acceptor gets {quic, closed, undefined, undefined} as the connection ends" do
        m = @mod
        {c, sc, l} = pair(m)
        parent = self()

        # Not the connection's owner, so it hears of the end only this way.
        _acceptor =
          spawn_link(fn ->
            :ok = m.async_accept_stream(sc, [])
            send(parent, :accepting)

            receive do
              msg -> send(parent, {:acceptor_got, msg})
            end
          end)

        assert_receive :accepting, @wait
        # The peer closes.
        :ok = m.close_connection(c)
        assert_receive {:acceptor_got, {:quic, :closed, :undefined, :undefined}}, @wait

        # The owner's own accepts, and a local close: one answered with a stream gets no such
        # message, the one still waiting does.
        {c2, sc2, _} = pair_on(m, l)
        :ok = m.async_accept_stream(c2, [])
        {:ok, s} = m.open_stream(sc2, [])
        :ok = m.send(s, "x")
        assert_receive {:quic, :new_stream, _, %{conn: ^c2}}, @wait
        :ok = m.async_accept_stream(c2, [])
        :ok = m.close_connection(c2)
        assert_receive {:quic, :closed, :undefined, :undefined}, @wait
        refute_received {:quic, :closed, :undefined, :undefined}
        :ok = m.close(l)
      end

      test "mutual TLS: verify_peer listener accepts its CA's client, refuses others", %{
        certs: certs
      } do
        m = @mod

        {:ok, l} =
          m.listen({~c"127.0.0.1", 0}, [
            {:alpn, [~c"t"]},
            {:certfile, to_charlist(certs.cert)},
            {:keyfile, to_charlist(certs.key)},
            {:verify, :verify_peer},
            {:cacertfile, to_charlist(certs.client_ca)}
          ])

        {:ok, {_, port}} = m.sockname(l)
        :ok = m.async_accept(l)

        base = [
          {:alpn, [~c"t"]},
          {:cacertfile, to_charlist(certs.ca)},
          {:server_name, ~c"localhost"}
        ]

        good = [
          {:certfile, to_charlist(certs.client_cert)},
          {:keyfile, to_charlist(certs.client_key)}
        ]

        assert {:ok, c} = m.connect(~c"127.0.0.1", port, base ++ good, @wait)
        assert_receive {:quic, :new_conn, _sc, _}, @wait
        # Waiting for the next connection: a refused one must not be delivered.
        :ok = m.async_accept(l)

        bad = [
          {:certfile, to_charlist(certs.other_cert)},
          {:keyfile, to_charlist(certs.other_key)}
        ]

        case m.connect(~c"127.0.0.1", port, base ++ bad, @wait) do
          {:error, {:tls_alert, _}} ->
            :ok

          {:ok, c2} ->
            # TLS 1.3: the client may finish before the server rejects its certificate.
            assert_receive {:quic, :transport_shutdown, ^c2, %{status: :tls_error}}, @wait
        end

        refute_received {:quic, :new_conn, _, _}
        assert {:ok, c3} = m.connect(~c"127.0.0.1", port, base ++ good, @wait)
        assert_receive {:quic, :new_conn, sc3, _}, @wait
        MaculaQuic.Test.Quic.same_connection!(c3, sc3)
        :ok = m.close(c3)
        :ok = m.close(c)
        :ok = m.close(l)
      end
    end
  end

  defp pair(m) do
    {:ok, l} = m.listen({~c"127.0.0.1", 0}, [{:alpn, [~c"t"]}])
    pair_on(m, l)
  end

  # A connection to the listener `l` (another one, for the listener of `pair/1`).
  defp pair_on(m, l) do
    {:ok, {_, port}} = m.sockname(l)
    :ok = m.async_accept(l)
    {:ok, c} = m.connect(~c"127.0.0.1", port, [{:alpn, [~c"t"]}, {:verify, :none}], @wait)
    assert_receive {:quic, :new_conn, sc, _}, @wait
    {c, sc, l}
  end

  defp echo_until_fin(m, ss) do
    receive do
      {:quic, data, ^ss, flags} when is_binary(data) ->
        :ok = m.send(ss, data)
        if Bitwise.band(flags, 2) == 2, do: :ok = m.send(ss, "", 4), else: echo_until_fin(m, ss)

      {:quic, :peer_send_shutdown, ^ss, _} ->
        :ok = m.send(ss, "", 4)
    after
      @wait -> flunk("echo stalled")
    end
  end

  defp collect(m, ss, acc) do
    receive do
      {:quic, data, ^ss, _} when is_binary(data) -> collect(m, ss, [acc, data])
      {:quic, :peer_send_shutdown, ^ss, _} -> IO.iodata_to_binary(acc)
    after
      @wait -> {:stalled, IO.iodata_to_binary(acc)}
    end
  end

  # The next `n` messages about stream `s`, as {tag, value}, in order.
  defp stream_messages(s, n) do
    for _ <- 1..n//1 do
      receive do
        {:quic, tag, ^s, value} when is_atom(tag) -> {tag, value}
      after
        @wait -> flunk("fewer than #{n} messages about the stream")
      end
    end
  end

  defp bor_fin(m, flags), do: Bitwise.bor(flags, m.send_flag_fin())

  # The test process's queued messages about stream `ss`.
  defp queued(ss) do
    {:messages, msgs} = Process.info(self(), :messages)
    Enum.count(msgs, &match?({:quic, _, ^ss, _}, &1))
  end

  # Until at least `n` are queued (no message announces that).
  defp wait_until_queued(ss, n) do
    unless MaculaQuic.Test.Quic.wait_until(fn -> queued(ss) >= n end),
      do: flunk("nothing queued for the stream")
  end

  defp run_in(pid, fun) do
    # controlling_process checks the *caller*: run it in a process that is not the owner.
    parent = self()
    _ = pid
    spawn(fn -> send(parent, {:ran, fun.()}) end)
    assert_receive {:ran, result}, @wait
    result
  end
end
