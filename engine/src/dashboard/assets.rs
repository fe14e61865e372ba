//! The dashboard's browser files, embedded in the binary: ours (`static/`) and the vendored
//! packages' (`vendor/`, reproduced from its lockfile by `scripts/vendor-dashboard-assets.sh`).
//! Each is served under a path naming a hash of its bytes, so it can be cached for a year: a
//! new binary with other bytes names another path.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// A file the pages load.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "htmx.min.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("vendor/htmx.min.js"),
    },
    Asset {
        name: "uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("vendor/uPlot.iife.min.js"),
    },
    Asset {
        name: "uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("vendor/uPlot.min.css"),
    },
    Asset {
        name: "dashboard.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("static/dashboard.js"),
    },
    Asset {
        name: "dashboard.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("static/dashboard.css"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        bytes: include_bytes!("static/favicon.svg"),
    },
];

/// The first 12 hex digits of each asset's SHA-256, in the order of [`ASSETS`].
fn hashes() -> &'static [String] {
    static HASHES: OnceLock<Vec<String>> = OnceLock::new();
    HASHES.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| hex::encode(&Sha256::digest(a.bytes)[..6]))
            .collect()
    })
}

/// Where a page loads the asset `name` from: `/assets/<hash>/<name>`.
pub(super) fn url(name: &str) -> String {
    let at = ASSETS
        .iter()
        .position(|a| a.name == name)
        .unwrap_or_else(|| panic!("no dashboard asset {name}"));
    format!("/assets/{}/{name}", hashes()[at])
}

/// `GET /assets/{hash}/{name}`: the file, cached for a year when the hash is its own; another
/// hash (a page from an older binary) still gets the file, uncached.
pub(super) async fn serve(Path((hash, name)): Path<(String, String)>) -> Response {
    let Some(at) = ASSETS.iter().position(|a| a.name == name) else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    let asset = &ASSETS[at];
    let cache = if hashes()[at] == hash {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
        ],
        asset.bytes,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_has_a_distinct_versioned_url() {
        let urls: std::collections::BTreeSet<_> = ASSETS.iter().map(|a| url(a.name)).collect();
        assert_eq!(urls.len(), ASSETS.len());
        for u in urls {
            assert!(
                u.starts_with("/assets/") && u.split('/').count() == 4,
                "{u}"
            );
        }
    }
}
