//! `with.auth` of an `http` step: how a request proves who sends it. A bearer token, Basic
//! credentials or a header of the author's choosing are fixed per step; an HMAC of the body and
//! AWS Signature V4 are computed over the request as it goes out, so they are made for each hop
//! (and not at all for a hop to another origin, which gets no credentials).
//!
//! Every value here may hold secret references: each is revealed as it is used, and whatever
//! carries a secret is noted as sent, so an echo of it is redacted from outputs, errors and logs.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use reqwest::Url;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use schemars::JsonSchema;
use serde::Deserialize;
use sha2::{Sha256, Sha512};
use switchyard_engine::definition::Secrets;
use switchyard_engine::state::StepFailure;

/// `with.auth`: one of these, by its key.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum Auth {
    /// `Authorization: Bearer TOKEN`.
    Bearer(String),
    /// `Authorization: Basic base64(username:password)`, encoded once the secrets are resolved.
    Basic { username: String, password: String },
    /// One header with a credential in it, such as `{name: X-Api-Key, value: ...}`.
    Header { name: String, value: String },
    /// An HMAC of the request body under `secret`, in `header`: GitHub's and Shopify's webhooks,
    /// many payment APIs.
    Hmac {
        secret: String,
        /// The header the signature goes in, such as `X-Signature`.
        header: String,
        #[serde(default)]
        algorithm: HmacAlgorithm,
        /// How the signature is written: `hex` (the default) or `base64`.
        #[serde(default)]
        encoding: SignatureEncoding,
        /// Text before the signature, such as `sha256=`.
        #[serde(default)]
        prefix: String,
    },
    /// AWS Signature Version 4 (Amazon's APIs: the Product Advertising API, S3, ...), signed
    /// over the method, URL, headers and body as sent.
    AwsSigv4 {
        /// The signing name of the service, such as `ProductAdvertisingAPI` or `s3`.
        service: String,
        region: String,
        access_key: String,
        secret_key: String,
        /// For temporary credentials.
        session_token: Option<String>,
    },
}

#[derive(Debug, Default, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum HmacAlgorithm {
    #[default]
    Sha256,
    Sha512,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum SignatureEncoding {
    #[default]
    Hex,
    Base64,
}

/// What one request of an `http` step is, as far as its signature covers it.
pub(super) struct Outgoing<'a> {
    pub method: &'a str,
    pub url: &'a Url,
    /// Every header the request is sent with, those an AWS signature covers among them.
    pub headers: &'a HeaderMap,
    /// The body's bytes; `None` for a body streamed as it is sent (multipart), which an HMAC
    /// cannot cover and an AWS signature covers as `UNSIGNED-PAYLOAD`.
    pub body: Option<&'a [u8]>,
    pub at: SystemTime,
}

fn invalid(message: impl Into<String>) -> StepFailure {
    StepFailure::permanent("invalid_parameters", message)
}

