//! Requests to tenants' own endpoints (webhook receivers, HTTP tools): the host is resolved
//! once, an address in the platform's own network is refused unless allowed, and the request goes
//! to the addresses that were checked — not to what a second lookup, a redirect or a proxy might
//! say.

use std::net::{IpAddr, SocketAddr};

/// Why an endpoint is not reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The URL names no host or port.
    #[error("{0}")]
    Invalid(&'static str),
    /// The host does not resolve (now: it may later).
    #[error("the host does not resolve")]
    Unresolvable,
    /// The host resolves to an address endpoints may not use. Which one is not said: the
    /// message may reach the tenant, the network is the platform's.
    #[error("the host resolves to an address endpoints may not use: refused")]
    Private,
    /// The client could not be built.
    #[error("building the HTTP client: {0}")]
    Client(String),
}

/// A client for `url` that sends only to the addresses its host resolved to now, after checking
/// them (private ones refused unless `allow_private`), with no redirects and no proxy; `builder`
/// carries the caller's other settings (timeouts).
pub async fn pinned_client(
    url: &reqwest::Url,
    allow_private: bool,
    builder: reqwest::ClientBuilder,
) -> Result<reqwest::Client, Refusal> {
    // An IPv6 literal is looked up without its brackets.
    let host = url
        .host_str()
        .ok_or(Refusal::Invalid("the URL has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url
        .port_or_known_default()
        .ok_or(Refusal::Invalid("the URL has no port"))?;
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|_| Refusal::Unresolvable)?
        .collect();
    if addresses.is_empty() {
        return Err(Refusal::Invalid("the host has no address"));
    }
    if !allow_private && addresses.iter().any(|a| is_private(a.ip())) {
        return Err(Refusal::Private);
    }
    builder
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .resolve_to_addrs(&host, &addresses)
        .build()
        .map_err(|e| Refusal::Client(e.without_url().to_string()))
}

/// Whether `ip` is one a tenant's endpoint must not point at: this network (0.0.0.0/8),
/// loopback, private, link-local, carrier-grade NAT, benchmarking (198.18.0.0/15), multicast and
/// broadcast; in IPv6 also unique-local and link-local, and any address that embeds an IPv4 one
/// (mapped, compatible, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) judged by that address.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            a == 0
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (a == 100 && (b & 0xc0) == 64)
                || (a == 198 && (b & 0xfe) == 18)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                IpAddr::V4(std::net::Ipv4Addr::new(
                    (hi >> 8) as u8,
                    hi as u8,
                    (lo >> 8) as u8,
                    lo as u8,
                ))
            };
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            // IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::a.b.c.d).
            if s[..6] == [0; 6] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_private(embedded(s[6], s[7]));
            }
            // 6to4: 2002:aabb:ccdd::.
            if s[0] == 0x2002 {
                return is_private(embedded(s[1], s[2]));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "198.18.0.1",
            "224.0.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:0a00:0001::1",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "2606:4700::1111",
            "100.128.0.1",
            "64:ff9b::5db8:d822",
            "2002:5db8:d822::1",
        ] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn a_private_host_is_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:1/x",
            "http://localhost:1/x",
            "http://[::1]:1/x",
        ] {
            let url = reqwest::Url::parse(url).unwrap();
            let refused = pinned_client(&url, false, reqwest::Client::builder()).await;
            assert_eq!(refused.err(), Some(Refusal::Private), "{url}");
            assert!(pinned_client(&url, true, reqwest::Client::builder())
                .await
                .is_ok());
        }
    }
}
