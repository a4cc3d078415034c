//! Raw-Quinn baseline for the benchmark suite (`bin/bench`): the same workloads the Elixir
//! benchmarks run through macula_quic, done directly with Quinn, with the same TLS and transport
//! settings as the NIF (see `src/tls.rs`): rustls 0.23 with the ring provider, TLS 1.3 only, a
//! client that accepts any server certificate but checks handshake signatures, Quinn's default
//! transport config with the NIF's default windows (`src/flow.rs`, which this file includes:
//! 2.5 MiB per stream, 64 MiB per connection; plus the idle timeout the benchmark passes to
//! both), a tokio multi-thread runtime with as many workers as the NIF's (one per core,
//! at most 4), a shared client endpoint bound to 0.0.0.0:0 and a listener bound to 127.0.0.1 with
//! SO_REUSEADDR, both asking for 2 MiB socket buffers (`flow::SOCKET_BUFFER`), and one client
//! configuration for every connect (the NIF caches its configurations per option set too). The
//! handshake workload measures full TLS handshakes: its client keeps no session tickets, as
//! macula_quic's benchmark connects with `session_resumption: false`. (With tickets kept, whether a
//! reconnect resumes depends on whether the last connection lived long enough to receive one: raw
//! Quinn's closes at once and hardly ever did, while macula_quic's resumed 29% of its handshakes
//! before both were made full; `bin/calls handshake` counts the server's signatures.)
//!
//! Not part of the NIF. Usage:
//!
//!     quinn_baseline <bulk|echo|fanout|handshake|memory> cert=PEM key=PEM [name=value ...]
//!     quinn_baseline suite cert=PEM key=PEM     # the cipher suite and group its handshakes use
//!     quinn_baseline echo role=server cert=PEM key=PEM     # the echoing end alone
//!     quinn_baseline echo peer_port=N cert=PEM key=PEM     # the client of such a server
//!
//! Prints one JSON object per line with the results.
// The library's default windows and socket buffers, from the very file the NIF compiles, so
// that both run with the same ones (the example cannot reach the cdylib's private modules).
#[path = "../src/flow.rs"]
mod flow;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

const ALPN: &[u8] = b"bench";

type Args = HashMap<String, String>;

fn arg_u64(a: &Args, k: &str, d: u64) -> u64 {
    a.get(k).and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn arg_f64(a: &Args, k: &str, d: f64) -> f64 {
    a.get(k).and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport(a: &Args) -> quinn::TransportConfig {
    let mut c = quinn::TransportConfig::default();
    // The NIF's stream window, or `stream_window=` bytes.
    let stream_window = arg_u64(a, "stream_window", flow::STREAM_RECV_WINDOW);
    c.stream_receive_window(quinn::VarInt::from_u64(stream_window).unwrap());
    // The NIF's connection window for that stream window, or `conn_window=` bytes.
    let conn_window = arg_u64(a, "conn_window", flow::conn_recv_window(stream_window));
    c.receive_window(quinn::VarInt::from_u64(conn_window).unwrap());
    if let Some(ms) = a.get("idle_timeout_ms").and_then(|v| v.parse::<u64>().ok()) {
        let t = if ms == 0 { None } else { Some(quinn::VarInt::from_u64(ms).unwrap().into()) };
        c.max_idle_timeout(t);
    }
    c
}

fn rustls_server(a: &Args) -> rustls::ServerConfig {
    let cert_pem = std::fs::read(&a["cert"]).expect("cert");
    let key_pem = std::fs::read(&a["key"]).expect("key");
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&cert_pem).collect::<Result<_, _>>().expect("cert pem");
    let key = PrivateKeyDer::from_pem_slice(&key_pem).expect("key pem");
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg
}

fn server_config(a: &Args) -> quinn::ServerConfig {
    let quic = QuicServerConfig::try_from(rustls_server(a)).unwrap();
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(transport(a)));
    server
}

fn rustls_client(resumption: bool) -> rustls::ClientConfig {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider().signature_verification_algorithms)))
        .with_no_client_auth();
    if !resumption {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg
}

