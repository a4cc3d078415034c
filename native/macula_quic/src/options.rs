//! Decoding the options callers pass to listen/connect/open_stream.
//!
//! The Elixir layer turns proplists into maps; here every key is checked against the names the
//! call accepts and every value against its type, so a wrong option is always
//! `{:error, {:bad_option, name}}` and never a crash or a silently ignored typo.
use std::net::IpAddr;
use std::time::Duration;

use rustler::types::map::MapIterator;
use rustler::{Atom, Encoder, Env, Term};

use crate::address::{decode_ip, decode_port, decode_string};
use crate::atoms;
use crate::error::{bad_option, Reason};
use crate::stream;

/// How a stream delivers received data (`:inet`-style `active`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Active {
    /// Passive: data waits for `recv`.
    Off,
    /// Every chunk becomes a message.
    On,
    /// One message, then passive (no `passive` message).
    Once,
    /// N more messages, then `{quic, passive, S, undefined}` and passive.
    Count(i32),
}

pub const ACTIVE_MAX: i64 = i16::MAX as i64;

impl Active {
    /// The mode after one message was delivered in it, and whether that spent an `N` budget
    /// (the owner is then told `{quic, passive, Handle, undefined}`).
    pub fn after_message(self) -> (Active, bool) {
        match self {
            Active::Once => (Active::Off, false),
            Active::Count(1) => (Active::Off, true),
            Active::Count(n) => (Active::Count(n - 1), false),
            other => (other, false),
        }
    }
}

/// The most streams of each direction a peer may be allowed to open at once (see `common`).
pub const MAX_STREAM_COUNT: u64 = u16::MAX as u64;

