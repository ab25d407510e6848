//! Network addresses: which are public (the only ones confab sends to on a client's say-so, push
//! endpoints, so that a registration cannot make a node reach its own network: loopback, private
//! ranges, link-local metadata services), and which address a request comes from (its peer's, or
//! behind trusted proxies the one they forwarded) and is rate limited under.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Whether `ip` is reachable on the public internet, as far as its range says.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(ip),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        // 0.0.0.0/8, shared address space (100.64.0.0/10), benchmarking (198.18.0.0/15),
        // reserved (240.0.0.0/4).
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 198 && (18..20).contains(&b))
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        // Unique local (fc00::/7), link-local (fe80::/10), documentation (2001:db8::/32),
        // NAT64 (64:ff9b::/96, which maps onto IPv4 of any kind).
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        || (first == 0x2001 && ip.segments()[1] == 0x0db8)
        || (first == 0x0064 && ip.segments()[1] == 0xff9b))
}

/// A range of addresses: `address/prefix` (`10.0.0.0/8`, `fd00::/8`), or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRange {
    network: IpAddr,
    prefix: u8,
}

impl IpRange {
    /// Whether `ip` is in the range. An IPv4 address mapped into IPv6 (`::ffff:10.0.0.1`, as a
    /// dual-stack socket reports an IPv4 peer) is taken as the IPv4 address it maps.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                masked_v4(ip, self.prefix) == masked_v4(network, self.prefix)
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                masked_v6(ip, self.prefix) == masked_v6(network, self.prefix)
            }
            _ => false,
        }
    }
}

impl FromStr for IpRange {
    type Err = String;

    fn from_str(text: &str) -> Result<IpRange, String> {
        let invalid = || format!("`{text}` is not an address or a range (address/prefix)");
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address = address.parse::<IpAddr>().map_err(|_| invalid())?;
        let most = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => most,
            Some(prefix) if !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_digit()) => {
                prefix
                    .parse::<u8>()
                    .ok()
                    .filter(|prefix| *prefix <= most)
                    .ok_or_else(invalid)?
            }
            Some(_) => return Err(invalid()),
        };
        // A range of IPv4 addresses mapped into IPv6 is that range of IPv4 addresses.
        match (address, canonical(address)) {
            (IpAddr::V6(_), IpAddr::V4(network)) if prefix >= 96 => Ok(IpRange {
                network: IpAddr::V4(network),
                prefix: prefix - 96,
            }),
            _ => Ok(IpRange {
                network: address,
                prefix,
            }),
        }
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The proxies (load balancers, ingresses) whose `X-Forwarded-For` header is believed: only they
/// can say which address a request came from, since a client can send any header it likes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpRange>);

impl TrustedProxies {
    /// Parses a comma-separated list of addresses and ranges; an empty list trusts no proxy. A
    /// range of every address (`0.0.0.0/0`, `::/0`) is refused: any client could then name its
    /// own address.
    pub fn parse(list: &str) -> Result<TrustedProxies, String> {
        let ranges: Vec<IpRange> = list
            .split(',')
            .map(str::trim)
            .filter(|range| !range.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        if let Some(everything) = ranges.iter().find(|range| range.prefix == 0) {
            return Err(format!(
                "`{everything}` holds every address, so any client could name its own"
            ));
        }
        Ok(TrustedProxies(ranges))
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|range| range.contains(ip))
    }

