%% Flag values for macula_quic, with the names and values of quicer's quicer.hrl. Only the
%% flags macula_quic takes are defined (no stream start, 0-RTT or event-mask flags).

%% Stream shutdown (macula_quic:async_shutdown_stream/3)
-define(QUIC_STREAM_SHUTDOWN_FLAG_NONE, 0).
-define(QUIC_STREAM_SHUTDOWN_FLAG_GRACEFUL, 1).
-define(QUIC_STREAM_SHUTDOWN_FLAG_ABORT_SEND, 2).
-define(QUIC_STREAM_SHUTDOWN_FLAG_ABORT_RECEIVE, 4).
-define(QUIC_STREAM_SHUTDOWN_FLAG_ABORT, 6).
-define(QUIC_STREAM_SHUTDOWN_FLAG_IMMEDIATE, 8).

%% Connection shutdown (macula_quic:async_shutdown_connection/3)
-define(QUIC_CONNECTION_SHUTDOWN_FLAG_NONE, 0).
-define(QUIC_CONNECTION_SHUTDOWN_FLAG_SILENT, 1).

%% Stream open (open_flag option)
-define(QUIC_STREAM_OPEN_FLAG_NONE, 0).
-define(QUIC_STREAM_OPEN_FLAG_UNIDIRECTIONAL, 1).

%% Send (macula_quic:send/3, async_send/3, async_csend/4)
-define(QUIC_SEND_FLAG_NONE, 0).
-define(QUIC_SEND_FLAG_FIN, 4).
%% async_send/3, async_csend/4: the caller gets {quic, send_complete, Stream, IsCancelled}
-define(QUICER_SEND_FLAG_SYNC, 16#1000).

%% Receive flags in {quic, Data, Stream, Flags}
-define(QUIC_RECEIVE_FLAG_NONE, 0).
-define(QUIC_RECEIVE_FLAG_FIN, 2).
