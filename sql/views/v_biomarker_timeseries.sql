-- Every live result as a time series point, in canonical units.
-- Censored values carry their operator (value_canonical is then the bound).
CREATE VIEW v_biomarker_timeseries AS
SELECT user_id,
       COALESCE(catalog_code, biomarker_code) AS biomarker,
       collected_at,
       value_operator,
       value_canonical,
       unit_canonical,
       reference_low_canonical,
       reference_high_canonical,
       loop_status,
       lab,
       revision,
       quality_flags,
       result_id
FROM biomarker_results
WHERE deleted_at IS NULL AND collected_at IS NOT NULL;
