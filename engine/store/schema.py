"""All DDL of the RankScope cache database, as numbered, append-only migrations.

`SCHEMA_VERSION` is the newest version this code understands. A database is brought up to it by
applying the missing migrations in order; a database whose version is higher was written by a newer
RankScope and is refused (see `Store`). Never edit a released migration: append a new one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "models, texts, arrays, calibrations, spectra, evaluations",
        (
            """CREATE TABLE schema_meta (
                key VARCHAR PRIMARY KEY,
                value VARCHAR NOT NULL
            )""",
            # Memo of file content hashes, so large weight files are hashed once.
            """CREATE TABLE file_hashes (
                path VARCHAR PRIMARY KEY,
                size BIGINT NOT NULL,
                mtime_ns BIGINT NOT NULL,
                sha256 VARCHAR NOT NULL
            )""",
            """CREATE TABLE models (
                fingerprint VARCHAR PRIMARY KEY,
                model_id VARCHAR NOT NULL,
                model_type VARCHAR NOT NULL,
                path VARCHAR NOT NULL,
                n_layers INTEGER NOT NULL,
                config_json VARCHAR NOT NULL,
                created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
            )""",
            """CREATE TABLE texts (
                fingerprint VARCHAR PRIMARY KEY,
                name VARCHAR NOT NULL,
                source VARCHAR NOT NULL,
                n_chars BIGINT NOT NULL,
                created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
            )""",
            # Large arrays live in safetensors files under cache/arrays; this is their index.
            """CREATE TABLE arrays (
                array_id VARCHAR PRIMARY KEY,
                kind VARCHAR NOT NULL,
                relpath VARCHAR NOT NULL,
                n_bytes BIGINT NOT NULL,
                sha256 VARCHAR NOT NULL,
                created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
            )""",
            """CREATE TABLE calibrations (
                calibration_id VARCHAR PRIMARY KEY,
                model_fingerprint VARCHAR NOT NULL,
                text_fingerprint VARCHAR NOT NULL,
                window_len INTEGER NOT NULL,
                n_windows INTEGER NOT NULL,
                n_groups INTEGER NOT NULL,
                add_bos BOOLEAN NOT NULL,
                n_tokens BIGINT NOT NULL,
                array_id VARCHAR NOT NULL,
                seconds DOUBLE NOT NULL,
                created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
            )""",
            """CREATE TABLE weight_spectra (
                model_fingerprint VARCHAR NOT NULL,
                layer INTEGER NOT NULL,
                linear_type VARCHAR NOT NULL,
                d_out INTEGER NOT NULL,
                d_in INTEGER NOT NULL,
                singular_values DOUBLE[] NOT NULL,
                PRIMARY KEY (model_fingerprint, layer, linear_type)
            )""",
            """CREATE TABLE feature_spectra (
                calibration_id VARCHAR NOT NULL,
                covariance VARCHAR NOT NULL,
                layer INTEGER NOT NULL,
                linear_type VARCHAR NOT NULL,
                d_out INTEGER NOT NULL,
                d_in INTEGER NOT NULL,
                eigenvalues DOUBLE[] NOT NULL,
                PRIMARY KEY (calibration_id, covariance, layer, linear_type)
            )""",
            """CREATE TABLE evaluations (
                evaluation_id VARCHAR PRIMARY KEY,
                model_fingerprint VARCHAR NOT NULL,
                text_fingerprint VARCHAR NOT NULL,
                window_len INTEGER NOT NULL,
                n_windows INTEGER NOT NULL,
                add_bos BOOLEAN NOT NULL,
                perplexity DOUBLE NOT NULL,
                mean_nll DOUBLE NOT NULL,
                n_tokens BIGINT NOT NULL,
                window_nll DOUBLE[] NOT NULL,
                seconds DOUBLE NOT NULL,
                created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
            )""",
        ),
    ),
    Migration(
        2,
        "factorisations, reference distributions, sensitivity points",
        (
            # calibration_id is '' for data-free methods
            """CREATE TABLE factorizations (
                factorization_id VARCHAR PRIMARY KEY,
                model_fingerprint VARCHAR NOT NULL,
                method VARCHAR NOT NULL,
                calibration_id VARCHAR NOT NULL,
                array_id VARCHAR NOT NULL,
                seconds DOUBLE NOT NULL,
                created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
            )""",
            # the original model's next-token distribution on an evaluation set (top-k + tail mass)
            """CREATE TABLE reference_distributions (
                reference_id VARCHAR PRIMARY KEY,
                model_fingerprint VARCHAR NOT NULL,
                text_fingerprint VARCHAR NOT NULL,
                window_len INTEGER NOT NULL,
                n_windows INTEGER NOT NULL,
                top_k INTEGER NOT NULL,
                array_id VARCHAR NOT NULL,
                perplexity DOUBLE NOT NULL,
                seconds DOUBLE NOT NULL,
                created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
            )""",
            # layer = -1 means "this type in every layer"
            """CREATE TABLE sensitivity_points (
                sweep_id VARCHAR NOT NULL,
                linear_type VARCHAR NOT NULL,
                layer INTEGER NOT NULL,
                ratio DOUBLE NOT NULL,
                decoder_params BIGINT NOT NULL,
                perplexity DOUBLE NOT NULL,
                kl_forward DOUBLE NOT NULL,
                kl_reverse DOUBLE NOT NULL,
                seconds DOUBLE NOT NULL,
                created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
                PRIMARY KEY (sweep_id, linear_type, layer, ratio)
            )""",
            """CREATE TABLE sweeps (
                sweep_id VARCHAR PRIMARY KEY,
                model_fingerprint VARCHAR NOT NULL,
                method VARCHAR NOT NULL,
                factorization_id VARCHAR NOT NULL,
                reference_id VARCHAR NOT NULL,
                settings_json VARCHAR NOT NULL,
                created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
            )""",
        ),
    ),
    Migration(
        3,
        "search studies and trials; exports",
        (
            """CREATE TABLE studies (
                study_id VARCHAR PRIMARY KEY,
                name VARCHAR NOT NULL,
                model_fingerprint VARCHAR NOT NULL,
                settings_json VARCHAR NOT NULL,
                state VARCHAR NOT NULL,
                validation_json VARCHAR,
                message VARCHAR,
                created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
                updated_at TIMESTAMP NOT NULL DEFAULT current_timestamp
            )""",
            # finished trials are immutable: written once, never updated
            """CREATE TABLE trials (
                study_id VARCHAR NOT NULL,
                number INTEGER NOT NULL,
                kind VARCHAR NOT NULL,
                label VARCHAR NOT NULL,
                trial_json VARCHAR NOT NULL,
                objective DOUBLE NOT NULL,
                perplexity DOUBLE NOT NULL,
                kl_forward DOUBLE NOT NULL,
                kl_reverse DOUBLE NOT NULL,
                decoder_params BIGINT NOT NULL,
                seconds DOUBLE NOT NULL,
                created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
                PRIMARY KEY (study_id, number)
            )""",
            # re-measurements of chosen plans on the full evaluation text
            """CREATE TABLE study_results (
                study_id VARCHAR NOT NULL,
                label VARCHAR NOT NULL,
                result_json VARCHAR NOT NULL,
                created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
                PRIMARY KEY (study_id, label)
            )""",
            """CREATE TABLE exports (
                export_id VARCHAR PRIMARY KEY,
                model_fingerprint VARCHAR NOT NULL,
                path VARCHAR NOT NULL,
                report_json VARCHAR NOT NULL,
                created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
            )""",
        ),
    ),
    Migration(
        4,
        "a fast checksum of every array file, checked on every read; who runs a study",
        (
            # xxh3-64 of the file, checked on every read (sha256 stays for rows written before it)
            "ALTER TABLE arrays ADD COLUMN xxh3 VARCHAR",
            # {"pid", "host", "started_at"} of the process running a study, null when none does
            "ALTER TABLE studies ADD COLUMN owner_json VARCHAR",
        ),
    ),
    Migration(
        5,
        "reference distributions as final hidden states (exact KL)",
        (
            # 'top-k': top-k log-probabilities plus a tail bucket (before 0.2); 'final-hidden': the LM head's input
            "ALTER TABLE reference_distributions ADD COLUMN kind VARCHAR NOT NULL DEFAULT 'top-k'",
        ),
    ),
    Migration(
        6,
        "recovery runs (subspace post-training, basis selection) and their trained vectors",
        (
            """CREATE TABLE recovery_runs (
                run_id VARCHAR PRIMARY KEY,
                model_fingerprint VARCHAR NOT NULL,
                kind VARCHAR NOT NULL,
                base_plan_json VARCHAR NOT NULL,
                settings_json VARCHAR NOT NULL,
                result_json VARCHAR NOT NULL,
                steps INTEGER NOT NULL,
                tokens BIGINT NOT NULL,
                seconds DOUBLE NOT NULL,
                peak_rss_bytes BIGINT NOT NULL,
                array_id VARCHAR NOT NULL,
                created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
            )""",
        ),
    ),
    Migration(
        7,
        "kept MLP channels of search trials that prune (LoRAP-style allocation)",
        (
            # {MLP path: kept channels or null}; null for a trial that prunes nothing (every trial before this)
            "ALTER TABLE trials ADD COLUMN channels_json VARCHAR",
        ),
    ),
)

SCHEMA_VERSION: int = MIGRATIONS[-1].version
