//! Mapping Quinn, rustls and io errors to terms callers can match on.
//!
//! Reasons are atoms, or `{atom, detail}` tuples where a code matters (an application error
//! code, a TLS alert). Never free-form strings: callers match on these.
use rustler::{Atom, Encoder, Env, Term};

use crate::atoms;

/// An error reason, independent of any environment (so it can cross threads).
#[derive(Clone, Debug)]
pub enum Reason {
    Atom(Atom),
    /// `{tag, integer}`: e.g. `{:shutdown, app_error_code}`, `{:transport_error, code}`.
    Code(Atom, u64),
    /// `{tag, atom}`: e.g. `{:tls_alert, :unknown_ca}`, `{:bad_option, :alpn}`.
    Tagged(Atom, Atom),
    /// `{:bad_option, name}`. The name is always an existing atom's text (one of our option
    /// names, or a key the caller passed as an atom), so encoding it creates no new atom.
    BadOption(String),
}

impl Encoder for Reason {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        match self {
            Reason::Atom(a) => a.encode(env),
            Reason::Code(a, c) => (*a, *c).encode(env),
            Reason::Tagged(a, b) => (*a, *b).encode(env),
            Reason::BadOption(name) => match Atom::from_str(env, name) {
                Ok(a) => (atoms::bad_option(), a).encode(env),
                Err(_) => (atoms::bad_option(), name.as_str()).encode(env),
            },
        }
    }
}

impl Reason {
    /// quicer's `transport_shutdown` status and error code for a connect that failed before
    /// Quinn had a connection to ask (see `connection::async_connect`): the reason's own tag.
    /// Our handshake deadline is MsQuic's `connection_timeout`.
    pub fn status(&self) -> (Atom, u64) {
        match self {
            Reason::Atom(a) if *a == atoms::timeout() => (atoms::connection_timeout(), 0),
            Reason::Atom(a) => (*a, 0),
            Reason::Code(a, c) => (*a, *c),
            Reason::Tagged(a, _) => (*a, 0),
            Reason::BadOption(_) => (atoms::bad_option(), 0),
        }
    }
}

impl From<Atom> for Reason {
    fn from(a: Atom) -> Self {
        Reason::Atom(a)
    }
}

/// `{:bad_option, name}` for an option with a wrong value or an unknown name.
pub fn bad_option(name: &str) -> Reason {
    Reason::BadOption(name.to_owned())
}

/// Maps an io error from bind/socket calls.
pub fn io(err: &std::io::Error) -> Reason {
    use std::io::ErrorKind::*;
    match err.kind() {
        AddrInUse => atoms::eaddrinuse().into(),
        AddrNotAvailable => atoms::eaddrnotavail().into(),
        PermissionDenied => atoms::eacces().into(),
        InvalidInput => atoms::einval().into(),
        _ => match err.raw_os_error() {
            Some(97) => Reason::Atom(atoms::eaddrnotavail()), // EAFNOSUPPORT: IPv6 disabled
            _ => Reason::Atom(atoms::io_error()),
        },
    }
}

/// The TLS alert name for a QUIC CRYPTO_ERROR code (0x100 + alert), where we know it.
fn tls_alert_name(alert: u8) -> Option<Atom> {
    rustler::atoms! {
        unexpected_message, bad_record_mac, handshake_failure,
        unsupported_certificate, certificate_revoked, certificate_expired,
        certificate_unknown, illegal_parameter, unknown_ca, access_denied, decode_error,
        decrypt_error, protocol_version, insufficient_security, internal_error,
        missing_extension, unsupported_extension, unrecognized_name,
        certificate_required, no_application_protocol, close_notify,
    }
    Some(match alert {
        0 => close_notify(),
        10 => unexpected_message(),
        20 => bad_record_mac(),
        40 => handshake_failure(),
        42 => atoms::bad_certificate(),
        43 => unsupported_certificate(),
        44 => certificate_revoked(),
        45 => certificate_expired(),
        46 => certificate_unknown(),
        47 => illegal_parameter(),
        48 => unknown_ca(),
        49 => access_denied(),
        50 => decode_error(),
        51 => decrypt_error(),
        70 => protocol_version(),
        71 => insufficient_security(),
        80 => internal_error(),
        109 => missing_extension(),
        110 => unsupported_extension(),
        112 => unrecognized_name(),
        116 => certificate_required(),
        120 => no_application_protocol(),
        _ => return None,
    })
}

/// Maps a QUIC transport error code (ours or the peer's) to a reason.
pub fn transport_code(code: u64) -> Reason {
    if (0x100..0x200).contains(&code) {
        let alert = (code - 0x100) as u8;
        return match tls_alert_name(alert) {
            Some(name) => Reason::Tagged(atoms::tls_alert(), name),
            None => Reason::Code(atoms::tls_alert(), alert as u64),
        };
    }
    match code {
        0x2 => atoms::connection_refused().into(),
        _ => Reason::Code(atoms::transport_error(), code),
    }
}

/// Maps why a connection ended (or failed to start).
pub fn connection(err: &quinn::ConnectionError) -> Reason {
    use quinn::ConnectionError::*;
    match err {
        TimedOut => atoms::timeout().into(),
        TransportError(e) => transport_code(u64::from(e.code)),
        ConnectionClosed(frame) => transport_code(u64::from(frame.error_code)),
        ApplicationClosed(frame) => Reason::Code(atoms::shutdown(), frame.error_code.into_inner()),
        Reset => atoms::reset().into(),
        LocallyClosed => atoms::closed().into(),
        VersionMismatch => atoms::version_mismatch().into(),
        CidsExhausted => atoms::cids_exhausted().into(),
    }
}

/// Maps why `Endpoint::connect` refused to start a connection.
pub fn connect(err: &quinn::ConnectError) -> Reason {
    use quinn::ConnectError::*;
    match err {
        EndpointStopping => atoms::closed().into(),
        CidsExhausted => atoms::cids_exhausted().into(),
        InvalidServerName(_) => bad_option("server_name"),
        InvalidRemoteAddress(_) => atoms::bad_address().into(),
        NoDefaultClientConfig | UnsupportedVersion => atoms::invalid_config().into(),
    }
}
