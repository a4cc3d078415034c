#!/usr/bin/env python3
"""An aioquic peer for macula_quic's interop tests (test/interop).

    peer.py server --host ::1 --port 0 --alpn a,b --cert c.pem --key k.pem [--echo] [--datagrams]
    peer.py client --host 127.0.0.1 --port N --alpn a [--cafile ca.pem] [--server-name n] [--datagrams]

It prints one JSON object per line on stdout (events) and reads one JSON object per line on
stdin (commands), so a test drives it step by step without sleeping. End of stdin ends the
process at once: closing the port that started it is enough to clean it up.

Events ("event" key):
  listening     {port}                                   server, once bound
  connected     {conn, alpn}                             handshake completed
  connect_failed{error}                                  client, handshake failed
  new_stream    {conn, stream_id, uni}                   the peer opened a stream
  stream_fin    {conn, stream_id, length, sha256, data?} the peer finished a stream (data:
                                                          the bytes as text when short)
  stream_reset  {conn, stream_id, error_code}            RESET_STREAM from the peer
  stop_sending  {conn, stream_id, error_code}            STOP_SENDING from the peer
  terminated    {conn, error_code, frame_type, reason, application, by_self}
  datagram      {conn, data}                             a datagram from the peer (as text)
  opened        {conn, stream_id}                        answer to "open"
  sent          {conn, stream_id, length, sha256}        answer to "send"
  ok            {}                                       answer to other commands
  error         {error}                                  a command failed

Commands ("cmd" key; "conn" picks a connection by number, default the latest):
  open   {uni}                         open a stream (it exists for the peer once data is sent)
  send   {stream_id, data | random, fin}  send text, or `random` pseudo-random bytes
  fin    {stream_id}                   finish the stream (FIN, no data)
  reset  {stream_id, code}             RESET_STREAM
  stop   {stream_id, code}             STOP_SENDING
  close  {code, reason}                close the connection with an application error code
  datagram {data}                      send a datagram (text)
  ping   {}                            answered with "ok" (ordering barrier)

With --echo (server), bytes received on a bidirectional stream the peer opened are sent back
on it, and the peer's FIN is echoed too; so are datagrams. With --datagrams the peer accepts
datagrams (RFC 9221: it sends max_datagram_frame_size).
"""

import argparse
import asyncio
import hashlib
import json
import os
import random
import ssl
import sys
import traceback

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import stream_is_client_initiated, stream_is_unidirectional

SHORT = 4096


def emit(event, **fields):
    fields = {"event": event, **fields}
    try:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the test is over
        os._exit(0)


