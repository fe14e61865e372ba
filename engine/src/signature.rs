//! Signed webhooks, in Stripe's scheme: a header `t=<unix seconds>,v1=<hex HMAC-SHA256 of
//! "<t>.<body>">`, so a receiver checks both who sent a body and that it is fresh. Switchyard
//! signs its notifications so (`X-Switchyard-Signature`, under the secret
//! `notification_secret`), and checks deliveries to webhook triggers the same way.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header a signed notification carries.
pub const HEADER: &str = "x-switchyard-signature";

/// How far a signature's time may be from the receiver's clock (Stripe's default).
pub const TOLERANCE_SECS: i64 = 300;

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value signing `body` at `timestamp` (unix seconds).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let digest = mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(digest))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature header is not `t=<seconds>,v1=<hex>`")]
    Malformed,
    #[error("the signature's time is more than {TOLERANCE_SECS} s from now")]
    Stale,
    #[error("no signature matches the body")]
    Mismatch,
}

/// Checks `header` against `body` at `now` (unix seconds): its `t` within `tolerance` seconds,
/// and any of its `v1` values (a sender rolling its secret sends several) the HMAC of
/// `"<t>.<body>"`, compared in constant time.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: i64,
    tolerance: i64,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", hex)) => signatures.extend(hex::decode(hex).ok()),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now - timestamp).abs() > tolerance {
        return Err(SignatureError::Stale);
    }
    let expected = mac(secret, timestamp, body);
    if signatures
        .iter()
        .any(|s| expected.clone().verify_slice(s).is_ok())
    {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_body_verifies_and_a_changed_stale_or_foreign_one_does_not() {
        let header = sign(b"whsec", 1_700_000_000, b"{\"a\":1}");
        assert!(header.starts_with("t=1700000000,v1="));
        assert_eq!(
            verify(b"whsec", &header, b"{\"a\":1}", 1_700_000_100, 300),
            Ok(())
        );
        assert_eq!(
            verify(b"whsec", &header, b"{\"a\":2}", 1_700_000_100, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"other", &header, b"{\"a\":1}", 1_700_000_100, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"whsec", &header, b"{\"a\":1}", 1_700_000_301, 300),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(b"whsec", "v1=00", b"", 0, 300),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn any_of_several_signatures_may_match() {
        let good = sign(b"new", 10, b"x");
        let v1 = good.split_once(",v1=").unwrap().1;
        let header = format!("t=10,v1={},v1={v1}", "ab".repeat(32));
        assert_eq!(verify(b"new", &header, b"x", 10, 300), Ok(()));
    }

    #[test]
    fn the_digest_is_hmac_sha256_of_time_dot_body() {
        // From Python: hmac.new(b"key", b"1.body", hashlib.sha256).hexdigest()
        assert_eq!(
            sign(b"key", 1, b"body"),
            "t=1,v1=91b5374b153842ad05b2c4eab9349b8321b14703165bd3fb8b034dfb8be98ae5"
        );
    }
}