impl Auth {
    /// The headers that carry this step's credentials for `request`. Each carries a secret, or
    /// was made from one.
    pub fn headers(
        &self,
        secrets: &Secrets,
        request: &Outgoing<'_>,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, StepFailure> {
        let reveal = |text: &str, field: &str| {
            secrets
                .reveal(text)
                .map_err(|e| invalid(format!("http step: `with.auth.{field}`: {e}")))
        };
        let value = |text: String, what: &str| {
            secrets.note_sent(&text);
            // The value holds a secret: name only where it goes.
            HeaderValue::from_str(&text).map_err(|_| {
                invalid(format!(
                    "http step: `with.auth.{what}` is not a valid header value"
                ))
            })
        };
        let header = |name: &str, field: &str| {
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                invalid(format!(
                    "http step: `with.auth.{field}`: bad header name {name:?}"
                ))
            })
        };
        Ok(match self {
            Auth::Bearer(token) => vec![(
                AUTHORIZATION,
                value(format!("Bearer {}", reveal(token, "bearer")?), "bearer")?,
            )],
            Auth::Basic { username, password } => {
                let pair = format!(
                    "{}:{}",
                    reveal(username, "basic.username")?,
                    reveal(password, "basic.password")?
                );
                let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
                vec![(AUTHORIZATION, value(format!("Basic {encoded}"), "basic")?)]
            }
            Auth::Header { name, value: text } => vec![(
                header(name, "header.name")?,
                value(reveal(text, "header.value")?, "header.value")?,
            )],
            Auth::Hmac {
                secret,
                header: name,
                algorithm,
                encoding,
                prefix,
            } => {
                let body = request.body.ok_or_else(|| {
                    invalid("http step: `with.auth.hmac` signs the body's bytes: it cannot sign a multipart body")
                })?;
                let key = reveal(secret, "hmac.secret")?;
                let digest = hmac_digest(*algorithm, key.as_bytes(), body);
                let signature = match encoding {
                    SignatureEncoding::Hex => hex::encode(digest),
                    SignatureEncoding::Base64 => {
                        base64::engine::general_purpose::STANDARD.encode(digest)
                    }
                };
                vec![(
                    header(name, "hmac.header")?,
                    value(format!("{prefix}{signature}"), "hmac")?,
                )]
            }
            Auth::AwsSigv4 {
                service,
                region,
                access_key,
                secret_key,
                session_token,
            } => {
                let credentials = Credentials::new(
                    reveal(access_key, "aws_sigv4.access_key")?,
                    reveal(secret_key, "aws_sigv4.secret_key")?,
                    session_token
                        .as_deref()
                        .map(|t| reveal(t, "aws_sigv4.session_token"))
                        .transpose()?,
                    None,
                    "switchyard",
                );
                aws_sigv4_headers(credentials, service, region, request)?
                    .into_iter()
                    .map(|(name, text)| {
                        // The date it adds is no secret, and redacting it would blank every
                        // timestamp alike in the answer.
                        if name == "authorization" || name == "x-amz-security-token" {
                            secrets.note_sent(&text);
                        }
                        Ok((
                            header(&name, "aws_sigv4")?,
                            HeaderValue::from_str(&text).map_err(|_| {
                                invalid("http step: `with.auth.aws_sigv4` made a header that is not valid")
                            })?,
                        ))
                    })
                    .collect::<Result<_, StepFailure>>()?
            }
        })
    }
}

fn hmac_digest(algorithm: HmacAlgorithm, key: &[u8], body: &[u8]) -> Vec<u8> {
    // Any key length is valid for HMAC.
    match algorithm {
        HmacAlgorithm::Sha256 => {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
            mac.update(body);
            mac.finalize().into_bytes().to_vec()
        }
        HmacAlgorithm::Sha512 => {
            let mut mac = Hmac::<Sha512>::new_from_slice(key).expect("HMAC takes any key");
            mac.update(body);
            mac.finalize().into_bytes().to_vec()
        }
    }
}

