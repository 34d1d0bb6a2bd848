-- A confirmed reservation whose resource has been used and given back (an
-- agent back from a delivery) is recorded released (Reserver.ReleaseTx).
ALTER TABLE troupe_reservations DROP CONSTRAINT troupe_reservations_state_check;
ALTER TABLE troupe_reservations ADD CONSTRAINT troupe_reservations_state_check
    CHECK (state IN ('held', 'confirmed', 'cancelled', 'expired', 'refused', 'released'));