fn client_config(a: &Args, resumption: bool) -> quinn::ClientConfig {
    let quic = QuicClientConfig::try_from(rustls_client(resumption)).unwrap();
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(Arc::new(transport(a)));
    client
}

/// What the handshakes agree on with these configurations: the cipher suite and key exchange
/// group. Quinn does not expose its TLS session, so this runs rustls's own handshake between the
/// very client and server configurations the workloads hand Quinn (in memory; TLS over QUIC
/// chooses both the same way, from the same lists). `bin/bench` prints it next to what `:ssl`
/// negotiated, so that readers can see both sides use the same cryptography.
fn suite(a: Args) {
    let name = ServerName::try_from("localhost").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(rustls_client(false)), name).unwrap();
    let mut server = rustls::ServerConnection::new(Arc::new(rustls_server(&a))).unwrap();
    let mut flight = Vec::new();
    // TLS 1.3 needs two flights each way; the bound only guards against a loop that never ends.
    for _ in 0..10 {
        if !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
        flight.clear();
        client.write_tls(&mut flight).unwrap();
        server.read_tls(&mut &flight[..]).unwrap();
        server.process_new_packets().unwrap();
        flight.clear();
        server.write_tls(&mut flight).unwrap();
        client.read_tls(&mut &flight[..]).unwrap();
        client.process_new_packets().unwrap();
    }
    let suite = client.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite()));
    let group = client.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name()));
    println!(
        "{{\"workload\":\"suite\",\"cipher_suite\":\"{}\",\"group\":\"{}\"}}",
        suite.unwrap_or_default(),
        group.unwrap_or_default()
    );
}

/// Same as the NIF's `verify: :none`: any certificate, but handshake signatures are checked.
#[derive(Debug)]
struct AcceptAnyServer(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _e: &CertificateDer<'_>,
        _i: &[CertificateDer<'_>],
        _n: &ServerName<'_>,
        _o: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

struct Pair {
    server: quinn::Endpoint,
    client: quinn::Endpoint,
    addr: SocketAddr,
    client_cfg: quinn::ClientConfig,
}

fn udp_socket(addr: SocketAddr) -> socket2::Socket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP)).unwrap();
    let _ = s.set_recv_buffer_size(flow::SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(flow::SOCKET_BUFFER);
    s.bind(&addr.into()).unwrap();
    s
}

/// A listener on 127.0.0.1 (SO_REUSEADDR, as the NIF binds) and a client endpoint on 0.0.0.0:0.
fn endpoints(a: &Args) -> Pair {
    let s = udp_socket((Ipv4Addr::LOCALHOST, 0).into());
    s.set_reuse_address(true).unwrap();
    let sock: UdpSocket = s.into();
    let server = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config(a)),
        sock,
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let csock: UdpSocket = udp_socket((Ipv4Addr::UNSPECIFIED, 0).into()).into();
    let client = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, csock, Arc::new(quinn::TokioRuntime)).unwrap();
    Pair { server, client, addr, client_cfg: client_config(a, true) }
}

impl Pair {
    async fn connect(&self) -> quinn::Connection {
        self.client.connect_with(self.client_cfg.clone(), self.addr, "localhost").unwrap().await.unwrap()
    }
    async fn accept(&self) -> quinn::Connection {
        self.server.accept().await.unwrap().await.unwrap()
    }
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Minor page faults of this process so far (`minflt`, field 10 of `/proc/self/stat`): bulk
/// reports them per MiB, beside macula_quic's, to show allocations that keep touching fresh
/// memory.
fn minor_faults() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis don't.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace().nth(7).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1048576.0 / d.as_secs_f64()
}

async fn drain(mut recv: quinn::RecvStream) -> u64 {
    let mut n = 0u64;
    while let Some(c) = recv.read_chunk(usize::MAX, true).await.unwrap() {
        n += c.bytes.len() as u64;
    }
    n
}