    /// The address a request came from, given its peer's and its `X-Forwarded-For` header values
    /// in order (as bytes: a value need not be text). From a trusted peer, the forwarded
    /// addresses are read from the right (each proxy appends the address it was reached from),
    /// past the trusted proxies, to the first address no trusted proxy has: the client's. What
    /// lies left of it was written by the client and is not believed. An entry that is not an
    /// address (text or not) ends the walk at the proxy that added it; a list of trusted proxies
    /// only gives its leftmost. From any other peer, the header is ignored.
    pub fn client_address<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl Iterator<Item = &'a [u8]>,
    ) -> IpAddr {
        let mut client = canonical(peer);
        if !self.trusts(client) {
            return client;
        }
        let hops: Vec<&[u8]> = forwarded_for
            .flat_map(|value| value.split(|byte| *byte == b','))
            .collect();
        for hop in hops.into_iter().rev() {
            let Some(hop) = std::str::from_utf8(hop)
                .ok()
                .and_then(|hop| forwarded_address(hop.trim()))
            else {
                break;
            };
            client = hop;
            if !self.trusts(hop) {
                break;
            }
        }
        client
    }
}

/// An `X-Forwarded-For` entry's address: bare (`203.0.113.5`, `2001:db8::1`), or with a port
/// (`203.0.113.5:4711`, `[2001:db8::1]:4711`) as some proxies write it.
fn forwarded_address(hop: &str) -> Option<IpAddr> {
    let ip = hop
        .parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|socket| socket.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|hop| hop.strip_suffix(']'))
                .and_then(|hop| hop.parse::<Ipv6Addr>().ok())
                .map(IpAddr::V6)
        })?;
    Some(canonical(ip))
}

/// The key under which requests from `ip` share a rate limit: an IPv4 address alone, an IPv6
/// address by its /64. An IPv6 host is given a whole /64 (SLAAC, privacy extensions rotate the
/// low 64 bits at will), so one client per address would let each take 2^64 allowances.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V4(ip) => IpAddr::V4(ip),
        IpAddr::V6(ip) => IpAddr::V6(masked_v6(ip, 64)),
    }
}

/// `ip`, with an IPv4 address mapped into IPv6 taken as that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

fn masked_v4(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ipv4Addr::from(u32::from(ip) & mask)
}

