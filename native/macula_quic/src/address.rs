//! Decoding addresses callers pass in, and encoding the ones we report.
//!
//! Accepted forms: an `:inet.ip_address()` tuple, or a string (binary or charlist) holding an
//! IPv4/IPv6 literal ("127.0.0.2", "::1", "[::1]") or, where resolution is allowed, a host name.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use rustler::types::tuple::get_tuple;
use rustler::{Binary, Encoder, Env, Term};

/// What a host argument names: an IP, or a name to resolve.
#[derive(Clone, Debug)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

/// Longest string any argument or option may be (a file path; names and literals are far
/// shorter). Longer input is rejected before it is copied or scanned, so a huge binary or
/// charlist never costs the calling scheduler more than this much work.
pub const MAX_STRING: usize = 4096;

/// Decodes a string (binary or charlist) of at most `MAX_STRING` bytes/characters into a Rust
/// `String`, if it is one.
pub fn decode_string(term: Term) -> Option<String> {
    if let Ok(bin) = term.decode::<Binary>() {
        if bin.len() > MAX_STRING {
            return None;
        }
        return std::str::from_utf8(bin.as_slice()).ok().map(str::to_owned);
    }
    if term.is_list() {
        let mut out = String::new();
        for item in crate::util::list_items(term, MAX_STRING)? {
            out.push(char::from_u32(item.decode::<u32>().ok()?)?);
        }
        return Some(out);
    }
    None
}

/// An integer of exactly type `T`. Rustler's decoders for `u8`/`u16` truncate a wider value
/// (256 would become 0), so narrow integers are decoded wide and range-checked.
fn exact<T: TryFrom<i64>>(term: Term) -> Option<T> {
    term.decode::<i64>().ok().and_then(|n| T::try_from(n).ok())
}

fn decode_ip_tuple(term: Term) -> Option<IpAddr> {
    let parts = get_tuple(term).ok()?;
    match parts.len() {
        4 => {
            let mut o = [0u8; 4];
            for (i, p) in parts.iter().enumerate() {
                o[i] = exact::<u8>(*p)?;
            }
            Some(IpAddr::V4(Ipv4Addr::from(o)))
        }
        8 => {
            let mut s = [0u16; 8];
            for (i, p) in parts.iter().enumerate() {
                s[i] = exact::<u16>(*p)?;
            }
            Some(IpAddr::V6(Ipv6Addr::from(s)))
        }
        _ => None,
    }
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    let s = s.strip_prefix('[').and_then(|x| x.strip_suffix(']')).unwrap_or(s);
    s.parse().ok()
}

/// An IP address: a tuple or a literal string. No name resolution.
pub fn decode_ip(term: Term) -> Option<IpAddr> {
    decode_ip_tuple(term).or_else(|| decode_string(term).and_then(|s| parse_ip(&s)))
}

/// A host: an IP (tuple or literal), or a DNS name to resolve later.
pub fn decode_host(term: Term) -> Option<Host> {
    if let Some(ip) = decode_ip(term) {
        return Some(Host::Ip(ip));
    }
    let name = decode_string(term)?;
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    valid.then_some(Host::Name(name))
}

/// A port: an integer in 0..=65535.
pub fn decode_port(term: Term) -> Option<u16> {
    // Decode wide and check the range: a narrow decode would wrap 70000 to a valid port.
    term.decode::<i64>().ok().and_then(|p| u16::try_from(p).ok())
}

/// Encodes a socket address as `{"ip", port}` (the IP as a binary string).
pub fn encode_addr<'a>(env: Env<'a>, addr: &SocketAddr) -> Term<'a> {
    (canonical_ip(addr.ip()).to_string(), addr.port()).encode(env)
}

/// Encodes a socket address as quicer does in event props: `"ip:port"` (`"[v6]:port"`).
pub fn encode_addr_string<'a>(env: Env<'a>, addr: &SocketAddr) -> Term<'a> {
    let ip = canonical_ip(addr.ip());
    let s = match ip {
        IpAddr::V4(v4) => format!("{}:{}", v4, addr.port()),
        IpAddr::V6(v6) => format!("[{}]:{}", v6, addr.port()),
    };
    s.encode(env)
}

/// IPv4 peers reaching a dual-stack socket appear as `::ffff:a.b.c.d`; report them as IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}
