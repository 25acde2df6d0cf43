-- API keys. Only a SHA-256 digest of each key is stored: a leaked table does not leak usable keys.
CREATE TABLE api_keys (
    key_sha256  bytea       PRIMARY KEY CHECK (octet_length(key_sha256) = 32),
    label       text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