fn masked_v6(ip: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    Ipv6Addr::from(u128::from(ip) & mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_ranges_are_not_public() {
        for internal in [
            "127.0.0.1",
            "10.0.0.5",
            "172.16.3.4",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(internal.parse().unwrap()), "{internal}");
        }
        for public in [
            "1.1.1.1",
            "142.250.74.78",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ranges_hold_what_their_prefix_covers() {
        let private: IpRange = "10.0.0.0/8".parse().unwrap();
        assert!(private.contains(ip("10.255.1.2")));
        assert!(private.contains(ip("::ffff:10.1.2.3")));
        assert!(!private.contains(ip("11.0.0.1")));
        assert!(!private.contains(ip("::1")));
        let single: IpRange = "192.0.2.7".parse().unwrap();
        assert!(single.contains(ip("192.0.2.7")));
        assert!(!single.contains(ip("192.0.2.8")));
        let unique_local: IpRange = "fd00::/8".parse().unwrap();
        assert!(unique_local.contains(ip("fd12:3456::1")));
        assert!(!unique_local.contains(ip("fe80::1")));
        let everything: IpRange = "0.0.0.0/0".parse().unwrap();
        assert!(everything.contains(ip("198.51.100.1")));
        assert!(!everything.contains(ip("2001:db8::1")));
        let every_v6: IpRange = "::/0".parse().unwrap();
        assert!(every_v6.contains(ip("2001:db8::1")));
        assert!(!every_v6.contains(ip("198.51.100.1")));
        let one_v6: IpRange = "2001:db8::7/128".parse().unwrap();
        assert!(one_v6.contains(ip("2001:db8::7")));
        assert!(!one_v6.contains(ip("2001:db8::8")));
        let mapped: IpRange = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(mapped, "10.0.0.0/8".parse().unwrap());
        assert!(mapped.contains(ip("10.9.8.7")));
        for invalid in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "proxy",
            "10.0.0.0/-1",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/ 8",
        ] {
            assert!(invalid.parse::<IpRange>().is_err(), "{invalid}");
        }
        assert_eq!(
            TrustedProxies::parse(" 10.0.0.0/8, ,fd00::/8 ")
                .unwrap()
                .0
                .len(),
            2
        );
        assert!(TrustedProxies::parse("10.0.0.0/8, nope").is_err());
        for everything in ["0.0.0.0/0", "10.0.0.0/8, ::/0"] {
            assert!(TrustedProxies::parse(everything).is_err(), "{everything}");
        }
    }

    #[test]
    fn only_a_trusted_peer_says_where_a_request_came_from() {
        let proxies = TrustedProxies::parse("10.0.0.0/8, 2001:db8:ffff::/48").unwrap();
        let client = |peer: &str, headers: &[&str]| {
            proxies
                .client_address(ip(peer), headers.iter().map(|value| value.as_bytes()))
                .to_string()
        };
        // An untrusted peer's header is not believed.
        assert_eq!(client("198.51.100.9", &["203.0.113.5"]), "198.51.100.9");
        // Nor is any header without trusted proxies.
        assert_eq!(
            TrustedProxies::default()
                .client_address(ip("10.0.0.1"), [b"203.0.113.5".as_slice()].into_iter())
                .to_string(),
            "10.0.0.1"
        );
        // A trusted proxy forwards its client's address.
        assert_eq!(client("10.0.0.1", &["203.0.113.5"]), "203.0.113.5");
        assert_eq!(client("::ffff:10.0.0.1", &["203.0.113.5"]), "203.0.113.5");
        // What the client wrote itself, left of what the proxy appended, is not believed.
        assert_eq!(
            client("10.0.0.1", &["192.0.2.1, 203.0.113.5"]),
            "203.0.113.5"
        );
        // Through a chain of trusted proxies, over several header lines.
        assert_eq!(
            client(
                "10.0.0.1",
                &["192.0.2.1, 203.0.113.5", "10.9.9.9, 2001:db8:ffff::2"]
            ),
            "203.0.113.5"
        );
        // Ports, brackets and the mapped form are read as the address.
        assert_eq!(client("10.0.0.1", &["203.0.113.5:4711"]), "203.0.113.5");
        assert_eq!(client("10.0.0.1", &["[2001:db8::5]:4711"]), "2001:db8::5");
        assert_eq!(client("10.0.0.1", &["[2001:db8::5]"]), "2001:db8::5");
        assert_eq!(client("10.0.0.1", &["::ffff:203.0.113.5"]), "203.0.113.5");
        // No header, or one that is not an address: the proxy's own address.
        assert_eq!(client("10.0.0.1", &[]), "10.0.0.1");
        assert_eq!(client("10.0.0.1", &["unknown"]), "10.0.0.1");
        assert_eq!(
            client("10.0.0.1", &["203.0.113.5, 10.0.0.2, garbage"]),
            "10.0.0.1"
        );
        // A value that is not text ends the walk as well: the client cannot have it skipped to
        // reach the addresses it wrote itself.
        let bytes = |values: [&'static [u8]; 2]| {
            proxies
                .client_address(ip("10.0.0.1"), values.into_iter())
                .to_string()
        };
        assert_eq!(
            bytes([b"198.51.100.77", b"\x80, 203.0.113.5"]),
            "203.0.113.5"
        );
        assert_eq!(bytes([b"198.51.100.77", b"\x80"]), "10.0.0.1");
        // Only trusted proxies: the leftmost.
        assert_eq!(client("10.0.0.1", &["10.0.0.3, 10.0.0.2"]), "10.0.0.3");
    }

    #[test]
    fn an_ipv6_client_is_limited_by_its_64() {
        assert_eq!(
            limit_key(ip("2001:db8:1:2:aaaa::1")),
            limit_key(ip("2001:db8:1:2:ffff:1:2:3"))
        );
        assert_ne!(
            limit_key(ip("2001:db8:1:2::1")),
            limit_key(ip("2001:db8:1:3::1"))
        );
        assert_ne!(limit_key(ip("192.0.2.1")), limit_key(ip("192.0.2.2")));
        assert_eq!(limit_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }
}
