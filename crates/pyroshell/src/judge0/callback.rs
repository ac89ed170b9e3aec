//! `callback_url`: PUT the finished submission to the client's URL.
//!
//! Off unless the operator enables callbacks. A callback is a request the
//! server makes on a client's behalf, so it must not reach what the client
//! cannot (Judge0's 2024 SSRF, CVE-2024-28185/28189 family): the host is
//! resolved once, every address must be public (no loopback, private,
//! link-local, CGNAT, unique-local, multicast, unspecified or documentation
//! ranges) unless the operator allows private targets, and the request is
//! pinned to the checked address so a second DNS answer cannot swap it
//! (rebinding). Redirects are not followed. Failures are retried with
//! exponential backoff, a bounded number of times.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tracing::{info, warn};

/// Attempts per callback (Judge0's `callbacks_max_tries` default is 3).
pub(crate) const MAX_TRIES: u32 = 3;
/// Timeout of one attempt (Judge0's `callbacks_timeout` default is 5 s).
pub(crate) const TIMEOUT: Duration = Duration::from_secs(5);
/// Delay before the second attempt; doubles each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// Why a callback target was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum TargetError {
    /// Not an http(s) URL with a host.
    #[error("callback URL is not an http(s) URL with a host")]
    BadUrl,
    /// The host did not resolve.
    #[error("callback host {0} does not resolve")]
    Unresolved(String),
    /// It resolves to an address callbacks may not reach.
    #[error("callback host {host} resolves to {addr}, which is not a public address")]
    NotPublic {
        /// The host.
        host: String,
        /// The refused address.
        addr: IpAddr,
    },
}

/// Whether `ip` is a public unicast address.
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let seg = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link-local
                || (seg[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
                || (seg[0] == 0x0064 && seg[1] == 0xff9b) // NAT64 can reach private v4
                || seg[0] == 0x2002) // 6to4 embeds any v4
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // CGNAT 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
        || o[0] >= 240) // reserved
}

/// Resolves the URL's host and checks every address. Returns the host and
/// the address to pin the request to.
///
/// # Errors
/// [`TargetError`] when the URL is unusable or an address is not allowed.
pub(crate) async fn check_target(url: &str, allow_private: bool) -> Result<(String, SocketAddr), TargetError> {
    let u = reqwest::Url::parse(url).map_err(|_| TargetError::BadUrl)?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(TargetError::BadUrl);
    }
    let host = u.host_str().ok_or(TargetError::BadUrl)?.to_string();
    let port = u.port_or_known_default().ok_or(TargetError::BadUrl)?;
    let bare = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare.as_str(), port))
            .await
            .map_err(|_| TargetError::Unresolved(host.clone()))?
            .collect(),
    };
    let first = *addrs.first().ok_or_else(|| TargetError::Unresolved(host.clone()))?;
    if !allow_private {
        if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
            return Err(TargetError::NotPublic { host, addr: bad.ip() });
        }
    }
    Ok((bare, first))
}

/// PUTs `body` to `url`: checked, pinned, no redirects, [`MAX_TRIES`] attempts with backoff.
/// Returns whether the target answered 2xx; failures are logged, never raised.
pub(crate) async fn deliver(url: String, body: serde_json::Value, allow_private: bool, token: String) -> bool {
    let (host, addr) = match check_target(&url, allow_private).await {
        Ok(t) => t,
        Err(e) => {
            warn!(%token, error = %e, "callback refused");
            return false;
        }
    };
    let client = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(TIMEOUT)
        .resolve(&host, addr)
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            warn!(%token, error = %e, "callback client could not be built");
            return false;
        }
    };
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=MAX_TRIES {
        match client.put(&url).json(&body).send().await {
            Ok(r) if r.status().is_success() => {
                info!(%token, attempt, status = r.status().as_u16(), "callback delivered");
                return true;
            }
            Ok(r) => warn!(%token, attempt, status = r.status().as_u16(), "callback answered with an error"),
            Err(e) => warn!(%token, attempt, error = %e, "callback failed"),
        }
        if attempt < MAX_TRIES {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
        ] {
            assert!(!is_public(bad.parse().unwrap()), "{bad}");
        }
        for good in ["1.1.1.1", "8.8.8.8", "2606:4700:4700::1111"] {
            assert!(is_public(good.parse().unwrap()), "{good}");
        }
    }

    #[tokio::test]
    async fn targets_are_checked_before_any_request() {
        let e = check_target("http://127.0.0.1:9/cb", false).await.unwrap_err();
        assert!(matches!(e, TargetError::NotPublic { .. }), "{e:?}");
        let e = check_target("http://localhost:9/cb", false).await.unwrap_err();
        assert!(matches!(e, TargetError::NotPublic { .. }), "localhost resolves to loopback: {e:?}");
        let e = check_target("http://[::1]:9/cb", false).await.unwrap_err();
        assert!(matches!(e, TargetError::NotPublic { .. }), "{e:?}");
        assert_eq!(check_target("file:///etc/passwd", false).await.unwrap_err(), TargetError::BadUrl);
        let (host, addr) = check_target("http://127.0.0.1:9/cb", true).await.unwrap();
        assert_eq!((host.as_str(), addr.port()), ("127.0.0.1", 9), "allowed when the operator says so");
    }
}