/// Peer verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verify {
    None,
    Peer,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Transport {
    pub idle_timeout_ms: Option<u64>,
    pub keep_alive_interval_ms: Option<u64>,
    pub peer_bidi_stream_count: Option<u64>,
    pub peer_unidi_stream_count: Option<u64>,
    pub stream_recv_window: Option<u64>,
    pub conn_recv_window: Option<u64>,
    pub send_window: Option<u64>,
    /// `datagram_receive_enabled`: the connection accepts QUIC datagrams from the peer and
    /// delivers them to its owner (see `datagram`). Off by default, as in quicer: the peer is
    /// then told datagrams are not accepted, and its sends fail at once.
    pub datagrams: bool,
    /// `datagram_receive_buffer`: bytes of received datagrams Quinn keeps for the owner (see
    /// `datagram`); Quinn's default when unset.
    pub datagram_buffer: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tls {
    pub alpn: Vec<Vec<u8>>,
    pub certfile: Option<PemFile>,
    pub keyfile: Option<PemFile>,
    pub cert: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
    pub cacertfile: Option<PemFile>,
    pub verify: Option<Verify>,
    /// (connect) `session_resumption`: `Some(false)` keeps no TLS session tickets, so every
    /// handshake is a full one.
    pub resumption: Option<bool>,
}

#[derive(Clone, Debug, Default)]
pub struct Listen {
    pub tls: Tls,
    pub transport: Transport,
    pub handshake_timeout: Option<Duration>,
    pub backlog: Option<usize>,
    pub datagram_active: Option<Active>,
}

#[derive(Clone, Debug, Default)]
pub struct Connect {
    pub tls: Tls,
    pub transport: Transport,
    pub server_name: Option<String>,
    pub local_address: Option<(IpAddr, u16)>,
    pub handshake_timeout: Option<Duration>,
    pub datagram_active: Option<Active>,
}

impl Listen {
    /// How the connections' datagrams are delivered (see `datagram`); `None` without them.
    pub fn datagrams(&self) -> Option<Active> {
        datagrams(&self.transport, self.datagram_active)
    }
}

impl Connect {
    /// How the connection's datagrams are delivered (see `datagram`); `None` without them.
    pub fn datagrams(&self) -> Option<Active> {
        datagrams(&self.transport, self.datagram_active)
    }
}

fn datagrams(t: &Transport, active: Option<Active>) -> Option<Active> {
    t.datagrams.then(|| active.unwrap_or(Active::On))
}

/// Bounds of `datagram_receive_buffer`: room for one datagram at least, and no more than the
/// default connection window (`flow::CONN_RECV_WINDOW`).
const DATAGRAM_BUFFER_MIN: u64 = 2048;
const DATAGRAM_BUFFER_MAX: u64 = 64 * 1024 * 1024;

fn datagram_buffer(v: Term) -> Result<u64, Reason> {
    match v.decode::<u64>() {
        Ok(n) if (DATAGRAM_BUFFER_MIN..=DATAGRAM_BUFFER_MAX).contains(&n) => Ok(n),
        _ => Err(bad_option("datagram_receive_buffer")),
    }
}

/// `datagram_active`: an `active` value, meaningful only with `datagram_receive_enabled`.
fn datagram_active(v: Term) -> Result<Active, Reason> {
    let setting = decode_active(v).ok_or_else(|| bad_option("datagram_active"))?;
    setting.apply(Active::Off).map_err(|_| bad_option("datagram_active"))
}

/// `datagram_active` or `datagram_receive_buffer` without `datagram_receive_enabled` would do
/// nothing: refused.
fn check_datagram_options(t: &Transport, active: Option<Active>) -> Result<(), Reason> {
    match (active, t.datagram_buffer) {
        (Some(_), _) if !t.datagrams => Err(bad_option("datagram_active")),
        (_, Some(_)) if !t.datagrams => Err(bad_option("datagram_receive_buffer")),
        _ => Ok(()),
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Stream {
    pub active: Active,
    pub unidirectional: bool,
    /// How far a passive stream reads ahead of `recv` (see `stream::PASSIVE_READ_AHEAD`).
    pub read_ahead: usize,
}

impl Default for Stream {
    fn default() -> Self {
        Stream { active: Active::On, unidirectional: false, read_ahead: stream::PASSIVE_READ_AHEAD }
    }
}

/// Bounds of a stream's `read_ahead`. Below a packet's worth, `recv(stream, 0)` would return
/// a few bytes at a time; the top bounds what one stream holds that its owner has not read,
/// and what one `recv(stream, 0)` returns.
pub const READ_AHEAD_MIN: usize = 1024;
pub const READ_AHEAD_MAX: usize = 4 * 1024 * 1024;

/// Decodes a `read_ahead` value: bytes, an integer in `READ_AHEAD_MIN..=READ_AHEAD_MAX`.
pub fn decode_read_ahead(v: Term) -> Option<usize> {
    v.decode::<usize>().ok().filter(|n| (READ_AHEAD_MIN..=READ_AHEAD_MAX).contains(n))
}

/// Calls `f` with each (option name, value) of a map, stopping at the first error; a non-map
/// or a non-atom key is a badarg. Entries are visited lazily, so a huge map of junk costs no
/// more than reaching its first unknown name.
fn each_entry<'a>(map: Term<'a>, mut f: impl FnMut(&str, Term<'a>) -> Result<(), Reason>) -> Result<(), Reason> {
    let iter = MapIterator::new(map).ok_or(Reason::Atom(atoms::badarg()))?;
    for (k, v) in iter {
        let name = k.atom_to_string().map_err(|_| Reason::Atom(atoms::badarg()))?;
        f(&name, v)?;
    }
    Ok(())
}

/// Largest DER certificate or key accepted in `:cert`/`:key` (real ones are a few KiB).
const MAX_DER: usize = 1024 * 1024;

/// Most ALPN protocol names accepted (the TLS extension holds at most 64 KiB of them).
const MAX_ALPN: usize = 256;

fn uint(name: &str, v: Term, max: u64) -> Result<u64, Reason> {
    match v.decode::<u64>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(bad_option(name)),
    }
}

fn boolean(name: &str, v: Term) -> Result<bool, Reason> {
    v.decode::<bool>().map_err(|_| bad_option(name))
}

/// A boolean, or quicer's `0`/`1` for one (its QUIC settings are MsQuic's integer flags).
fn flag(name: &str, v: Term) -> Result<bool, Reason> {
    match v.decode::<u8>() {
        Ok(0) => Ok(false),
        Ok(1) => Ok(true),
        Ok(_) => Err(bad_option(name)),
        Err(_) => boolean(name, v),
    }
}

fn string(name: &str, v: Term) -> Result<String, Reason> {
    decode_string(v).ok_or_else(|| bad_option(name))
}

/// A PEM file named in the options, as `MaculaQuic.Options.read_pem_files/1` read it (in the
/// calling process, so that no file is read on a scheduler): its contents, or why it could not
/// be read. The error is reported (as `{name, why}`) where the file is needed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PemFile {
    Read(Vec<u8>),
    Unreadable(Unreadable),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unreadable {
    Enoent,
    Eacces,
    Eisdir,
    Einval,
    TooLarge,
    Malformed,
}

/// `{:"$macula_quic_pem", :ok, Contents}` or `{:"$macula_quic_pem", :error, Why}`; anything
/// else (a path handed to the NIF directly, say) is a bad option.
fn pem_file(name: &str, v: Term) -> Result<PemFile, Reason> {
    rustler::atoms! { pem_tag = "$macula_quic_pem" }
    let bad = || bad_option(name);
    let parts = rustler::types::tuple::get_tuple(v).map_err(|_| bad())?;
    let [tag, status, value] = parts[..] else { return Err(bad()) };
    if tag.decode::<Atom>().ok() != Some(pem_tag()) {
        return Err(bad());
    }
    match status.atom_to_string().map_err(|_| bad())?.as_str() {
        "ok" => match value.decode::<rustler::Binary>() {
            Ok(b) if b.len() <= MAX_DER => Ok(PemFile::Read(b.as_slice().to_vec())),
            _ => Err(bad()),
        },
        "error" => {
            let why = match value.atom_to_string().map_err(|_| bad())?.as_str() {
                "enoent" => Unreadable::Enoent,
                "eacces" => Unreadable::Eacces,
                "eisdir" => Unreadable::Eisdir,
                "einval" => Unreadable::Einval,
                "too_large" => Unreadable::TooLarge,
                "malformed" => Unreadable::Malformed,
                _ => return Err(bad()),
            };
            Ok(PemFile::Unreadable(why))
        }
        _ => Err(bad()),
    }
}

fn binary(name: &str, v: Term) -> Result<Vec<u8>, Reason> {
    match v.decode::<rustler::Binary>() {
        Ok(b) if b.len() <= MAX_DER => Ok(b.as_slice().to_vec()),
        _ => Err(bad_option(name)),
    }
}

fn alpn(v: Term) -> Result<Vec<Vec<u8>>, Reason> {
    let items = crate::util::list_items(v, MAX_ALPN).ok_or_else(|| bad_option("alpn"))?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let s = decode_string(item).ok_or_else(|| bad_option("alpn"))?;
        // ALPN protocol ids are 1..=255 bytes (RFC 7301).
        if s.is_empty() || s.len() > 255 {
            return Err(bad_option("alpn"));
        }
        out.push(s.into_bytes());
    }
    if out.is_empty() {
        return Err(bad_option("alpn"));
    }
    Ok(out)
}

fn verify(v: Term) -> Result<Verify, Reason> {
    rustler::atoms! { none, verify_none, verify_peer, peer }
    let a: Atom = v.decode().map_err(|_| bad_option("verify"))?;
    if a == none() || a == verify_none() {
        Ok(Verify::None)
    } else if a == verify_peer() || a == peer() {
        Ok(Verify::Peer)
    } else {
        Err(bad_option("verify"))
    }
}

/// Decodes an `active` value: `true | false | :once | integer` (integers in -32767..=32767).
pub fn decode_active(v: Term) -> Option<ActiveSetting> {
    if let Ok(b) = v.decode::<bool>() {
        return Some(ActiveSetting::Set(if b { Active::On } else { Active::Off }));
    }
    if let Ok(a) = v.decode::<Atom>() {
        return (a == atoms::once()).then_some(ActiveSetting::Set(Active::Once));
    }
    match v.decode::<i64>() {
        // A range, not `n.abs()`: the absolute value of i64::MIN overflows.
        Ok(n) if (-ACTIVE_MAX..=ACTIVE_MAX).contains(&n) => Some(ActiveSetting::Add(n as i32)),
        _ => None,
    }
}

/// An `active` mode as callers see it: `true | false | :once | N`.
pub fn encode_active(env: Env, a: Active) -> Term {
    match a {
        Active::On => true.encode(env),
        Active::Off => false.encode(env),
        Active::Once => atoms::once().encode(env),
        Active::Count(n) => n.encode(env),
    }
}

/// An `active` option as given: a mode, or an integer to add to the counter (`:inet` semantics).
#[derive(Clone, Copy, Debug)]
pub enum ActiveSetting {
    Set(Active),
    Add(i32),
}

impl ActiveSetting {
    /// Did this setting, taking the mode from `before` to `after`, spend the budget? An `N` that
    /// brings the count to zero or below turns delivery off and, as in `:inet`, says so
    /// (`{quic, passive, Handle, undefined}`); setting `false` says nothing.
    pub fn ran_out(self, before: Active, after: Active) -> bool {
        matches!(self, ActiveSetting::Add(_)) && after == Active::Off && before != Active::Off
    }

    /// Applies this setting to the current mode. `Err` when the counter would exceed
    /// `ACTIVE_MAX`.
    pub fn apply(self, current: Active) -> Result<Active, ()> {
        match self {
            ActiveSetting::Set(m) => Ok(m),
            ActiveSetting::Add(n) => {
                let base = match current {
                    Active::Count(c) => c as i64,
                    _ => 0,
                };
                let total = base + n as i64;
                if total > ACTIVE_MAX {
                    Err(())
                } else if total <= 0 {
                    Ok(Active::Off)
                } else {
                    Ok(Active::Count(total as i32))
                }
            }
        }
    }
}

/// Transport and TLS options shared by listen and connect. Returns false when `name` is not one.
fn common(name: &str, v: Term, tls: &mut Tls, t: &mut Transport) -> Result<bool, Reason> {
    const MAX_VARINT: u64 = (1 << 62) - 1;
    match name {
        "alpn" => tls.alpn = alpn(v)?,
        "certfile" | "cert_file" => tls.certfile = Some(pem_file(name, v)?),
        "keyfile" | "key_file" => tls.keyfile = Some(pem_file(name, v)?),
        "cert" => tls.cert = Some(binary(name, v)?),
        "key" => tls.key = Some(binary(name, v)?),
        "cacertfile" => tls.cacertfile = Some(pem_file(name, v)?),
        "verify" => tls.verify = Some(verify(v)?),
        // Quinn encodes the idle timeout as a QUIC varint of milliseconds.
        "idle_timeout_ms" => t.idle_timeout_ms = Some(uint(name, v, MAX_VARINT)?),
        "keep_alive_interval_ms" => t.keep_alive_interval_ms = Some(uint(name, v, u32::MAX as u64)?),
        // Quinn sets up state for every stream the peer may open when a connection starts (a loop
        // over the count, run inside connect on the caller's scheduler and on every accepted
        // connection), so the count must stay small for that to be quick: MsQuic's limit (and
        // so quicer's), a u16.
        "peer_bidi_stream_count" => t.peer_bidi_stream_count = Some(uint(name, v, MAX_STREAM_COUNT)?),
        "peer_unidi_stream_count" => t.peer_unidi_stream_count = Some(uint(name, v, MAX_STREAM_COUNT)?),
        "stream_recv_window" | "stream_recv_window_default" => {
            t.stream_recv_window = Some(uint(name, v, MAX_VARINT)?)
        }
        "conn_recv_window" | "conn_flow_control_window" => {
            t.conn_recv_window = Some(uint(name, v, MAX_VARINT)?)
        }
        "send_window" => t.send_window = Some(uint(name, v, MAX_VARINT)?),
        "datagram_receive_enabled" => t.datagrams = flag(name, v)?,
        "datagram_receive_buffer" => t.datagram_buffer = Some(datagram_buffer(v)?),
        _ => return Ok(false),
    }
    Ok(true)
}

fn handshake_timeout(name: &str, v: Term) -> Result<Duration, Reason> {
    Ok(Duration::from_millis(uint(name, v, u32::MAX as u64)?))
}

pub fn decode_listen(map: Term) -> Result<Listen, Reason> {
    let mut o = Listen::default();
    each_entry(map, |name, v| {
        if common(name, v, &mut o.tls, &mut o.transport)? {
            return Ok(());
        }
        match name {
            "handshake_idle_timeout_ms" => o.handshake_timeout = Some(handshake_timeout(name, v)?),
            "backlog" => o.backlog = Some(uint(name, v, 1 << 20)?.max(1) as usize),
            "datagram_active" => o.datagram_active = Some(datagram_active(v)?),
            _ => return Err(bad_option(name)),
        }
        Ok(())
    })?;
    check_datagram_options(&o.transport, o.datagram_active)?;
    if o.tls.alpn.is_empty() {
        return Err(Reason::Tagged(atoms::missing_option(), alpn_atom()));
    }
    Ok(o)
}

pub fn decode_connect(map: Term) -> Result<Connect, Reason> {
    let mut o = Connect::default();
    each_entry(map, |name, v| {
        if common(name, v, &mut o.tls, &mut o.transport)? {
            return Ok(());
        }
        match name {
            "handshake_idle_timeout_ms" => o.handshake_timeout = Some(handshake_timeout(name, v)?),
            "server_name" | "sni" => o.server_name = Some(string(name, v)?),
            "session_resumption" => o.tls.resumption = Some(boolean(name, v)?),
            "local_address" => o.local_address = Some(local_address(v)?),
            "datagram_active" => o.datagram_active = Some(datagram_active(v)?),
            _ => return Err(bad_option(name)),
        }
        Ok(())
    })?;
    check_datagram_options(&o.transport, o.datagram_active)?;
    if o.tls.alpn.is_empty() {
        return Err(Reason::Tagged(atoms::missing_option(), alpn_atom()));
    }
    Ok(o)
}

fn alpn_atom() -> Atom {
    rustler::atoms! { alpn }
    alpn()
}

/// `local_address`: an IP (tuple or string), or `{ip, port}`.
fn local_address(v: Term) -> Result<(IpAddr, u16), Reason> {
    if let Some(ip) = decode_ip(v) {
        return Ok((ip, 0));
    }
    if let Ok((ip, port)) = v.decode::<(Term, Term)>() {
        if let (Some(ip), Some(port)) = (decode_ip(ip), decode_port(port)) {
            return Ok((ip, port));
        }
    }
    Err(bad_option("local_address"))
}

pub fn decode_stream(map: Term) -> Result<Stream, Reason> {
    let mut o = Stream::default();
    each_entry(map, |name, v| {
        match name {
            "active" => {
                let setting = decode_active(v).ok_or_else(|| bad_option("active"))?;
                o.active = setting.apply(Active::Off).map_err(|_| bad_option("active"))?;
            }
            "unidirectional" => o.unidirectional = boolean(name, v)?,
            "read_ahead" => o.read_ahead = decode_read_ahead(v).ok_or_else(|| bad_option(name))?,
            // quicer's open flag: QUIC_STREAM_OPEN_FLAG_UNIDIRECTIONAL = 1.
            "open_flag" => {
                let f = uint(name, v, u32::MAX as u64)?;
                o.unidirectional = f & 1 == 1;
            }
            // quicer's start flags and event masks have no Quinn counterpart: a stream starts on
            // its first write. Accepted so quicer code runs unchanged.
            "start_flag" | "quic_event_mask" => {
                uint(name, v, u32::MAX as u64)?;
            }
            _ => return Err(bad_option(name)),
        }
        Ok(())
    })?;
    Ok(o)
}
