-- What operators set at runtime rather than in definition files: template variables, secrets,
-- API users and the token signing key, one namespace each. Values are JSON.
CREATE TABLE settings (
    namespace   TEXT NOT NULL,
    name        TEXT NOT NULL,
    value       JSONB NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (namespace, name)
);