class Peer(QuicConnectionProtocol):
    """One connection: reports its events and echoes when asked."""

    registry = []
    echo = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.index = len(Peer.registry)
        Peer.registry.append(self)
        self.streams = {}  # stream_id -> [length, sha256, short bytes]
        self.closing = False

    def quic_event_received(self, event):
        if isinstance(event, events.HandshakeCompleted):
            emit("connected", conn=self.index, alpn=event.alpn_protocol)
        elif isinstance(event, events.StreamDataReceived):
            self.on_data(event)
        elif isinstance(event, events.StreamReset):
            emit("stream_reset", conn=self.index, stream_id=event.stream_id,
                 error_code=event.error_code)
        elif isinstance(event, events.DatagramFrameReceived):
            emit("datagram", conn=self.index, data=event.data.decode("latin-1"))
            if Peer.echo:
                self._quic.send_datagram_frame(event.data)
                self.transmit()
        elif isinstance(event, events.StopSendingReceived):
            emit("stop_sending", conn=self.index, stream_id=event.stream_id,
                 error_code=event.error_code)
        elif isinstance(event, events.ConnectionTerminated):
            emit(
                "terminated",
                conn=self.index,
                error_code=event.error_code,
                frame_type=event.frame_type,
                reason=event.reason_phrase,
                application=event.frame_type is None,
                by_self=self.closing,
            )

    def on_data(self, event):
        sid = event.stream_id
        state = self.streams.get(sid)
        if state is None:
            state = self.streams[sid] = [0, hashlib.sha256(), bytearray()]
            emit("new_stream", conn=self.index, stream_id=sid,
                 uni=stream_is_unidirectional(sid))
        state[0] += len(event.data)
        state[1].update(event.data)
        if len(state[2]) <= SHORT:
            state[2] += event.data[: SHORT + 1 - len(state[2])]
        if (
            Peer.echo
            and not stream_is_unidirectional(sid)
            and stream_is_client_initiated(sid) != self._quic.configuration.is_client
        ):
            self._quic.send_stream_data(sid, event.data, end_stream=event.end_stream)
        if event.end_stream:
            fields = dict(conn=self.index, stream_id=sid, length=state[0],
                          sha256=state[1].hexdigest())
            if state[0] <= SHORT:
                fields["data"] = bytes(state[2]).decode("latin-1")
            emit("stream_fin", **fields)

    def command(self, cmd):
        name = cmd["cmd"]
        quic = self._quic
        if name == "open":
            sid = quic.get_next_available_stream_id(is_unidirectional=bool(cmd.get("uni")))
            emit("opened", conn=self.index, stream_id=sid)
        elif name == "send":
            if "random" in cmd:
                data = random.Random(cmd.get("seed", 0)).randbytes(cmd["random"])
            else:
                data = cmd.get("data", "").encode("latin-1")
            quic.send_stream_data(cmd["stream_id"], data, end_stream=bool(cmd.get("fin")))
            emit("sent", conn=self.index, stream_id=cmd["stream_id"], length=len(data),
                 sha256=hashlib.sha256(data).hexdigest())
        elif name == "fin":
            quic.send_stream_data(cmd["stream_id"], b"", end_stream=True)
            emit("ok")
        elif name == "reset":
            quic.reset_stream(cmd["stream_id"], cmd["code"])
            emit("ok")
        elif name == "stop":
            quic.stop_stream(cmd["stream_id"], cmd["code"])
            emit("ok")
        elif name == "close":
            self.closing = True
            quic.close(error_code=cmd.get("code", 0), reason_phrase=cmd.get("reason", ""))
            emit("ok")
        elif name == "datagram":
            quic.send_datagram_frame(cmd.get("data", "").encode("latin-1"))
            emit("ok")
        elif name == "ping":
            emit("ok")
        else:
            raise ValueError(f"unknown command {name!r}")
        self.transmit()


def configuration(args, is_client):
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=args.alpn.split(","),
        max_data=64 * 1024 * 1024,
        max_stream_data=16 * 1024 * 1024,
        idle_timeout=30.0,
        max_datagram_frame_size=65536 if args.datagrams else None,
    )
    if is_client:
        if args.cafile:
            config.load_verify_locations(cafile=args.cafile)
            config.verify_mode = ssl.CERT_REQUIRED
        else:
            config.verify_mode = ssl.CERT_NONE
        config.server_name = args.server_name or args.host
    else:
        config.load_cert_chain(args.cert, args.key)
    return config


async def commands():
    """Runs stdin's commands; ends the process at end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            # End of input: leave at once, without waiting for connections to drain.
            sys.stdout.flush()
            os._exit(0)
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
            if not Peer.registry:
                raise ValueError("no connection yet")
            Peer.registry[cmd.get("conn", -1)].command(cmd)
        except Exception as exc:  # reported, the peer goes on
            emit("error", error=f"{type(exc).__name__}: {exc}")


async def run_server(args):
    Peer.echo = args.echo
    server = await serve(args.host, args.port, configuration=configuration(args, False),
                         create_protocol=Peer)
    emit("listening", port=server._transport.get_extra_info("sockname")[1])
    await commands()


async def run_client(args):
    stdin = asyncio.ensure_future(commands())
    try:
        async with connect(args.host, args.port, configuration=configuration(args, True),
                           create_protocol=Peer, wait_connected=False) as proto:
            proto.transmit()
            try:
                await asyncio.wait_for(proto.wait_connected(), args.timeout)
            except (ConnectionError, asyncio.TimeoutError) as exc:
                emit("connect_failed", error=type(exc).__name__)
            await stdin
    except Exception as exc:
        emit("connect_failed", error=f"{type(exc).__name__}: {exc}")
        await stdin


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--alpn", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--cafile")
    parser.add_argument("--server-name")
    parser.add_argument("--echo", action="store_true")
    parser.add_argument("--datagrams", action="store_true")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    try:
        asyncio.run(run_server(args) if args.role == "server" else run_client(args))
    except Exception:
        emit("crash", error=traceback.format_exc())
    sys.stdout.flush()
    os._exit(1)


if __name__ == "__main__":
    main()
