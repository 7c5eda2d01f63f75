-- What fulfilment found: the amount and currency Stripe says were paid, the time credited for
-- them (never more than was paid for), and, when they differ from what was priced, why.
ALTER TABLE payment_history ADD COLUMN paid_cents INTEGER;
ALTER TABLE payment_history ADD COLUMN paid_currency TEXT;
ALTER TABLE payment_history ADD COLUMN credited_ms INTEGER;
ALTER TABLE payment_history ADD COLUMN mismatch TEXT;
