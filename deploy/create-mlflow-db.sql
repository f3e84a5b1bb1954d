-- The tracking server's database, beside Optuna's (POSTGRES_DB) in the same PostgreSQL.
CREATE DATABASE mlflow;
