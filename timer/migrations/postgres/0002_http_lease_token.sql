-- The claim token of an HTTP task's lease: fences outcomes across re-insertions and RetryTx.
ALTER TABLE troupe_timers ADD COLUMN lease TEXT NOT NULL DEFAULT '';
