-- Tokens revoked before they expire (DELETE /api/admin/tokens/{jti}, `switchyard token revoke`).
-- Every process reads the list at most a second old; a row goes once its token would have
-- expired.
CREATE TABLE revoked_tokens (
    jti         TEXT PRIMARY KEY,
    expires_at  INTEGER NOT NULL,
    revoked_at  INTEGER NOT NULL,
    revoked_by  TEXT NOT NULL
);
CREATE INDEX revoked_tokens_by_expiry ON revoked_tokens (expires_at);

-- Who changed a definition, variable, secret, user, token or key, and when (GET
-- /api/admin/audit), written in the transaction of the change where the store allows it. Never a
-- secret's value or a password. Pruned after 90 days.
CREATE TABLE audit_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE INDEX audit_log_by_at ON audit_log (at);
