-- Fleet alerts name several accounts: the fleet's evidence (its id, every account, the ones
-- new to this alert, links and shared fingerprints), NULL on per-user alerts.
ALTER TABLE alerts ADD COLUMN fleet JSONB;
-- Finding every fleet alert that named an account, whichever account leads it.
CREATE INDEX alerts_by_fleet_account ON alerts USING GIN ((fleet -> 'accounts'));