/// Workload 1: `bytes` over one stream, written in `chunk`-byte pieces.
async fn bulk(a: Args) {
    let bytes = arg_u64(&a, "bytes", 1 << 30);
    let chunk = arg_u64(&a, "chunk", 1 << 20) as usize;
    let p = endpoints(&a);
    let (cc, sc) = tokio::join!(p.connect(), p.accept());
    let reader = tokio::spawn(async move {
        let (_s, r) = sc.accept_bi().await.unwrap();
        drain(r).await
    });
    let before = cc.stats();
    let data = Bytes::from(vec![7u8; chunk]);
    let faults0 = minor_faults();
    let t0 = Instant::now();
    let (mut send, _recv) = cc.open_bi().await.unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk as u64) as usize;
        send.write_chunk(data.slice(..n)).await.unwrap();
        left -= n as u64;
    }
    send.finish().unwrap();
    let got = reader.await.unwrap();
    let dt = t0.elapsed();
    let faults = minor_faults() - faults0;
    assert_eq!(got, bytes);
    let after = cc.stats();
    let ios = after.udp_tx.ios - before.udp_tx.ios;
    let dgrams = after.udp_tx.datagrams - before.udp_tx.datagrams;
    println!(
        "{{\"workload\":\"bulk\",\"bytes\":{bytes},\"seconds\":{:.6},\"mib_s\":{:.2},\"udp_tx_ios\":{ios},\"udp_tx_datagrams\":{dgrams},\"ios_per_datagram\":{:.4},\"faults_per_mib\":{:.1}}}",
        dt.as_secs_f64(),
        mib_s(bytes, dt),
        ios as f64 / dgrams.max(1) as f64,
        faults as f64 / (bytes as f64 / 1048576.0)
    );
    cc.close(0u32.into(), b"");
    p.client.wait_idle().await;
}

/// The echoing end of workload 2: echoes the first stream the peer opens until it finishes.
async fn echo_serve(sc: quinn::Connection) {
    let Ok((mut s, mut r)) = sc.accept_bi().await else { return };
    while let Ok(Some(c)) = r.read_chunk(usize::MAX, true).await {
        if s.write_chunk(c.bytes).await.is_err() {
            break;
        }
    }
}

/// Workload 2: `size`-byte echo round trips on one stream for `seconds`.
///
/// Both ends in this process by default. With `role=server` this process is only the echoing
/// end: it prints `{"port":N}` and serves every connection until its standard input closes;
/// `peer_port=N` makes this process the client of such a server (the benchmark's "two OS
/// processes" variant, where neither end's threads can pick up the other's datagrams).
async fn echo(a: Args) {
    let size = arg_u64(&a, "size", 64) as usize;
    let secs = arg_f64(&a, "seconds", 2.0);
    let p = endpoints(&a);
    if a.get("role").map(String::as_str) == Some("server") {
        println!("{{\"port\":{}}}", p.addr.port());
        // The benchmark ends the server by closing its standard input.
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
        while let Some(inc) = p.server.accept().await {
            tokio::spawn(async move {
                if let Ok(sc) = inc.await {
                    echo_serve(sc).await;
                }
            });
        }
        return;
    }
    let cc = match a.get("peer_port").and_then(|v| v.parse::<u16>().ok()) {
        Some(port) => {
            let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            p.client.connect_with(p.client_cfg.clone(), to, "localhost").unwrap().await.unwrap()
        }
        None => {
            let (cc, sc) = tokio::join!(p.connect(), p.accept());
            tokio::spawn(echo_serve(sc));
            cc
        }
    };
    let (mut s, mut r) = cc.open_bi().await.unwrap();
    let msg = vec![1u8; size];
    let mut back = vec![0u8; size];
    // Warm-up (also makes the peer see the stream).
    for _ in 0..100 {
        s.write_all(&msg).await.unwrap();
        r.read_exact(&mut back).await.unwrap();
    }
    let mut lat: Vec<u64> = Vec::with_capacity(1 << 20);
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        s.write_all(&msg).await.unwrap();
        r.read_exact(&mut back).await.unwrap();
        lat.push(t.elapsed().as_nanos() as u64);
    }
    report_round_trips("echo", size, lat, t0.elapsed(), "");
    cc.close(0u32.into(), b"");
}

