//! TLS for QUIC: rustls configurations built from caller options.
//!
//! QUIC requires TLS 1.3; the ring provider is used throughout (it cross-compiles to every
//! target we ship without cmake or clang).
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, NamedGroup, RootCertStore, SignatureScheme};

use crate::counters;
use crate::error::{bad_option, Reason};
use crate::flow;
use crate::options::{PemFile, Tls, Transport, Unreadable, Verify};
use crate::util::lock;

rustler::atoms! {
    certfile, keyfile, cacertfile, cert, key, enoent, eacces, eisdir, einval, too_large, malformed, no_key,
    cert_key_mismatch,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A PEM file's contents (read by the calling process, see `options::PemFile`), or
/// `{:certfile | :keyfile | :cacertfile, why}` with `why` one of `:enoent`, `:eacces`,
/// `:eisdir` (a directory), `:einval` (not a regular file: a device, FIFO or socket, which
/// could block or never end), `:too_large` (over 1 MiB) or `:malformed` (unreadable
/// otherwise).
fn pem(file: &PemFile, which: rustler::Atom) -> Result<&[u8], Reason> {
    let why = match file {
        PemFile::Read(pem) => return Ok(pem),
        PemFile::Unreadable(Unreadable::Enoent) => enoent(),
        PemFile::Unreadable(Unreadable::Eacces) => eacces(),
        PemFile::Unreadable(Unreadable::Eisdir) => eisdir(),
        PemFile::Unreadable(Unreadable::Einval) => einval(),
        PemFile::Unreadable(Unreadable::TooLarge) => too_large(),
        PemFile::Unreadable(Unreadable::Malformed) => malformed(),
    };
    Err(Reason::Tagged(which, why))
}

fn certs_from_pem(pem: &[u8], which: rustler::Atom) -> Result<Vec<CertificateDer<'static>>, Reason> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(c),
        _ => Err(Reason::Tagged(which, malformed())),
    }
}

/// The certificate chain and key from options, if the caller gave any.
fn chain_and_key(tls: &Tls) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, Reason> {
    let chain = match (&tls.certfile, &tls.cert) {
        (Some(file), _) => Some(certs_from_pem(pem(file, certfile())?, certfile())?),
        (None, Some(der)) => Some(vec![CertificateDer::from(der.clone())]),
        (None, None) => None,
    };
    let key = match (&tls.keyfile, &tls.key) {
        (Some(file), _) => Some(
            PrivateKeyDer::from_pem_slice(pem(file, keyfile())?).map_err(|_| Reason::Tagged(keyfile(), malformed()))?,
        ),
        (None, Some(der)) => Some(
            PrivateKeyDer::try_from(der.clone()).map_err(|_| Reason::Tagged(key(), malformed()))?,
        ),
        (None, None) => None,
    };
    match (chain, key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(Reason::Tagged(keyfile(), no_key())),
        (None, Some(_)) => Err(bad_option("certfile")),
    }
}

fn roots(tls: &Tls) -> Result<Option<RootCertStore>, Reason> {
    let Some(file) = &tls.cacertfile else { return Ok(None) };
    let mut store = RootCertStore::empty();
    for c in certs_from_pem(pem(file, cacertfile())?, cacertfile())? {
        store.add(c).map_err(|_| Reason::Tagged(cacertfile(), malformed()))?;
    }
    Ok(Some(store))
}

/// A self-signed certificate for a listener given none. For development only: clients must
/// use `verify: :none` (or trust this exact certificate) to connect.
fn self_signed() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Reason> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let ck = rcgen::generate_simple_self_signed(names).map_err(|_| Reason::Atom(crate::atoms::tls_error()))?;
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).map_err(|_| Reason::Atom(crate::atoms::tls_error()))?;
    Ok((vec![ck.cert.der().clone()], key))
}

