-- Live results outside their reference range, or flagged low/high/critical by Loop.
-- direction: below, above, or flagged (Loop's flag without a comparable range).
-- A censored value counts only when its bound proves it: "<2" with a low limit of 3 is
-- below; ">2" with a low limit of 3 is not known to be.
CREATE VIEW v_out_of_range AS
SELECT user_id, biomarker, collected_at, value_operator, value_canonical, unit_canonical,
       reference_low_canonical, reference_high_canonical, loop_status,
       CASE WHEN is_below = 1 THEN 'below' WHEN is_above = 1 THEN 'above' ELSE 'flagged' END
           AS direction,
       result_id
FROM (
    SELECT r.*,
           COALESCE(r.catalog_code, r.biomarker_code) AS biomarker,
           CASE WHEN r.value_canonical < r.reference_low_canonical
                     AND COALESCE(r.value_operator, '<') IN ('<', '<=')
                THEN 1 ELSE 0 END AS is_below,
           CASE WHEN r.value_canonical > r.reference_high_canonical
                     AND COALESCE(r.value_operator, '>') IN ('>', '>=')
                THEN 1 ELSE 0 END AS is_above
    FROM biomarker_results r
    WHERE r.deleted_at IS NULL
) compared
WHERE is_below = 1 OR is_above = 1 OR loop_status IN ('low', 'high', 'critical');
