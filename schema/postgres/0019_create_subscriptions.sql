-- As schema/0024_create_subscriptions.sql: plans sold as Stripe subscriptions, their paid
-- invoices, and where a license's plan periods are counted from.
CREATE TABLE subscriptions (
    id                   text    PRIMARY KEY,
    license_id           bigint  NOT NULL REFERENCES licenses (id),
    customer_id          text,
    plan                 text    NOT NULL,
    status               text    NOT NULL,
    period_start         bigint,
    period_end           bigint,
    cancel_at_period_end bigint  NOT NULL DEFAULT 0,
    grace_until          bigint,
    ends_at              bigint,
    event_at             bigint  NOT NULL DEFAULT 0,
    created_at           bigint  NOT NULL,
    updated_at           bigint  NOT NULL
);
CREATE INDEX subscriptions_license ON subscriptions (license_id, updated_at);
CREATE INDEX subscriptions_ending ON subscriptions (ends_at) WHERE ends_at IS NOT NULL;

CREATE TABLE subscription_invoices (
    id              text    PRIMARY KEY,
    subscription_id text    NOT NULL,
    license_id      bigint  NOT NULL REFERENCES licenses (id),
    payment_intent  text,
    amount_cents    bigint  NOT NULL,
    currency        text    NOT NULL,
    period_start    bigint  NOT NULL,
    period_end      bigint  NOT NULL,
    paid_at         bigint  NOT NULL
);
CREATE INDEX subscription_invoices_intent ON subscription_invoices (payment_intent);

CREATE TABLE subscription_checkouts (
    session_id text   PRIMARY KEY,
    license_id bigint NOT NULL REFERENCES licenses (id),
    plan       text   NOT NULL,
    url        text   NOT NULL,
    expires_at bigint NOT NULL,
    created_at bigint NOT NULL
);
CREATE INDEX subscription_checkouts_license ON subscription_checkouts (license_id, expires_at);

ALTER TABLE plans ADD COLUMN included_ms bigint;
ALTER TABLE plans ADD COLUMN price_cents bigint;
ALTER TABLE plans ADD COLUMN price_interval text;

ALTER TABLE licenses ADD COLUMN period_anchor bigint;

-- A new billing period is a change every node must hear of (its plan periods start again).
CREATE OR REPLACE FUNCTION tollgate_license_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT'
       OR NEW.balance_ms + NEW.used_ms IS DISTINCT FROM OLD.balance_ms + OLD.used_ms
       OR (NEW.status, NEW.key_hash, NEW.plan, NEW.expires_at, NEW.keys_version,
           NEW.period_anchor)
          IS DISTINCT FROM (OLD.status, OLD.key_hash, OLD.plan, OLD.expires_at, OLD.keys_version,
           OLD.period_anchor)
    THEN
        PERFORM pg_notify('tollgate_licenses', NEW.id::text);
    END IF;
    RETURN NULL;
END
$$;