/// Prints a round-trip workload's result line from its latencies (ns) and the time it took;
/// `extra` goes at the end of the object (`,"lost":0`).
fn report_round_trips(workload: &str, size: usize, mut lat: Vec<u64>, dt: Duration, extra: &str) {
    let n = lat.len();
    lat.sort_unstable();
    println!(
        "{{\"workload\":\"{workload}\",\"size\":{size},\"round_trips\":{n},\"seconds\":{:.6},\"rt_s\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1}{extra}}}",
        dt.as_secs_f64(),
        n as f64 / dt.as_secs_f64(),
        percentile(&lat, 50.0) as f64 / 1000.0,
        percentile(&lat, 99.0) as f64 / 1000.0
    );
}

/// `size`-byte datagram echo round trips on one connection for `seconds`, one in flight (the
/// benchmark's "64 B datagrams" row): the accepting end echoes each datagram it reads. One not
/// back within a second counts as lost, and the next goes.
async fn dgram_echo(a: Args) {
    let size = arg_u64(&a, "size", 64) as usize;
    let secs = arg_f64(&a, "seconds", 2.0);
    let p = endpoints(&a);
    let (cc, sc) = tokio::join!(p.connect(), p.accept());
    tokio::spawn(async move {
        while let Ok(d) = sc.read_datagram().await {
            if sc.send_datagram(d).is_err() {
                break;
            }
        }
    });
    let msg = Bytes::from(vec![1u8; size]);
    for _ in 0..100 {
        dgram_round_trip(&cc, &msg).await;
    }
    let mut lost = 0u64;
    let mut lat: Vec<u64> = Vec::with_capacity(1 << 20);
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        if !dgram_round_trip(&cc, &msg).await {
            lost += 1;
        }
        lat.push(t.elapsed().as_nanos() as u64);
    }
    report_round_trips("dgram_echo", size, lat, t0.elapsed(), &format!(",\"lost\":{lost}"));
    cc.close(0u32.into(), b"");
}

/// One datagram out and its echo back; false when none came back within a second.
async fn dgram_round_trip(cc: &quinn::Connection, msg: &Bytes) -> bool {
    cc.send_datagram(msg.clone()).unwrap();
    tokio::time::timeout(Duration::from_secs(1), cc.read_datagram()).await.is_ok()
}

/// Workload 3: `streams` concurrent streams of `bytes` each on one connection.
async fn fanout(a: Args) {
    let streams = arg_u64(&a, "streams", 100);
    let bytes = arg_u64(&a, "bytes", 10 << 20);
    let chunk = arg_u64(&a, "chunk", 1 << 20) as usize;
    let p = endpoints(&a);
    let (cc, sc) = tokio::join!(p.connect(), p.accept());
    let server = tokio::spawn(async move {
        let mut readers = Vec::new();
        for _ in 0..streams {
            let (_s, r) = sc.accept_bi().await.unwrap();
            readers.push(tokio::spawn(drain(r)));
        }
        let mut total = 0;
        for r in readers {
            total += r.await.unwrap();
        }
        (total, sc)
    });
    let data = Bytes::from(vec![7u8; chunk]);
    let t0 = Instant::now();
    let mut writers = Vec::new();
    for _ in 0..streams {
        let cc = cc.clone();
        let data = data.clone();
        writers.push(tokio::spawn(async move {
            let (mut send, _r) = cc.open_bi().await.unwrap();
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk as u64) as usize;
                send.write_chunk(data.slice(..n)).await.unwrap();
                left -= n as u64;
            }
            send.finish().unwrap();
            // Keep the stream handles until the peer has read everything.
            let _ = send.stopped().await;
        }));
    }
    let (total, sc) = server.await.unwrap();
    let dt = t0.elapsed();
    assert_eq!(total, streams * bytes);
    // How often flow control held the sender back, as the receiving end heard it (macula_quic's
    // getstat data_blocked_rx and stream_data_blocked_rx).
    let rx = sc.stats().frame_rx;
    println!(
        "{{\"workload\":\"fanout\",\"streams\":{streams},\"bytes\":{total},\"seconds\":{:.6},\"mib_s\":{:.2},\"data_blocked\":{},\"stream_data_blocked\":{}}}",
        dt.as_secs_f64(),
        mib_s(total, dt),
        rx.data_blocked,
        rx.stream_data_blocked
    );
    cc.close(0u32.into(), b"");
    for w in writers {
        let _ = w.await;
    }
}