pub fn transport_config(t: &Transport) -> Result<quinn::TransportConfig, Reason> {
    use quinn::VarInt;
    let var = |name: &str, v: u64| VarInt::from_u64(v).map_err(|_| bad_option(name));
    let mut c = quinn::TransportConfig::default();
    if let Some(ms) = t.idle_timeout_ms {
        // 0 means "no idle timeout", as in quicer.
        let timeout = if ms == 0 { None } else { Some(var("idle_timeout_ms", ms)?.into()) };
        c.max_idle_timeout(timeout);
    }
    if let Some(ms) = t.keep_alive_interval_ms {
        c.keep_alive_interval(if ms == 0 { None } else { Some(Duration::from_millis(ms)) });
    }
    if let Some(n) = t.peer_bidi_stream_count {
        c.max_concurrent_bidi_streams(var("peer_bidi_stream_count", n)?);
    }
    if let Some(n) = t.peer_unidi_stream_count {
        c.max_concurrent_uni_streams(var("peer_unidi_stream_count", n)?);
    }
    let stream_window = t.stream_recv_window.unwrap_or(flow::STREAM_RECV_WINDOW);
    c.stream_receive_window(var("stream_recv_window", stream_window)?);
    let conn_window = t.conn_recv_window.unwrap_or_else(|| flow::conn_recv_window(stream_window));
    c.receive_window(var("conn_recv_window", conn_window)?);
    if let Some(n) = t.send_window {
        c.send_window(n);
    }
    // Quinn accepts datagrams unless told otherwise, and keeps up to its buffer's worth that
    // nobody reads. Without the option nothing would read them: say so to the peer instead.
    if !t.datagrams {
        c.datagram_receive_buffer_size(None);
    } else if let Some(n) = t.datagram_buffer {
        c.datagram_receive_buffer_size(Some(n as usize));
    }
    Ok(c)
}

