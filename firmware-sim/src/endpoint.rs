//! Parsing a hub URL (`wss://HOST[:PORT][/PATH]`) without an allocator.

/// A parsed hub URL. Every part borrows from the URL text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint<'u> {
    /// `wss` (TLS) rather than `ws`.
    pub secure: bool,
    /// Host name or address, without IPv6 brackets: what TCP connects to and what TLS
    /// verifies (it must be one of the certificate's SANs).
    pub host: &'u str,
    /// Port (default 443 for wss, 80 for ws).
    pub port: u16,
    /// `host[:port]` as written, for the HTTP `Host` header.
    pub authority: &'u str,
    /// Path and query; [`schemas::DEVICE_PATH`] when the URL has none.
    pub path: &'u str,
}

/// Why a URL was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Not `ws://` or `wss://`.
    #[error("the hub URL must start with wss:// (or ws:// behind a TLS-terminating proxy)")]
    Scheme,
    /// No host, user info, or a bad IPv6 literal.
    #[error("the hub URL has no valid host")]
    Host,
    /// The port is not a number from 1 to 65535.
    #[error("the hub URL's port is not a number from 1 to 65535")]
    Port,
}

impl<'u> Endpoint<'u> {
    /// Parses `url`.
    ///
    /// # Errors
    /// See [`EndpointError`].
    pub fn parse(url: &'u str) -> Result<Endpoint<'u>, EndpointError> {
        let url = url.trim();
        let (secure, rest) = if let Some(rest) = strip_prefix_ci(url, "wss://") {
            (true, rest)
        } else if let Some(rest) = strip_prefix_ci(url, "ws://") {
            (false, rest)
        } else {
            return Err(EndpointError::Scheme);
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.is_empty() || authority.contains('@') {
            return Err(EndpointError::Host);
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let close = v6.find(']').ok_or(EndpointError::Host)?;
            let host = &v6[..close];
            let after = &v6[close + 1..];
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(EndpointError::Host),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(EndpointError::Host);
        }
        let port = match port {
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(EndpointError::Port),
            },
            None if secure => 443,
            None => 80,
        };
        let path = path.split('#').next().unwrap_or("");
        let path = if path.is_empty() || path.starts_with('?') {
            schemas::DEVICE_PATH
        } else {
            path
        };
        Ok(Endpoint {
            secure,
            host,
            port,
            authority,
            path,
        })
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_urls() {
        let e = Endpoint::parse("wss://127.0.0.1:8443/v1/device").expect("url");
        assert_eq!(
            e,
            Endpoint {
                secure: true,
                host: "127.0.0.1",
                port: 8443,
                authority: "127.0.0.1:8443",
                path: "/v1/device"
            }
        );
        let e = Endpoint::parse("WS://hub.example.net").expect("url");
        assert_eq!((e.secure, e.port, e.path), (false, 80, "/v1/device"));
        let e = Endpoint::parse("wss://[::1]:9000/x?y=1").expect("url");
        assert_eq!(
            (e.host, e.port, e.path, e.authority),
            ("::1", 9000, "/x?y=1", "[::1]:9000")
        );
        assert_eq!(Endpoint::parse("https://h/"), Err(EndpointError::Scheme));
        assert_eq!(Endpoint::parse("wss://:1/"), Err(EndpointError::Host));
        assert_eq!(Endpoint::parse("wss://u@h/"), Err(EndpointError::Host));
        assert_eq!(Endpoint::parse("wss://h:0/"), Err(EndpointError::Port));
        assert_eq!(Endpoint::parse("wss://h:99999/"), Err(EndpointError::Port));
    }
}
