-- What operators set at runtime rather than in definition files: template variables, secrets,
-- API users and the token signing key, one namespace each. Values are JSON text.
CREATE TABLE settings (
    namespace   TEXT NOT NULL,
    name        TEXT NOT NULL,
    value       TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (namespace, name)
);
