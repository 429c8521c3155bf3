-- Per connected user: grant status and how their syncs are going.
CREATE VIEW v_sync_health AS
SELECT g.user_id,
       g.status AS grant_status,
       g.status_reason AS grant_reason,
       g.consented_at,
       s.last_attempt_at,
       s.last_success_at,
       s.last_complete_at,
       s.last_status,
       s.last_error,
       COALESCE(s.consecutive_failures, 0) AS consecutive_failures,
       COALESCE(s.results_live, 0) AS results_live,
       (SELECT COUNT(*) FROM rejects j WHERE j.user_id = g.user_id) AS rejects
FROM grants g
LEFT JOIN sync_state s ON s.user_id = g.user_id;
