//! What happens on the WebSocket link around a session, classified once for every driver:
//! a data frame to a message or to the close it calls for, a refused upgrade (its HTTP
//! status and `Retry-After`) to a [`DisconnectCause`], the peer's close frame to a cause,
//! and a close code to words for a log.
//!
//! The hub, the Linux agent, the firmware and the test devices all call these, so a 503
//! means the same wait and a text frame on a postcard connection the same close code
//! everywhere. No I/O, no allocation.

use crate::close;
use crate::codec::{decode_postcard, DecodeError, Encoding, WireMessage};
use crate::session::DisconnectCause;

/// A data frame as the WebSocket layer delivered it.
#[derive(Debug, Clone, Copy)]
pub enum DataFrame<'a> {
    /// A binary message.
    Binary(&'a [u8]),
    /// A text message (UTF-8 checked by the WebSocket layer).
    Text(&'a str),
}

/// A frame that calls for closing the connection: the close code to send and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRefused {
    /// The close code (1003, 1007 or 4002).
    pub code: u16,
    /// The decoder's explanation (for the close reason and the log).
    pub error: Option<DecodeError>,
    /// A short fixed explanation.
    pub reason: &'static str,
}

/// Decodes a data frame of a connection using `encoding`: binary frames carry postcard,
/// text frames JSON, and the other kind is refused with 1003. A message type this version
/// does not know is refused with 4002, anything else that does not decode with 1007.
///
/// # Errors
/// [`FrameRefused`] with the close code to send.
// The decoder's explanation is a fixed-capacity string (no allocator on the firmware path),
// and it is still smaller than the message an `Ok` carries.
#[allow(clippy::result_large_err)]
pub fn decode_frame<M: WireMessage>(
    encoding: Encoding,
    frame: DataFrame<'_>,
) -> Result<M, FrameRefused> {
    let decoded = match (encoding, frame) {
        (Encoding::Postcard, DataFrame::Binary(bytes)) => decode_postcard::<M>(bytes),
        #[cfg(feature = "json")]
        (Encoding::Json, DataFrame::Text(text)) => crate::codec::decode_json::<M>(text),
        #[cfg(not(feature = "json"))]
        (Encoding::Json, DataFrame::Text(_)) => {
            return Err(FrameRefused {
                code: close::UNSUPPORTED_DATA,
                error: None,
                reason: "this build has no JSON decoder",
            })
        }
        (Encoding::Postcard, DataFrame::Text(_)) => {
            return Err(FrameRefused {
                code: close::UNSUPPORTED_DATA,
                error: None,
                reason: "text frame on a hub.v1.postcard connection",
            })
        }
        (Encoding::Json, DataFrame::Binary(_)) => {
            return Err(FrameRefused {
                code: close::UNSUPPORTED_DATA,
                error: None,
                reason: "binary frame on a hub.v1.json connection",
            })
        }
    };
    decoded.map_err(|err| match err {
        DecodeError::UnknownType => FrameRefused {
            code: close::UNKNOWN_MESSAGE,
            error: Some(err),
            reason: "unknown message type",
        },
        DecodeError::Malformed(_) => FrameRefused {
            code: close::INVALID_PAYLOAD,
            error: Some(err),
            reason: "message does not decode",
        },
    })
}

/// How long a device waits after a 503 without a usable `Retry-After`, in seconds.
pub const DEFAULT_RETRY_AFTER_S: u64 = 5;

/// Reads a `Retry-After` header value in delta-seconds (the form the hub sends). An HTTP
/// date or garbage gives `None`.
pub fn parse_retry_after(value: &str) -> Option<u64> {
    value.trim().parse::<u64>().ok()
}

/// What a refused WebSocket upgrade means for the session, from its HTTP status and the
/// response's `Retry-After` (seconds), if any.
///
/// - 400, 401, 403, 404: the request itself is wrong (subprotocol, token, path); retrying
///   soon will not help, so the session retries slowly ([`DisconnectCause::Refused`]).
/// - 429 and 503: the hub is busy or shutting down; wait what it asks
///   ([`DEFAULT_RETRY_AFTER_S`] without an answer), plus jitter.
/// - anything else (a proxy's 502, say): an ordinary failed attempt with normal backoff.
pub fn upgrade_refused(status: u16, retry_after_s: Option<u64>) -> DisconnectCause {
    match status {
        400 | 401 | 403 | 404 => DisconnectCause::Refused,
        429 | 503 => DisconnectCause::Unavailable {
            retry_after_ms: retry_after_s
                .unwrap_or(DEFAULT_RETRY_AFTER_S)
                .saturating_mul(1000),
        },
        _ => DisconnectCause::ConnectFailed,
    }
}

