//! Who may do what: roles, signed bearer tokens (`tokens.rs`: JWT, HS256, signing keys that
//! rotate, revocation) and users with argon2 password hashes (`passwords.rs`: hashed on a few
//! dedicated threads). The CLI issues tokens and adds users with the same code the API checks
//! them with.
//!
//! Users live in the `users` settings namespace; the signing keys in `system`, encrypted under the
//! master key (`crate::keys`), generated once by whichever process needs them first unless
//! `SWITCHYARD_JWT_SECRET` provides one.

mod passwords;
mod tokens;

use serde::{Deserialize, Serialize};

pub use passwords::{
    User, UserSession, check_password, delete_user, put_user, session_stands, users,
};
pub use tokens::{Claims, KeySet, MAX_TTL, TokenKeys};

use crate::keys::KeyError;
use crate::store::StoreError;

pub(crate) const USERS: &str = "users";
pub(crate) const SYSTEM: &str = "system";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the token is missing, malformed, forged or expired")]
    InvalidToken,
    #[error("this token was revoked")]
    Revoked,
    #[error("unknown user or wrong password")]
    BadCredentials,
    #[error(
        "the signing secret must be at least {} bytes",
        tokens::MIN_SECRET_BYTES
    )]
    WeakSecret,
    #[error("{0}")]
    InvalidUser(String),
    #[error("a token lives at most 365 days")]
    TtlTooLong,
    /// Every password-hashing thread is busy and the queue is full or too slow.
    #[error("too many logins at once; retry in a second")]
    Busy,
    #[error("{0}")]
    Signing(String),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a caller may do: viewer, operator and admin each can do everything the ones before it
/// can; webhook stands apart.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Role {
    /// A sender of webhooks (n8n's Header Auth credential): delivers events and answers
    /// waiting steps, and nothing else, not even reading.
    Webhook,
    /// Reads workflows, runs, fires and events.
    Viewer,
    /// Also starts, cancels and retries runs and pauses schedules.
    Operator,
    /// Also changes definitions, variables, secrets, users and tokens.
    Admin,
}

impl Role {
    pub fn allows(self, needed: Role) -> bool {
        match (self, needed) {
            (Role::Webhook, needed) => needed == Role::Webhook,
            // Whoever may start runs may deliver what starts them.
            (_, Role::Webhook) => self >= Role::Operator,
            _ => self >= needed,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Every role's name.
    pub fn names() -> &'static [&'static str] {
        <Role as strum::VariantNames>::VARIANTS
    }

    /// Whether a user (who logs in) may hold it: a webhook key is a token only.
    pub fn for_users(self) -> bool {
        self != Role::Webhook
    }
}

/// Who did something from the command line, for the audit log: `cli:<OS user>`.
pub fn cli_actor() -> String {
    match std::env::var("USER") {
        Ok(user) if !user.is_empty() => format!("cli:{user}"),
        _ => "cli".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_include_the_ones_below() {
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Operator));
        assert!(!Role::Operator.allows(Role::Admin));
    }

    #[test]
    fn a_webhook_key_delivers_webhooks_and_nothing_else() {
        assert!(Role::Webhook.allows(Role::Webhook));
        assert!(!Role::Webhook.allows(Role::Viewer));
        assert!(Role::Operator.allows(Role::Webhook));
        assert!(Role::Admin.allows(Role::Webhook));
        assert!(!Role::Viewer.allows(Role::Webhook));
        assert_eq!("webhook".parse::<Role>(), Ok(Role::Webhook));
        assert_eq!(Role::Operator.to_string(), "operator");
    }
}