/// The headers AWS Signature V4 adds to `request` (`x-amz-date`, `authorization`, and
/// `x-amz-security-token` with a session token), as names and values.
pub(super) fn aws_sigv4_headers(
    credentials: Credentials,
    service: &str,
    region: &str,
    request: &Outgoing<'_>,
) -> Result<Vec<(String, String)>, StepFailure> {
    let identity = credentials.into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(request.at)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| invalid(format!("http step: `with.auth.aws_sigv4`: {e}")))?
        .into();
    let headers = request
        .headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
    let body = match request.body {
        Some(bytes) => SignableBody::Bytes(bytes),
        None => SignableBody::UnsignedPayload,
    };
    let signable = SignableRequest::new(request.method, request.url.as_str(), headers, body)
        .map_err(|e| invalid(format!("http step: `with.auth.aws_sigv4`: {e}")))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| invalid(format!("http step: `with.auth.aws_sigv4`: {e}")))?
        .into_parts();
    Ok(instructions
        .headers()
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn outgoing<'a>(url: &'a Url, headers: &'a HeaderMap, body: &'a [u8]) -> Outgoing<'a> {
        Outgoing {
            method: "POST",
            url,
            headers,
            body: Some(body),
            at: SystemTime::UNIX_EPOCH,
        }
    }

    fn auth(value: serde_json::Value) -> Auth {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn basic_auth_encodes_the_resolved_credentials() {
        let url = Url::parse("http://example.com/").unwrap();
        let headers = HeaderMap::new();
        let made = auth(json!({ "basic": { "username": "ann", "password": "pw" } }))
            .headers(&Secrets::default(), &outgoing(&url, &headers, b""))
            .unwrap();
        assert_eq!(
            made,
            vec![(AUTHORIZATION, HeaderValue::from_static("Basic YW5uOnB3"))]
        );
    }

    /// GitHub's documented example: secret "It's a Secret to Everybody", body "Hello, World!".
    #[test]
    fn hmac_signs_the_body_as_github_documents_it() {
        let url = Url::parse("http://example.com/").unwrap();
        let headers = HeaderMap::new();
        let made = auth(json!({ "hmac": {
            "secret": "It's a Secret to Everybody",
            "header": "X-Hub-Signature-256",
            "prefix": "sha256="
        } }))
        .headers(
            &Secrets::default(),
            &outgoing(&url, &headers, b"Hello, World!"),
        )
        .unwrap();
        assert_eq!(made[0].0.as_str(), "x-hub-signature-256");
        assert_eq!(
            made[0].1,
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn an_unknown_auth_or_field_is_refused() {
        assert!(serde_json::from_value::<Auth>(json!({ "digest": "x" })).is_err());
        assert!(
            serde_json::from_value::<Auth>(
                json!({ "hmac": { "secret": "s", "header": "h", "salt": 1 } })
            )
            .is_err()
        );
        assert!(
            serde_json::from_value::<Auth>(
                json!({ "hmac": { "secret": "s", "header": "h", "algorithm": "md5" } })
            )
            .is_err()
        );
    }
}

/// AWS Signature V4 against botocore, the reference implementation: the same request at the same
/// time must carry the same `Authorization`, byte for byte.
#[cfg(test)]
mod botocore {
    use super::*;
    use serde_json::{Value, json};
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    /// botocore's headers for `request`, or `None` where Python or botocore is missing.
    fn botocore_signs(request: &Value) -> Option<Value> {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/botocore_sigv4.py"
        );
        let mut child = Command::new("python3")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(request.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains("No module named 'botocore'"),
                "botocore failed: {stderr}"
            );
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).unwrap())
    }

    fn compare(session_token: Option<&str>) {
        // Amazon's Product Advertising API 5 `SearchItems`, as its scratchpad sends it.
        let body = r#"{"Keywords":"microphone","Resources":["ItemInfo.Title","Offers.Listings.Price"],"PartnerTag":"switchyard-20","PartnerType":"Associates","Marketplace":"www.amazon.com"}"#;
        let headers = [
            ("host", "webservices.amazon.com"),
            ("content-type", "application/json; charset=utf-8"),
            ("content-encoding", "amz-1.0"),
            (
                "x-amz-target",
                "com.amazon.paapi5.v1.ProductAdvertisingAPIv1.SearchItems",
            ),
            ("idempotency-key", "run:step"),
        ];
        let url = "https://webservices.amazon.com/paapi5/searchitems";
        let at = 1_780_000_000;
        let request = json!({
            "method": "POST",
            "url": url,
            "body": body,
            "headers": headers.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "access_key": "AKIAIOSFODNN7EXAMPLE",
            "secret_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "session_token": session_token,
            "service": "ProductAdvertisingAPI",
            "region": "us-east-1",
            "at": at,
        });
        let Some(reference) = botocore_signs(&request) else {
            switchyard_engine::testing::skipped(
                "SWITCHYARD_REQUIRE_BOTOCORE",
                "no botocore to compare SigV4 with: `pip install botocore` (.ci/run installs it)",
            );
            return;
        };
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(name, HeaderValue::from_static(value));
        }
        let auth: Auth = serde_json::from_value(json!({ "aws_sigv4": {
            "service": "ProductAdvertisingAPI",
            "region": "us-east-1",
            "access_key": "AKIAIOSFODNN7EXAMPLE",
            "secret_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "session_token": session_token,
        } }))
        .unwrap();
        let url = Url::parse(url).unwrap();
        let made = auth
            .headers(
                &Secrets::default(),
                &Outgoing {
                    method: "POST",
                    url: &url,
                    headers: &map,
                    body: Some(body.as_bytes()),
                    at: SystemTime::UNIX_EPOCH + Duration::from_secs(at),
                },
            )
            .unwrap();
        let ours = |name: &str| {
            made.iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            ours("authorization").as_deref(),
            reference["authorization"].as_str()
        );
        assert_eq!(
            ours("x-amz-date").as_deref(),
            reference["x-amz-date"].as_str()
        );
        assert_eq!(
            ours("x-amz-security-token").as_deref(),
            reference["x-amz-security-token"].as_str()
        );
    }

    #[test]
    fn aws_sigv4_matches_botocore_byte_for_byte_on_a_pa_api_search() {
        compare(None);
    }

    #[test]
    fn aws_sigv4_with_a_session_token_matches_botocore() {
        compare(Some("FwoGZXIvYXdzEXAMPLETOKEN"));
    }
}