/// The Quinn server configuration for a listener.
pub fn server_config(tls: &Tls, transport: &Transport) -> Result<quinn::ServerConfig, Reason> {
    let (chain, key) = match chain_and_key(tls)? {
        Some(ck) => ck,
        None => self_signed()?,
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|_| Reason::Atom(crate::atoms::tls_error()))?;
    let builder = match tls.verify {
        Some(Verify::Peer) => {
            // Requiring client certificates needs a CA to check them against.
            let roots = roots(tls)?.ok_or_else(|| bad_option("cacertfile"))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|_| bad_option("cacertfile"))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(|_| Reason::Tagged(certfile(), cert_key_mismatch()))?;
    cfg.alpn_protocols = tls.alpn.clone();
    let quic = QuicServerConfig::try_from(cfg).map_err(|_| Reason::Atom(crate::atoms::tls_error()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(transport_config(transport)?));
    Ok(server)
}

/// The Quinn client configuration for one connect.
///
/// Verification: `verify: :verify_peer` checks the server against `cacertfile` (required, as
/// there is no system store to fall back on); `verify: :none` accepts any certificate (still
/// checking the handshake signature). Without `verify`, a given `cacertfile` means verify_peer,
/// and no `cacertfile` means none — quicer's default.
pub fn client_config(tls: &Tls, transport: &Transport) -> Result<quinn::ClientConfig, Reason> {
    let roots = roots(tls)?;
    let verify = tls.verify.unwrap_or(if roots.is_some() { Verify::Peer } else { Verify::None });
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|_| Reason::Atom(crate::atoms::tls_error()))?;
    let builder = match verify {
        Verify::Peer => builder.with_root_certificates(roots.ok_or_else(|| bad_option("cacertfile"))?),
        Verify::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider().signature_verification_algorithms))),
    };
    let mut cfg = match chain_and_key(tls)? {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|_| Reason::Tagged(certfile(), cert_key_mismatch()))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = tls.alpn.clone();
    cfg.resumption = if tls.resumption == Some(false) {
        Resumption::disabled()
    } else {
        Resumption::store(Arc::new(CountingSessionStore(ClientSessionMemoryCache::new(SESSION_CACHE_SERVERS))))
    };
    let quic = QuicClientConfig::try_from(cfg).map_err(|_| Reason::Atom(crate::atoms::tls_error()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(Arc::new(transport_config(transport)?));
    Ok(client)
}

/// What a client configuration is built from: the options, and the contents of the files
/// they name (so a changed certificate file gets a new configuration).
#[derive(PartialEq, Eq, Hash)]
struct ClientKey {
    tls: Tls,
    transport: Transport,
}

/// Distinct client configurations kept; past this the cache starts over.
const CLIENT_CACHE_MAX: usize = 64;

fn client_cache() -> &'static Mutex<HashMap<ClientKey, quinn::ClientConfig>> {
    static C: OnceLock<Mutex<HashMap<ClientKey, quinn::ClientConfig>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

/// `client_config`, reused for connects with the same options.
///
/// One configuration per set of options, as a long-lived rustls client keeps it, means a
/// connect does not rebuild the verifier and parse certificates every time, and the TLS session
/// cache is shared: a reconnect to a server that already sent this client a session ticket
/// resumes the session (no certificate chain sent, signed and verified again), unless
/// `session_resumption: false`. A connection closed right after its handshake may not have
/// received its ticket yet (the server sends it once the handshake is done).
pub fn client_config_cached(tls: &Tls, transport: &Transport) -> Result<quinn::ClientConfig, Reason> {
    // A file that could not be read is reported first, in this order, before any contents are
    // parsed: as when the files were read here (a connect with several faults reports the same
    // one).
    for (file, which) in [(&tls.certfile, certfile()), (&tls.keyfile, keyfile()), (&tls.cacertfile, cacertfile())] {
        if let Some(file) = file {
            pem(file, which)?;
        }
    }
    // The files' contents are part of the key (a renewed certificate must not reuse a stale
    // configuration): `tls` holds them, as read for this call.
    let key = ClientKey { tls: tls.clone(), transport: transport.clone() };
    if let Some(config) = lock(client_cache()).get(&key) {
        return Ok(config.clone());
    }
    // Errors (unreadable files, bad PEM) come from here and are never cached.
    let config = client_config(tls, transport)?;
    let mut cache = lock(client_cache());
    if cache.len() >= CLIENT_CACHE_MAX {
        cache.clear();
    }
    cache.insert(key, config.clone());
    Ok(config)
}

/// Servers whose session tickets a client configuration keeps (rustls's default).
const SESSION_CACHE_SERVERS: usize = 256;

/// rustls's in-memory session cache, counting the TLS 1.3 tickets stored and those taken to
/// offer a resumed handshake (`tls_tickets` and `tls_resumptions` in `native_counts/0`).
/// Whether a handshake resumed changes what it costs (a resumed one sends, signs and verifies
/// no certificate), so the benchmarks report it, and the tests prove `session_resumption: false`
/// takes effect.
#[derive(Debug)]
struct CountingSessionStore(ClientSessionMemoryCache);

impl ClientSessionStore for CountingSessionStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.0.set_kx_hint(server_name, group)
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.0.kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.0.set_tls12_session(server_name, value)
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.0.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.0.remove_tls12_session(server_name)
    }

    fn insert_tls13_ticket(&self, server_name: ServerName<'static>, value: Tls13ClientSessionValue) {
        counters::bump(&counters::TLS_TICKETS);
        self.0.insert_tls13_ticket(server_name, value)
    }

    fn take_tls13_ticket(&self, server_name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        let ticket = self.0.take_tls13_ticket(server_name);
        if ticket.is_some() {
            counters::bump(&counters::TLS_RESUMPTIONS);
        }
        ticket
    }
}

/// `verify: :none` on a client: any server certificate is accepted, but the handshake
/// signatures are still checked, so the connection is at least bound to the key presented.
#[derive(Debug)]
struct AcceptAnyServer(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