/// Workload 4: connect + close, `concurrency` at a time, for `seconds`.
async fn handshake(a: Args) {
    let conc = arg_u64(&a, "concurrency", 1);
    let secs = arg_f64(&a, "seconds", 2.0);
    let mut p = endpoints(&a);
    // Full handshakes only (see the top of this file).
    p.client_cfg = client_config(&a, false);
    let p = Arc::new(p);
    let ps = p.clone();
    tokio::spawn(async move {
        while let Some(inc) = ps.server.accept().await {
            tokio::spawn(async move {
                if let Ok(c) = inc.await {
                    c.closed().await;
                }
            });
        }
    });
    // Warm-up.
    for _ in 0..20 {
        let c = p.connect().await;
        c.close(0u32.into(), b"");
        c.closed().await;
    }
    let count = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let p = p.clone();
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let c = p.connect().await;
                c.close(0u32.into(), b"");
                c.closed().await;
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let dt = t0.elapsed();
    let n = count.load(Ordering::Relaxed);
    println!(
        "{{\"workload\":\"handshake\",\"concurrency\":{conc},\"handshakes\":{n},\"seconds\":{:.6},\"hs_s\":{:.1}}}",
        dt.as_secs_f64(),
        n as f64 / dt.as_secs_f64()
    );
}

/// Workload 5: `conns` idle connections held open; resident memory per connection (both ends).
async fn memory(a: Args) {
    let n = arg_u64(&a, "conns", 10_000);
    let conc = arg_u64(&a, "concurrency", 16);
    let p = Arc::new(endpoints(&a));
    // Warm-up: one connection, so the runtime, endpoints and TLS state exist before measuring.
    let (c, s) = tokio::join!(p.connect(), p.accept());
    c.close(0u32.into(), b"");
    drop(s);
    p.client.wait_idle().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes();
    let ps = p.clone();
    let server = tokio::spawn(async move {
        let mut held = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let inc = ps.server.accept().await.unwrap();
            held.push(tokio::spawn(async move { inc.await.unwrap() }));
        }
        let mut conns = Vec::with_capacity(n as usize);
        for h in held {
            conns.push(h.await.unwrap());
        }
        conns
    });
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..conc {
        let p = p.clone();
        let mine = n / conc + u64::from(i < n % conc);
        tasks.push(tokio::spawn(async move {
            let mut v = Vec::with_capacity(mine as usize);
            for _ in 0..mine {
                v.push(p.connect().await);
            }
            v
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.extend(t.await.unwrap());
    }
    let servers = server.await.unwrap();
    let open_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes();
    let live = clients.iter().filter(|c| c.close_reason().is_none()).count();
    println!(
        "{{\"workload\":\"memory\",\"conns\":{n},\"live\":{live},\"open_seconds\":{open_s:.3},\"rss_before\":{before},\"rss_after\":{after},\"bytes_per_conn\":{:.0}}}",
        (after.saturating_sub(before)) as f64 / n as f64
    );
    for c in &clients {
        c.close(0u32.into(), b"");
    }
    drop(servers);
}

fn main() {
    let mut argv = std::env::args().skip(1);
    let workload = argv.next().unwrap_or_default();
    let args: Args = argv
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    // The NIF's runtime: one worker per core, at most 4 (src/runtime.rs).
    let workers = arg_u64(&args, "workers", 0) as usize;
    let workers = if workers == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 4)
    } else {
        workers
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    // Run the workload as a task on the workers, as the NIF's tasks run (not on this thread).
    let job = rt.spawn(async move {
        match workload.as_str() {
            "bulk" => bulk(args).await,
            "echo" => echo(args).await,
            "dgram_echo" => dgram_echo(args).await,
            "fanout" => fanout(args).await,
            "handshake" => handshake(args).await,
            "memory" => memory(args).await,
            "suite" => suite(args),
            other => {
                eprintln!("unknown workload {other:?}: bulk | echo | dgram_echo | fanout | handshake | memory | suite");
                std::process::exit(2);
            }
        }
    });
    rt.block_on(job).unwrap();
    rt.shutdown_timeout(Duration::from_secs(1));
}
