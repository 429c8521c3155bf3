-- The latest live result per user and biomarker, by specimen time.
-- One row per (user_id, biomarker): biomarker is the catalog code, or Loop's code when the
-- catalog does not know it. Values in unit_canonical; value_source/unit_source as sent.
CREATE VIEW v_latest_biomarkers AS
SELECT user_id, biomarker, result_id, biomarker_name, loinc, collected_at, value_operator,
       value_canonical, unit_canonical, value_source, unit_source, value_text,
       reference_low_canonical, reference_high_canonical, loop_status, quality_flags
FROM (
    SELECT r.*,
           COALESCE(r.catalog_code, r.biomarker_code) AS biomarker,
           ROW_NUMBER() OVER (
               PARTITION BY r.user_id, COALESCE(r.catalog_code, r.biomarker_code)
               ORDER BY r.collected_at DESC, r.parsed_at DESC, r.result_id DESC
           ) AS rank_in_biomarker
    FROM biomarker_results r
    WHERE r.deleted_at IS NULL AND r.collected_at IS NOT NULL
) ranked
WHERE rank_in_biomarker = 1;