/// The cause for a close frame the peer sent: its code, or 1005 ("no status") when the
/// frame had none.
pub fn peer_closed(code: Option<u16>) -> DisconnectCause {
    DisconnectCause::Closed(code.unwrap_or(close::NO_STATUS))
}

/// Reads the code of a close frame's payload (two bytes, big-endian, then the reason).
pub fn close_code(payload: &[u8]) -> Option<u16> {
    match payload {
        [hi, lo, ..] => Some(u16::from_be_bytes([*hi, *lo])),
        _ => None,
    }
}

/// Words for a close code from the hub, for a device's log.
pub fn close_meaning(code: u16) -> &'static str {
    match code {
        close::NORMAL => "normal close",
        close::GOING_AWAY => "hub shutting down",
        close::PROTOCOL_ERROR => "broken WebSocket framing",
        close::UNSUPPORTED_DATA => "wrong frame type for the encoding",
        close::NO_STATUS => "closed without a status code",
        close::INVALID_PAYLOAD => "the hub could not decode a message",
        close::POLICY => "token revoked or expired; retrying slowly",
        close::TOO_BIG => "message too big",
        close::INTERNAL => "hub internal error",
        close::SUPERSEDED => "another connection with this device id took over (two devices with one identity?); retrying slowly",
        close::PROTOCOL_VIOLATION => "protocol violation",
        close::UNKNOWN_MESSAGE => "unknown message type",
        close::LIVENESS_TIMEOUT => "the hub heard nothing from the device in time",
        close::HELLO_TIMEOUT => "hello timeout",
        close::RECONNECT => "the hub moves the device to another node; reconnecting at once",
        close::RATE_LIMITED => "too many messages per second; retrying after a short wait",
        _ => "unexpected close code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode_postcard;
    use crate::message::{Ack, HubMessage};

    #[test]
    fn frames_decode_or_name_their_close_code() {
        let mut buf = [0u8; 32];
        let ack = HubMessage::Ack(Ack { up_to_seq: 3 });
        let bytes = encode_postcard(&ack, &mut buf).expect("encode");
        assert_eq!(
            decode_frame::<HubMessage>(Encoding::Postcard, DataFrame::Binary(bytes)),
            Ok(ack)
        );
        let refused = |enc, frame| {
            decode_frame::<HubMessage>(enc, frame)
                .map(|_| ())
                .map_err(|r| r.code)
        };
        assert_eq!(
            refused(Encoding::Postcard, DataFrame::Text("{}")),
            Err(close::UNSUPPORTED_DATA)
        );
        assert_eq!(
            refused(Encoding::Json, DataFrame::Binary(&[1])),
            Err(close::UNSUPPORTED_DATA)
        );
        assert_eq!(
            refused(Encoding::Postcard, DataFrame::Binary(&[9])),
            Err(close::UNKNOWN_MESSAGE)
        );
        assert_eq!(
            refused(Encoding::Postcard, DataFrame::Binary(&[1])),
            Err(close::INVALID_PAYLOAD)
        );
        assert_eq!(
            refused(Encoding::Json, DataFrame::Text(r#"{"nope":{}}"#)),
            Err(close::UNKNOWN_MESSAGE)
        );
    }

    #[test]
    fn refused_upgrades_map_to_the_same_backoff_everywhere() {
        for status in [400, 401, 403, 404] {
            assert_eq!(upgrade_refused(status, None), DisconnectCause::Refused);
        }
        assert_eq!(
            upgrade_refused(503, parse_retry_after(" 30 ")),
            DisconnectCause::Unavailable {
                retry_after_ms: 30_000
            }
        );
        assert_eq!(
            upgrade_refused(503, parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT")),
            DisconnectCause::Unavailable {
                retry_after_ms: DEFAULT_RETRY_AFTER_S * 1000
            }
        );
        assert_eq!(
            upgrade_refused(429, Some(2)),
            DisconnectCause::Unavailable {
                retry_after_ms: 2_000
            }
        );
        assert_eq!(upgrade_refused(502, None), DisconnectCause::ConnectFailed);
        assert_eq!(peer_closed(None), DisconnectCause::Closed(1005));
        assert_eq!(close_code(&[0x0f, 0xa0, b'x']), Some(4000));
        assert_eq!(close_code(&[1]), None);
    }
}
