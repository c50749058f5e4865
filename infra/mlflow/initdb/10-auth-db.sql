-- The auth app's users and permissions live in their own database: its schema migrations are separate from the
-- tracking store's. Run once by the postgres image on an empty data volume, as POSTGRES_USER (who owns it).
CREATE DATABASE mlflow_auth;
