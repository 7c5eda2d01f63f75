-- Every node learns of a license change made anywhere within a second (LISTEN/NOTIFY): a change
-- that is not a flush's usage is announced on the channel `tollgate_licenses`, with the
-- license's id as the payload, when its transaction commits. That is a new license, a credit,
-- debit, payment or refund (the balance moves without the used time moving the other way), a
-- revocation, a rotation, a plan or expiry change. A flush moves balance_ms and used_ms by the
-- same amount in opposite directions, so usage announces nothing.
CREATE FUNCTION tollgate_license_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT'
       OR NEW.balance_ms + NEW.used_ms IS DISTINCT FROM OLD.balance_ms + OLD.used_ms
       OR (NEW.status, NEW.key_hash, NEW.plan, NEW.expires_at)
          IS DISTINCT FROM (OLD.status, OLD.key_hash, OLD.plan, OLD.expires_at) THEN
        PERFORM pg_notify('tollgate_licenses', NEW.id::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER licenses_announce_changes AFTER INSERT OR UPDATE ON licenses
    FOR EACH ROW EXECUTE FUNCTION tollgate_license_changed();
